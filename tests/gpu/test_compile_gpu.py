"""tritonclip in compiled and CUDA-graph-captured training steps on a GPU, replayed over many
steps against the eager step. Run with `make test-gpu`; skipped without CUDA."""

import pytest
import torch

import tritonclip
from tritonclip import optim

pytestmark = pytest.mark.gpu

STEPS = 20


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 64)).cuda()


def _grads_for(model, step):
    """Gradients set from a seed (not backward: the comparison is of the clip and step)."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, device="cuda") * (1 + step % 3)
            for p in model.parameters()]


def _eager_run(clip):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    norms = []
    for step in range(STEPS):
        for p, g in zip(model.parameters(), _grads_for(model, step)):
            p.grad = g
        norms.append(clip(model.parameters()))
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], torch.stack(norms)


def _clip(params):
    return tritonclip.clip_grad_norm_(params, 1.0)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_clip_and_step_replays_like_eager(mode):
    expected, expected_norms = _eager_run(_clip)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)

    @torch.compile(mode=mode, fullgraph=True)
    def clip(params):
        return tritonclip.clip_grad_norm_(params, 1.0)

    norms = []
    for step in range(STEPS):
        for p, g in zip(params, _grads_for(model, step)):
            p.grad.copy_(g)  # the same gradient tensors every step (static for the graph)
        norms.append(clip(params).clone())
        optimizer.step()
    torch.testing.assert_close(torch.stack(norms), expected_norms, rtol=0, atol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0)


def test_manual_capture_of_clip_and_fused_step_replays_over_many_steps():
    expected, expected_norms = _eager_run(_clip)
    model = _model()
    params = list(model.parameters())
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    # capturable=True: the fused step reads its step count and lr on the device
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: layout, plans, optimizer state
        for g in static_grads:
            g.zero_()
        tritonclip.clip_grad_norm_(params, 1.0)
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    model.load_state_dict(_model().state_dict())  # undo the warm-up step
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
    with torch.cuda.stream(side):
        optimizer.step()  # state allocated outside the capture; a zero gradient step
    torch.cuda.current_stream().wait_stream(side)
    model.load_state_dict(_model().state_dict())
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            state[key].zero_()
        state["step"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = tritonclip.clip_grad_norm_(params, 1.0)
        optimizer.step()
    norms = []
    for step in range(STEPS):
        for g, new in zip(static_grads, _grads_for(model, step)):
            g.copy_(new)
        graph.replay()
        norms.append(total.clone())
    torch.testing.assert_close(torch.stack(norms), expected_norms, rtol=0, atol=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def test_folded_clip_captures_into_a_cuda_graph():
    """optim.clip_into_ (the coefficient folded into the fused step) under capture."""
    model = _model()
    params = list(model.parameters())
    for p, g in zip(params, _grads_for(model, 0)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        optim.clip_into_(optimizer, 1.0)
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optim.clip_into_(optimizer, 1.0)
        optimizer.step()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.isfinite(p).all() for p in params)


def test_error_mode_under_capture_raises_a_clear_error():
    params = [torch.nn.Parameter(torch.ones(1024, device="cuda"))]
    params[0].grad = torch.ones(1024, device="cuda")
    tritonclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)  # warm-up, eager
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph):
            tritonclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
