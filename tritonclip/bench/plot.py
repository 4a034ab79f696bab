"""PNG plots of a benchmark result, one per (family of gradient sets, dtype), one column per
operation: time (top) and GB/s (bottom). The sweeps (one tensor of growing size, many small
tensors of growing count) are lines over the measured points; the models, unrelated sets,
are grouped bars."""

from __future__ import annotations

import math
import os
import textwrap

import matplotlib

from . import report
from .cases import OPS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

FAMILIES = ("one-tensor", "many-small", "model")
# Fixed colours per implementation, the same in every plot (matplotlib's tab10 order).
COLORS = {"tritonclip": "tab:green", "torch-foreach": "tab:blue", "torch-loop": "tab:orange",
          "optimizer-only": "tab:gray", "torch-compile": "tab:purple",
          "tritonclip-compile": "tab:olive"}
PANEL_WIDTH_IN = 4.2
# The copy bandwidth line is drawn where some bar or point reaches this fraction of it.
COPY_LINE_MIN_FRACTION = 0.1
# A suptitle of 10 pt holds about this many characters per inch of figure width (DejaVu
# Sans averages ~0.55 em per character): wrapping there keeps a one-panel title whole.
TITLE_CHARS_PER_INCH = 12


def plot_results(result: dict, out: str) -> list[str]:
    """Write ``<family>-<dtype>.png`` for each family and dtype with timed records; return
    their paths. Also redraws a results.json written before ``time_ms`` was recorded (its
    statistic was the median; its spread is unknown)."""
    records = [_with_statistic(r) for r in result["results"]
               if "time_ms" in r or "median_ms" in r]
    paths = []
    for family in FAMILIES:
        for dtype in sorted({r["dtype"] for r in records}):
            subset = [r for r in records if r["family"] == family and r["dtype"] == dtype]
            if subset:
                paths.append(_plot(subset, result, family, dtype, out))
    return paths


def _with_statistic(record: dict) -> dict:
    if "time_ms" in record:
        return record
    return dict(record, time_ms=record["median_ms"], spread=0.0)


def impl_label(impl: str, result: dict, dtype: str) -> str:
    """The legend entry: tritonclip's entries name the backend that ran (its torch backend on
    a CPU, Triton on CUDA), so that a CPU plot is not read as the Triton kernels'."""
    if not impl.startswith("tritonclip"):
        return impl
    backend = result.get("tritonclip_backend", {}).get(dtype)
    if backend is None:  # a results.json from before the backend was recorded
        backend = "Triton" if result["machine"]["device_type"] == "cuda" else "torch backend"
    return f"{impl} ({backend})"


