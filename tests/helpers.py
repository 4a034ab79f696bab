"""Shared test helpers: input builders, poisoning, and the tolerance checks."""

from __future__ import annotations

import math
import threading

import torch

from tritonclip import _core, kernels, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}
NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.5, math.inf, -math.inf]
# Total norms must be within this relative error of the float64 reference for every dtype:
# the inputs are exact in their dtype and accumulation is float32.
NORM_RTOL = 1e-5


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """An allocation filled with NaN, so an element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def random_grads(sizes, dtype, seed=0, device="cpu", scale=1.0) -> list[torch.Tensor]:
    """Gradients with exact values in ``dtype`` (drawn in float32, rounded once)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        values = (torch.randn(n, generator=gen) * scale).to(dtype)
        g = poisoned((n,), dtype, device)
        g.copy_(values)
        out.append(g)
    return out


def params_with(grads: list[torch.Tensor | None]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        shape = g.shape if g is not None else (3,)
        dtype = g.dtype if g is not None else torch.float32
        device = g.device if g is not None else "cpu"
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = g
        params.append(p)
    return params


def norm_dtype(grads) -> torch.dtype:
    """The dtype of a norm over ``grads``: float64 when a float64 gradient takes part."""
    return (torch.float64 if any(g is not None and g.dtype == torch.float64 for g in grads)
            else torch.float32)


def assert_norm_close(actual: torch.Tensor, expected: torch.Tensor, rtol=NORM_RTOL, grads=()):
    """``actual`` (float32, or float64 for ``grads`` with a float64 one) within ``rtol`` of
    the float64 ``expected``; NaN/inf must match."""
    assert actual.dtype == norm_dtype(grads), actual.dtype
    assert actual.dim() == 0, actual.shape
    a, e = float(actual), float(expected)
    if math.isnan(e) or math.isinf(e):
        assert (math.isnan(a) and math.isnan(e)) or a == e, (a, e)
        return
    # float32 cannot hold values below its smallest normal with 1e-5 precision.
    assert abs(a - e) <= rtol * abs(e) + 1e-37, f"norm {a!r} vs reference {e!r}: rel err {abs(a - e) / max(abs(e), 1e-300):.3g}"


def assert_scaled_once(after: torch.Tensor, before: torch.Tensor, coef: torch.Tensor):
    """``after`` equals before * coef computed in float32 (float64 for float64) and rounded
    once to its dtype, bit for bit."""
    compute = torch.float64 if before.dtype == torch.float64 else torch.float32
    expected = (before.to(compute) * coef.to(compute)).to(before.dtype)
    assert torch.equal(after.isnan(), expected.isnan())
    mismatch = (after != expected) & ~expected.isnan()
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} of {after.numel()} elements differ from grad * coef: "
        f"first at {mismatch.nonzero()[0].tolist()}: {after[mismatch][0]!r} vs "
        f"{expected[mismatch][0]!r}"
    )


def applied_coefficient(total: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """The coefficient tritonclip documents, recomputed from the norm it returned."""
    return torch.clamp(max_norm / (total + eps), max=1.0)  # in the norm's dtype


def check_coefficient(total: torch.Tensor, ref_total: torch.Tensor, max_norm: float):
    coef = applied_coefficient(total, max_norm)
    ref = reference.clip_coefficient(ref_total, max_norm)
    assert abs(float(coef) - float(ref)) <= NORM_RTOL * float(ref), (float(coef), float(ref))
    return coef


def cached_plans() -> list:
    """The launch plans held by the core's cache (with the layouts they were built for)."""
    plans = []
    for entry in list(_core.CACHE._items.values()):
        for group in getattr(entry, "groups", ()):
            for plan in [getattr(group, "plan", None), *getattr(group, "plans", {}).values()]:
                if plan is not None and not any(plan is p for p in plans):
                    plans.append(plan)
    return plans


class PlanBuilds:
    """Counts kernels.build_plan / build_row_plan calls (use as a context manager)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("build_plan", "build_row_plan"):
            original = getattr(kernels, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(kernels, name, counted)


def run_in_threads(work, n: int = 4) -> list[str]:
    """``work(i)`` for i in range(n), each in its own thread, all at once; the exceptions they
    raised, as strings (an exception in a thread would otherwise only be printed)."""
    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(repr(e))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
