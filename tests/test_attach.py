"""tritonclip.attach: clipping as an optimizer step pre-hook, against the explicit calls."""

import io
import math

import pytest
import torch

import tritonclip
from tritonclip import _core, kernels

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


@pytest.fixture(autouse=True)
def _fresh_row_caches():
    _core.clear_cache()


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batches(n=5, scale=3.0):
    torch.manual_seed(1)
    return [(torch.randn(8, 16) * scale, torch.randn(8, 4)) for _ in range(n)]


def _backward(model, x, y):
    torch.nn.functional.mse_loss(model(x), y).backward()


def _train(make_optimizer, explicit=None, attach_kwargs=None, batches=None, poison=None):
    """Train with either explicit clipping before step() or attach(); return the model, the
    norms and the handle."""
    model = _model()
    optimizer = make_optimizer(model)
    handle = tritonclip.attach(optimizer, **attach_kwargs) if attach_kwargs else None
    norms = []
    for step, (x, y) in enumerate(batches or _batches()):
        optimizer.zero_grad()
        _backward(model, x, y)
        if poison and step in poison:
            model[0].bias.grad[0] = poison[step]
        if explicit is not None:
            norms.append(explicit(model, optimizer))
        optimizer.step()
        if handle is not None:
            norms.append(handle.last_norm)
    return model, norms, handle


def _same_params(a, b):
    # Not bit for bit: a global norm sums its spans in address order, and two models'
    # gradients lie at different addresses, so the last bit of a norm may differ.
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


SGD = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
ADAM_FUSED = lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)  # noqa: E731


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [SGD, ADAM_FUSED], ids=["sgd", "adam-fused-folded"])
def test_max_norm_equals_clip_then_step(backend, make):
    explicit = lambda m, o: tritonclip.clip_grad_norm_(m.parameters(), 0.5,  # noqa: E731
                                                       backend=backend)
    a, norms_a, _ = _train(make, explicit=explicit)
    b, norms_b, handle = _train(make, attach_kwargs=dict(max_norm=0.5, backend=backend))
    assert all(float(n) > 0.5 for n in norms_a)  # clipping active every step
    for x, y in zip(norms_a, norms_b):
        assert float(y) == pytest.approx(float(x), rel=1e-6)
    _same_params(a, b)
    assert handle.steps == 5 and handle.last_norm.dtype == torch.float32


def test_negative_control_without_attach_params_differ():
    a, _, _ = _train(SGD, explicit=lambda m, o: tritonclip.clip_grad_norm_(m.parameters(), 0.5))
    b, _, _ = _train(SGD)
    assert any(not torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_max_norm_and_clip_value_override(backend):
    def make(m):
        return torch.optim.SGD([
            {"params": m[0].parameters()},
            {"params": m[2].parameters(), "max_norm": 0.05, "clip_value": 0.01},
        ], lr=0.1)

    def explicit(m, o):
        g0 = list(m[0].parameters())
        g1 = list(m[2].parameters())
        n0 = tritonclip.clip_grad_norm_(g0, 0.5, backend=backend)
        n1 = tritonclip.clip_grad_norm_(g1, 0.05, backend=backend)
        tritonclip.clip_grad_value_(g0, 0.2, backend=backend)
        tritonclip.clip_grad_value_(g1, 0.01, backend=backend)
        return torch.stack([n0, n1]).norm()

    a, norms_a, _ = _train(make, explicit=explicit)
    b, norms_b, _ = _train(make, attach_kwargs=dict(max_norm=0.5, clip_value=0.2,
                                                    backend=backend))
    _same_params(a, b)
    for x, y in zip(norms_a, norms_b):  # last_norm: the total over both groups
        assert float(y) == pytest.approx(float(x), rel=1e-6)
    # negative control: without the override the second group is clipped by the default
    c, _, _ = _train(make, attach_kwargs=dict(max_norm=0.5, clip_value=0.2, backend=backend))
    d, _, _ = _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                     attach_kwargs=dict(max_norm=0.5, clip_value=0.2, backend=backend))
    assert any(not torch.equal(p, q) for p, q in zip(c.parameters(), d.parameters()))


