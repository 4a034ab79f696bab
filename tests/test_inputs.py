"""Input handling: None grads, generators, empty input, aliases, bucket views, non-contiguous
grads, non-finite norms in each mode, and bad arguments rejected before any change."""

import math
import warnings

import pytest
import torch

import tritonclip
from helpers import (PlanBuilds, applied_coefficient, assert_norm_close, assert_scaled_once,
                     cached_plans, params_with, random_grads)
from tritonclip import kernels, reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_grads_skipped_and_generator_accepted(backend):
    grads = random_grads([10, 20], torch.float32)
    params = params_with([grads[0], None, grads[1]])
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_((p for p in params), 0.1, backend=backend)
    assert_norm_close(total, reference.total_norm(before, 2.0), grads=before)
    coef = applied_coefficient(total, 0.1)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_tensor_and_empty_inputs(backend):
    p = params_with(random_grads([33], torch.float32))[0]
    before = p.grad.clone()
    total = tritonclip.clip_grad_norm_(p, 0.1, backend=backend)
    assert_scaled_once(p.grad, before, applied_coefficient(total, 0.1))
    assert float(tritonclip.clip_grad_norm_([], 1.0, backend=backend)) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        tritonclip.clip_grad_norm_((x for x in []), 1.0, backend=backend)
    assert float(tritonclip.get_total_norm([], backend=backend)) == 0.0
    assert float(tritonclip.get_total_norm([torch.empty(0)], backend=backend)) == 0.0
    assert float(tritonclip.clip_grad_norm_(params_with([None]), 1.0, backend=backend)) == 0.0
    tritonclip.clip_grad_value_([], 1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_and_aliases_counted_and_scaled_once(backend):
    g = random_grads([100], torch.float32)[0]
    before = g.clone()
    p = params_with([g])[0]
    alias = torch.nn.Parameter(torch.zeros(10, 10))
    alias.grad = g.view(10, 10)  # same memory, another tensor
    total = tritonclip.clip_grad_norm_([p, p, alias], 0.1, backend=backend)
    assert_norm_close(total, reference.total_norm([before], 2.0), grads=[before])
    assert_scaled_once(g, before, applied_coefficient(total, 0.1))  # once, not three times
    # Partial overlap: the union of the two regions is counted once.
    flat = random_grads([50], torch.float32)[0]
    total = tritonclip.get_total_norm([flat[0:30], flat[20:50]], backend=backend)
    assert_norm_close(total, reference.total_norm([flat], 2.0), grads=[flat])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_views_are_merged_into_one_span(backend):
    bucket = random_grads([10 + 300 + 7], torch.float32)[0]
    views = [bucket[0:10], bucket[10:310].view(20, 15), bucket[310:317]]
    before = bucket.clone()
    total = tritonclip.clip_grad_norm_(params_with(views), 0.1, backend=backend)
    assert_norm_close(total, reference.total_norm([before], 2.0), grads=[before])
    assert_scaled_once(bucket, before, applied_coefficient(total, 0.1))
    if backend == "triton":
        (plan,) = cached_plans()
        assert sum(launch.n_spans for launch in plan.launches) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_grads(backend):
    base = random_grads([12 * 10], torch.float32)[0].view(12, 10)
    transposed = base.t()  # dense, permuted: handled as a span
    strided = random_grads([8 * 6], torch.float32, seed=1)[0].view(8, 6)[:, ::2]  # not dense
    before_base, before_strided_parent = base.clone(), strided.clone()
    total = tritonclip.clip_grad_norm_(params_with([transposed, strided]), 0.1, backend=backend)
    assert_norm_close(total, reference.total_norm([before_base, before_strided_parent], 2.0), grads=[before_base, before_strided_parent])
    coef = applied_coefficient(total, 0.1)
    assert_scaled_once(base, before_base, coef)
    assert_scaled_once(strided, before_strided_parent, coef)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 0.5, 0.0],
                         ids=["2", "1", "inf", "-inf", "0.5", "0"])
