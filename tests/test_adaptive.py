"""AGC, AutoClip and ZClip against float64 references of their published formulas (timm's
adaptive_clip_grad, the AutoClip paper's percentile rule, the ZClip reference algorithm)."""

import io
import math

import pytest
import torch

import tritonclip
from helpers import PlanBuilds, params_with, random_grads
from tritonclip import _core, kernels
from tritonclip import reference_adaptive as ref

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]
AGC_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _fresh_row_caches():
    _core.clear_cache()


# -- AGC ----------------------------------------------------------------------------------

def _agc_model(dtype, seed=0):
    """Linear, Conv2d, Embedding and 1-D parameters (as ``dtype`` leaves), with gradients whose
    rows straddle the AGC threshold (row scales spread over three decades), one zero gradient
    row and one zero weight row."""
    torch.manual_seed(seed)
    modules = [torch.nn.Linear(33, 17), torch.nn.Conv2d(3, 8, 3), torch.nn.Embedding(50, 12),
               torch.nn.LayerNorm(40)]
    gen = torch.Generator().manual_seed(seed + 1)
    weights, grads = [], []
    for p in (p for m in modules for p in m.parameters()):
        w = p.detach().clone()
        if not weights:
            w[3] = 0  # weight row of norm 0: the eps floor applies
        if w.dim() == 1 and torch.all(w == w.flatten()[0]):
            w = w + torch.randn(w.shape, generator=gen) * 0.1  # LayerNorm's ones/zeros
        rows = w.shape[0] if w.dim() > 1 else 1
        scale = torch.logspace(-4, -1, rows).view((rows,) + (1,) * (w.dim() - 1))
        g = torch.randn(w.shape, generator=gen) * (scale if w.dim() > 1 else 0.05)
        if w.dim() > 1:
            g[1] = 0  # zero gradient row
        weights.append(w.to(dtype).requires_grad_())
        grads.append(g.to(dtype))
    return weights, grads


def _with_grads(weights, grads):
    for w, g in zip(weights, grads):
        w.grad = g
    return weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["2", "1", "inf"])
@pytest.mark.parametrize("dtype", AGC_DTYPES, ids=["fp32", "bf16", "fp64"])
def test_agc_matches_timm_formula(backend, dtype, norm_type):
    weights, grads = _agc_model(dtype)
    params = _with_grads(weights, grads)
    before = [g.clone() for g in grads]
    expected = ref.agc(weights, before, 0.01, 1e-3, norm_type)
    tritonclip.clip_grad_agc_(params, 0.01, 1e-3, norm_type, backend=backend)
    clipped_rows = kept_rows = 0
    for w, g, b, e in zip(weights, grads, before, expected):
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=0)
        else:
            rtol = 1e-6 if dtype == torch.float32 else 2 ** -8
            torch.testing.assert_close(g.double(), e, rtol=rtol, atol=1e-30)
        rows_g = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(1, -1)
        rows_b = b.reshape(rows_g.shape)
        for row, brow in zip(rows_g, rows_b):
            if torch.equal(row, brow):
                kept_rows += 1
            else:
                clipped_rows += 1
    assert clipped_rows > 5 and kept_rows > 5  # both sides of the threshold were exercised


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_negative_control_unitwise_is_not_per_tensor(backend):
    weights, grads = _agc_model(torch.float32)
    before = [g.clone() for g in grads]
    tritonclip.clip_grad_agc_(_with_grads(weights, grads), backend=backend)
    # the same formula with whole-tensor norms (flattened to 1-D) gives other gradients
    whole = ref.agc([w.reshape(-1) for w in weights], [b.reshape(-1) for b in before])
    assert any(not torch.allclose(g.double().reshape(-1), e) for g, e in zip(grads, whole))


