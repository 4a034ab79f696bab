"""Sweep of the streaming kernels' launch configuration: ``python -m tritonclip.bench.tune``.

For each dtype and gradient size, times the three streaming passes at the kernel level, over
one plan, for every candidate (bytes per loop iteration, warps):

- ``norm``: the fused norm and clip coefficient (reads N bytes);
- ``scale``: the scale pass by a coefficient of 1 that is applied (reads and writes N);
- ``clamp``: the value clamp by bounds that change nothing (reads and writes N).

It prints GB/s and the fraction of the device-to-device copy bandwidth measured in the same
run, marks the best candidate per (dtype, size, pass) against the current default
(``kernels/config.py``), and writes ``tune.json`` to ``--out``. The result is what the
config's table should be set from; nothing is changed automatically. Needs a CUDA device
(``--allow-cpu`` runs the sweep on CPU tensors under TRITON_INTERPRET=1, for tests only: its
timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from tritonclip import kernels
from tritonclip.kernels import config

from . import timing

MB = 2**20
# (bytes per loop iteration, warps): 4 to 32 KiB per iteration (1 to 16 vectors a thread)
CANDIDATES = [(block, warps) for block in (4096, 8192, 16384, 32768) for warps in (2, 4, 8, 16)
              if block >= warps * 32 * kernels.VECTOR_BYTES]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PASSES = ("norm", "scale", "clamp")
BYTES_MOVED = {"norm": 1, "scale": 2, "clamp": 2}  # times the gradient bytes


def _passes(plan):
    one = torch.ones((), dtype=torch.float32, device=plan.device)
    return {
        "norm": lambda: kernels.norm_clip(plan, 2.0, 1.0, 1e-6, False),
        "scale": lambda: kernels.scale_(plan, one, skip_at_least_one=False),
        "clamp": lambda: kernels.clamp_(plan, -1e30, 1e30),
    }


def sweep(device: torch.device, dtype_names, sizes, candidates=CANDIDATES, reps: int = 5):
    """One record per (dtype, size, candidate, pass): median ms and GB/s."""
    records = []
    for name in dtype_names:
        dtype = DTYPES[name]
        for nbytes in sizes:
            grad = torch.randn(nbytes // dtype.itemsize, device=device).to(dtype)
            plan = kernels.build_plan([(grad.data_ptr(), grad.numel())], device, dtype)
            for block_bytes, warps in candidates:
                with config.stream_tuning(block_bytes, warps):
                    for op, fn in _passes(plan).items():
                        stats = timing.device_time_ms(fn, device, reps)
                        moved = BYTES_MOVED[op] * grad.numel() * dtype.itemsize
                        records.append({"dtype": name, "grad_bytes": nbytes, "op": op,
                                        "bytes_per_iteration": block_bytes, "num_warps": warps,
                                        **stats,
                                        "gbps": moved / (stats["median_ms"] * 1e-3) / 1e9})
            del grad, plan
    return records


def best(records: list[dict]) -> list[dict]:
    """Per (dtype, size, pass): the fastest candidate and the default's time beside it."""
    default = (config._BYTES_PER_ITERATION, config._NUM_WARPS)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dtype"], r["grad_bytes"], r["op"]), []).append(r)
    rows = []
    for (dtype, nbytes, op), group in groups.items():
        fastest = min(group, key=lambda r: r["median_ms"])
        current = [r for r in group
                   if (r["bytes_per_iteration"], r["num_warps"]) == default]
        rows.append({"dtype": dtype, "grad_bytes": nbytes, "op": op,
                     "best": (fastest["bytes_per_iteration"], fastest["num_warps"]),
                     "best_ms": fastest["median_ms"],
                     "default_ms": current[0]["median_ms"] if current else None})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tritonclip.bench.tune",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16,fp32", help="comma-separated: bf16, fp32, fp16")
    parser.add_argument("--sizes-mb", default="4,64,1024",
                        help="gradient sizes in MiB, comma-separated (default 4,64,1024)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls on the CPU")
    parser.add_argument("--out", default="bench-out", help="folder for tune.json")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        sys.exit("tritonclip.bench.tune times the Triton kernels: it needs a CUDA device")
    names = args.dtype.split(",")
    for name in names:
        if name not in DTYPES:
            sys.exit(f"tritonclip.bench.tune: unknown dtype {name!r}; choose from {list(DTYPES)}")
    sizes = [int(float(mb) * MB) for mb in args.sizes_mb.split(",")]
    copy_gbps = timing.copy_bandwidth_gbps(device, max(sizes), args.reps)
    records = sweep(device, names, sizes, reps=args.reps)
    summary = best(records)
    result = {"machine": timing.machine_stamp(device), "copy_bandwidth_gbps": copy_gbps,
              "default": [config._BYTES_PER_ITERATION, config._NUM_WARPS],
              "records": records, "best": summary}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(result, f, indent=1)
    m = result["machine"]
    print(f"device: {m['device']} | triton {m['triton']} | commit {m['commit'][:12]} | "
          f"copy {copy_gbps:.0f} GB/s | default {result['default'][0]} B x "
          f"{result['default'][1]} warps")
    print(f"{'dtype':<6}{'MiB':>7} {'pass':<6}{'best (B, warps)':>17}{'best ms':>10}"
          f"{'% copy':>8}{'default ms':>12}")
    for row in summary:
        moved = BYTES_MOVED[row["op"]] * row["grad_bytes"]
        fraction = moved / (row["best_ms"] * 1e-3) / 1e9 / copy_gbps
        default = f"{row['default_ms']:.4f}" if row["default_ms"] is not None else "-"
        print(f"{row['dtype']:<6}{row['grad_bytes'] / MB:>7.0f} {row['op']:<6}"
              f"{str(row['best']):>17}{row['best_ms']:>10.4f}{100 * fraction:>7.1f}%"
              f"{default:>12}")


if __name__ == "__main__":
    main()