def test_nonfinite_modes(backend, bad, norm_type):
    def fresh():
        grads = random_grads([64, 65], torch.float32)
        grads[1][7] = bad
        return grads

    expected = reference.total_norm(fresh(), norm_type)
    # propagate: the norm is non-finite and the grads are scaled by the non-finite coefficient
    grads = fresh()
    total = tritonclip.clip_grad_norm_(params_with(grads), 1.0, norm_type, backend=backend)
    assert_norm_close(total, expected)
    assert not math.isfinite(float(total))  # for every norm order, -inf and 0 included
    # error: raised before anything is modified
    if not math.isfinite(float(expected)):
        grads = fresh()
        before = [g.clone() for g in grads]
        with pytest.raises(RuntimeError, match="non-finite"):
            tritonclip.clip_grad_norm_(params_with(grads), 1.0, norm_type, backend=backend,
                                       error_if_nonfinite=True)
        for g, b in zip(grads, before):
            assert torch.equal(g.isnan(), b.isnan()) and torch.equal(g.nan_to_num(), b.nan_to_num())
        with pytest.raises(RuntimeError, match="non-finite"):
            tritonclip.get_total_norm(grads, norm_type, backend=backend, nonfinite="error")
    # skip: nothing is modified, the norm is returned
    grads = fresh()
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 1e-3, norm_type, backend=backend,
                                       nonfinite="skip")
    assert_norm_close(total, expected)
    for g, b in zip(grads, before):
        if math.isfinite(float(expected)):
            assert_scaled_once(g, b, applied_coefficient(total, 1e-3))
        else:
            assert torch.equal(g.nan_to_num(), b.nan_to_num())


def test_foreach_true_on_unsupported_device_raises_like_torch():
    # meta is rejected earlier; a foreach-less device needs a backend ("privateuse1"): check
    # the rule itself instead.
    from tritonclip._torch_backend import use_foreach
    with pytest.raises(RuntimeError, match="foreach=True"):
        use_foreach([torch.zeros(1)], torch.device("meta"), True)
    assert use_foreach([torch.zeros(1)], torch.device("cpu"), False) is False


def _grads_and_copies():
    grads = random_grads([20, 30], torch.float32)
    return grads, [g.clone() for g in grads]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda ps: tritonclip.clip_grad_norm_(ps, -1.0), ValueError, "max_norm.*-1.0"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, math.nan), ValueError, "max_norm.*nan"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, "1"), TypeError, "max_norm.*'1'"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, "fro"), ValueError, "norm_type.*'fro'"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, math.nan), ValueError, "norm_type"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, eps=-1e-6), ValueError, "eps"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, nonfinite="ignore"), ValueError, "'ignore'"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True, nonfinite="skip"),
         ValueError, "contradicts"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, foreach="yes"), TypeError, "foreach"),
        (lambda ps: tritonclip.clip_grad_norm_(ps, 1.0, backend="cuda"), ValueError, "'cuda'"),
        (lambda ps: tritonclip.clip_grad_norm_(ps + [3.0], 1.0), TypeError, r"parameters\[2\].*float"),
        (lambda ps: tritonclip.clip_grad_norm_(42, 1.0), TypeError, "int"),
        (lambda ps: tritonclip.clip_grad_value_(ps, -0.5), ValueError, "clip_value.*-0.5"),
        (lambda ps: tritonclip.clip_grad_value_(ps, math.nan), ValueError, "clip_value"),
        (lambda ps: tritonclip.clip_grad_value_(ps, lo=1.0, hi=-1.0), ValueError, "lo.*hi"),
        (lambda ps: tritonclip.clip_grad_value_(ps, 1.0, lo=-1.0), ValueError, "not both"),
        (lambda ps: tritonclip.clip_grad_value_(ps), ValueError, "clip_value"),
        (lambda ps: tritonclip.get_total_norm([p.grad for p in ps] + ["x"]), TypeError, r"tensors\[2\]"),
        (lambda ps: tritonclip.clip_grads_with_norm_(ps, -2.0, torch.tensor(1.0)), ValueError, "max_norm"),
    ],
)
def test_bad_input_rejected_before_any_change(call, error, match):
    grads, before = _grads_and_copies()
    with pytest.raises(error, match=match):
        call(params_with(grads))
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


