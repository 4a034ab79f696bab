"""Conformance of get_total_norm / clip_grad_norm_ / clip_grads_with_norm_ on both backends,
against the float64 reference and against torch.nn.utils on the same inputs."""

import math

import pytest
import torch

import tritonclip
from helpers import (
    DTYPE_IDS,
    DTYPES,
    NORM_TYPES,
    applied_coefficient,
    assert_norm_close,
    assert_scaled_once,
    check_coefficient,
    params_with,
    random_grads,
)
from tritonclip import reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]

SIZE_SETS = {
    "n0": [0],
    "n1": [1],
    "n63": [63],
    "n4097": [4097],
    "mixed": [1, 63, 0, 4097, 130, 7],
    "chunks": [70000, 5],  # more than one 64Ki-element chunk
}


def _norm_id(p):
    return {math.inf: "inf", -math.inf: "-inf"}.get(p, str(p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=_norm_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("sizes", SIZE_SETS.values(), ids=SIZE_SETS.keys())
def test_total_norm_matches_float64_reference(backend, norm_type, dtype, sizes):
    grads = random_grads(sizes, dtype, seed=len(sizes))
    total = tritonclip.get_total_norm(grads, norm_type, backend=backend)
    assert_norm_close(total, reference.total_norm(grads, norm_type), grads=grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf], ids=_norm_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_clip_active_scales_each_grad_once_by_the_coefficient(backend, norm_type, dtype):
    grads = random_grads([63, 4097, 1, 300], dtype, seed=3)
    before = [g.clone() for g in grads]
    max_norm = 0.25
    total = tritonclip.clip_grad_norm_(params_with(grads), max_norm, norm_type, backend=backend)
    assert_norm_close(total, reference.total_norm(before, norm_type), grads=before)
    coef = check_coefficient(total, reference.total_norm(before, norm_type), max_norm)
    assert float(coef) < 0.1  # clipping is really active
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_clip_inactive_leaves_grads_bitwise_unchanged(backend, dtype):
    grads = random_grads([63, 4097], dtype)
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 1e6, backend=backend)
    assert float(total) > 0
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=DTYPE_IDS.get)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_matches_torch_nn_utils(backend, dtype, foreach):
    ours = random_grads([10, 4097, 257], dtype, seed=7)
    theirs = [g.clone() for g in ours]
    params_theirs = params_with(theirs)
    total = tritonclip.clip_grad_norm_(params_with(ours), 0.5, foreach=foreach, backend=backend)
    expected = torch.nn.utils.clip_grad_norm_(params_theirs, 0.5, foreach=foreach)
    # torch returns the norm in the grads' dtype: compare at that precision.
    assert float(total.to(dtype)) == pytest.approx(float(expected), rel=1e-2 if dtype != torch.float32 else 1e-6)
    # The coefficients differ by the norms' rounding (torch's is in the grads' dtype).
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_zero_counts_elements_not_tensors(backend):
    grads = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0]), torch.tensor([3.0])]
    assert float(tritonclip.get_total_norm(grads, 0, backend=backend)) == 3.0
    # torch's code counts the tensors that have a nonzero (documented difference).
    assert float(torch.nn.utils.get_total_norm(grads, 0)) == 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grads_with_norm_uses_given_norm(backend):
    grads = random_grads([100, 7], torch.float32)
    before = [g.clone() for g in grads]
    tritonclip.clip_grads_with_norm_(params_with(grads), 1.0, torch.tensor(4.0), backend=backend)
    coef = applied_coefficient(torch.tensor(4.0), 1.0)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)
    tritonclip.clip_grads_with_norm_(params_with(grads), 1.0, 0.5, backend=backend)  # float norm
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)  # coef 1: unchanged


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [0.5, 2.0, math.inf, -math.inf, 0.0], ids=_norm_id)
def test_per_tensor_norms(backend, norm_type):
    grads = random_grads([5, 0, 4097, 63], torch.bfloat16, seed=11)
    grads.append(grads[2])  # a duplicate gets its own entry, counted once in the total
    strided = torch.randn(8, 6)[:, ::2]
    grads.append(strided)
    total, norms = tritonclip.get_total_norm(grads, norm_type, backend=backend, per_tensor=True)
    unique = grads[:4] + [strided]
    assert_norm_close(total, reference.total_norm(unique, norm_type), grads=unique)
    assert norms.dtype == torch.float32 and norms.shape == (len(grads),)
    for t, n in zip(grads, norms):
        expected = reference.total_norm([t], norm_type)
        assert_norm_close(n, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_one_norm(backend):
    grads = random_grads([100], torch.float16) + random_grads([33], torch.float32, seed=1) + \
        random_grads([65], torch.bfloat16, seed=2) + random_grads([9], torch.float64, seed=3)
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 0.1, backend=backend)
    ref = reference.total_norm(before, 2.0)
    assert_norm_close(total, ref, grads=before)
    coef = check_coefficient(total, ref, 0.1)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors(backend):
    sizes = [(i * 37) % 200 for i in range(300)]
    grads = random_grads(sizes, torch.float32, seed=5)
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 1.0, backend=backend)
    ref = reference.total_norm(before, 2.0)
    assert_norm_close(total, ref)
    coef = check_coefficient(total, ref, 1.0)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


def test_negative_control_detects_a_wrong_scale():
    """The checks above must be able to fail: a coefficient off by one ulp is caught."""
    grads = random_grads([4097], torch.float32)
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 0.5, backend="torch")
    coef = applied_coefficient(total, 0.5)
    wrong = torch.nextafter(coef, torch.tensor(2.0))
    with pytest.raises(AssertionError):
        assert_scaled_once(grads[0], before[0], wrong)
    with pytest.raises(AssertionError):
        assert_norm_close(total * (1 + 3e-5), reference.total_norm(before, 2.0), grads=before)
    with pytest.raises(AssertionError):
        check_coefficient(total, reference.total_norm(before, 2.0) * 1.001, 0.5)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf, 0.0], ids=_norm_id)
def test_torch_backend_is_accurate_on_long_cpu_tensors(norm_type):
    # torch.linalg.vector_norm of one 4M-element float32 CPU tensor is off by ~1e-4; the torch
    # backend must still meet the 1e-5 promise.
    g = torch.rand(4_000_003, generator=torch.Generator().manual_seed(0)) + 0.5
    total = tritonclip.get_total_norm([g, g[:10].clone()], norm_type, backend="torch")
    assert_norm_close(total, reference.total_norm([g, g[:10]], norm_type))
