"""Ratios, stability marks and the printed table of a benchmark result.

Every ratio compares ``time_ms``, the statistic of :mod:`tritonclip.bench.timing` (the 20th
percentile of the calls on the CPU, the median on CUDA), of two implementations timed in the
same run. A ratio is only written where both times are stable (:func:`noisy`); otherwise the
record is marked ``"unstable": true`` with the reason, and the table prints ``unstable``.
"""

from __future__ import annotations

import math

BASELINE = "torch-foreach"
# Where torch has no foreach recipe (AGC), the ratio is to the loop a user writes (timm's).
FALLBACK_BASELINE = "torch-loop"
# A time is unstable when (p75 - min) / min exceeds UNSTABLE_SPREAD: a quarter of its calls
# or more took at least twice as long as the fastest one, i.e. spent as long waiting for the
# machine as working. Measured on the 2-core CI machine, threads pinned, with other jobs
# running (load 2.5-3): spreads had a median of 0.2-0.5 and a 90th percentile of 0.7-1.15,
# while the speedups (interleaved calls, 20th percentiles) reproduced within 6.5% over 4
# runs for 90% of the rows whatever their spread; the stalls this rule is for (a thread pool
# waiting on a descheduled worker: a 0.03 ms clip taking 16-48 ms) spread times by 10 to
# over 1000. A threshold of 0.5 flagged half the rows of such a run although their ratios held.
UNSTABLE_SPREAD = 1.0
STEP_ALONE = "optimizer-only"
# A clip's overhead in the step case (clip + step minus the step alone) counts as resolved
# when above this fraction of the clip + step time: twice the typical run-to-run deviation
# of a ratio of two 20th percentiles (median 1.5-2.5% over 4 runs of --quick at load 3), so
# that noise, which also makes overheads negative, is shown as '~0' and not as a ratio.
OVERHEAD_RESOLUTION = 0.05
# (ours, theirs) pairs whose step-case clip overheads are compared.
OVERHEAD_PAIRS = (("tritonclip", "torch-foreach"), ("tritonclip-compile", "torch-compile"))


def noisy(record: dict) -> bool:
    """Whether ``record``'s own time is unstable: its spread exceeds ``UNSTABLE_SPREAD``."""
    return record["spread"] > UNSTABLE_SPREAD


def with_ratios(records: list[dict]) -> list[dict]:
    """Add the comparisons to the timed records of one run and mark unstable ones.

    ``speedup_vs_torch``: torch foreach=True time / this time, same case, same run (the torch
    loop where there is no foreach recipe); ``wall_speedup_vs_torch`` likewise for the wall
    time per call where it was measured; ``speedup_vs_torch_compile``: torch's compiled clip
    against tritonclip's; in the step case, ``clip_overhead_ms`` (this time minus the step
    alone) and ``overhead_vs_torch`` (tritonclip's clip overhead over torch's). Each record
    also gets ``unstable`` (bool): its own time or one it is compared with is noisy.
    """
    timed = [r for r in records if "time_ms" in r]
    for r in timed:
        r["unstable"] = False
        if noisy(r):
            _mark_unstable(r, f"spread {r['spread']:.2f} > {UNSTABLE_SPREAD}")
    baselines = _by_case(timed, FALLBACK_BASELINE)
    baselines.update(_by_case(timed, BASELINE))  # foreach wins where both exist
    compiled = _by_case(timed, "torch-compile")
    for r in timed:
        ref = baselines.get(_case(r))
        if ref is not None:
            _compare(r, ref, "speedup_vs_torch", "time_ms")
            if "wall_ms_per_call" in r and "wall_ms_per_call" in ref:
                _compare(r, ref, "wall_speedup_vs_torch", "wall_ms_per_call")
        ref = compiled.get(_case(r))
        if r["impl"] == "tritonclip-compile" and ref is not None:
            _compare(r, ref, "speedup_vs_torch_compile", "time_ms")
    _add_step_overheads(timed)
    return records


def _case(record: dict) -> tuple:
    return record["set"], record["dtype"], record["op"]


def _by_case(records: list[dict], impl: str) -> dict[tuple, dict]:
    return {_case(r): r for r in records if r["impl"] == impl}


def _mark_unstable(record: dict, reason: str) -> None:
    record["unstable"] = True
    record.setdefault("unstable_reason", reason)


