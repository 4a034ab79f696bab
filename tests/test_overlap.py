"""tritonclip.overlap_norm in one process: the norm taken during backward equals
clip_grad_norm_'s on the same gradients (and a float64 reference), the clip then equals
clip-then-step over training runs, through accumulation, unused parameters, zero_grad modes,
gradients changed after backward, a GradScaler with inf/NaN, and attach(overlap=...); misuse
is refused at registration. The distributed cases are in tests/test_overlap_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

import tritonclip
from helpers import assert_norm_close
from tritonclip import _overlap_hooks, overlap, reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


class _Net(torch.nn.Module):
    def __init__(self, dtype, extra):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
            torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).to(dtype)
        # a parameter the forward uses only when asked to
        self.unused = torch.nn.Linear(16, 4).to(dtype) if extra else None

    def forward(self, x, use_extra=False):
        out = self.body(x)
        if use_extra:
            out = out + self.unused(self.body[:4](x))
        return out


def _model(seed=0, dtype=torch.float32, extra=False):
    torch.manual_seed(seed)
    return _Net(dtype, extra)


def _loss(model, x, use_extra=False):
    return model(x, use_extra).square().mean()


def _norm(model, p=2.0):
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    return reference.total_norm(grads, p)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 parameters, so that models here have several (and a partial last one)."""
    monkeypatch.setattr(_overlap_hooks, "CHUNK_PARAMETERS", 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_norm_equals_the_norm_after_backward(backend, norm_type, small_chunks):
    model = _model()
    handle = tritonclip.overlap_norm(model, norm_type, backend=backend)
    assert len(handle._chunks) == 3  # 8 parameters in chunks of 3
    for step in range(3):
        torch.manual_seed(100 + step)
        model.zero_grad()
        _loss(model, torch.randn(4, 8) * (step + 1)).backward()
        grads = [q.grad for q in model.parameters()]
        ours = handle.total_norm()
        assert_norm_close(ours, reference.total_norm(grads, norm_type), rtol=1e-6, grads=grads)
        theirs = tritonclip.clip_grad_norm_(model.parameters(), math.inf, norm_type,
                                            backend=backend)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_partial_norms_are_taken_during_backward(monkeypatch, small_chunks):
    """Negative control for the whole point: every chunk is measured by a hook during
    backward, none at the finalize unless its gradients changed; a removed handle has no
    hook and refuses to finalize."""
    model = _model()
    handle = tritonclip.overlap_norm(model)
    calls = []
    real = overlap.OverlapNorm._power
    monkeypatch.setattr(overlap.OverlapNorm, "_power",
                        lambda self, grads: calls.append(len(grads)) or real(self, grads))
    _loss(model, torch.randn(4, 8)).backward()
    assert calls == [3, 3, 2]  # three chunks, in reverse order, as backward made them ready
    handle.total_norm()
    assert calls == [3, 3, 2]
    model.zero_grad()
    _loss(model, torch.randn(4, 8)).backward()
    model.body[0].weight.grad.mul_(2.0)  # changed after backward: that chunk measured late
    assert calls == [3, 3, 2] * 2
    assert_norm_close(handle.total_norm(), _norm(model))
    assert calls == [3, 3, 2] * 2 + [2]
    handle.remove()
    model.zero_grad()
    _loss(model, torch.randn(4, 8)).backward()
    assert calls == [3, 3, 2] * 2 + [2]  # no hook left
    with pytest.raises(RuntimeError, match="removed"):
        handle.total_norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    model = _model(dtype=dtype)
    handle = tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8, dtype=dtype)).backward()
    grads = [q.grad for q in model.parameters()]
    assert_norm_close(handle.total_norm(), reference.total_norm(grads, 2.0), grads=grads)


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_accumulation_unused_parameters_and_zero_grad(micro_batches, set_to_none, small_chunks):
    """The norm of the accumulated gradient; a parameter unused in a step (None, zeroed, or
    accumulated in an earlier micro-batch only) is counted as its gradient stands."""
    model = _model(extra=True)
    handle = tritonclip.overlap_norm(model)
    for step in range(4):
        model.zero_grad(set_to_none=set_to_none)
        for micro in range(micro_batches):
            torch.manual_seed(10 * step + micro)
            _loss(model, torch.randn(4, 8), use_extra=(step + micro) % 3 == 1).backward()
        assert_norm_close(handle.total_norm(), _norm(model))