def test_meta_tensors_rejected():
    p = torch.nn.Parameter(torch.empty(4, device="meta"))
    p.grad = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        tritonclip.clip_grad_norm_([p], 1.0)
    with pytest.raises(ValueError, match="meta"):
        tritonclip.get_total_norm([torch.empty(3, device="meta")])


def test_forced_triton_without_interpreter_fails_before_any_change(monkeypatch):
    monkeypatch.setattr(kernels.config, "_INTERPRETED", False)
    grads, before = _grads_and_copies()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tritonclip.clip_grad_norm_(params_with(grads), 1e-3, backend="triton")
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


@pytest.mark.interpreter
def test_forced_triton_rejects_a_complex_group_before_touching_the_real_one():
    real = random_grads([20], torch.float32)[0]
    before = real.clone()
    cplx = torch.randn(5, dtype=torch.complex64)
    with pytest.raises(ValueError, match="complex64"):
        tritonclip.clip_grad_norm_(params_with([real, cplx]), 1e-3, backend="triton")
    assert torch.equal(real, before)


def test_env_selects_backend(monkeypatch):
    monkeypatch.setenv("TRITONCLIP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TRITONCLIP_BACKEND"):
        tritonclip.get_total_norm([torch.ones(3)])
    monkeypatch.setenv("TRITONCLIP_BACKEND", "torch")
    builds = PlanBuilds(monkeypatch)
    tritonclip.get_total_norm([torch.ones(3)])
    assert builds.count == 0


@pytest.mark.interpreter
def test_env_triton_backend_runs_kernels(monkeypatch):
    monkeypatch.setenv("TRITONCLIP_BACKEND", "triton")
    builds = PlanBuilds(monkeypatch)
    tritonclip.get_total_norm([torch.ones(3)])
    assert builds.count == 1


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    builds = PlanBuilds(monkeypatch)
    tritonclip.clip_grad_norm_(params_with(random_grads([10], torch.float32)), 1e-3)
    assert builds.count == 0


def test_complex_and_sparse_grads_on_torch_backend():
    c = torch.randn(7, dtype=torch.complex64)
    sparse = torch.sparse_coo_tensor([[0, 2, 2]], [1.0, 2.0, 2.0], (4,), check_invariants=True)
    dense = torch.randn(5)
    total = tritonclip.get_total_norm([c, sparse, dense])
    expected = torch.linalg.vector_norm(torch.cat([c.abs().double(), torch.tensor([1.0, 4.0]).double(), dense.double()]))
    assert_norm_close(total, expected)


