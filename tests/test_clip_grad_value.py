"""clip_grad_value_: symmetric and asymmetric bounds, every dtype, both backends."""

import math

import pytest
import torch

import tritonclip
from helpers import cached_plans, DTYPE_IDS, DTYPES, params_with, random_grads
from tritonclip import kernels, reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


def _expected(before, lo, hi):
    """Clamp in the compute dtype, rounded once to the grad's dtype (torch's semantics)."""
    compute = torch.float64 if before.dtype == torch.float64 else torch.float32
    x = before.to(compute)
    return torch.where(x.isnan(), x, x.clamp(lo, hi)).to(before.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bounds", [dict(clip_value=0.5), dict(lo=-0.1, hi=0.7), dict(lo=0.2),
                                    dict(hi=-0.3), dict(clip_value=0.0), dict(clip_value=0.1001)],
                         ids=["sym", "asym", "lo-only", "hi-only", "zero", "inexact"])
def test_clamp_matches_reference(backend, dtype, bounds):
    grads = random_grads([1, 63, 4097, 0, 70001], dtype, seed=2)
    grads[1][5] = float("nan")
    grads[2][3] = float("inf")
    before = [g.clone() for g in grads]
    tritonclip.clip_grad_value_(params_with(grads), backend=backend, **bounds)
    if "clip_value" in bounds:
        lo, hi = -bounds["clip_value"], bounds["clip_value"]
    else:
        lo, hi = bounds.get("lo", -math.inf), bounds.get("hi", math.inf)
    for g, b, r in zip(grads, before, reference.clip_grad_value(before, lo, hi)):
        expected = _expected(b, lo, hi)
        assert torch.equal(g.isnan(), expected.isnan())
        assert torch.equal(g.nan_to_num(), expected.nan_to_num())
        # and within one rounding of the float64 reference
        torch.testing.assert_close(g.double(), r, equal_nan=True, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_matches_torch_clip_grad_value(backend, foreach):
    ours = random_grads([100, 4097], torch.float32, seed=4)
    theirs = [g.clone() for g in ours]
    tritonclip.clip_grad_value_(params_with(ours), 0.3, foreach=foreach, backend=backend)
    torch.nn.utils.clip_grad_value_(params_with(theirs), 0.3, foreach=foreach)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_clip_of_aliases_and_bucket_views(backend):
    bucket = random_grads([64], torch.float32)[0]
    before = bucket.clone()
    tritonclip.clip_grad_value_(params_with([bucket[:32], bucket[32:], bucket[10:20]]), 0.2,
                                backend=backend)
    assert torch.equal(bucket, before.clamp(-0.2, 0.2))
    # Clamping is idempotent, so the values cannot show a region clamped twice; the plan can.
    if backend == "triton":
        (plan,) = cached_plans()
        assert sum(launch.n_spans for launch in plan.launches) == 1


def test_negative_control_detects_a_wrong_bound():
    grads = random_grads([4097], torch.float32)
    before = grads[0].clone()
    tritonclip.clip_grad_value_(params_with(grads), 0.5, backend="torch")
    assert not torch.equal(grads[0], _expected(before, -0.4999, 0.4999))
