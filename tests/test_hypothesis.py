"""Property test: random lists of shapes, dtypes, views and norm types against the float64
reference, on both backends."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tritonclip
from helpers import (DTYPES, applied_coefficient, assert_norm_close, assert_scaled_once,
                     params_with, run_in_threads)
from tritonclip import reference

grad_specs = st.lists(
    st.tuples(st.integers(0, 3000), st.sampled_from(DTYPES), st.integers(0, 3)),
    min_size=1, max_size=12,
)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter),
                                     "torch"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=grad_specs, norm_type=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, math.inf]),
       max_norm=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_random_lists_match_reference(backend, specs, norm_type, max_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for n, dtype, offset in specs:
        # `offset` > 0 takes a view into a larger buffer: misaligned pointers and lengths.
        buffer = torch.randn(n + offset, generator=gen).to(dtype)
        grads.append(buffer[offset:])
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), max_norm, norm_type, backend=backend)
    assert_norm_close(total, reference.total_norm(before, norm_type), grads=before)
    coef = applied_coefficient(total, max_norm)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]
# Bounds inside, at the edge of and beyond float16's and float32's ranges.
bounds = st.sampled_from([0.0, 0.1, 1.0, 6e4, 65504.0, 65510.0, 65520.0, 1e5, 3e38, 3.4e38,
                          1e39, math.inf])
values = st.sampled_from([0.0, -0.0, 0.05, -2.5, 7e4, -1e5, 6.5e4, 3e38, math.inf, -math.inf,
                          math.nan])


def _expected_clamp(g: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """What the kernels compute: the value and the bounds in float32 (float64 for float64),
    clamped, rounded once to the gradient's dtype; NaN stays NaN."""
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    x = g.to(acc)
    low = torch.tensor(lo, dtype=torch.float64).to(acc)
    high = torch.tensor(hi, dtype=torch.float64).to(acc)
    return torch.where(x.isnan(), x, torch.minimum(torch.maximum(x, low), high)).to(g.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.integers(1, 300), st.sampled_from(DTYPES), st.integers(0, 2),
                                st.lists(values, max_size=4)), min_size=1, max_size=6),
       lo=bounds, hi=bounds, seed=st.integers(0, 2**16))
def test_value_clip_of_mixed_precision_lists_with_wide_bounds(backend, specs, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for n, dtype, offset, special in specs:
        buffer = (torch.randn(n + offset, generator=gen) * 1e4).to(dtype)
        for i, v in enumerate(special[:n]):
            buffer[offset + i] = v
        grads.append(buffer[offset:])
    lo = -lo
    expected = [_expected_clamp(g, lo, hi) for g in grads]
    tritonclip.clip_grad_value_(params_with(grads), lo=lo, hi=hi, backend=backend)
    for g, e in zip(grads, expected):
        assert torch.equal(g.isnan(), e.isnan())
        assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(e)), (lo, hi, g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.integers(0, 400), st.sampled_from(DTYPES),
                                st.sampled_from([None, math.nan, math.inf, -math.inf])),
                      min_size=1, max_size=6),
       norm_type=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, math.inf, -math.inf, -1.0]),
       seed=st.integers(0, 2**16))
def test_per_tensor_norms_with_nan_and_inf_for_every_order(backend, specs, norm_type, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for n, dtype, poison in specs:
        g = torch.randn(n, generator=gen).to(dtype)
        if poison is not None and n:
            g[int(torch.randint(n, (1,), generator=gen))] = poison
        grads.append(g)
    total, norms = tritonclip.get_total_norm(grads, norm_type, backend=backend, per_tensor=True)
    assert norms.shape == (len(grads),)
    for g, norm in zip(grads, norms):
        if g.isnan().any():
            assert norm.isnan(), (norm_type, g)
        elif g.isinf().any():
            assert norm == math.inf, (norm_type, g)
        else:
            expected = reference.total_norm([g], norm_type)
            assert_norm_close(norm.reshape(()), expected, rtol=2e-5, grads=grads)
    if any(g.isnan().any() for g in grads):
        assert total.isnan()
    elif any(g.isinf().any() for g in grads):
        assert total == math.inf


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=grad_specs, norm_type=st.sampled_from([0.0, 1.0, 2.0, math.inf, -math.inf]),
       seed=st.integers(0, 2**16))
def test_threads_get_the_results_of_one_thread(specs, norm_type, seed):
    # Each thread clips its own copy of one list, again and again, all at once (the layouts
    # share the one cache): every result equals, bit for bit, what one thread alone got on the
    # same copy (the same addresses: the summation order follows them).
    gen = torch.Generator().manual_seed(seed)
    source = [torch.randn(n + offset, generator=gen).to(dtype)[offset:]
              for n, dtype, offset in specs]
    copies = [[g.clone() for g in source] for _ in range(4)]

    def clip(i):
        for g, s in zip(copies[i], source):
            g.copy_(s)
        return tritonclip.clip_grad_norm_(params_with(copies[i]), 0.5, norm_type)

    alone = [(clip(i), [g.clone() for g in copies[i]]) for i in range(4)]
    results = [[] for _ in range(4)]

    def work(i):
        for _ in range(5):
            results[i].append((clip(i), [g.clone() for g in copies[i]]))

    assert run_in_threads(work) == []
    for (expected, expected_grads), runs in zip(alone, results):
        for total, grads in runs:
            assert torch.equal(total, expected) or (total.isnan() and expected.isnan())
            for g, e in zip(grads, expected_grads):
                assert torch.equal(g.isnan(), e.isnan())
                assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(e))
