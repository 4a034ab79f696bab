"""Per-tensor, AGC, AutoClip, ZClip, attach and the monitor on CUDA with compiled kernels:
same results as the float64 references, and no host synchronisation in steady state
(``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising call into an error).
Run with `make test-gpu`; skipped without CUDA."""

import pytest
import torch

import tritonclip
from helpers import params_with, random_grads
from tritonclip import reference_adaptive as ref

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(100, 32), torch.nn.Linear(32, 64),
                               torch.nn.Tanh(), torch.nn.Linear(64, 100)).cuda()


def _backward(model, scale=1.0):
    x = torch.randint(0, 100, (16,), device="cuda")
    (model(x).logsumexp(-1).mean() * scale).backward()


class _NoSync:
    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


def test_per_tensor_and_agc_match_references_on_cuda():
    grads = random_grads([4097, 70001, 3, 1 << 18], torch.bfloat16, device="cuda", seed=2)
    before = [g.clone() for g in grads]
    norms = tritonclip.clip_grad_norm_per_tensor_(params_with(grads), 50.0)
    ref_norms, ref_clipped = ref.clip_grad_norm_per_tensor(before, 50.0)
    torch.testing.assert_close(norms.cpu().double(), ref_norms, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_clipped):
        torch.testing.assert_close(g.cpu().double(), r, rtol=2 ** -7, atol=0)

    model = _model()
    _backward(model)
    params = list(model.parameters())
    snapshot = [p.grad.clone() for p in params]
    tritonclip.clip_grad_agc_(params, 0.01)
    for p, g, e in zip(params, snapshot, ref.agc(params, snapshot, 0.01)):
        torch.testing.assert_close(p.grad.cpu().double(), e, rtol=1e-6, atol=1e-12)


def test_no_host_synchronisation_in_steady_state():
    model = _model()
    params = list(model.parameters())
    autoclip = tritonclip.AutoClip(percentile=10)
    zclip = tritonclip.ZClip(warmup_steps=2)
    monitor = tritonclip.GradNormMonitor(model, top_k=2)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    handle = tritonclip.attach(fused, max_norm=1.0, per_tensor_norm=0.5, agc=0.05,
                               clip_value=1.0, skip_nonfinite=True, skip_above=1e6)

    def one_step():
        fused.zero_grad(set_to_none=False)
        _backward(model)
        tritonclip.clip_grad_norm_per_tensor_(params, 0.5)
        tritonclip.clip_grad_agc_(params, 0.01)
        autoclip(params)
        zclip(params)
        monitor.record(threshold=1.0)
        monitor.annotate(threshold=zclip.last_threshold, coef=zclip.last_coef)
        fused.step()

    for _ in range(4):  # builds plans and layouts, ends the ZClip warm-up
        one_step()
    with _NoSync():
        for _ in range(3):
            one_step()
    assert handle.last_norm.device.type == "cuda"
    assert monitor.to_dict()["summary"]["steps"] == 7


def test_attach_folds_a_plain_max_norm_without_sync():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    tritonclip.attach(optimizer, max_norm=0.1, skip_nonfinite=True)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)
        _backward(model)
        optimizer.step()
    with _NoSync():
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            _backward(model)
            optimizer.step()
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