@pytest.mark.interpreter
def test_agc_long_rows_and_one_plan_per_tensor_list(monkeypatch):
    w = torch.nn.Parameter(random_grads([2 * (kernels.CHUNK + 3)], torch.float32, seed=1)[0]
                           .view(2, -1))
    w.grad = random_grads([w.numel()], torch.float32, seed=2)[0].view(2, -1)
    before = w.grad.clone()
    expected = ref.agc([w], [before], 1e-3)
    builds = PlanBuilds(monkeypatch)
    tritonclip.clip_grad_agc_([w], 1e-3, backend="triton")
    torch.testing.assert_close(w.grad.double(), expected[0], rtol=1e-6, atol=0)
    assert builds.count == 2  # weights and gradients
    tritonclip.clip_grad_agc_([w], 1e-3, backend="triton")
    assert builds.count == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_nan_row_stays_in_its_row(backend):
    weights, grads = _agc_model(torch.float32)
    grads[0][5, 2] = float("nan")
    before = [g.clone() for g in grads]
    expected = ref.agc(weights, before)
    tritonclip.clip_grad_agc_(_with_grads(weights, grads), backend=backend)
    assert grads[0][5].isnan().all()
    assert not grads[0][torch.arange(17) != 5].isnan().any()
    torch.testing.assert_close(grads[0].double(), expected[0], rtol=1e-6, atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_non_contiguous_parameter(backend):
    base = torch.randn(12, 20)
    w = torch.nn.Parameter(base.t())  # contiguous after Parameter? make sure it is not
    w = torch.nn.Parameter(torch.empty(12, 20).t())
    with torch.no_grad():
        w.copy_(base.t())
    w.grad = torch.randn(20, 12) * 0.1
    before = w.grad.clone()
    expected = ref.agc([w], [before], 0.01)
    tritonclip.clip_grad_agc_([w], 0.01, backend=backend)
    torch.testing.assert_close(w.grad.double(), expected[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad, error", [
    (dict(clip_factor=-0.1), ValueError), (dict(clip_factor=math.inf), ValueError),
    (dict(eps=math.nan), ValueError), (dict(norm_type=0), ValueError),
    (dict(clip_factor="0.1"), TypeError),
])
def test_agc_bad_arguments_touch_nothing(bad, error):
    weights, grads = _agc_model(torch.float32)
    before = [g.clone() for g in grads]
    with pytest.raises(error):
        tritonclip.clip_grad_agc_(_with_grads(weights, grads), **bad)
    assert all(torch.equal(g, b) for g, b in zip(grads, before))


def test_agc_rejects_sparse_gradients():
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        tritonclip.clip_grad_agc_([w])


# -- AutoClip -------------------------------------------------------------------------------

def _norm_schedule(steps, seed=0):
    """Gradient norms of a run with spikes: lognormal around 1, x30 every 7th step."""
    gen = torch.Generator().manual_seed(seed)
    norms = torch.exp(torch.randn(steps, generator=gen) * 0.3)
    norms[::7] *= 30
    return norms.tolist()


def _grads_with_norm(norm, seed, sizes=(300, 4097)):
    grads = random_grads(list(sizes), torch.float32, seed=seed)
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    return [g.mul_(norm / total) for g in grads]


def _run(clipper, schedule, seed=0):
    """Feed ``clipper`` one step per norm; return (returned norms, gradients after). One
    gradient tensor, so that the norm's summation order cannot depend on addresses."""
    out = []
    for step, target in enumerate(schedule):
        grads = _grads_with_norm(target, seed + step, sizes=(4097,))
        norm = clipper.step(params_with(grads))
        out.append((norm, [g.clone() for g in grads]))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("history", [None, 5], ids=["all", "last5"])
def test_autoclip_matches_percentile_rule(backend, history):
    schedule = _norm_schedule(16)
    clipper = tritonclip.AutoClip(percentile=30, history=history, backend=backend)
    seen = []
    for step, target in enumerate(schedule):
        grads = _grads_with_norm(target, step)
        before = [g.clone() for g in grads]
        norm = clipper.step(params_with(grads))
        ref_norm = float(tritonclip.reference.total_norm(before, 2.0))
        assert float(norm) == pytest.approx(ref_norm, rel=1e-6)
        seen.append(ref_norm)
        threshold = ref.autoclip_threshold(seen, 30, history)
        assert float(clipper.last_threshold) == pytest.approx(threshold, rel=1e-6)
        coef = min(threshold / (ref_norm + 1e-6), 1.0)
        for g, b in zip(grads, before):
            torch.testing.assert_close(g.double(), b.double() * coef, rtol=1e-6, atol=0)


def test_autoclip_history_grows_past_its_first_capacity():
    clipper = tritonclip.AutoClip(percentile=50)
    clipper._INITIAL_CAPACITY = 4
    seen = []
    for step, target in enumerate(_norm_schedule(11)):
        grads = _grads_with_norm(target, step, sizes=(64,))
        seen.append(float(clipper.step(params_with(grads))))
    assert clipper._norms.numel() == 16
    assert float(clipper.last_threshold) == pytest.approx(
        ref.autoclip_threshold(seen, 50, None), rel=1e-6)


@pytest.mark.parametrize("history", [None, 4], ids=["all", "last4"])
def test_autoclip_state_dict_resumes_identically(history):
    schedule = _norm_schedule(12, seed=3)
    a = tritonclip.AutoClip(percentile=20, history=history)
    _run(a, schedule[:6])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    tail_a = _run(a, schedule[6:], seed=6)
    b = tritonclip.AutoClip(percentile=20, history=history)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    tail_b = _run(b, schedule[6:], seed=6)
    for (na, ga), (nb, gb) in zip(tail_a, tail_b):
        assert torch.equal(na, nb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    # negative control: a fresh clipper (no history) clips differently
    tail_c = _run(tritonclip.AutoClip(percentile=20, history=history), schedule[6:], seed=6)
    assert any(not torch.equal(x, y) for (_, ga), (_, gc) in zip(tail_a, tail_c)
               for x, y in zip(ga, gc))


def test_autoclip_nonfinite_norm_does_not_poison_the_history():
    clipper = tritonclip.AutoClip(percentile=50)
    _run(clipper, [1.0, 2.0, 3.0])
    grads = _grads_with_norm(1.0, 9)
    grads[0][0] = float("nan")
    assert clipper.step(params_with(grads)).isnan()
    _run(clipper, [4.0])
    # history {1, 2, 3, inf, 4}: the median is 3
    assert float(clipper.last_threshold) == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("kwargs", [dict(percentile=-1), dict(percentile=101),
                                    dict(history=0), dict(history=2.5), dict(history=True)])
def test_autoclip_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tritonclip.AutoClip(**kwargs)


def test_autoclip_state_of_another_history_rejected():
    a = tritonclip.AutoClip(history=3)
    with pytest.raises(ValueError, match="history"):
        tritonclip.AutoClip(history=None).load_state_dict(a.state_dict())


# -- ZClip ----------------------------------------------------------------------------------

ZCLIP_CONFIGS = {
    "zscore-adaptive": dict(),
    "zscore-adaptive-factor": dict(clip_factor=0.8, max_grad_norm=None),
    "zscore-mean": dict(clip_option="mean"),
    "percentile": dict(mode="percentile", z_thresh=1.5),
    "skip-update": dict(skip_update_on_spike=True),
    "no-cap": dict(max_grad_norm=None),
}


def _zclip_schedule():
    # warm-up around 0.5, a quiet stretch, spikes of x3 and x10, then a cap-bound stretch
    return _norm_schedule(30, seed=1)[:30]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ZCLIP_CONFIGS))