def test_no_warnings_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tritonclip.clip_grad_norm_(params_with(random_grads([10], torch.float32)), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_inside_a_dense_grad_is_counted_once(backend):
    g = torch.tensor([3.0, 0.0, 4.0, 0.0])
    total = tritonclip.clip_grad_norm_(params_with([g, g[::2]]), 1.0, backend=backend)
    assert float(total) == pytest.approx(5.0, rel=1e-6)
    torch.testing.assert_close(g, torch.tensor([0.6, 0.0, 0.8, 0.0]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_partly_overlapping_another_grad_is_rejected(backend):
    buffer = random_grads([40], torch.float32)[0]
    before = buffer.clone()
    grads = [buffer[:20], buffer[10:40:3]]
    with pytest.raises(ValueError, match=r"gradient 1 .*overlaps"):
        tritonclip.clip_grad_norm_(params_with(grads), 1e-3, backend=backend)
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_rejected_before_any_change(backend):
    dense = random_grads([30], torch.float32)[0]
    before = dense.clone()
    expanded = torch.ones(1).expand(4)
    for clip in (lambda ps: tritonclip.clip_grad_norm_(ps, 1e-3, backend=backend),
                 lambda ps: tritonclip.clip_grad_value_(ps, 1e-3, backend=backend)):
        with pytest.raises(ValueError, match=r"gradients\[1\].*expanded"):
            clip(params_with([dense, expanded]))
        assert torch.equal(dense, before)


def test_value_clip_rejects_complex_and_uncoalesced_sparse_before_any_change():
    dense = random_grads([30], torch.float32)[0]
    before = dense.clone()
    with pytest.raises(TypeError, match=r"gradients\[1\].*complex"):
        tritonclip.clip_grad_value_(params_with([dense, torch.randn(3, dtype=torch.complex64)]), 0.1)
    sparse = torch.sparse_coo_tensor([[0, 2, 2]], [1.0, 2.0, 2.0], (4,), check_invariants=True)
    with pytest.raises(ValueError, match="coalesce"):
        tritonclip.clip_grad_value_(params_with([dense, sparse]), 0.1)
    assert torch.equal(dense, before)
    coalesced = sparse.coalesce()
    tritonclip.clip_grad_value_(params_with([coalesced]), 1.0)
    assert coalesced.to_dense().tolist() == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_dtype_follows_the_gradients_not_the_default_dtype(backend):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert tritonclip.get_total_norm([], backend=backend).dtype == torch.float32
        ones = torch.ones(3, dtype=torch.float32)
        assert tritonclip.get_total_norm([ones], backend=backend).dtype == torch.float32
        assert tritonclip.get_total_norm([ones.double()], backend=backend).dtype == torch.float64
        assert tritonclip.get_total_norm([ones, ones.double()],
                                         backend=backend).dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_layout_cache_reuses_grouping_for_the_same_tensors(monkeypatch):
    from tritonclip import _layout

    grads = random_grads([10, 20, 30], torch.float32)
    params = params_with(grads)
    tritonclip.clip_grad_norm_(params, 1e-3)
    monkeypatch.setattr(_layout, "spans", lambda *a: pytest.fail("grouped again"))
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params, 1e-3)
    assert_norm_close(total, reference.total_norm(before, 2.0), grads=before)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, applied_coefficient(total, 1e-3))


@pytest.mark.parametrize("change", ["new-tensor", "dtype", "transpose", "view-offset"])
def test_layout_cache_notices_a_changed_list(change):
    base = random_grads([64], torch.float32)[0]
    grads = [base[:32].view(4, 8), base[32:]]
    tritonclip.get_total_norm(grads)  # cached
    if change == "new-tensor":
        grads[1] = random_grads([32], torch.float32, seed=5)[0]
        expected = [grads[0], grads[1]]
    elif change == "dtype":
        grads = [g.double() for g in grads]
        expected = grads
    elif change == "transpose":
        grads[0] = grads[0].t()
        expected = [base]
    else:  # same storage, shifted view: the two no longer touch but overlap
        grads[1] = base[16:48]
        expected = [base[:48]]
    total = tritonclip.get_total_norm(grads)
    assert_norm_close(total, reference.total_norm(expected, 2.0), grads=expected)


def test_the_same_gradient_objects_skip_the_signature(monkeypatch):
    from tritonclip import _core

    grads = random_grads([100, 200, 50], torch.float32)
    expected = tritonclip.get_total_norm(grads)
    monkeypatch.setattr(_core, "_signature", lambda *a: pytest.fail("signature computed"))
    assert torch.equal(tritonclip.get_total_norm(grads), expected)


@pytest.mark.parametrize("change", ["data", "resize"])
def test_a_gradient_object_whose_memory_changed_is_regrouped(change):
    # Same tensor objects as the cached call, but one now has other memory (``.data =``) or
    # another size (``resize_``): the identity fast path must notice and regroup.
    grads = random_grads([100, 200], torch.float32)
    tritonclip.get_total_norm(grads)
    if change == "data":
        grads[1].data = torch.full((300,), 2.0)
    else:
        grads[1].resize_(50)
    total = tritonclip.get_total_norm(grads)
    assert_norm_close(total, reference.total_norm([g.clone() for g in grads], 2.0), grads=[g.clone() for g in grads])