def test_stale_gradients_without_zero_grad_are_counted():
    model = _model(extra=True)
    handle = tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8), use_extra=True).backward()
    handle.total_norm()
    _loss(model, torch.randn(4, 8)).backward()  # no zero_grad; model.unused keeps its grad
    assert model.unused.weight.grad is not None
    assert_norm_close(handle.total_norm(), _norm(model))


@pytest.mark.parametrize("change", ["in_place", "replaced", "set_to_none", "assigned_unused"])
def test_gradients_changed_after_backward_are_measured_again(change, small_chunks):
    model = _model(extra=True)
    handle = tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8)).backward()
    weight = model.body[2].weight
    if change == "in_place":
        weight.grad.mul_(7.0)
    elif change == "replaced":
        weight.grad = torch.full_like(weight, 3.0)
    elif change == "set_to_none":
        weight.grad = None
    else:
        model.unused.weight.grad = torch.ones_like(model.unused.weight)
    assert_norm_close(handle.total_norm(), _norm(model))


def _training_run(recipe, optimizer_cls, steps=5, scaler_steps=None, accumulate=1,
                  backend="torch"):
    """Parameters and norms after ``steps`` of clip + step; ``recipe``: "torch"
    (clip_grad_norm_ then step), "overlap" (the handle's clip_), "attach"."""
    model = _model(extra=True)
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 0.01}
    fused = optimizer_cls.__name__ == "fused"
    cls = torch.optim.AdamW if fused else optimizer_cls
    optimizer = cls(model.parameters(), **kwargs, **({"fused": True} if fused else {}))
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
              if scaler_steps is not None else None)
    handle = None
    if recipe == "overlap":
        handle = tritonclip.overlap_norm(model, backend=backend)
    elif recipe == "attach":
        tritonclip.attach(optimizer, max_norm=0.05, overlap=model, scaler=scaler,
                          backend=backend)
        handle = optimizer._tritonclip_attached
    norms = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        for micro in range(accumulate):
            torch.manual_seed(step * 10 + micro)
            x = torch.randn(4, 8)
            if scaler_steps is not None and step in scaler_steps and micro == accumulate - 1:
                x[0, 0] = scaler_steps[step]  # an inf/NaN through the whole backward
            loss = _loss(model, x, use_extra=step == 2)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if recipe == "torch":
            if scaler is not None:
                scaler.unscale_(optimizer)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        elif recipe == "overlap":
            norms.append(handle.clip_(0.05, optimizer, scaler=scaler))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if recipe == "attach":
            norms.append(handle.last_norm)
    return [float(n) for n in norms], [p.detach().clone() for p in model.parameters()], (
        scaler.get_scale() if scaler is not None else None)


class fused:  # a marker: torch.optim.AdamW(fused=True)
    __name__ = "fused"


OPTIMIZERS = [pytest.param(torch.optim.SGD, id="sgd"), pytest.param(torch.optim.AdamW, id="adamw"),
              pytest.param(fused(), id="fused-adamw")]


