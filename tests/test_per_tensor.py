"""Per-tensor norm clipping and its kernels (row plans, per-span scale) against the float64
reference of min(max_norm / (|g| + eps), 1) per tensor."""

import math

import pytest
import torch

import tritonclip
from helpers import cached_plans, DTYPE_IDS, DTYPES, norm_dtype, params_with, PlanBuilds, poisoned, random_grads
from tritonclip import _core, kernels
from tritonclip import reference_adaptive as ref

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]
SIZES = [1, 63, 0, 4097, 70001, 3000]


@pytest.fixture(autouse=True)
def _fresh_row_caches():
    _core.clear_cache()


def _expected_scaled(before, norm, max_norm, eps=1e-6):
    """before * coef with coef from the returned float32 norm, in the kernels' precision."""
    if before.dtype == torch.float64:
        return None
    coef = torch.clamp(max_norm / (norm.float() + eps), max=1.0)
    if coef >= 1:
        return before
    return (before.float() * coef).to(before.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.5], ids=["2", "1", "inf", "3.5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_matches_reference(backend, dtype, norm_type):
    grads = random_grads(SIZES, dtype, seed=3)
    before = [g.clone() for g in grads]
    ref_norms, ref_clipped = ref.clip_grad_norm_per_tensor(before, 1.0, norm_type)
    # a threshold between the norms: some tensors clipped, others not
    max_norm = float(ref_norms[ref_norms > 0].median())
    ref_norms, ref_clipped = ref.clip_grad_norm_per_tensor(before, max_norm, norm_type)
    norms = tritonclip.clip_grad_norm_per_tensor_(params_with(grads), max_norm, norm_type,
                                                  backend=backend)
    assert norms.dtype == norm_dtype(grads) and norms.shape == (len(grads),)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-5, atol=0)
    untouched = 0
    for g, b, r, n in zip(grads, before, ref_clipped, norms):
        if dtype == torch.float64:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=0)
            continue
        expected = _expected_scaled(b, n, max_norm)
        assert torch.equal(g, expected), (dtype, g.numel())
        untouched += expected is b and g.numel() > 0
        torch.testing.assert_close(g.double(), r, rtol=2 ** -7, atol=2 ** -24)  # the formula
    assert dtype == torch.float64 or untouched >= 1  # the mix really happened


def test_negative_control_global_clip_is_not_per_tensor():
    grads = random_grads([300, 5000], torch.float32, seed=1)
    _, per_tensor = ref.clip_grad_norm_per_tensor(grads, 1.0)
    _, global_ = tritonclip.reference.clip_grad_norm(grads, 1.0)
    assert not all(torch.allclose(a, b) for a, b in zip(per_tensor, global_))


@pytest.mark.interpreter
def test_one_plan_covers_every_tensor(monkeypatch):
    # One row plan for the group: the norm and the scale each launch once per alignment
    # class of the plan (the launchers loop over plan.launches), whatever the tensor count.
    grads = random_grads([100, 4097, 3, 70001], torch.float32)
    builds = PlanBuilds(monkeypatch)
    tritonclip.clip_grad_norm_per_tensor_(params_with(grads), 0.5, backend="triton")
    assert builds.count == 1
    (rows,) = cached_plans()
    assert rows.n_rows == 4 and len(rows.launches) == 2  # 3 and 4097 are unaligned
    assert sorted(rows.order.tolist()) == [0, 1, 2, 3]


