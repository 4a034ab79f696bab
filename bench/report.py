"""Print tritonclip/torch time ratios from a pytest-benchmark JSON file.

    python bench/report.py bench-out/benchmark.json
"""

from __future__ import annotations

import json
import platform
import sys

import torch

# Bytes that must move per call, in units of the gradient bytes N (see bench/test_clip_bench.py).
MOVED = {("tritonclip", "active"): 3, ("tritonclip", "inactive"): 1, ("tritonclip", "value"): 2,
         ("torch", "active"): 3, ("torch", "inactive"): 3, ("torch", "value"): 4}


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[(info["model"], info["case"], info["impl"])] = (bench["stats"]["median"], info)
    machine = data.get("machine_info", {})
    device = next(iter(rows.values()))[1]["device"] if rows else "?"
    print(f"device: {device} ({machine.get('cpu', {}).get('brand_raw', platform.processor())}), "
          f"torch {torch.__version__}, commit {data.get('commit_info', {}).get('id', '?')[:10]}")
    if device == "cpu":
        print("No GPU here: on the CPU tritonclip runs its torch path. The Triton kernels need a "
              "GPU for speed (under TRITON_INTERPRET=1 they run, slowly, for testing).")
    print(f"{'model':<12} {'case':<9} {'torch ms':>9} {'tritonclip ms':>14} {'speedup':>8} "
          f"{'tritonclip GB/s':>16}")
    for model, case in sorted({(m, c) for m, c, _ in rows}):
        ours, info = rows[(model, case, "tritonclip")]
        theirs, _ = rows[(model, case, "torch")]
        gbs = MOVED[("tritonclip", case)] * info["grad_bytes"] / ours / 1e9
        print(f"{model:<12} {case:<9} {theirs * 1e3:>9.1f} {ours * 1e3:>14.1f} "
              f"{theirs / ours:>7.2f}x {gbs:>16.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-out/benchmark.json")