def test_zclip_matches_reference_algorithm(backend, name):
    config = dict(warmup_steps=5, max_grad_norm=4.0) | ZCLIP_CONFIGS[name]
    zclip = tritonclip.ZClip(**config, backend=backend)
    reference = ref.ZClipReference(**config)
    spikes = 0
    for step, target in enumerate(_zclip_schedule()):
        grads = _grads_with_norm(target, step)
        before = [g.clone() for g in grads]
        norm = zclip.step(params_with(grads))
        ref_norm = float(tritonclip.reference.total_norm(before, 2.0))
        assert float(norm) == pytest.approx(ref_norm, rel=1e-6)
        ref_coef = reference.step(ref_norm)
        assert float(zclip.last_coef) == pytest.approx(ref_coef, rel=1e-5), step
        spikes += ref_coef < 1
        for g, b in zip(grads, before):
            torch.testing.assert_close(g.double(), b.double() * ref_coef, rtol=1e-5, atol=0)
        if reference.mean is not None:
            assert float(zclip.mean) == pytest.approx(reference.mean, rel=1e-5)
            assert float(zclip.var) == pytest.approx(reference.var, rel=1e-4)
    assert spikes >= 2


def test_zclip_state_lives_on_the_device_as_tensors():
    zclip = tritonclip.ZClip(warmup_steps=2)
    _run(zclip, [1.0, 1.1, 1.2])
    assert isinstance(zclip.mean, torch.Tensor) and isinstance(zclip.var, torch.Tensor)
    assert isinstance(zclip.last_spike, torch.Tensor) and zclip.initialized


