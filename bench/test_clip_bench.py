"""tritonclip vs torch.nn.utils on the same gradients, in the same run (pytest-benchmark).

Cases, each on GPT-2-small and a Llama-7B block: norm clip with clipping active, norm clip
with clipping inactive (norm below max_norm), value clip. On CUDA the auto backend runs the
Triton kernels; on CPU it runs tritonclip's torch path (Triton kernels need a GPU for speed).
Bytes that must move (the floors of DESIGN.md): active 3N, inactive N, value 2N for tritonclip;
torch moves 3N, 3N and 4N. `bench/report.py` turns the JSON into ratios.
"""

import pytest
import torch

import tritonclip
from shapes import SHAPE_SETS, grad_bytes, make_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
IMPLS = {
    "tritonclip": (tritonclip.clip_grad_norm_, tritonclip.clip_grad_value_),
    "torch": (torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grad_value_),
}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=list(SHAPE_SETS))
def model(request):
    grads = make_grads(SHAPE_SETS[request.param](), DTYPE, DEVICE)
    params = []
    for g in grads:
        # The weights themselves are never read: a broadcast scalar saves their memory.
        p = torch.nn.Parameter(torch.zeros((), device=DEVICE, dtype=DTYPE).expand(g.shape))
        p.grad = g
        params.append(p)
    saved = [g.clone() for g in grads]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    return request.param, params, saved, norm


def _restore(params, saved):
    for p, s in zip(params, saved):
        p.grad.copy_(s)
    _sync()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", ["active", "inactive", "value"])
def test_clip(benchmark, model, case, impl):
    name, params, saved, norm = model
    clip_norm, clip_value = IMPLS[impl]
    benchmark.group = f"{name}/{case}"
    benchmark.extra_info.update(model=name, case=case, impl=impl, device=DEVICE,
                                dtype=str(DTYPE), grad_bytes=grad_bytes(saved))

    if case == "value":
        def run():
            clip_value(params, 0.5 * norm / len(params))
            _sync()
    else:
        max_norm = norm / 10 if case == "active" else norm * 10

        def run():
            clip_norm(params, max_norm)
            _sync()

    # Each round starts from the same gradients (the restore is not timed), so "active"
    # really clips every round.
    benchmark.pedantic(run, setup=lambda: _restore(params, saved), rounds=11, warmup_rounds=2)
