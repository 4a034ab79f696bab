"""Check, without a GPU, that a plan's relaunch of a compiled kernel (kernels/launch.py) runs
exactly what Triton's own launch path would.

Run as a script with TRITON_INTERPRET unset (tests/test_launch.py does, in a subprocess):
kernels are compiled for sm_90 and launched into tritonclip.bench.null_driver, which records
every launcher call instead of running it. For each scenario (real launch functions of
tritonclip.kernels over plans of CPU tensors) it compares the calls of Triton's path
(``kernel[grid](...)`` every time) with the second round of the package's path (relaunches of
the kept compiled kernel): the same compiled kernel (each has its own null launcher), grid,
stream and argument kinds, and no ``JITFunction.run`` in that round. It prints one JSON
object; "control" compares two scenarios that differ only in the gradients' dtype, which must
be told apart (the comparison can fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from unittest import mock

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_check.py needs compiled kernels: run it with TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tritonclip import kernels  # noqa: E402
from tritonclip.kernels import clamp, norm, registry, scale  # noqa: E402
from tritonclip.bench.null_driver import null_driver  # noqa: E402

CPU = torch.device("cpu")


def _tensors(dtype, sizes, misaligned=False):
    out = []
    for size in sizes:
        base = torch.randn(size + 1).to(dtype)
        out.append(base[1:] if misaligned else base[:size])
    return out


def scenarios():
    """(name, make): ``make()`` builds fresh plans and returns a callable that launches."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        tag = str(dtype).split(".")[1]

        def plans(dtype=dtype):
            one = _tensors(dtype, [70_000])
            mixed = _tensors(dtype, [1, 16, 17, 4096]) + _tensors(dtype, [3000], True)
            return (kernels.build_plan([(t.data_ptr(), t.numel()) for t in one], CPU, dtype),
                    kernels.build_plan([(t.data_ptr(), t.numel()) for t in mixed], CPU, dtype))

        def clips(dtype=dtype):
            one, mixed = plans(dtype)
            return lambda: (kernels.norm_clip(one, 2.0, 1.0, 1e-6, False),
                            kernels.norm_clip(mixed, float("inf"), 1.0, 1e-6, True))

        def streaming(dtype=dtype):
            _, mixed = plans(dtype)
            coef = torch.tensor(0.5, dtype=torch.float64 if dtype == torch.float64 else None)
            return lambda: (kernels.scale_(mixed, coef), kernels.clamp_(mixed, -0.1, 0.25),
                            kernels.group_power(mixed, 0.0))

        yield f"norm_clip-{tag}", clips
        yield f"scale-clamp-count-{tag}", streaming

    def rows():
        grads = _tensors(torch.float32, [6 * 16, 3 * 17])
        plan = kernels.build_row_plan([(grads[0].data_ptr(), 6, 16),
                                       (grads[1].data_ptr(), 3, 17)], CPU, torch.float32)
        coef = torch.linspace(0.5, 1.5, 9)
        return lambda: (kernels.finalize(plan, kernels.norm_partials(plan, 3.5), 3.5),
                        kernels.scale_each_(plan, coef))

    def amp():
        (g,) = _tensors(torch.float32, [5000])
        plan = kernels.build_plan([(g.data_ptr(), g.numel())], CPU, torch.float32)
        inv = torch.tensor([0.25])
        return lambda: kernels.norm_clip(plan, 2.0, 1.0, 1e-6, False, inv)

    yield "rows", rows
    yield "amp", amp


def _kind(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    return (type(value).__name__, value if isinstance(value, (int, float, bool)) else None)


def _summary(calls):
    """(launcher, grid, stream, argument kinds) of each recorded call."""
    return [(id(launcher), args[:4], tuple(map(_kind, args[9:]))) for launcher, args in calls]


@contextlib.contextmanager
def counting_triton_runs():
    count = [0]
    original = JITFunction.run

    def run(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    with mock.patch.object(JITFunction, "run", run):
        yield count


def unspecialized_rule(kernel) -> list[str]:
    """The arguments of ``kernel`` through which a call could change Triton's choice of
    compiled kernel, besides constexprs and tensor dtypes (expected: none for the kernels
    that plans relaunch): each must be a typed scalar that is not specialized, a per-call
    pointer not specialized on alignment, or a plan table."""
    return [p.name for p in kernel.params
            if not p.is_constexpr
            and not (p.annotation_type and p.do_not_specialize)
            and not p.do_not_specialize_on_alignment
            and p.name not in registry.TABLES]


@triton.jit(do_not_specialize=["n"])
def _probe(x_ptr, n, BLOCK: tl.constexpr):
    """An untyped size (its width would follow its value) and a pointer specialized on
    alignment: what the rule must catch."""
    pass


def main() -> None:
    record: list = []
    report = {"triton": triton.__version__, "scenarios": {},
              "rule": {k.fn.__name__: unspecialized_rule(k)
                       for k in (norm._norm_kernel, norm._finalize_kernel, scale._scale_kernel,
                                 clamp._clamp_kernel)},
              "rule_control": unspecialized_rule(_probe)}
    with null_driver(record=record):
        summaries = {}
        for name, make in scenarios():
            with kernels.launch.through_triton():
                launch_all = make()
                launch_all()  # compiles
                record.clear()
                launch_all()
            triton_path = _summary(record)
            launch_all = make()  # fresh plans: nothing kept yet
            launch_all()  # the first round keeps the compiled kernels
            record.clear()
            with counting_triton_runs() as runs:
                launch_all()
            relaunched = _summary(record)
            summaries[name] = (triton_path, relaunched)
            report["scenarios"][name] = {"launches": len(relaunched),
                                         "same_calls": relaunched == triton_path,
                                         "through_triton": runs[0]}
        f32, bf16 = summaries["norm_clip-float32"][1], summaries["norm_clip-bfloat16"][0]
        report["control_same"] = f32 == bf16
    print(json.dumps(report))


if __name__ == "__main__":
    main()
