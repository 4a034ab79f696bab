"""tritonclip.optim.clip_into_: clipping handed to fused optimizers, against clip-then-step."""

import math

import pytest
import torch

import tritonclip
import tritonclip.optim

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]
OPTIMIZERS = {
    "adam": lambda ps, fused: torch.optim.Adam(ps, lr=1e-2, fused=fused),
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused),
    "sgd": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=fused),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batches(n=6):
    torch.manual_seed(1)
    return [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_clip_then_fused_step(backend, name):
    results = {}
    for recipe in ("clip-then-step", "clip-into"):
        model = _model()
        optimizer = OPTIMIZERS[name](model.parameters(), True)
        assert tritonclip.optim.folds_into(optimizer)
        norms = []
        for x, y in _batches():
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if recipe == "clip-then-step":
                norms.append(tritonclip.clip_grad_norm_(model.parameters(), 0.2, backend=backend))
            else:
                grads = [p.grad.clone() for p in model.parameters()]
                norms.append(tritonclip.optim.clip_into_(optimizer, 0.2, backend=backend))
                # the gradients themselves are not touched before the step
                assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
            optimizer.step()
            assert not hasattr(optimizer, "grad_scale")
        results[recipe] = (norms, [p.detach() for p in model.parameters()])
    (n1, p1), (n2, p2) = results["clip-then-step"], results["clip-into"]
    for a, b in zip(n1, n2):
        assert float(b) == pytest.approx(float(a), rel=1e-6)
    assert float(n1[0]) > 0.2  # clipping was active
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_grad_scaler_matches_unscale_clip_step(backend):
    inject = {2: float("inf")}
    results = {}
    for recipe in ("two-calls", "clip-into"):
        model = _model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        history = []
        for step, (x, y) in enumerate(_batches()):
            optimizer.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if step in inject:
                model[0].bias.grad[3] = inject[step]
            if recipe == "two-calls":
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            else:
                norm = tritonclip.optim.clip_into_(optimizer, 0.2, scaler=scaler, backend=backend)
            scaler.step(optimizer)
            scaler.update()
            assert not hasattr(optimizer, "grad_scale")
            history.append((float(norm), scaler.get_scale(),
                            [p.detach().clone() for p in model.parameters()]))
        results[recipe] = history
    for step, ((n1, s1, p1), (n2, s2, p2)) in enumerate(zip(*results.values())):
        assert s1 == s2, step
        if step in inject:
            assert not math.isfinite(n1) and not math.isfinite(n2)
        else:
            assert n2 == pytest.approx(n1, rel=1e-5), step
        for a, b in zip(p1, p2):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step}")


def test_unfused_optimizer_falls_back_to_scaling_the_grads():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert not tritonclip.optim.folds_into(optimizer)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    total = tritonclip.optim.clip_into_(optimizer, 1e-3)
    coef = torch.clamp(1e-3 / (total + 1e-6), max=1.0)
    for g, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, g * coef)
    assert not hasattr(optimizer, "grad_scale")


def test_two_calls_before_a_step_keep_one_hook():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    tritonclip.optim.clip_into_(optimizer, 1e-3)
    tritonclip.optim.clip_into_(optimizer, 1e-3)
    assert len(optimizer._optimizer_step_post_hooks) == 1
    optimizer.register_step_post_hook(lambda *a: None)  # a hook registered after ours
    optimizer.step()
    assert not hasattr(optimizer, "grad_scale")
    tritonclip.optim.clip_into_(optimizer, 1e-3)
    assert len(optimizer._optimizer_step_post_hooks) == 2  # ours is registered once


def test_a_failed_step_leaves_no_stale_grad_scale():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(4, 16)).pow(2).sum().backward()
    tritonclip.optim.clip_into_(optimizer, 1e-3)
    assert hasattr(optimizer, "grad_scale")
    # the step never ran; a plain step later must not divide by the old coefficient
    tritonclip.optim.clip_into_(optimizer, 1e9)  # inactive: grad_scale 1
    assert float(optimizer.grad_scale) == 1.0


def test_only_torch_fused_optimizers_take_the_fold():
    model = _model()
    assert tritonclip.optim.folds_into(torch.optim.Adagrad(model.parameters(), fused=True))
    assert not tritonclip.optim.folds_into(torch.optim.Adam(model.parameters(), foreach=True))

    class Custom(torch.optim.SGD):
        pass

    assert not tritonclip.optim.folds_into(Custom(model.parameters(), lr=0.1, fused=True))