def _plot(records, result, family, dtype, out) -> str:
    ops = [op for op in OPS if any(r["op"] == op for r in records)]
    width = max(PANEL_WIDTH_IN * len(ops), 6.0)
    fig, axes = plt.subplots(2, len(ops), figsize=(width, 7.5), squeeze=False,
                             constrained_layout=True)
    impls = [i for i in COLORS if any(r["impl"] == i for r in records)]
    draw = _bars if family == "model" else _lines
    for column, op in enumerate(ops):
        top, bottom = axes[0][column], axes[1][column]
        top.set_yscale("log")
        rows = [r for r in records if r["op"] == op]
        draw(top, bottom, rows, impls, family)
        _label_log_axis(top)
        top.set_title(op)
        top.set_ylabel(f"time (ms, {_statistic(result)})")
        bottom.set_ylabel("GB/s (bytes that must move)")
        copy = result["copy_bandwidth_gbps"]
        # Launch-bound sets on a GPU reach a few GB/s of 3000: the line would flatten them.
        if max(r["gbps"] for r in rows) >= COPY_LINE_MIN_FRACTION * copy:
            bottom.axhline(copy, color="gray", linestyle="--", linewidth=1,
                           label="measured copy bandwidth")
    handles, labels = _legend_entries(axes, result, dtype)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle(_title(result, family, dtype, width), fontsize=10)
    path = os.path.join(out, f"{family}-{dtype}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend below the panels
    plt.close(fig)
    return path


def _statistic(result: dict) -> str:
    return result.get("method", {}).get("time_ms_field", "median_ms").replace("_ms", "")


def _title(result: dict, family: str, dtype: str, width_in: float) -> str:
    m = result["machine"]
    threads = result.get("method", {}).get("threads")
    text = (f"tritonclip vs torch.nn.utils: {family}, {dtype} | {m['device']} | "
            f"torch {m['torch']}, triton {m['triton']} | {m['commit'][:10]}"
            + (f" | {threads} thread(s)" if threads else ""))
    return "\n".join(textwrap.wrap(text, int(width_in * TITLE_CHARS_PER_INCH)))


def _legend_entries(axes, result, dtype):
    """One entry per implementation (and the copy bandwidth line), from every panel."""
    entries = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = list(entries)
    return [entries[label] for label in labels], [
        impl_label(label, result, dtype) if label in COLORS else label for label in labels]


def _sweep_x(record: dict, family: str) -> float:
    return record["tensors"] if family == "many-small" else record["grad_bytes"] / 2**20


def _lines(top, bottom, records, impls, family) -> None:
    """A sweep: one line per implementation over the measured points, ticks at those points
    only (labelled with the set's size or tensor count, no minor labels to overlap)."""
    points = sorted({(_sweep_x(r, family), r["set"]) for r in records})
    for impl in impls:
        rows = sorted((r for r in records if r["impl"] == impl),
                      key=lambda r: _sweep_x(r, family))
        if not rows:
            continue
        x = [_sweep_x(r, family) for r in rows]
        style = dict(marker="o", color=COLORS[impl], label=impl,
                     linewidth=2.2 if impl == "tritonclip" else 1.2)
        top.plot(x, [r["time_ms"] for r in rows], **style)
        bottom.plot(x, [r["gbps"] for r in rows], **style)
        for ax, key in ((top, "time_ms"), (bottom, "gbps")):
            _mark_unstable(ax, [(xi, r[key]) for xi, r in zip(x, rows) if report.noisy(r)])
    xlabel = "tensors of 4K elements" if family == "many-small" else "gradient size"
    labels = [name.split("x")[0] if family == "many-small" else name.split("x", 1)[1]
              for _, name in points]
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.set_xticks([x for x, _ in points])
        ax.set_xticklabels(labels)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)


def _bars(top, bottom, records, impls, family) -> None:
    """Models: a group of bars per model, one bar per implementation (no line joins
    unrelated models)."""
    models = list(dict.fromkeys(r["set"] for r in records))
    present = [i for i in impls if any(r["impl"] == i for r in records)]
    bar_width = 0.8 / max(len(present), 1)
    for k, impl in enumerate(present):
        by_model = {r["set"]: r for r in records if r["impl"] == impl}
        x = [m + (k - (len(present) - 1) / 2) * bar_width for m in range(len(models))
             if models[m] in by_model]
        rows = [by_model[name] for name in models if name in by_model]
        for ax, key in ((top, "time_ms"), (bottom, "gbps")):
            ax.bar(x, [r[key] for r in rows], bar_width, color=COLORS[impl], label=impl)
            _mark_unstable(ax, [(xi, r[key]) for xi, r in zip(x, rows) if report.noisy(r)])
    for ax in (top, bottom):
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.grid(True, axis="y", alpha=0.3)
    times = [r["time_ms"] for r in records]
    # A bar on a log axis starts at the axis' bottom: put it a decade under the shortest
    # time, so that every bar's height reads as decades above the same floor.
    top.set_ylim(bottom=10 ** math.floor(math.log10(min(times)) - 1))


def _label_log_axis(ax) -> None:
    """Label a log axis with plain numbers (0.05, 2, 300), at 1, 2 and 5 per decade where it
    spans two decades or less (else at powers of ten only), and no minor labels: matplotlib's
    own put 2e-01-style labels on minor ticks, overlapping on short ranges."""
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if math.log10(high / low) <= 2 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(low, high)


def _mark_unstable(ax, points: list[tuple[float, float]]) -> None:
    """Ring the points whose own time is unstable (report.noisy), with one legend entry."""
    if points:
        ax.scatter(*zip(*points), s=120, facecolors="none", edgecolors="red", linewidths=1.2,
                   label=f"unstable time (spread > {report.UNSTABLE_SPREAD:g})", zorder=3)
