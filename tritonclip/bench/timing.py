"""Timers and the machine stamp that every benchmark result carries."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def device_time_ms(fn: Callable[[], object], device: torch.device, reps: int,
                   setup: Callable[[], object] | None = None) -> dict:
    """Median and 20th/80th percentiles of the device time of one call, in ms.

    CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush between calls); with a
    ``setup`` (run before every call, untimed), the same method by hand: setup, L2 flush,
    events around the call. CPU: ``time.perf_counter`` around each call after two warm-ups.
    """
    if device.type == "cuda" and setup is None:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    setup = setup or (lambda: None)
    for _ in range(2):
        setup()
        fn()
    if device.type == "cuda":
        return _cuda_events_ms(fn, setup, device, max(reps, 25))
    samples = []
    for _ in range(reps):
        setup()
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _quantiles(samples)


def _cuda_events_ms(fn, setup, device, reps) -> dict:
    # 256 MiB written between calls evicts the L2 (50 MiB on an H100), as do_bench does.
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        setup()
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def wall_time_ms(fn: Callable[[], object], device: torch.device, calls: int,
                 setup: Callable[[], object] | None = None) -> float:
    """Wall time per call, host work included (what a training loop sees when launches and
    Python overhead dominate).

    Without ``setup``: ``calls`` back-to-back calls, one synchronisation at the end. With a
    ``setup`` (e.g. restoring clipped gradients, untimed), each call is timed alone between
    two synchronisations, so the figure also holds one synchronisation's latency (the same
    for every implementation: ratios understate the difference slightly).
    """
    fn()
    _sync(device)
    if setup is None:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / calls
    total = 0.0
    for _ in range(calls):
        setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - start
    return total * 1e3 / calls


def copy_bandwidth_gbps(device: torch.device, nbytes: int, reps: int) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second, in GB/s):
    the roof that the bytes-moved figures are compared with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = device_time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / (timing["median_ms"] * 1e-3) / 1e9


def _quantiles(samples: list[float]) -> dict:
    if len(samples) == 1:
        return {"median_ms": samples[0], "p20_ms": samples[0], "p80_ms": samples[0]}
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"median_ms": statistics.median(samples), "p20_ms": deciles[1], "p80_ms": deciles[7]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_stamp(device: torch.device) -> dict:
    """Device, versions and commit, recorded with every run."""
    import triton

    import tritonclip

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tritonclip": tritonclip.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty and commit != "unknown" else "")
