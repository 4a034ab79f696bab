"""Property test: random lists of shapes, dtypes, views and norm types against the float64
reference, on both backends."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tritonclip
from helpers import DTYPES, applied_coefficient, assert_norm_close, assert_scaled_once, params_with
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
