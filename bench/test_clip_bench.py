"""pytest-benchmark suite: tritonclip vs torch.nn.utils on the same gradients, same run.

The same cases as ``python -m tritonclip.bench`` (they share ``tritonclip.bench.cases``),
for GPT-2-small, a Llama-7B block, ViT-B/16 and a 2-layer LSTM, and the active, inactive,
norm-only, value and amp cases (the step case lives in the CLI only). On CUDA the auto backend runs the Triton kernels; on the CPU it
runs tritonclip's torch path. Run: ``make bench-pytest``.
"""

import pytest
import torch

from tritonclip.bench import cases, shapes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
MODELS = ["gpt2-small", "llama-block", "vit-b16", "lstm-2layer"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    grads = shapes.make_grads(shapes.MODELS[request.param](), DTYPE, DEVICE)
    return request.param, grads, cases.make_params(grads)


@pytest.mark.parametrize("impl", ["tritonclip", "torch-foreach", "torch-loop"])
@pytest.mark.parametrize("op", [op for op in cases.OPS if op != "step"])
def test_clip(benchmark, model, op, impl):
    name, grads, params = model
    cases.normalize_(grads)
    restore = cases.restorer(op, grads) or (lambda: None)
    fn = cases.callable_for(impl, op, params, grads)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    benchmark.group = f"{name}/{op}"
    benchmark.extra_info.update(model=name, op=op, impl=impl, device=str(DEVICE),
                                dtype=str(DTYPE), grad_bytes=nbytes,
                                bytes_moved=cases.PASSES[impl][op] * nbytes)

    def run():
        fn()
        _sync()

    def setup():
        restore()
        _sync()

    benchmark.pedantic(run, setup=setup, rounds=11, warmup_rounds=2)
