"""Host µs per call of two checkouts of tritonclip, measured alternately on this machine.

    git worktree add ../before <commit>
    python bench/host_compare.py ../before .  --rounds 3

Each round runs one process per checkout (the same public calls as
``python -m tritonclip.bench.host``: kernels compiled for sm_90 and launched into the null
driver, nothing run), old then new, and the table gives each row's best over the rounds: on a
shared 2-core machine the spread between runs (10-30%) is larger than the difference to
measure, and alternating rounds expose both checkouts to the same load. Each process imports
tritonclip from its checkout (an editable install of another checkout is bypassed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETS = [("1 x 1M", 1, 1 << 20), ("100 x 4K", 100, 4096), ("2000 x 4K", 2000, 4096)]
OPS = ["clip_grad_norm_", "get_total_norm", "clip_grad_value_", "unscale_and_clip"]


def measure(checkout: str) -> dict:
    """µs per call of every (set, operation) with tritonclip imported from ``checkout``."""
    sys.meta_path[:] = [f for f in sys.meta_path  # an editable install maps another checkout
                        if "editable" not in type(f).__module__
                        and "editable" not in getattr(f, "__module__", "")]
    sys.path.insert(0, os.path.abspath(checkout))
    import timeit
    from unittest import mock

    import torch

    import tritonclip
    from tritonclip.amp import unscale_and_clip_grads_
    from tritonclip.bench.null_driver import null_driver

    # backend="triton" must take CPU tensors (their kernels are compiled, not interpreted)
    if hasattr(tritonclip, "_core"):
        from tritonclip import _triton_backend
        accept = mock.patch.object(_triton_backend.TRITON, "unsupported", lambda *a: None)
    else:  # checkouts before the one-core change
        from tritonclip import _groups
        accept = mock.patch.object(_groups, "interpreter_enabled", lambda: True)
    result = {}
    with null_driver(), accept:
        # (the sets and calls of tritonclip.bench.host, written out here: the checkouts'
        # own bench modules differ)
        for label, count, numel in SETS:
            params = []
            for _ in range(count):
                param = torch.nn.Parameter(torch.empty(numel))
                param.grad = torch.randn(numel)
                params.append(param)
            grads = [p.grad for p in params]
            inv_scale = torch.full((1,), 0.5)
            calls = {
                "clip_grad_norm_": lambda: tritonclip.clip_grad_norm_(params, 1.0,
                                                                      backend="triton"),
                "get_total_norm": lambda: tritonclip.get_total_norm(grads, backend="triton"),
                "clip_grad_value_": lambda: tritonclip.clip_grad_value_(params, 0.1,
                                                                        backend="triton"),
                "unscale_and_clip": lambda: unscale_and_clip_grads_(grads, inv_scale, 1.0,
                                                                    backend="triton"),
            }
            n = max(300 // max(count // 100, 1), 10)
            for name, fn in calls.items():
                fn(), fn(), fn()  # compiles, builds the plan, keeps what it keeps
                result[f"{label}|{name}"] = min(timeit.repeat(fn, number=n, repeat=11)) / n * 1e6
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", help="before and after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    env = dict(os.environ, TRITON_INTERPRET="0")
    best: dict[str, dict] = {c: {} for c in args.checkouts}
    for _ in range(args.rounds):
        for checkout in args.checkouts:
            done = subprocess.run([sys.executable, __file__, "--measure", checkout], env=env,
                                  capture_output=True, text=True, check=True)
            for key, us in json.loads(done.stdout.strip().splitlines()[-1]).items():
                best[checkout][key] = min(us, best[checkout].get(key, us))
    print("| gradients | operation | " + " | ".join(args.checkouts) + " |")
    print("|---|---|" + "---:|" * len(args.checkouts))
    for key in best[args.checkouts[0]]:
        label, op = key.split("|")
        print(f"| {label} | {op} | " + " | ".join(f"{best[c][key]:.1f}"
                                                 for c in args.checkouts) + " |")


if __name__ == "__main__":
    main()
