"""tritonclip.amp: the fused unscale + clip, against the float64 reference and against the
two-call recipe (scaler.unscale_ then torch.nn.utils.clip_grad_norm_) over a training run."""

import copy
import math

import pytest
import torch

import tritonclip
import tritonclip.amp
from helpers import applied_coefficient, assert_norm_close, assert_scaled_once, random_grads
from tritonclip import reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("log2_scale", [0, 8, 16, 24])
@pytest.mark.parametrize("bad", [None, "inf", "nan"])
def test_unscale_and_clip_grads(backend, dtype, log2_scale, bad):
    scale = 2.0**log2_scale
    unscaled = random_grads([63, 4097, 300], torch.float32, seed=log2_scale)
    grads = [(u * scale).to(dtype) for u in unscaled]  # fp16 overflows at 2**24: found_inf
    if bad:
        grads[1][17] = float(bad)
    before = [g.clone() for g in grads]
    inv_scale = torch.tensor(1.0 / scale)
    max_norm = 0.5
    total, found_inf = tritonclip.amp.unscale_and_clip_grads_(grads, inv_scale, max_norm,
                                                              backend=backend)
    expected_total = reference.total_norm([b.double() / scale for b in before], 2.0)
    assert_norm_close(total, expected_total)
    assert float(found_inf) == (0.0 if math.isfinite(float(expected_total)) else 1.0)
    factor = applied_coefficient(total, max_norm) * inv_scale
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, factor)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW],
                         ids=["sgd", "adamw"])
def test_matches_the_two_call_recipe_over_a_training_run(backend, optimizer_cls):
    torch.manual_seed(0)
    data = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(8)]
    inject = {3: float("inf"), 5: float("nan")}  # steps whose grads overflow
    runs = {}
    for recipe in ("torch", "tritonclip"):
        model = _model()
        kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 0.01}
        optimizer = optimizer_cls(model.parameters(), **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        history = []
        for step, (x, y) in enumerate(data):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if step in inject:
                model[2].weight.grad[0, 1] = inject[step]
            if recipe == "torch":
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            else:
                norm = tritonclip.amp.unscale_and_clip_(scaler, optimizer, 0.3, backend=backend)
            scaler.step(optimizer)
            scaler.update()
            history.append((float(norm), scaler.get_scale(),
                            [p.detach().clone() for p in model.parameters()]))
        runs[recipe] = history
    for step, ((n1, s1, p1), (n2, s2, p2)) in enumerate(zip(runs["torch"], runs["tritonclip"])):
        assert s1 == s2, f"step {step}: scale {s1} vs {s2}"
        if step in inject:
            assert not math.isfinite(n1) and not math.isfinite(n2)
        else:
            assert n2 == pytest.approx(n1, rel=1e-5), f"step {step}"
        for a, b in zip(p1, p2):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    # The injected steps were skipped: parameters did not move.
    for step in inject:
        for a, b in zip(runs["tritonclip"][step - 1][2], runs["tritonclip"][step][2]):
            assert torch.equal(a, b)


def test_scaler_state_and_errors():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(model(torch.randn(2, 16)).sum()).backward()
    tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1.0)
    with pytest.raises(RuntimeError, match="already been called"):
        tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1.0)
    state = scaler._per_optimizer_states[id(optimizer)]
    assert list(state["found_inf_per_device"]) == [torch.device("cpu")]
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match="after step"):
        tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1.0)


def test_float16_grads_rejected_before_any_change():
    model = _model().half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # initializes the scale
    with pytest.raises(ValueError, match="float16"):
        tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1.0)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_disabled_scaler_is_a_plain_clip():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16)).sum().backward()
    reference_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        q.grad = p.grad.clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    total = tritonclip.amp.unscale_and_clip_(scaler, optimizer, 0.1)
    expected = tritonclip.clip_grad_norm_(reference_model.parameters(), 0.1)
    # (CPU reductions may round differently for differently aligned copies of the data)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", [0.0, -math.inf], ids=["0", "-inf"])
def test_found_inf_for_norms_that_hide_an_inf(norm_type):
    grads = random_grads([10, 10], torch.float32)
    grads[0][3] = float("inf")
    _, found_inf = tritonclip.amp.unscale_and_clip_grads_(grads, torch.tensor(0.5), 1.0,
                                                          norm_type)
    assert float(found_inf) == 1.0


def test_skip_leaves_overflowed_grads_untouched():
    grads = random_grads([10, 10], torch.float32)
    grads[1][2] = float("nan")
    before = [g.clone() for g in grads]
    _, found_inf = tritonclip.amp.unscale_and_clip_grads_(grads, torch.tensor(0.25), 1e-3,
                                                          nonfinite="skip")
    assert float(found_inf) == 1.0
    for g, b in zip(grads, before):
        assert torch.equal(g.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_fp32_grads_beside_bf16_model_grads(backend):
    # Megatron/apex style: some gradients in bfloat16, their float32 masters or others in
    # float32; one norm over all of them, each group scaled in its own dtype.
    model_grads = random_grads([4097, 63], torch.bfloat16, seed=1)
    master_grads = random_grads([300, 5], torch.float32, seed=2)
    grads = model_grads + master_grads
    before = [g.clone() for g in grads]
    total, found_inf = tritonclip.amp.unscale_and_clip_grads_(grads, torch.tensor(2.0**-8), 0.1,
                                                              backend=backend)
    assert total.dtype == torch.float32 and float(found_inf) == 0.0
    assert_norm_close(total, reference.total_norm([b.double() * 2.0**-8 for b in before], 2.0),
                      grads=before)
    factor = applied_coefficient(total, 0.1) * 2.0**-8
    for g, b in zip(grads, before):
        assert g.dtype == b.dtype
        assert_scaled_once(g, b, factor)