@pytest.mark.parametrize("recipe", ["overlap", "attach"])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_training_run_equals_clip_then_step(recipe, optimizer_cls):
    norms, params, _ = _training_run("torch", optimizer_cls, accumulate=2)
    ours, our_params, _ = _training_run(recipe, optimizer_cls, accumulate=2)
    assert ours == pytest.approx(norms, rel=1e-6)
    assert any(n > 0.05 for n in norms)  # the clip was active
    for a, b in zip(params, our_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_training_run_interpreted_kernels():
    pytest.importorskip("triton")
    from tritonclip.kernels import config
    if not config.interpreted():
        pytest.skip("needs TRITON_INTERPRET=1")
    norms, params, _ = _training_run("torch", fused(), steps=3)
    ours, our_params, _ = _training_run("overlap", fused(), steps=3, backend="triton")
    assert ours == pytest.approx(norms, rel=1e-6)
    for a, b in zip(params, our_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", ["overlap", "attach"])
@pytest.mark.parametrize("optimizer_cls", OPTIMIZERS)
def test_grad_scaler_with_inf_and_nan(recipe, optimizer_cls):
    """The unscaled norm; a step with an inf or NaN gradient is skipped and the scale backed
    off exactly as with scaler.unscale_ + clip_grad_norm_."""
    bad = {1: math.inf, 3: math.nan}
    norms, params, scale = _training_run("torch", optimizer_cls, steps=6, scaler_steps=bad)
    ours, our_params, our_scale = _training_run(recipe, optimizer_cls, steps=6,
                                                scaler_steps=bad)
    assert our_scale == scale
    # (a step the scaler skips never reaches a non-fused optimizer's pre-hook: attach's
    # last_norm is then the previous step's)
    prehook_skipped = recipe == "attach" and not isinstance(optimizer_cls, fused)
    for step, (a, b) in enumerate(zip(norms, ours)):
        if step in bad:
            assert not math.isfinite(a)
            assert prehook_skipped or not math.isfinite(b)
        else:
            assert b == pytest.approx(a, rel=1e-6), step
    for a, b in zip(params, our_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_skip_nonfinite_through_attach():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    clip = tritonclip.attach(optimizer, max_norm=1.0, overlap=model, skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 8)
    x[0, 0] = math.nan
    _loss(model, x).backward()
    optimizer.step()
    assert bool(clip.last_skipped)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_modes():
    model = _model()
    handle = tritonclip.overlap_norm(model)
    x = torch.randn(4, 8)
    x[0, 0] = math.inf
    _loss(model, x).backward()
    saved = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        handle.clip_(1.0, nonfinite="error")
    model.zero_grad()
    _loss(model, x).backward()
    saved = [p.grad.clone() for p in model.parameters()]
    total = handle.clip_(1.0, nonfinite="skip")  # coefficient 1: gradients left as they are
    assert not math.isfinite(total)
    for a, p in zip(saved, model.parameters()):
        torch.testing.assert_close(p.grad, a, equal_nan=True, rtol=0, atol=0)
    model.zero_grad()
    _loss(model, x).backward()
    handle.clip_(1.0)  # propagate: NaN coefficient, as torch's clip leaves them
    assert any(torch.isnan(p.grad).any() for p in model.parameters())


def test_misuse_is_refused_at_registration():
    model = _model()
    handle = tritonclip.overlap_norm(model)
    with pytest.raises(RuntimeError, match="already registered"):
        tritonclip.overlap_norm(model)
    handle.remove()
    tritonclip.overlap_norm(model).remove()  # after remove(), again
    for p in (0.0, -math.inf, "fro"):
        with pytest.raises(ValueError):
            tritonclip.overlap_norm(model, p)
    with pytest.raises(TypeError, match="nn.Module"):
        tritonclip.overlap_norm(list(model.parameters()))
    with pytest.raises(ValueError, match="comm_hook is for"):
        tritonclip.overlap_norm(model, comm_hook=lambda s, b: None, comm_state=None)
    with pytest.raises(TypeError, match="norm_filter"):
        tritonclip.overlap_norm(model, norm_filter=3)

    other = _model(1)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not those overlap_norm covers"):
        tritonclip.attach(optimizer, max_norm=1.0, overlap=model)
    part = torch.optim.SGD(list(model.parameters())[:3], lr=0.1)
    with pytest.raises(ValueError, match="5 covered ones are not the optimizer"):
        tritonclip.attach(part, max_norm=1.0, overlap=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="LBFGS"):
        tritonclip.attach(torch.optim.LBFGS(model.parameters()), max_norm=1.0, overlap=model)
    with pytest.raises(ValueError, match="give max_norm"):
        tritonclip.attach(optimizer, clip_value=1.0, overlap=model)
    with pytest.raises(ValueError, match="clip_value"):
        tritonclip.attach(optimizer, max_norm=1.0, clip_value=1.0, overlap=model)
    with pytest.raises(ValueError, match="scaler= is for overlap"):
        tritonclip.attach(optimizer, max_norm=1.0, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="norm_type"):
        tritonclip.attach(optimizer, max_norm=1.0, norm_type=1.0,
                          overlap=tritonclip.overlap_norm(model))
    # nothing was left registered by the refusals (the handle above belongs to the module)
    assert not hasattr(optimizer, "_tritonclip_attached")
    model._tritonclip_overlap_norm.remove()

    clip = tritonclip.attach(optimizer, max_norm=1.0, overlap=model)
    _loss(model, torch.randn(4, 8)).backward()
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(lambda: 0.0)
    clip.remove()
    assert not hasattr(model, "_tritonclip_overlap_norm")


def test_clip_arguments_are_checked_before_the_finalize():
    model = _model()
    handle = tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8)).backward()
    with pytest.raises(ValueError, match="max_norm"):
        handle.clip_(-1.0)
    with pytest.raises(ValueError, match="needs the optimizer"):
        handle.clip_(1.0, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="optimizer"):
        handle.clip_(1.0, "adam")
    expected = _norm(model)  # (the refusals left the round open and the gradients alone)
    assert_norm_close(handle.clip_(1.0), expected)


def test_scaler_driving_attach_without_it_is_refused():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    tritonclip.attach(optimizer, max_norm=1.0, overlap=model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, torch.randn(4, 8))).backward()
    with pytest.raises(RuntimeError, match="pass scaler= to attach"):
        scaler.step(optimizer)