def _compare(record: dict, ref: dict, key: str, field: str) -> None:
    """``record[key] = ref[field] / record[field]`` where both times are stable; otherwise
    mark ``record`` unstable (if the reference is what is noisy, say so)."""
    if noisy(record):
        return
    if noisy(ref):
        _mark_unstable(record, f"{ref['impl']}'s spread {ref['spread']:.2f} > {UNSTABLE_SPREAD}")
        return
    record[key] = ref[field] / record[field]


def _add_step_overheads(records: list[dict]) -> None:
    """The step case: each clip's overhead over the step alone, and the ratios of overheads
    where both are resolved: above ``clip_overhead_noise_ms``, ``OVERHEAD_RESOLUTION`` of the
    clip + step time (a smaller difference cannot be told from zero, nor from a negative
    value, which noise also produces)."""
    alone = _by_case(records, STEP_ALONE)
    step = [r for r in records if r["op"] == "step" and r["impl"] != STEP_ALONE]
    for r in step:
        ref = alone.get(_case(r))
        if ref is None:
            continue
        r["clip_overhead_ms"] = r["time_ms"] - ref["time_ms"]
        r["clip_overhead_noise_ms"] = OVERHEAD_RESOLUTION * r["time_ms"]
        r["clip_overhead_resolved"] = r["clip_overhead_ms"] > r["clip_overhead_noise_ms"]
        if noisy(ref):
            _mark_unstable(r, f"{STEP_ALONE}'s spread {ref['spread']:.2f} > {UNSTABLE_SPREAD}")
    by_impl = {(_case(r), r["impl"]): r for r in step}
    for ours_impl, theirs_impl in OVERHEAD_PAIRS:
        for r in step:
            theirs = by_impl.get((_case(r), theirs_impl))
            if r["impl"] != ours_impl or theirs is None or "clip_overhead_ms" not in r:
                continue
            if r["unstable"] or theirs["unstable"]:
                _mark_unstable(r, f"{theirs_impl}'s step time is unstable")
            elif r["clip_overhead_resolved"] and theirs["clip_overhead_resolved"]:
                r["overhead_vs_torch"] = r["clip_overhead_ms"] / theirs["clip_overhead_ms"]


def format_ratio(value) -> str:
    """``1.23x``; ``<0.01x`` below that; ``-`` for a missing, non-finite or non-positive
    value (never ``nanx`` or ``0.00x``)."""
    if value is None or not math.isfinite(value) or value <= 0:
        return "-"
    return f"{value:.2f}x" if value >= 0.01 else "<0.01x"


def _ratio_cell(record: dict, key: str) -> str:
    if key in record:
        return format_ratio(record[key])
    return "unstable" if record.get("unstable") else "-"


def _overhead_cell(ours: dict, theirs: dict) -> str:
    """The step case's ``clip ovh`` cell: the ratio of overheads, or why there is none."""
    if "overhead_vs_torch" in ours:
        return format_ratio(ours["overhead_vs_torch"])
    if ours.get("unstable"):
        return "unstable"
    if "clip_overhead_resolved" not in ours:
        return "-"
    if not ours["clip_overhead_resolved"]:
        return "~0"
    return "torch ~0" if not theirs.get("clip_overhead_resolved", True) else "-"


def header_lines(result: dict) -> list[str]:
    """The machine, the method (threads, statistic, stability rule) and any warnings."""
    m, method = result["machine"], result["method"]
    load = m.get("load_average_1min")
    lines = [
        f"device: {m['device']} | torch {m['torch']} | triton {m['triton']} | CUDA {m['cuda']} "
        f"| commit {m['commit'][:12]} | copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s",
        f"threads: {method['threads']} (torch intra-op) | load average "
        + (f"{load:.2f}" if load is not None else "unknown") + f" on {m['cpu_count']} cores"
        f" | times: {method['statistic']} | unstable: (p75 - min) / min > {UNSTABLE_SPREAD}",
    ]
    return lines + [f"WARNING: {w}" for w in result.get("warnings", [])]


