"""Check, without a GPU, that kernels.launch.Launcher launches exactly what Triton would.

Run as a script with TRITON_INTERPRET unset (tests/test_launch.py does, in a subprocess):
kernels are compiled for sm_90 and launched into tritonclip.bench.null_driver, which records
every launcher call instead of running it. It prints one JSON object:

- "package": per scenario (each a real launch function of tritonclip.kernels on CPU tensors),
  whether the second round of direct launches made the same launcher calls (same compiled
  kernel, grid, stream, hooks and arguments) as Triton's own path, and how many launches of
  that round went through ``JITFunction.run`` (expected: none).
- "keys": for a probe kernel called with integers and tensors on every side of Triton's
  specialization boundaries, the calls whose direct launch ran another compiled kernel than
  ``JITFunction.warmup`` returns for the same arguments (expected: none).
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_check.py needs compiled kernels: run it with TRITON_INTERPRET unset or 0")

import torch
import triton
import triton.language as tl

from tritonclip.bench.null_driver import null_driver
from tritonclip.kernels import (build_row_plan, clamp_, finalize, group_power, norm_clip,
                                norm_partials, plan_cache, scale_, scale_each_,
                                unscale_norm_clip)
from tritonclip import kernels
from tritonclip.kernels import clamp, error_clip, launch, norm, scale

LAUNCHERS = list(kernels.LAUNCHERS)
CPU = torch.device("cpu")


def _tensors(dtype, sizes, misaligned=False):
    """Gradients of the given sizes; with ``misaligned``, views one element into a buffer."""
    out = []
    for size in sizes:
        base = torch.randn(size + 1).to(dtype)
        out.append(base[1:] if misaligned else base[:size])
    return out


def _plan(tensors, per_span=False):
    return plan_cache.get([(t.data_ptr(), t.numel()) for t in tensors], CPU, tensors[0].dtype,
                          per_span)


def scenarios():
    """(name, callable): each launches one or more kernels of the package."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        tag = str(dtype).split(".")[1]
        one = _plan(_tensors(dtype, [70_000]))
        mixed = _plan(_tensors(dtype, [1, 16, 17, 4096]) + _tensors(dtype, [3000], True))
        coef = torch.tensor(0.5)
        yield f"norm_clip-{tag}", lambda p=one: norm_clip(p, 2.0, 1.0, 1e-6, False)
        yield f"norm_clip-mixed-{tag}", lambda p=mixed: norm_clip(p, float("inf"), 1.0, 1e-6, True)
        yield f"scale-{tag}", lambda p=mixed, c=coef: scale_(p, c)
        yield f"clamp-{tag}", lambda p=mixed: clamp_(p, -0.1, 0.25)
    grads = _tensors(torch.float32, [5, 16, 33])
    per_span = _plan(grads, per_span=True)
    yield "partials+finalize", lambda: finalize(per_span, norm_partials(per_span, 3.5), 3.5)
    yield "group_power-count", lambda: group_power(per_span, 0.0)
    yield "unscale_norm_clip", lambda: unscale_norm_clip(per_span, 2.0, 1.0, 1e-6, False,
                                                         torch.tensor([0.25]))
    rows = _tensors(torch.float32, [6 * 16, 3 * 17])
    row_plan = build_row_plan([(rows[0].data_ptr(), 6, 16), (rows[1].data_ptr(), 3, 17)], CPU,
                              torch.float32)
    yield "scale_each", lambda: scale_each_(row_plan, torch.linspace(0.5, 1.5, 9))
    for row_len in (1, 16, 17, error_clip.FUSED_ROW_MAX + 1):
        x = torch.randn(3, row_len)
        out, counts = torch.empty_like(x), torch.zeros(2, dtype=torch.int64)
        yield (f"row_clip-{row_len}",
               lambda x=x, o=out, c=counts: error_clip.row_clip_out(x, o, 1.0, 2.0, 1e-6, c))
        yield (f"clamp_out-{row_len}",
               lambda x=x, o=out: error_clip.clamp_out(x, o, -0.5, 0.5))


