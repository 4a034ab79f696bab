"""PNG plots of a benchmark result: time and GB/s against gradient bytes, one line per
implementation, one column per operation."""

from __future__ import annotations

import os

import matplotlib

from .cases import OPS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_results(result: dict, out: str) -> list[str]:
    """Write one PNG per (family of gradient sets, dtype); return their paths."""
    records = [r for r in result["results"] if "median_ms" in r]
    paths = []
    for family in ("one-tensor", "many-small", "model"):
        for dtype in sorted({r["dtype"] for r in records}):
            subset = [r for r in records if r["family"] == family and r["dtype"] == dtype]
            if subset:
                paths.append(_plot(subset, result, family, dtype, out))
    return paths


def _plot(records, result, family, dtype, out) -> str:
    ops = [op for op in OPS if any(r["op"] == op for r in records)]
    fig, axes = plt.subplots(2, len(ops), figsize=(4.2 * len(ops), 7), squeeze=False)
    for column, op in enumerate(ops):
        by_impl: dict[str, list] = {}
        for r in records:
            if r["op"] == op:
                by_impl.setdefault(r["impl"], []).append(r)
        for impl, rows in sorted(by_impl.items()):
            rows.sort(key=lambda r: r["grad_bytes"])
            x = [r["grad_bytes"] / 2**20 for r in rows]
            style = dict(marker="o", linewidth=2.2 if impl == "tritonclip" else 1.2, label=impl)
            axes[0][column].plot(x, [r["median_ms"] for r in rows], **style)
            axes[1][column].plot(x, [r["gbps"] for r in rows], **style)
        axes[0][column].set_title(op)
        axes[0][column].set_ylabel("median time (ms)")
        axes[1][column].set_ylabel("GB/s (bytes that must move)")
        axes[1][column].axhline(result["copy_bandwidth_gbps"], color="gray", linestyle="--",
                                linewidth=1, label="measured copy bandwidth")
        for row in (0, 1):
            axes[row][column].set_xscale("log")
            axes[row][column].set_xlabel("gradient MB")
            axes[row][column].grid(True, which="both", alpha=0.3)
        axes[0][column].set_yscale("log")
    axes[1][0].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"tritonclip vs torch.nn.utils: {family}, {dtype} | {m['device']} | "
                 f"torch {m['torch']}, triton {m['triton']} | {m['commit'][:10]}", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, f"{family}-{dtype}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