@pytest.mark.interpreter
def test_second_call_builds_nothing(monkeypatch):
    grads = random_grads([100, 4097, 3], torch.float32)
    params = params_with(grads)
    builds = PlanBuilds(monkeypatch)
    tritonclip.clip_grad_norm_per_tensor_(params, 0.1, backend="triton")
    assert builds.count == 1
    tritonclip.clip_grad_norm_per_tensor_(params, 0.1, backend="triton")
    assert builds.count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_clipped_once_and_none_skipped(backend):
    g = random_grads([500], torch.float32)[0]
    before = g.clone()
    p = params_with([g])[0]
    none = params_with([None])[0]
    norms = tritonclip.clip_grad_norm_per_tensor_([p, none, p], 0.1, backend=backend)
    assert norms.shape == (2,) and norms[0] == norms[1]
    assert torch.equal(g, _expected_scaled(before, norms[0], 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_gradients_rejected_before_any_change(backend):
    flat = random_grads([1000], torch.float32)[0]
    before = flat.clone()
    params = params_with([flat[:600], flat[500:]])
    with pytest.raises(ValueError, match="share memory"):
        tritonclip.clip_grad_norm_per_tensor_(params, 1e-3, backend=backend)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_gradient(backend):
    parent = random_grads([64 * 64], torch.float32)[0].view(64, 64)
    strided = parent[:, ::2]
    other = parent.clone()[:, 1::2]  # another storage
    before = strided.clone()
    norms = tritonclip.clip_grad_norm_per_tensor_(params_with([strided, other]), 0.5,
                                                  backend=backend)
    torch.testing.assert_close(norms[0].double(), before.double().norm(), rtol=1e-6, atol=0)
    assert torch.equal(strided, _expected_scaled(before, norms[0], 0.5))
    assert torch.equal(parent[:, 1::2], parent[:, 1::2])  # the other columns not written


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["propagate", "skip", "error"])
def test_nonfinite(backend, mode):
    grads = random_grads([100, 200], torch.float32)
    grads[0][7] = float("nan")
    before = [g.clone() for g in grads]
    params = params_with(grads)
    if mode == "error":
        with pytest.raises(RuntimeError, match="non-finite"):
            tritonclip.clip_grad_norm_per_tensor_(params, 0.1, backend=backend, nonfinite=mode)
        for g, b in zip(grads, before):  # raised before touching any gradient
            assert torch.equal(g.nan_to_num(), b.nan_to_num())
        return
    norms = tritonclip.clip_grad_norm_per_tensor_(params, 0.1, backend=backend, nonfinite=mode)
    assert norms[0].isnan() and torch.isfinite(norms[1])
    assert torch.equal(grads[1], _expected_scaled(before[1], norms[1], 0.1))
    if mode == "skip":
        assert torch.equal(grads[0].isnan(), before[0].isnan())
        assert torch.equal(grads[0].nan_to_num(), before[0].nan_to_num())
    else:
        assert grads[0].isnan().all()


@pytest.mark.parametrize("bad, error", [
    (dict(max_norm=-1.0), ValueError), (dict(max_norm=float("nan")), ValueError),
    (dict(norm_type=0.0), ValueError), (dict(norm_type="-inf"), ValueError),
    (dict(norm_type="two"), ValueError), (dict(eps=float("inf")), ValueError),
    (dict(nonfinite="ignore"), ValueError), (dict(max_norm="1"), TypeError),
])
def test_bad_arguments_touch_nothing(bad, error):
    grads = random_grads([50], torch.float32)
    before = grads[0].clone()
    args = dict(max_norm=1e-3, norm_type=2.0) | bad
    with pytest.raises(error):
        tritonclip.clip_grad_norm_per_tensor_(params_with(grads), args.pop("max_norm"), **args)
    assert torch.equal(grads[0], before)


def test_empty_input():
    norms = tritonclip.clip_grad_norm_per_tensor_([], 1.0)
    assert norms.shape == (0,) and norms.dtype == torch.float32


# -- kernels ------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_row_plan_equals_plan_builder_for_whole_tensors(dtype):
    # The row builder writes plan.py's table layout with vectorized ops: same bytes.
    flat = torch.zeros(200000, dtype=dtype)
    views = [flat[:70000], flat[70001:70006], flat[70008:140008 + 8], flat[150001:150002]]
    rows = kernels.build_row_plan([(v.data_ptr(), 1, v.numel()) for v in views], flat.device,
                                  dtype)
    expected = kernels.build_plan([(v.data_ptr(), v.numel()) for v in views], flat.device,
                                  dtype)
    assert rows.n_partials == expected.n_partials
    assert rows.n_segments == 1 + len(views) and expected.n_segments == 1
    assert torch.equal(rows.segments[0], expected.segments[0])
    assert len(rows.launches) == len(expected.launches)
    for a, b in zip(rows.launches, expected.launches):
        n = 2 * a.n_spans + 2 * a.n_chunks
        assert (a.aligned, a.n_spans, a.n_chunks) == (b.aligned, b.n_spans, b.n_chunks)
        assert torch.equal(a.table[:n], b.table[:n])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_row_norms_and_per_row_scale(dtype):
    w = random_grads([7 * 301], dtype, seed=2)[0].view(7, 301)
    long_rows = random_grads([2 * (kernels.CHUNK + 5)], dtype, seed=5)[0].view(2, -1)
    entries = [(w.data_ptr(), 7, 301), (long_rows.data_ptr(), 2, kernels.CHUNK + 5)]
    rows = kernels.build_row_plan(entries, w.device, dtype)
    assert rows.n_rows == 9
    power = kernels.finalize(rows, kernels.norm_partials(rows, 2.0), 2.0)
    expected = torch.cat([w.double().norm(dim=1), long_rows.double().norm(dim=1)])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(power[1:].double().sqrt(), expected, rtol=rtol, atol=0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coef = torch.tensor([0.5, 1.0, 2.0, float("nan"), 0.25, 1.0, 0.75, 0.125, 3.0], dtype=acc)
    before = [w.clone(), long_rows.clone()]
    kernels.scale_each_(rows, coef)
    for t, b, c in ((w, before[0], coef[:7]), (long_rows, before[1], coef[7:])):
        for row, brow, cr in zip(t, b, c):
            if cr >= 1:
                assert torch.equal(row, brow)  # skipped: not even rewritten
            elif cr.isnan():
                assert row.isnan().all()
            else:
                assert torch.equal(row, (brow.to(acc) * cr).to(dtype))


@pytest.mark.interpreter
def test_scale_each_without_skip_applies_every_coefficient():
    g = random_grads([1000], torch.float32)[0]
    rows = kernels.build_row_plan([(g.data_ptr(), 4, 250)], g.device, torch.float32)
    before = g.clone()
    coef = torch.tensor([2.0, 1.0, 0.5, 4.0])
    kernels.scale_each_(rows, coef, skip_at_least_one=False)
    assert torch.equal(g, (before.view(4, 250) * coef[:, None]).view(-1))
    with pytest.raises(ValueError, match="4 coefficients"):
        kernels.scale_each_(rows, coef[:3])


@pytest.mark.interpreter
def test_every_row_partial_is_written():
    g = random_grads([3 * 70001], torch.float32)[0]
    rows = kernels.build_row_plan([(g.data_ptr(), 3, 70001)], g.device, torch.float32)
    original_empty = torch.empty
    try:  # poison the launchers' own allocations
        torch.empty = lambda *a, **k: original_empty(*a, **k).fill_(float("nan"))
        partials = kernels.norm_partials(rows, 2.0)
        out = kernels.finalize(rows, partials, 2.0)
    finally:
        torch.empty = original_empty
    assert not partials.isnan().any() and not out.isnan().any()
    assert out.shape == (4,)
    assert poisoned((1,), torch.float32).isnan().all()  # the helper poisons