def _metadata(value):
    """Launch metadata (a LazyDict, or None where no hook is set) as plain data."""
    data = getattr(value, "data", value)
    if not isinstance(data, dict):
        return repr(data)
    return sorted((k, id(v) if k == "function" else repr(v)) for k, v in data.items())


def _normalized(record):
    """Launcher calls with fresh tensors replaced by what Triton specializes on them."""
    def arg(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", str(value.dtype), tuple(value.shape), value.data_ptr() % 16)
        if isinstance(value, (int, float, bool, str, type(None))) or isinstance(value, tl.dtype):
            return repr(value)
        return ("object", id(value))
    calls = []
    for launcher, args in record:
        grid, (stream, function, packed, metadata, enter, exit_) = args[:3], args[3:9]
        calls.append([id(launcher), list(grid), stream, id(function), repr(packed),
                      _metadata(metadata), id(enter), id(exit_), [arg(a) for a in args[9:]]])
    return calls


class _Received:
    """Stands in for a module's Launcher and logs what each call gave it."""

    def __init__(self, launcher, log):
        self.launcher, self.log = launcher, log

    def __call__(self, grid, *args, **kwargs):
        self.log.append((self.launcher, grid, args, kwargs))
        return self.launcher(grid, *args, **kwargs)


def _passed_through(received, record) -> bool:
    """Whether each launcher call carried exactly what its Launcher was given: the grid
    (padded to three), the very argument objects in order, then the constexprs by name or
    default, in declared order."""
    if len(received) != len(record):
        return False
    for (launcher, grid, args, kwargs), (_, call) in zip(received, record):
        if list(call[:3]) != (list(grid) + [1, 1])[:3]:
            return False
        params = launcher.kernel.params
        tail = [kwargs[p.name] if p.name in kwargs else p.default for p in params[len(args):]]
        passed = call[9:]
        if len(passed) != len(params) or any(a is not b for a, b in zip(passed, args)):
            return False
        if any(type(a) is not type(b) or a != b for a, b in zip(passed[len(args):], tail)):
            return False
    return True


def check_package(launchers=LAUNCHERS, only=None):
    """Triton's path, then two rounds of direct launches; the second round must make the
    same launcher calls as Triton's path, pass through what it was given, and go through
    JITFunction.run not once. Every scenario runs on device 0 with stream 0, and again on
    device 1 with stream 7 (a key without the device, or a cached stream, would show)."""
    routed = {"count": 0}
    for launcher in launchers:
        original = launcher.kernel.run

        def counting(*args, _original=original, **kwargs):
            routed["count"] += 1
            return _original(*args, **kwargs)
        launcher.kernel.run = counting
    received: list = []
    modules = (norm, scale, clamp, error_clip)
    originals = {(m, n): v for m in modules for n, v in vars(m).items()
                 if any(v is launcher for launcher in launchers)}
    for (module, name), launcher in originals.items():
        setattr(module, name, _Received(launcher, received))

    results = {}
    record: list = []
    try:
        with null_driver(90, record) as active:
            for device, stream in ((0, 0), (1, 7)):
                active.device, active.stream = device, stream
                for name, run in scenarios():
                    if only is not None and name != only:
                        continue
                    for launcher in launchers:
                        launcher._direct = False
                    record.clear()
                    run()
                    through_triton = _normalized(record)
                    for launcher in launchers:
                        launcher._direct = True
                    run()  # first direct round: each new variant still goes through Triton
                    record.clear()
                    received.clear()
                    routed["count"] = 0
                    run()
                    results[f"{name}@{device}"] = {
                        "same_calls": _normalized(record) == through_triton,
                        "passed_through": _passed_through(received, record),
                        "launches": len(record), "through_triton": routed["count"]}
    finally:
        for (module, name), launcher in originals.items():
            setattr(module, name, launcher)
    return results


@triton.jit(do_not_specialize=["m"], do_not_specialize_on_alignment=["y_ptr"])
def _probe_kernel(x_ptr, y_ptr, n, m, f, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * f + m, mask=mask)


class _CoarseLauncher(launch.Launcher):
    """Negative control: a key blind to alignment and to integer values."""

    def _kinds(self, args):
        return tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args)