def test_group_entry_none_turns_clipping_off_for_that_group():
    def make(m):
        return torch.optim.SGD([{"params": m[0].parameters()},
                                {"params": m[2].parameters(), "max_norm": None}], lr=0.1)

    a, _, _ = _train(make, explicit=lambda m, o: tritonclip.clip_grad_norm_(
        m[0].parameters(), 0.5))
    b, norms, _ = _train(make, attach_kwargs=dict(max_norm=0.5))
    _same_params(a, b)
    assert all(n is not None for n in norms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_agc_and_value_in_order(backend):
    def explicit(m, o):
        params = list(m.parameters())
        total = tritonclip.get_total_norm([p.grad for p in params], backend=backend)
        tritonclip.clip_grad_norm_per_tensor_(params, 0.3, backend=backend)
        tritonclip.clip_grad_agc_(params, 0.05, backend=backend)
        tritonclip.clip_grad_value_(params, 0.02, backend=backend)
        return total

    a, norms_a, _ = _train(SGD, explicit=explicit)
    b, norms_b, _ = _train(SGD, attach_kwargs=dict(per_tensor_norm=0.3, agc=0.05,
                                                   clip_value=0.02, backend=backend))
    _same_params(a, b)
    # The two runs' parameters may differ in the last bit (see _same_params), and so may the
    # norms of the steps after the first.
    assert [float(x) for x in norms_a] == pytest.approx([float(y) for y in norms_b], rel=1e-6)


def test_adaptive_zclip_and_state_dict_resume():
    batches = _batches(10, scale=5.0)
    zclip = tritonclip.ZClip(warmup_steps=3, max_grad_norm=None)
    a, _, _ = _train(SGD, explicit=lambda m, o: zclip.step(m.parameters()), batches=batches)
    b, _, handle = _train(SGD, attach_kwargs=dict(adaptive=tritonclip.ZClip(
        warmup_steps=3, max_grad_norm=None)), batches=batches)
    _same_params(a, b)
    # resume: train 6 steps, checkpoint model + optimizer + handle, continue 4 in both
    model = _model()
    optimizer = SGD(model)
    handle = tritonclip.attach(optimizer, adaptive=tritonclip.ZClip(warmup_steps=3))
    for x, y in batches[:6]:
        optimizer.zero_grad()
        _backward(model, x, y)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(),
                "clip": handle.state_dict()}, buffer)
    for x, y in batches[6:]:
        optimizer.zero_grad()
        _backward(model, x, y)
        optimizer.step()
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    optimizer2 = SGD(resumed)
    optimizer2.load_state_dict(saved["opt"])
    handle2 = tritonclip.attach(optimizer2, adaptive=tritonclip.ZClip(warmup_steps=3))
    handle2.load_state_dict(saved["clip"])
    for x, y in batches[6:]:
        optimizer2.zero_grad()
        _backward(resumed, x, y)
        optimizer2.step()
    _same_params(model, resumed)
    assert handle2.steps == handle.steps == 10


def test_remove_unregisters_cleanly():
    model = _model()
    optimizer = SGD(model)
    pre, post = len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)
    handle = tritonclip.attach(optimizer, max_norm=1e-3, skip_nonfinite=True)
    with pytest.raises(RuntimeError, match="already attached"):
        tritonclip.attach(optimizer, max_norm=1.0)
    handle.remove()
    assert len(optimizer._optimizer_step_pre_hooks) == pre
    assert len(optimizer._optimizer_step_post_hooks) == post
    x, y = _batches(1)[0]
    _backward(model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # unclipped
    assert not hasattr(optimizer, "found_inf")
    tritonclip.attach(optimizer, max_norm=1.0).remove()  # attaching again works


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True),
], ids=["adam-one-sync", "adam-fused-found-inf", "sgd-fused-found-inf"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_nonfinite_leaves_params_and_state_untouched(make, bad):
    model = _model()
    optimizer = make(model)
    handle = tritonclip.attach(optimizer, max_norm=1.0, skip_nonfinite=True)
    batches = _batches(3)
    for x, y in batches[:2]:
        optimizer.zero_grad()
        _backward(model, x, y)
        optimizer.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}
    optimizer.zero_grad()
    _backward(model, *batches[2])
    model[0].bias.grad[1] = bad
    optimizer.step()
    assert bool(handle.last_skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for k, s in optimizer.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]), n  # moments and step counts too
    assert all(p.grad is not None for p in model.parameters())  # restored after the step
    assert not hasattr(optimizer, "found_inf")
    # the next finite step goes through
    optimizer.zero_grad()
    _backward(model, *batches[0])
    optimizer.step()
    assert not bool(handle.last_skipped)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("fused", [False, True])
