"""tritonclip.overlap_norm on a GPU: the Triton kernels measure chunks during a real
backward, in bf16, with no host synchronisation from backward to the end of the step, and a
training run equals clip-then-step. Run with `make test-gpu`; skipped without CUDA."""

import math

import pytest
import torch

import tritonclip
from tritonclip.bench.train_step import Decoder

pytestmark = pytest.mark.gpu


def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return Decoder(512, 128, 4, 4, 512, True, 64).to(device="cuda", dtype=dtype)


def _batch(step):
    gen = torch.Generator(device="cuda").manual_seed(step)
    return (torch.randint(512, (4, 64), device="cuda", generator=gen),
            torch.randint(512, (4, 64), device="cuda", generator=gen))


def _loss(model, step):
    tokens, targets = _batch(step)
    return torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1).float(),
                                             targets.flatten())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_equals_clip_grad_norm(dtype):
    model = _model(dtype)
    handle = tritonclip.overlap_norm(model)
    for step in range(3):
        model.zero_grad()
        _loss(model, step).backward()
        ours = handle.total_norm()
        theirs = tritonclip.clip_grad_norm_(model.parameters(), math.inf)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
        grads = [p.grad for p in model.parameters()]
        expected = tritonclip.reference.total_norm(grads, 2.0)
        assert float(ours) == pytest.approx(float(expected), rel=1e-5)


def test_no_host_synchronisation_from_backward_to_step():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = tritonclip.overlap_norm(model)
    _loss(model, 0).backward()  # (first call: compilation, caches)
    handle.clip_(0.1, optimizer)
    optimizer.step()
    optimizer.zero_grad()
    loss = _loss(model, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
        handle.clip_(0.1, optimizer)
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_training_run_equals_clip_then_step():
    runs = {}
    for recipe in ("after", "overlap"):
        model = _model(torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        handle = tritonclip.overlap_norm(model) if recipe == "overlap" else None
        norms = []
        for step in range(10):
            optimizer.zero_grad()
            _loss(model, step).backward()
            norms.append(handle.clip_(0.1, optimizer) if handle else
                         torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
            optimizer.step()
        runs[recipe] = torch.stack(norms), [p.detach() for p in model.parameters()]
    torch.testing.assert_close(runs["overlap"][0], runs["after"][0], rtol=1e-5, atol=0)
    for a, b in zip(runs["after"][1], runs["overlap"][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