def test_clip_refuses_an_optimizer_of_other_parameters():
    model = _model()
    handle = tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8)).backward()
    part = torch.optim.AdamW(list(model.parameters())[:2], fused=True)
    with pytest.raises(ValueError, match="not those overlap_norm covers"):
        handle.clip_(1.0, part)
    assert not hasattr(part, "grad_scale")
    expected = _norm(model)
    assert_norm_close(handle.clip_(1.0), expected)  # the round is still open


def test_a_compiled_model(monkeypatch):
    """torch.compile(model): the post-accumulate-grad hooks still fire during backward."""
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    handle = tritonclip.overlap_norm(compiled)
    calls = []
    real = overlap.OverlapNorm._power
    monkeypatch.setattr(overlap.OverlapNorm, "_power",
                        lambda self, grads: calls.append(len(grads)) or real(self, grads))
    for step in range(2):
        model.zero_grad()
        _loss(compiled, torch.randn(4, 8)).backward()
        assert len(calls) == step + 1  # measured in backward
        assert_norm_close(handle.total_norm(), _norm(model))
    assert len(calls) == 2  # nothing late


def test_no_reference_cycle_keeps_the_model_alive():
    """torch keeps hooks where the garbage collector cannot see them: the hooks hold the
    handle weakly, so a model (and its handle) without remove() is freed."""
    import gc
    import weakref

    model = _model()
    tritonclip.overlap_norm(model)
    _loss(model, torch.randn(4, 8)).backward()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_total_norm_after_the_scaler_unscaled():
    """scaler.unscale_ moves no version counter: the slots hold the scaled norms, and a chunk
    measured late (changed by hand afterwards) is measured unscaled; both come out right."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = tritonclip.overlap_norm(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(_loss(model, torch.randn(4, 8))).backward()
    scaler.unscale_(optimizer)
    assert_norm_close(handle.total_norm(scaler), _norm(model))
    scaler.scale(_loss(model, torch.randn(4, 8))).backward()
    scaler.update()
    scaler.unscale_(optimizer)
    model.body[0].bias.grad.mul_(3.0)
    assert_norm_close(handle.total_norm(scaler), _norm(model))


def test_frozen_parameters_and_a_callers_handle():
    model = _model()
    model.body[0].bias.requires_grad_(False)
    handle = tritonclip.overlap_norm(model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)  # the frozen one included
    clip = tritonclip.attach(optimizer, max_norm=0.1, overlap=handle)
    _loss(model, torch.randn(4, 8)).backward()
    expected = _norm(model)
    optimizer.step()
    assert_norm_close(clip.last_norm, expected)
    clip.remove()
    assert model._tritonclip_overlap_norm is handle  # the caller's handle stays registered


def test_parameters_replaced_after_registration_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, device="meta"))
    handle = tritonclip.overlap_norm(model)
    model.to_empty(device="cpu")  # new Parameter objects
    with pytest.raises(ValueError, match="replaced after registration"):
        handle.clip_(1.0, torch.optim.SGD(model.parameters(), lr=0.1))