@pytest.mark.parametrize("split", [3, 12], ids=["mid-warmup", "after-warmup"])
def test_zclip_state_dict_resumes_identically(split):
    schedule = _zclip_schedule()
    config = dict(warmup_steps=5, max_grad_norm=None)  # no cap: warm-up steps do not clip
    a = tritonclip.ZClip(**config)
    _run(a, schedule[:split])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    tail_a = _run(a, schedule[split:], seed=split)
    b = tritonclip.ZClip(**config)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    tail_b = _run(b, schedule[split:], seed=split)
    for (na, ga), (nb, gb) in zip(tail_a, tail_b):
        assert torch.equal(na, nb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    tail_c = _run(tritonclip.ZClip(**config), schedule[split:], seed=split)  # negative control
    assert any(not torch.equal(x, y) for (_, ga), (_, gc) in zip(tail_a, tail_c)
               for x, y in zip(ga, gc))


def test_zclip_nonfinite_norm_left_out_of_the_statistics():
    zclip = tritonclip.ZClip(warmup_steps=3, max_grad_norm=None)
    _run(zclip, [1.0, 1.2, 0.8, 1.1])
    mean, var = zclip.mean.clone(), zclip.var.clone()
    for bad in (float("nan"), float("inf")):
        grads = _grads_with_norm(1.0, 5)
        grads[1][3] = bad
        zclip.step(params_with(grads))
        assert torch.equal(zclip.mean, mean) and torch.equal(zclip.var, var)
    # and in the warm-up: the mean of the finite norms
    zclip = tritonclip.ZClip(warmup_steps=3, max_grad_norm=None)
    grads = _grads_with_norm(1.0, 5)
    grads[0][0] = float("nan")
    zclip.step(params_with(grads))
    _run(zclip, [2.0, 4.0])
    assert float(zclip.mean) == pytest.approx(3.0, rel=1e-6)
    assert float(zclip.var) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("kwargs, error", [
    (dict(alpha=1.0), ValueError), (dict(alpha=0), ValueError), (dict(z_thresh=0), ValueError),
    (dict(warmup_steps=0), ValueError), (dict(mode="mad"), ValueError),
    (dict(clip_option="median"), ValueError), (dict(max_grad_norm=-1), ValueError),
    (dict(skip_update_on_spike="yes"), TypeError), (dict(alpha="0.9"), TypeError),
])
def test_zclip_bad_arguments(kwargs, error):
    with pytest.raises(error):
        tritonclip.ZClip(**kwargs)


def test_zclip_state_of_another_warmup_rejected():
    a = tritonclip.ZClip(warmup_steps=4)
    _run(a, [1.0])
    with pytest.raises(ValueError, match="warmup"):
        tritonclip.ZClip(warmup_steps=5).load_state_dict(a.state_dict())