class _ShuffledLauncher(launch.Launcher):
    """Negative control: passes the constexprs in reverse order."""

    def _tail(self, n_positional, kwargs):
        tail = super()._tail(n_positional, kwargs)
        return None if tail is None else tail[::-1]


def check_keys(launcher_type=launch.Launcher):
    """Calls across the specialization boundaries of ints (1, multiples of 16, i32/i64/u64
    widths), tensor alignment and dtype, and with the constexpr given by position; returns
    the calls that ran another kernel than Triton would."""
    probe = launcher_type(_probe_kernel)
    x32, x16 = torch.randn(64), torch.randn(64).half()
    y = torch.empty(65)
    ints = [1, 2, 16, 17, 32, 2**31 - 16, 2**31 - 1, 2**31, 2**32, -1, -16, -(2**31),
            -(2**31) - 1, 2**63 - 1, 2**63, 2**64 - 16]
    by_keyword = {"BLOCK": 64}
    calls = [((x32, y, n, 3, 0.5), by_keyword) for n in ints]
    calls += [((x32, y, 5, m, 0.5), by_keyword) for m in ints]
    calls += [((x, out, 16, 1, 2.0), by_keyword)
              for x in (x32, x32[1:], x16, x16[1:]) for out in (y, y[1:])]
    calls += [((x32, y, 16, 1, 2.0, block), {}) for block in (64, 32, 64, 32)]
    wrong = []
    record: list = []
    with null_driver(90, record):
        for args, kwargs in calls:
            for _ in range(2):  # the first may compile through Triton; the second is direct
                record.clear()
                probe((1,), *args, **kwargs)
            expected = _probe_kernel.warmup(*args, grid=(1,), **kwargs)
            if len(record) != 1 or record[0][0] is not expected.run:
                wrong.append(repr([a if not isinstance(a, torch.Tensor) else
                                   (str(a.dtype), a.data_ptr() % 16) for a in args]))
        # a callable grid goes through Triton, which calls it with the bound arguments
        for _ in range(2):
            record.clear()
            probe(lambda meta: (1,), x32, y, 16, 1, 2.0, BLOCK=64)
        callable_grid = len(record) == 1 and record[0][1][:3] == (1, 1, 1)
    compiled = sum(len(by_kinds) for _, by_kinds in probe._variants.values())
    return {"calls": len(calls), "compiled": compiled, "wrong": wrong,
            "callable_grid": callable_grid}


class _StaleLauncher(launch.Launcher):
    """Negative control: launches every call with the first call's arguments."""

    first = None

    def __call__(self, grid, *args, **kwargs):
        if self.first is None:
            self.first = args
        return super().__call__(grid, *self.first, **kwargs)


def check_controls():
    """The checks above must fail for a launcher that is wrong."""
    controls = {}
    # (control, module, its launcher, a scenario of that launcher); norm_clip allocates the
    # norm and coefficient it returns on every call, so stale arguments differ from fresh ones
    for name, launcher_type, module, attribute, scenario in (
            ("shuffled", _ShuffledLauncher, scale, "_launch_scale_kernel", "scale-float32"),
            ("stale", _StaleLauncher, norm, "_launch_norm_kernel", "norm_clip-float32")):
        real = getattr(module, attribute)
        control = launcher_type(real.kernel)
        setattr(module, attribute, control)
        try:
            result = check_package([control], only=scenario)[f"{scenario}@0"]
        finally:
            setattr(module, attribute, real)
        controls[name] = result["same_calls"] and result["passed_through"]
    controls["coarse_key_wrong"] = len(check_keys(_CoarseLauncher)["wrong"])
    return controls


if __name__ == "__main__":
    if not launch.COMPATIBLE:
        print(json.dumps({"triton": triton.__version__, "compatible": False}))
    else:
        print(json.dumps({"triton": triton.__version__, "compatible": True,
                          "keys": check_keys(), "package": check_package(),
                          "controls": check_controls()}))
