"""Ratios and the printed table of a benchmark result."""

from __future__ import annotations

BASELINE = "torch-foreach"
# Where torch has no foreach recipe (AGC), the ratio is to the loop a user writes (timm's).
FALLBACK_BASELINE = "torch-loop"


def with_ratios(records: list[dict]) -> list[dict]:
    """Add ``speedup_vs_torch`` (torch foreach=True time / this time, same case, same run; the
    torch loop where there is no foreach recipe) and, where measured,
    ``wall_speedup_vs_torch``."""
    baseline = {}
    for impl in (FALLBACK_BASELINE, BASELINE):  # foreach wins where both exist
        baseline.update({(r["set"], r["dtype"], r["op"]): r for r in records
                         if r["impl"] == impl and "median_ms" in r})
    for r in records:
        ref = baseline.get((r["set"], r["dtype"], r["op"]))
        if ref is None or "median_ms" not in r:
            continue
        r["speedup_vs_torch"] = ref["median_ms"] / r["median_ms"]
        if "wall_ms_per_call" in r and "wall_ms_per_call" in ref:
            r["wall_speedup_vs_torch"] = ref["wall_ms_per_call"] / r["wall_ms_per_call"]
    compiled = {(r["set"], r["dtype"], r["op"]): r for r in records
                if r["impl"] == "torch-compile" and "median_ms" in r}
    for r in records:  # compiled against compiled
        ref = compiled.get((r["set"], r["dtype"], r["op"]))
        if r["impl"] == "tritonclip-compile" and ref is not None and "median_ms" in r:
            r["speedup_vs_torch_compile"] = ref["median_ms"] / r["median_ms"]
    return records


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"device: {m['device']} | torch {m['torch']} | triton {m['triton']} | CUDA {m['cuda']} | "
        f"commit {m['commit'][:12]} | copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s"
    ]
    impls = []
    for r in result["results"]:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    others = [i for i in impls if i != "tritonclip"]
    header = (f"{'set':<12} {'dtype':<5} {'op':<8} {'MiB':>8} "
              + "".join(f"{i + ' ms':>22}" for i in others)
              + f"{'tritonclip ms':>15} {'speedup':>8} {'GB/s':>8} {'% copy':>7} {'wall x':>7}"
              + f" {'clip ovh':>9}"
              + (f" {'compiled x':>10}" if "tritonclip-compile" in impls else ""))
    lines += [header, "-" * len(header)]
    cases: dict[tuple, dict] = {}
    for r in result["results"]:
        cases.setdefault((r["set"], r["dtype"], r["op"]), {})[r["impl"]] = r
    for (name, dtype, op), by_impl in cases.items():
        ours = by_impl.get("tritonclip", {})
        if "median_ms" not in ours:
            lines.append(f"{name:<12} {dtype:<5} {op:<8} skipped: {ours.get('skipped', '?')}")
            continue
        cells = "".join(
            f"{by_impl[i]['median_ms']:>22.3f}" if "median_ms" in by_impl.get(i, {}) else f"{'-':>22}"
            for i in others
        )
        wall = ours.get("wall_speedup_vs_torch")
        compiled = by_impl.get("tritonclip-compile", {})
        lines.append(
            f"{name:<12} {dtype:<5} {op:<8} {ours['grad_bytes'] / 2**20:>8.1f} {cells}"
            f"{ours['median_ms']:>15.3f} {ours.get('speedup_vs_torch', float('nan')):>7.2f}x "
            f"{ours['gbps']:>8.1f} {100 * ours['copy_fraction']:>6.1f}% "
            + (f"{wall:>6.2f}x" if wall is not None else f"{'':>7}")
            + (f" {ours['overhead_vs_torch']:>8.2f}x" if "overhead_vs_torch" in ours
               else f"{'':>10}")
            + (f" {compiled['speedup_vs_torch_compile']:>9.2f}x"
               if "speedup_vs_torch_compile" in compiled else "")
        )
    lines.append("speedup: torch foreach=True time / tritonclip time, same case, same run. "
                 "GB/s: bytes that must move (tritonclip.bench.cases) per second. "
                 "wall x: the same for wall time per call, host work included. "
                 "clip ovh (step): tritonclip's clip overhead over torch's, each being the time "
                 "of clip + fused AdamW step minus the step alone. "
                 "compiled x: torch's clip under torch.compile against tritonclip's (one "
                 "custom op) under torch.compile, same case, same run.")
    if m["device_type"] == "cpu":
        lines.append("On a CPU, sets that fit in the caches run above memory bandwidth, and a "
                     "copy also reads its destination, so in-place passes can exceed 100%.")
    return "\n".join(lines)
