"""Timers and the machine stamp that every benchmark result carries."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


# The statistic that times are compared by, per device type. On the CPU, interference (a
# thread pool waiting on a descheduled worker, another process on the core or its memory
# bandwidth, a page fault) only ever adds time, in bursts that last from one call to
# seconds, so a low quantile of the calls estimates the call's own cost while a median of a
# few calls lands on scheduler-tick multiples (4-16 ms). The 20th percentile rather than the
# minimum: it needs a fifth of the calls to agree, where the minimum can be one lucky call
# that caught the machine idle. Measured on the 2-core CI machine with two other CPU-bound
# processes running (load 3): over 4 runs of --quick, speedups from the minimum strayed from
# their row's median by up to 51%, from the 20th percentile by up to 14% (90% within 6.5%).
# CUDA events time the device alone, where the median (triton.testing.do_bench's
# convention) is robust.
STATISTIC = {"cpu": "p20_ms", "cuda": "median_ms"}

# On the CPU a measurement takes rounds of calls, one call of each implementation compared
# per round, for at least ``reps`` rounds and until the fastest implementation has
# CPU_MIN_SAMPLED_MS of timed calls (at most CPU_MAX_REPS rounds): a call of 0.05 ms is
# shorter than one scheduler tick of interference, so it needs dozens of samples for its
# quantiles to mean anything, and those cost milliseconds. 200 ms rather than 50 (20-40 calls
# instead of 5-10 for the 4-64 MB sets) cut the run-to-run scatter of --quick's speedups by a
# third (largest deviation 24% -> 14%) for 13 s more on the CI machine.
CPU_MIN_SAMPLED_MS = 200.0
CPU_MAX_REPS = 100


def time_each(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
              setup: Callable[[], object] | None = None) -> dict[str, dict]:
    """:func:`device_time_ms` of each of ``fns`` (implementations of one case), by name.

    On the CPU the calls are interleaved, one call of each implementation per round (each
    after ``setup``, untimed): another process's busy phase lasts seconds, so it then slows
    every implementation alike instead of whichever was being timed, and the ratios of their
    times hold. On CUDA (events time the device, not the host) each is timed in turn.
    """
    if device.type == "cuda" or not fns:
        return {name: device_time_ms(fn, device, reps, setup) for name, fn in fns.items()}
    samples = _interleaved_samples_ms(fns, setup or (lambda: None), reps)
    return {name: _with_statistic(summarize(times), device) for name, times in samples.items()}


def device_time_ms(fn: Callable[[], object], device: torch.device, reps: int,
                   setup: Callable[[], object] | None = None) -> dict:
    """The time of one call of ``fn``, in ms: :func:`summarize`'s fields, plus ``time_ms``
    (the statistic compared on this device, ``STATISTIC``: the 20th percentile on the CPU,
    the median on CUDA) and ``spread`` ((p75 - min) / min: how far a typical call lies above
    the fastest).

    CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flush between calls); with a
    ``setup`` (run before every call, untimed), the same method by hand: setup, L2 flush,
    events around the call. CPU: ``time.perf_counter`` around each call after one untimed
    warm-up call, for at least ``reps`` calls (more for short calls, ``CPU_MIN_SAMPLED_MS``):
    :func:`time_each` of ``fn`` alone.
    """
    if device.type == "cuda" and setup is None:
        import triton.testing

        low, p20, median, p75, p80 = triton.testing.do_bench(  # quantile 0: the minimum
            fn, quantiles=[0.0, 0.2, 0.5, 0.75, 0.8])
        stats = {"min_ms": low, "p20_ms": p20, "median_ms": median, "p75_ms": p75,
                 "p80_ms": p80}
    elif device.type == "cuda":
        stats = summarize(_cuda_events_ms(fn, setup, device, max(reps, 25)))
    else:
        return time_each({"fn": fn}, device, reps, setup)["fn"]
    return _with_statistic(stats, device)


def _with_statistic(stats: dict, device: torch.device) -> dict:
    """``stats`` with ``time_ms`` (the statistic compared on ``device``) and ``spread``."""
    low = stats["min_ms"]
    # 1e-6 ms (1 ns) is below any timer's resolution: it only guards the division.
    spread = (stats["p75_ms"] - low) / max(low, 1e-6)
    return dict(stats, time_ms=stats[statistic_name(device)], spread=spread)


def statistic_name(device: torch.device) -> str:
    """The field of :func:`device_time_ms`'s result that ``time_ms`` copies on ``device``."""
    return STATISTIC.get(device.type, STATISTIC["cpu"])


def summarize(samples: list[float]) -> dict:
    """``min_ms``, ``p20_ms``, ``median_ms``, ``p75_ms`` and ``p80_ms`` of ``samples`` (ms),
    and ``reps``, their number."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        p20 = p75 = p80 = ordered[0]
    else:
        cuts = statistics.quantiles(ordered, n=20, method="inclusive")  # 5% steps
        p20, p75, p80 = cuts[3], cuts[14], cuts[15]
    return {"min_ms": ordered[0], "p20_ms": p20, "median_ms": statistics.median(ordered),
            "p75_ms": p75, "p80_ms": p80, "reps": len(ordered)}


def _interleaved_samples_ms(fns, setup, reps) -> dict[str, list[float]]:
    """Per implementation, the ``time.perf_counter`` time of each timed call (ms), after one
    untimed warm-up call each (first-call allocations, caches, compilation)."""
    for fn in fns.values():
        setup()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < reps or (min(map(sum, samples.values())) < CPU_MIN_SAMPLED_MS
                            and rounds < CPU_MAX_REPS):
        for name, fn in fns.items():
            setup()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    return samples


def _cuda_events_ms(fn, setup, device, reps) -> list[float]:
    # 256 MiB written between calls evicts the L2 (50 MiB on an H100), as do_bench does.
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    for _ in range(2):  # warm-up
        setup()
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        setup()
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def wall_time_ms(fn: Callable[[], object], device: torch.device, calls: int,
                 setup: Callable[[], object] | None = None) -> float:
    """Wall time per call, host work included (what a training loop sees when launches and
    Python overhead dominate), for CUDA: on the CPU every :func:`device_time_ms` time already
    is a wall time.

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
    return 2 * src.numel() * 4 / (timing["time_ms"] * 1e-3) / 1e9


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


def machine_load() -> dict:
    """``load_average_1min`` (None where the OS has none), ``cpu_count`` and ``busy``: whether
    more processes wanted a core over the last minute than there are cores, so that the
    benchmark shares its cores and its times carry other processes' work."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows; no /proc
        load = None
    cores = os.cpu_count() or 1
    return {"load_average_1min": load, "cpu_count": cores,
            "busy": load is not None and load > cores}


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
