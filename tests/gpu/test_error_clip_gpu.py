"""Error clipping on CUDA with compiled kernels: conformance with the float64 reference,
the float32 coefficient bit for bit, no host synchronisation in backward (counters
included), determinism where programs really race, and int64 offsets. `make test-gpu`."""

import math

import pytest
import torch

import tritonclip
from helpers import DTYPE_IDS, DTYPES
from test_error_clip import _exact_rows, _grad, assert_clip_close
from tritonclip import reference

pytestmark = pytest.mark.gpu


def _backward(x, g, **kwargs):
    leaf = x.detach().clone().requires_grad_()
    tritonclip.error_clip(leaf, **kwargs).backward(g)
    return leaf.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,dim", [((4096, 64), -1), ((8, 128, 96), (0, 2)),
                                       ((3, 100003), -1), ((1 << 20,), None),
                                       ((33, 7), 0)], ids=str)
def test_norm_clip_on_cuda(dtype, shape, dim):
    g = _grad(shape, dtype, seed=1).cuda()
    norms = torch.linalg.vector_norm(g.double(), dim=dim)
    max_norm = float(norms.median())
    out = _backward(torch.zeros_like(g), g, max_norm=max_norm, dim=dim)
    assert out.is_cuda
    assert_clip_close(out.cpu(), reference.error_clip_grad(g.cpu(), max_norm=max_norm, dim=dim))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_value_clip_and_misaligned_views_on_cuda(dtype):
    flat = _grad((2 * 4099 * 9 + 1,), dtype, seed=2).cuda()
    g = flat[1:1 + 4099 * 9].view(4099, 9)  # unaligned specializations
    out = _backward(torch.zeros_like(g), g, lo=-0.2, hi=0.5)
    assert torch.equal(out.cpu(), reference.error_clip_grad(g.cpu(), lo=-0.2, hi=0.5).to(dtype))
    out = _backward(torch.zeros_like(g), g, max_norm=0.5, dim=-1)
    assert_clip_close(out.cpu(), reference.error_clip_grad(g.cpu(), max_norm=0.5, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("root", [7, 142], ids=["fused", "split"])
def test_coefficient_bitwise_on_cuda(dtype, root):
    g = _exact_rows(root, 6 if root == 7 else 2, dtype).cuda()
    norms = torch.linalg.vector_norm(g.double(), dim=-1, keepdim=True).float()
    max_norm = 0.9 * float(norms[1])
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = _backward(torch.zeros_like(g), g, max_norm=max_norm, dim=-1)
    assert torch.equal(out, (g.to(acc) * coef.to(acc)).to(dtype))


def test_no_host_synchronisation_in_backward():
    counter = tritonclip.ClipCounter("cuda")
    x = torch.zeros(512, 256, device="cuda", requires_grad=True)
    g = torch.randn(512, 256, device="cuda")
    cases = [dict(max_norm=1.0, dim=-1), dict(max_norm=1.0), dict(clip_value=0.1),
             dict(max_norm=1.0, dim=0)]
    ys = [tritonclip.error_clip(x, counter=counter, **kw) for kw in cases]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for y in ys:
            y.backward(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(counter.seen) == 512 + 1 + 512 * 256 + 256


def test_counts_and_results_deterministic_under_racing_programs():
    g = torch.randn(64, 300000, device="cuda", dtype=torch.bfloat16)
    counter = tritonclip.ClipCounter("cuda")
    first = _backward(torch.zeros_like(g), g, max_norm=500.0, dim=-1, counter=counter)
    second = _backward(torch.zeros_like(g), g, max_norm=500.0, dim=-1, counter=counter)
    assert torch.equal(first, second)
    norms = torch.linalg.vector_norm(g.float(), dim=-1)
    assert int(counter.clipped) == 2 * int((500.0 / (norms + 1e-6) < 1).sum())


def test_int64_offsets():
    # 2**31 + 2**20 elements: offsets past int32 in the clamp, fused-row and split-row paths.
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + (1 << 20)
    if free < 4 * n * 2 + (1 << 30):
        pytest.skip("needs about 18 GB of free GPU memory")
    g = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    g[-1] = 3.0

    def backward(grad, **kwargs):
        leaf = torch.empty(grad.shape, dtype=grad.dtype, device="cuda", requires_grad=True)
        tritonclip.error_clip(leaf, **kwargs).backward(grad)
        return leaf.grad

    out = backward(g, lo=-1.0, hi=2.0)
    assert out[-1].item() == 2.0 and out[0].item() == 1.0
    del out
    out = backward(g.view(-1, 1 << 10), max_norm=1.0, dim=-1)  # fused: rows past 2**31
    assert math.isclose(out[-1, -1].item(), 3 / math.sqrt(1023 + 9), rel_tol=1e-2)
    assert math.isclose(out[0, 0].item(), 1 / 32, rel_tol=1e-2)
    del out
    out = backward(g.view(-1, 1 << 20), max_norm=1.0, dim=-1)  # split: chunks past 2**31
    assert math.isclose(out[-1, -1].item(), 3 / math.sqrt((1 << 20) - 1 + 9), rel_tol=1e-2)
