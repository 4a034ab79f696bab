"""Host time per call of tritonclip's Triton path, measured on any machine.

``python -m tritonclip.bench.host``.

A clip of small gradients is bound by host work (argument checks, the layout look-up and the
kernel launches), not by memory. This measures that work without a GPU: the kernels are
compiled for sm_90 and launched into :mod:`~tritonclip.bench.null_driver`, which runs
everything on the host up to the compiled launcher and then does nothing. Not counted: the
launcher's argument packing in C and ``cuLaunchKernel`` itself (a few µs per launch on a
GPU host), and the CUDA caching allocator, which is slower than the CPU one measured here.

Each operation is timed twice in the same run: as tritonclip launches (a plan relaunches the
compiled kernel that its first launch returned, ``kernels.launch``) and with every launch
going through Triton's ``JITFunction.run`` (``kernel[grid](...)``), so the table shows what
the relaunch saves. Times are the best of ``--repeat`` means over ``--calls`` calls, in µs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from unittest import mock

if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
    sys.exit("tritonclip.bench.host measures compiled kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402

import tritonclip  # noqa: E402
from tritonclip import _triton_backend, kernels  # noqa: E402
from tritonclip.amp import unscale_and_clip_grads_  # noqa: E402
from tritonclip.bench.null_driver import null_driver  # noqa: E402

# (label, number of tensors, elements per tensor)
SETS = [("1 x 1M", 1, 1 << 20), ("100 x 4K", 100, 4096), ("2000 x 4K", 2000, 4096)]


def _operations(params, inv_scale):
    grads = [p.grad for p in params]
    return {
        "clip_grad_norm_": lambda: tritonclip.clip_grad_norm_(params, 1.0, backend="triton"),
        "get_total_norm": lambda: tritonclip.get_total_norm(grads, backend="triton"),
        "clip_grad_value_": lambda: tritonclip.clip_grad_value_(params, 0.1, backend="triton"),
        "unscale_and_clip": lambda: unscale_and_clip_grads_(grads, inv_scale, 1.0,
                                                            backend="triton"),
    }


def _per_call_us(fn, calls: int, repeat: int) -> float:
    fn()  # compiles (first time), builds the plan and keeps the compiled kernels
    return min(timeit.repeat(fn, number=calls, repeat=repeat)) / calls * 1e6


def measure(calls: int = 200, repeat: int = 5) -> list[dict]:
    """One row per (tensor set, operation): µs per call, relaunched and through Triton."""
    rows = []
    # backend="triton" takes CPU tensors: the kernels are compiled for sm_90 and launched
    # into the null driver
    with null_driver(), mock.patch.object(_triton_backend.TRITON, "unsupported",
                                          lambda *args: None):
        for label, count, numel in SETS:
            params = []
            for _ in range(count):
                param = torch.nn.Parameter(torch.empty(numel))
                param.grad = torch.randn(numel)
                params.append(param)
            inv_scale = torch.full((1,), 0.5)
            n = max(calls // max(count // 100, 1), 10)
            for name, fn in _operations(params, inv_scale).items():
                with kernels.launch.through_triton():
                    through = _per_call_us(fn, n, repeat)
                relaunched = _per_call_us(fn, n, repeat)
                rows.append({"set": label, "op": name, "relaunch_us": relaunched,
                             "triton_run_us": through})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tritonclip.bench.host",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per timing (default 200)")
    parser.add_argument("--repeat", type=int, default=5, help="timings, best taken (default 5)")
    args = parser.parse_args(argv)
    rows = measure(args.calls, args.repeat)
    print(f"# host µs per call, null driver (sm_90 kernels, nothing launched); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print("| gradients | operation | tritonclip (relaunch) | through JITFunction.run | saved |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['set']} | {row['op']} | {row['relaunch_us']:.1f} | "
              f"{row['triton_run_us']:.1f} | {row['triton_run_us'] - row['relaunch_us']:.1f} |")


if __name__ == "__main__":
    main()