def format_table(result: dict) -> str:
    """The printed table: one row per case, torch's times beside tritonclip's, the ratios."""
    impls = list(dict.fromkeys(r["impl"] for r in result["results"]))
    others = [i for i in impls if i != "tritonclip"]
    has_wall = any("wall_ms_per_call" in r for r in result["results"])
    has_step = any(r["op"] == "step" for r in result["results"])
    has_compile = "tritonclip-compile" in impls
    header = (f"{'set':<12} {'dtype':<5} {'op':<10} {'MiB':>8} "
              + "".join(f"{i + ' ms':>22}" for i in others)
              + f"{'tritonclip ms':>15} {'speedup':>8} {'GB/s':>8} {'% copy':>7}"
              + (f" {'wall x':>8}" if has_wall else "")
              + (f" {'clip ovh':>9}" if has_step else "")
              + (f" {'compiled x':>10}" if has_compile else "") + "  note")
    lines = header_lines(result) + [header, "-" * len(header)]
    cases: dict[tuple, dict] = {}
    for r in result["results"]:
        cases.setdefault(_case(r), {})[r["impl"]] = r
    for (name, dtype, op), by_impl in cases.items():
        ours = by_impl.get("tritonclip", {})
        if "time_ms" not in ours:
            lines.append(f"{name:<12} {dtype:<5} {op:<10} skipped: {ours.get('skipped', '?')}")
            continue
        cells = "".join(f"{by_impl[i]['time_ms']:>22.3f}" if "time_ms" in by_impl.get(i, {})
                        else f"{'-':>22}" for i in others)
        theirs_step = by_impl.get("torch-foreach", {})
        lines.append(
            f"{name:<12} {dtype:<5} {op:<10} {ours['grad_bytes'] / 2**20:>8.1f} {cells}"
            f"{ours['time_ms']:>15.3f} {_ratio_cell(ours, 'speedup_vs_torch'):>8} "
            f"{ours['gbps']:>8.1f} {100 * ours['copy_fraction']:>6.1f}%"
            + (f" {_ratio_cell(ours, 'wall_speedup_vs_torch'):>8}" if has_wall else "")
            + (f" {_overhead_cell(ours, theirs_step) if op == 'step' else '':>9}"
               if has_step else "")
            + (f" {_compiled_cell(by_impl):>10}" if has_compile else "")
            + f"  {_note(by_impl)}".rstrip()
        )
    return "\n".join(lines + _footer(result, has_wall, has_step, has_compile))


def _compiled_cell(by_impl: dict[str, dict]) -> str:
    return _ratio_cell(by_impl.get("tritonclip-compile", {}), "speedup_vs_torch_compile")


def _note(by_impl: dict[str, dict]) -> str:
    """Each implementation of the row whose own time is unstable, with its spread."""
    noisy_impls = [f"{impl} {r['spread']:.2f}" for impl, r in by_impl.items()
                   if "time_ms" in r and noisy(r)]
    return f"spread > {UNSTABLE_SPREAD}: " + ", ".join(noisy_impls) if noisy_impls else ""


def _footer(result: dict, has_wall: bool, has_step: bool, has_compile: bool) -> list[str]:
    lines = [
        "speedup: torch foreach=True time / tritonclip time, same case, same run; 'unstable' "
        "where either time's spread,",
        f"  (p75 - min) / min over its calls, exceeds {UNSTABLE_SPREAD} (the times are printed, "
        "the ratio is not: rerun on a quieter machine).",
        "GB/s: bytes that must move (tritonclip.bench.cases) per second; % copy: of the "
        "measured copy bandwidth.",
    ]
    if has_wall:
        lines.append("wall x: the same for wall time per call, host work included.")
    if has_step:
        lines.append("clip ovh (step): tritonclip's clip overhead over torch's, each the time "
                     "of clip + fused AdamW step minus the step alone;")
        lines.append(f"  '~0' where tritonclip's overhead is under {OVERHEAD_RESOLUTION:.0%} of "
                     "its clip + step time (noise), 'torch ~0' where torch's is.")
    if has_compile:
        lines.append("compiled x: torch's clip under torch.compile against tritonclip's (one "
                     "custom op) under torch.compile, same case, same run.")
    if result["machine"]["device_type"] == "cpu":
        lines.append("On a CPU, sets that fit in the caches run above memory bandwidth, and a "
                     "copy also reads its destination, so in-place passes can exceed 100%.")
    return lines