def test_skip_above(fused):
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    handle = tritonclip.attach(optimizer, skip_above=1.0)
    x, y = _batches(1)[0]
    for scale, skipped in ((100.0, True), (1e-3, False)):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).mul(scale).backward()
        total = tritonclip.get_total_norm([p.grad for p in model.parameters()])
        optimizer.step()
        assert torch.equal(handle.last_norm, total)  # measured before clipping
        assert bool(handle.last_skipped) == skipped
        unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert unchanged == skipped


def test_grad_scaler_needs_unscale_before_step_for_fused():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    tritonclip.attach(optimizer, max_norm=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = _batches(1)[0]
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(optimizer)
    del optimizer.grad_scale, optimizer.found_inf  # left by the step that raised
    # the documented recipe: unscale_ first, then the hook clips the unscaled gradients
    optimizer.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(optimizer)
    unscaled = tritonclip.get_total_norm([p.grad for p in model.parameters()])
    scaler.step(optimizer)
    scaler.update()
    assert optimizer.state[next(iter(model.parameters()))]["step"] == 1
    assert float(unscaled) > 0.5


@pytest.mark.parametrize("kwargs, error", [
    (dict(), ValueError), (dict(max_norm=-1.0), ValueError),
    (dict(max_norm=1.0, adaptive=tritonclip.AutoClip()), ValueError),
    (dict(adaptive=object()), TypeError), (dict(agc="0.1"), TypeError),
    (dict(agc={"clip": 0.1}), ValueError), (dict(skip_nonfinite=1), TypeError),
    (dict(clip_value=math.nan), ValueError),
])
def test_bad_arguments_register_nothing(kwargs, error):
    optimizer = SGD(_model())
    with pytest.raises(error):
        tritonclip.attach(optimizer, **kwargs)
    assert not optimizer._optimizer_step_pre_hooks
    with pytest.raises(TypeError, match="Optimizer"):
        tritonclip.attach(object(), max_norm=1.0)


def test_bad_group_entry_rejected_at_attach_and_at_step():
    model = _model()
    optimizer = torch.optim.SGD([{"params": model.parameters(), "max_norm": -2.0}], lr=0.1)
    with pytest.raises(ValueError, match="param_groups"):
        tritonclip.attach(optimizer, clip_value=1.0)
    optimizer.param_groups[0]["max_norm"] = 1.0
    tritonclip.attach(optimizer, clip_value=1.0)
    optimizer.param_groups[0]["clip_value"] = "big"
    _backward(model, *_batches(1)[0])
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(TypeError):
        optimizer.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_a_step_with_a_closure_is_refused():
    # The pre-hook would clip the previous gradients; the closure makes new ones.
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = tritonclip.attach(optimizer, max_norm=1.0)

    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(2, 3)).sum()
        loss.backward()
        return loss

    closure()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.step()  # without a closure it clips and steps
    handle.remove()


def test_an_adaptive_clipper_of_another_norm_order_is_refused():
    optimizer = torch.optim.SGD(torch.nn.Linear(3, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="norm_type"):
        tritonclip.attach(optimizer, adaptive=tritonclip.ZClip(norm_type="inf"))
