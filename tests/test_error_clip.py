"""Error clipping: forward is the identity (no copy), backward equals a float64 reference of
the clip (bitwise where the arithmetic allows), on the Triton kernels under the interpreter
and on the torch implementation; hooks attach and detach cleanly; counters; bad arguments."""

from __future__ import annotations

import math
import os
import re
import sys

import pytest
import torch
from torch import nn

import tritonclip
from helpers import DTYPE_IDS, DTYPES, poisoned
from tritonclip import _core, reference
from tritonclip.error_clip import _Options
from tritonclip.kernels import error_clip as ec_kernels

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


def _grad(shape, dtype, seed=0, scale=1.0) -> torch.Tensor:
    """Values exact in ``dtype`` (drawn in float32, rounded once)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def backward_of(x: torch.Tensor, grad: torch.Tensor, **kwargs) -> torch.Tensor:
    """x.grad after error_clip(x, **kwargs).backward(grad), for a fresh leaf copy of x."""
    leaf = x.detach().clone().requires_grad_()
    tritonclip.error_clip(leaf, **kwargs).backward(grad)
    return leaf.grad


def assert_clip_close(actual: torch.Tensor, expected: torch.Tensor, coef_rtol: float = 1e-6):
    """``actual`` (in the gradient's dtype) against the float64 reference: the error may be
    twice that of rounding the reference itself to the dtype, plus ``coef_rtol`` relative for
    the float32 coefficient (and float32 norms). NaN where the reference has NaN."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.double()
    assert torch.equal(a.isnan(), expected.isnan()), "NaN pattern differs"
    finite = ~expected.isnan()
    own = (expected.to(actual.dtype).double() - expected).abs()
    allowed = 2 * own + coef_rtol * expected.abs()
    err = (a - expected).abs()
    bad = finite & (err > allowed)
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} elements off: first at {bad.nonzero()[0].tolist()}: "
        f"{a[bad][0].item()!r} vs {expected[bad][0].item()!r}"
    )


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(clip_value=0.1), dict(max_norm=1.0, dim=-1)],
                         ids=["value", "norm"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_forward_is_identity_without_copy(kwargs, layout):
    base = _grad((6, 10), torch.float32).requires_grad_()
    x = {"contiguous": base * 1, "transposed": (base * 1).t(),
         "strided": (base * 1)[:, ::3]}[layout]
    y = tritonclip.error_clip(x, **kwargs)
    assert torch.equal(y, x)
    assert (y.data_ptr(), y.stride(), y.shape) == (x.data_ptr(), x.stride(), x.shape)
    assert y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # no copy
    assert y.requires_grad and y.grad_fn is not None


def test_forward_keeps_every_bit():
    x = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45, -3.5])
    y = tritonclip.error_clip(x, clip_value=1.0)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_result_cannot_be_modified_in_place():
    # Documented: a view made in a custom Function; torch refuses in-place ops on it.
    x = torch.randn(4, requires_grad=True) * 1
    y = tritonclip.error_clip(x, clip_value=1.0)
    with pytest.raises(RuntimeError, match="view"):
        y.add_(1)


# ---------------------------------------------------------------------------------------
# backward: value clipping (exact, so bitwise)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bounds", [dict(clip_value=0.5), dict(lo=-0.25, hi=0.75),
                                    dict(lo=-0.3), dict(hi=0.0), dict(clip_value=0.0)],
                         ids=["sym", "asym", "lo-only", "hi-zero", "zero"])
@pytest.mark.parametrize("shape", [(1,), (63,), (4, 33, 5)], ids=str)
def test_value_clip_equals_reference_bitwise(backend, dtype, bounds, shape):
    x = _grad(shape, dtype, seed=1)
    g = _grad(shape, dtype, seed=2)
    lo = bounds.get("lo", -bounds.get("clip_value", math.inf))
    hi = bounds.get("hi", bounds.get("clip_value", math.inf))
    if g.numel() > 3:  # NaN stays NaN; infinities are clamped
        g.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    else:
        g.fill_(2.0 if hi < math.inf else -2.0)  # outside the finite bound
    out = backward_of(x, g, backend=backend, **bounds)
    expected = reference.error_clip_grad(g, lo=lo, hi=hi).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())
    assert not torch.equal(out.nan_to_num(), g.nan_to_num())  # clipping happened


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_clip_over_many_programs(backend):
    g = _grad((70001,), torch.float32, seed=20)  # 18 programs of the clamp kernel
    out = backward_of(torch.zeros_like(g), g, clip_value=0.5, backend=backend)
    assert torch.equal(out, reference.error_clip_grad(g, lo=-0.5, hi=0.5).float())


# ---------------------------------------------------------------------------------------
# backward: norm clipping
# ---------------------------------------------------------------------------------------

# (shape, dim): rows in memory order, reduced dims elsewhere (a copy), several dims, the
# whole tensor, rows of one element, and rows longer than the fused kernel takes.
NORM_CASES = [
    pytest.param((7, 33), -1, id="7x33-dim-1"),
    pytest.param((4, 5, 6), (0, 2), id="4x5x6-dim02"),
    pytest.param((3, 4, 5), 1, id="3x4x5-dim1"),
    pytest.param((2, 3, 4), (1, 2), id="2x3x4-dim12"),
    pytest.param((6, 1), -1, id="6x1-dim-1"),
    pytest.param((8, 16), 0, id="8x16-dim0"),
    pytest.param((37,), None, id="37-whole"),
    pytest.param((5, 9), None, id="5x9-whole"),
    pytest.param((3, 20000), -1, id="3x20000-split"),
    pytest.param((70001,), None, id="70001-whole-split"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,dim", NORM_CASES)
def test_norm_clip_equals_reference(backend, dtype, shape, dim):
    x = _grad(shape, dtype, seed=3)
    g = _grad(shape, dtype, seed=4)
    max_norm = 0.8
    out = backward_of(x, g, max_norm=max_norm, dim=dim, backend=backend)
    expected = reference.error_clip_grad(g, max_norm=max_norm, dim=dim)
    assert out.dtype == dtype
    assert_clip_close(out, expected)
    # Every slice is clipped at this max_norm except where the test says otherwise:
    assert not torch.equal(out, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [1.0, math.inf, 3.5, 0.5, "inf"],
                         ids=["1", "inf", "3.5", "0.5", "inf-str"])
@pytest.mark.parametrize("shape,dim", [((9, 40), -1), ((2, 3, 20), (0, 2)),
                                       ((1, 17000), -1)], ids=["9x40", "2x3x20", "1x17000"])
def test_norm_orders_equal_reference(backend, norm_type, shape, dim):
    g = _grad(shape, torch.float32, seed=5)
    p = float(norm_type)
    norms = torch.linalg.vector_norm(g.double(), p, dim=dim)
    max_norm = float(norms.median()) * 1.001  # about half the slices above, half below
    out = backward_of(torch.zeros(shape), g, max_norm=max_norm, dim=dim, norm_type=norm_type,
                      backend=backend)
    expected = reference.error_clip_grad(g, max_norm=max_norm, dim=dim, norm_type=p)
    assert_clip_close(out, expected, coef_rtol=2e-6 if p not in (1.0, 2.0, math.inf) else 1e-6)
    assert not torch.equal(out, g) or norms.numel() == 1


def _exact_rows(row_len_root: int, n_rows: int, dtype) -> torch.Tensor:
    """Rows of +-2^k (k per row) of length r^2: every partial sum of squares or of absolute
    values is exact, so the norm is exact in any summation order (2^k * r for p = 2)."""
    gen = torch.Generator().manual_seed(6)
    signs = torch.randint(0, 2, (n_rows, row_len_root ** 2), generator=gen) * 2 - 1
    scales = 2.0 ** torch.arange(-3, n_rows - 3).unsqueeze(1)
    return (signs * scales).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["2", "1", "inf"])
@pytest.mark.parametrize("root", [7, 142], ids=["fused-49", "split-20164"])
def test_norm_clip_applies_the_float32_coefficient_once_bitwise(backend, dtype, norm_type,
                                                                root):
    # With exact norms, the result is fully determined by the documented arithmetic:
    # coef = min(max_norm / (norm + eps), 1) in float32, g * coef in float32 (float64 for
    # float64), rounded once.
    n_rows = 6 if root == 7 else 2
    g = _exact_rows(root, n_rows, dtype)
    norms = torch.linalg.vector_norm(g.double(), norm_type, dim=-1, keepdim=True).float()
    max_norm = 0.9 * float(norms[1])  # row 0 (half of row 1's norm) is not clipped
    out = backward_of(torch.zeros_like(g), g, max_norm=max_norm, dim=-1, norm_type=norm_type,
                      backend=backend)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (g.to(acc) * coef.to(acc)).to(dtype)
    assert (coef < 1).any() and (coef == 1).any()
    assert torch.equal(out, expected)
    if dtype in (torch.float32, torch.float64):
        # Negative control: a coefficient one float32 ulp off changes the result.
        nudged = torch.nextafter(coef, torch.zeros_like(coef))
        assert not torch.equal(out, (g.to(acc) * nudged.to(acc)).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_control_the_reference_check_can_fail(backend):
    g = _grad((7, 33), torch.float32, seed=7)
    expected = reference.error_clip_grad(g, max_norm=0.8, dim=-1)
    with pytest.raises(AssertionError):
        assert_clip_close(g, expected)  # the unclipped gradient
    with pytest.raises(AssertionError):  # clipped over the wrong dimension
        assert_clip_close(backward_of(g, g, max_norm=0.8, dim=0, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_slices_propagate_like_clip_grad_norm(backend):
    g = torch.ones(4, 8)
    g[1, 3] = float("nan")
    g[2, 0] = float("inf")
    out = backward_of(torch.zeros(4, 8), g, max_norm=1.0, dim=-1, backend=backend)
    assert out[1].isnan().all()  # NaN norm: NaN coefficient
    assert out[2].isnan()[0] and (out[2, 1:] == 0).all()  # inf norm: coefficient 0 (inf*0)
    assert_clip_close(out[[0, 3]], reference.error_clip_grad(g[[0, 3]], max_norm=1.0, dim=-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_a_value_used_twice_is_clipped_once_summed(backend):
    x = torch.zeros(5, requires_grad=True)
    y = tritonclip.error_clip(x, clip_value=1.0, backend=backend)
    (3 * y).sum().add((2 * y).sum()).backward()  # 5 arrives at y, clipped to 1
    assert torch.equal(x.grad, torch.ones(5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,dim", [((0, 4), -1), ((3, 0), -1), ((0,), None)], ids=str)
def test_empty(backend, shape, dim):
    counter = tritonclip.ClipCounter()
    out = backward_of(torch.zeros(shape), torch.zeros(shape), max_norm=1.0, dim=dim,
                      backend=backend, counter=counter)
    assert out.shape == shape
    assert int(counter.clipped) == 0 and int(counter.seen) == (3 if shape == (3, 0) else
                                                                (1 if dim is None else 0))


# ---------------------------------------------------------------------------------------
# layouts and kernel outputs
# ---------------------------------------------------------------------------------------


def _layouts(shape, dtype):
    """Non-contiguous gradients: dense permuted, strided slice, expanded (read-only)."""
    big = _grad((shape[1], shape[0] * 2), dtype, seed=8)
    return {
        "transposed": _grad(shape[::-1], dtype, 9).t(),
        "strided": big.t()[::2],
        "expanded": _grad((1, shape[1]), dtype, 10).expand(shape),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
@pytest.mark.parametrize("kwargs", [dict(lo=-0.2, hi=0.5), dict(max_norm=0.7),
                                    dict(max_norm=0.7, dim=-1), dict(max_norm=0.7, dim=0)],
                         ids=["value", "whole", "dim-1", "dim0"])
def test_non_contiguous_gradients(backend, dtype, layout, kwargs):
    shape = (6, 10)
    g = _layouts(shape, dtype)[layout]
    assert not g.is_contiguous() and g.shape == shape
    spec = _Options(
        None, kwargs.get("lo"), kwargs.get("hi"), kwargs.get("max_norm"), kwargs.get("dim"),
        2.0, 1e-6, backend, None).spec(torch.zeros(shape, dtype=dtype))
    before = g.clone()
    out = _core.clip_activation_grad(g, spec)
    assert torch.equal(g, before)  # the incoming gradient is never written
    expected = reference.error_clip_grad(g, lo=kwargs.get("lo"), hi=kwargs.get("hi"),
                                         max_norm=kwargs.get("max_norm"), dim=kwargs.get("dim"))
    assert_clip_close(out, expected)
    # and through autograd
    assert_clip_close(backward_of(torch.zeros(shape, dtype=dtype), g, backend=backend,
                                  **kwargs), expected)


@pytest.mark.interpreter
def test_dense_permuted_gradient_is_not_copied(monkeypatch):
    g = _grad((10, 6), torch.float32).t()
    calls = []
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **k: calls.append(1) or self.clone())
    spec = _Options(
        0.1, None, None, None, None, 2.0, 1e-6, "triton", None).spec(g)
    out = _core.clip_activation_grad(g, spec)
    assert not calls and out.stride() == g.stride()  # run in the memory order, same strides
    assert torch.equal(out, g.clamp(-0.1, 0.1))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape,dim", [((7, 33), -1), ((3, 20000), -1), ((70001,), None),
                                       ((2, 3, 4), (0, 2))], ids=str)
def test_kernel_outputs_are_all_written(monkeypatch, dtype, shape, dim):
    # Every allocation of the backward (outputs, partials, coefficients) starts as NaN: an
    # element a kernel failed to write would show.
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(math.nan))
    monkeypatch.setattr(torch, "empty_like",
                        lambda *a, **k: real_empty_like(*a, **k).fill_(math.nan))
    g = _grad(shape, dtype, seed=11)
    for kwargs in (dict(max_norm=0.5, dim=dim), dict(clip_value=0.5)):
        out = backward_of(torch.zeros(shape, dtype=dtype), g, backend="triton", **kwargs)
        assert not out.isnan().any(), kwargs


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_launchers_on_misaligned_views_and_poisoned_outputs(dtype):
    # Views one element in: the unaligned specializations; outputs poisoned.
    flat = _grad((2 * 40 * 9 + 1,), dtype, seed=12)
    x = flat[1:1 + 40 * 9].view(40, 9)
    out = poisoned((40, 9), dtype)
    ec_kernels.row_clip_out(x, out, 0.5, 2.0, 1e-6)
    assert_clip_close(out, reference.error_clip_grad(x, max_norm=0.5, dim=-1))
    out = poisoned((360,), dtype)
    ec_kernels.clamp_out(x.reshape(-1), out, -0.1, 0.2)
    assert torch.equal(out, reference.error_clip_grad(x.reshape(-1), lo=-0.1, hi=0.2).to(dtype))


@pytest.mark.interpreter
def test_bitwise_deterministic_across_runs():
    g = _grad((3, 40000), torch.bfloat16, seed=13)
    first = backward_of(torch.zeros_like(g), g, max_norm=0.3, dim=-1, backend="triton")
    second = backward_of(torch.zeros_like(g), g, max_norm=0.3, dim=-1, backend="triton")
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(lo=-0.3, hi=0.4), dict(max_norm=0.9),
                                    dict(max_norm=0.9, dim=-1), dict(max_norm=0.9, dim=(0, 2))],
                         ids=["value", "whole", "dim-1", "dim02"])
def test_double_backward_differentiates_the_clip(backend, kwargs):
    shape = (3, 4, 5)
    x = _grad(shape, torch.float64, seed=19).requires_grad_()
    g = _grad(shape, torch.float64, seed=14).requires_grad_()
    y = tritonclip.error_clip(x, backend=backend, **kwargs)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    w = _grad(shape, torch.float64, seed=15)
    (gg,) = torch.autograd.grad((gx * w).sum(), g)

    g_ref = g.detach().clone().requires_grad_()
    clipped = reference.error_clip_grad(g_ref, **kwargs)
    (expected,) = torch.autograd.grad((clipped * w).sum(), g_ref)
    assert_clip_close(gx.detach(), clipped.detach())
    # The coefficient is float32 by contract: its derivative carries that rounding.
    torch.testing.assert_close(gg, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(gg, w)  # a clip, not the identity


# ---------------------------------------------------------------------------------------
# counters
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_counter_counts_clipped_elements_and_slices(backend):
    counter = tritonclip.ClipCounter()
    g = _grad((8, 50), torch.float32, seed=16)
    backward_of(g, g, lo=-0.5, hi=1.0, backend=backend, counter=counter)
    outside = int(((g < -0.5) | (g > 1.0)).sum())
    assert (int(counter.clipped), int(counter.seen)) == (outside, 400)
    counter.reset()
    norms = torch.linalg.vector_norm(g, dim=-1)
    max_norm = float(norms.median()) * 1.001  # no row within eps of it
    for _ in range(2):  # accumulates
        backward_of(g, g, max_norm=max_norm, dim=-1, backend=backend, counter=counter)
    assert (int(counter.clipped), int(counter.seen)) == (2 * int((norms > max_norm).sum()), 16)
    big = _grad((2, 20000), torch.float32, seed=17)  # the split path counts too
    backward_of(big, big, max_norm=1.0, dim=-1, backend=backend, counter=counter)
    assert (int(counter.clipped), int(counter.seen)) == (2 * int((norms > max_norm).sum()) + 2,
                                                         18)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(max_norm=1.0, dim=-1), dict(max_norm=1.0),
                                    dict(clip_value=0.1)], ids=["rows", "whole", "value"])
def test_backward_needs_no_host_synchronisation(monkeypatch, backend, kwargs):
    # Reading a tensor's value (.item(), int(), bool(), .tolist()) is how host code waits
    # for a device: none may happen in backward, counters included.
    counter = tritonclip.ClipCounter()
    g = _grad((8, 50), torch.float32, seed=18)
    x = torch.zeros(8, 50, requires_grad=True)
    y = tritonclip.error_clip(x, backend=backend, counter=counter, **kwargs)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name,
                            lambda *a, _n=name, **k: pytest.fail(f"host sync: Tensor.{_n}"))
    y.backward(g)
    monkeypatch.undo()
    assert int(counter.seen) == {"rows": 8, "whole": 1, "value": 400}[
        "value" if "clip_value" in kwargs else "rows" if "dim" in kwargs else "whole"]


# ---------------------------------------------------------------------------------------
# modules and hooks
# ---------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.cell = nn.LSTMCell(8, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh())
                                     for _ in range(2)])
        self.out = nn.Linear(8, 1)

    def forward(self, x):  # x: [T, B, 4]
        h = c = x.new_zeros(x.shape[1], 8)
        for x_t in x:
            h, c = self.cell(self.inp(x_t), (h, c))
        for block in self.blocks:
            h = block(h)
        return self.out(h).squeeze(-1)


def _grads(model, x, scale=1.0):
    model.zero_grad()
    (model(x).sum() * scale).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_attach_and_detach_cleanly(backend):
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(5, 3, 4)
    plain = _grads(model, x, scale=100.0)
    counter = tritonclip.ClipCounter()
    handle = tritonclip.register_error_clip(model, max_norm=1e-3, dim=-1, filter=nn.LSTMCell,
                                            backend=backend, counter=counter)
    assert handle.names == ("cell",)
    clipped = _grads(model, x, scale=100.0)
    # Parameters before the cell (inp, cell) see clipped gradients; those after do not.
    assert all(not torch.equal(a, b) for a, b in zip(plain[:6], clipped[:6]))
    assert all(torch.equal(a, b) for a, b in zip(plain[6:], clipped[6:]))
    # Per sample (3) of the 5 h and 5 c outputs (the hooks see the last c's gradient too:
    # autograd fills in zeros for an output of a node that gets gradient through another).
    assert int(counter.seen) == (5 + 5) * 3
    handle.remove()
    again = _grads(model, x, scale=100.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert int(counter.seen) == 30  # no hook ran
    handle.remove()  # idempotent


def test_filters():
    model = _Net()
    kw = dict(clip_value=1.0)
    cases = {
        nn.Linear: ("inp", "blocks.0.0", "blocks.1.0", "out"),
        (nn.LSTMCell, nn.Tanh): ("cell", "blocks.0.1", "blocks.1.1"),
        "blocks.*": ("blocks.0", "blocks.0.0", "blocks.0.1", "blocks.1", "blocks.1.0",
                     "blocks.1.1"),
        re.compile(r"blocks\.\d+"): ("blocks.0", "blocks.1"),
        (lambda name, module: name.endswith("out")): ("out",),
    }
    for filter, names in cases.items():
        with tritonclip.register_error_clip(model, filter=filter, **kw) as handle:
            assert handle.names == names, filter
    assert not any(m._forward_hooks for m in model.modules())  # `with` removed them all
    with pytest.raises(ValueError, match="matched no module"):
        tritonclip.register_error_clip(model, filter="encoder.*", **kw)
    with pytest.raises(TypeError, match="filter"):
        tritonclip.register_error_clip(model, filter=3, **kw)
    with pytest.raises(TypeError, match="filter"):
        tritonclip.register_error_clip(model, **kw)  # filter is required
    with pytest.raises(ValueError, match="max_norm"):  # checked at registration
        tritonclip.register_error_clip(model, filter=nn.Linear, max_norm=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_clip_module_clips_tuple_outputs(backend):
    torch.manual_seed(1)
    cell = nn.LSTMCell(3, 5)
    counter = tritonclip.ClipCounter()
    wrapped = tritonclip.ErrorClip(cell, lo=-1e-3, hi=1e-3, backend=backend, counter=counter)
    assert "lo=-0.001" in repr(wrapped)
    x = torch.randn(2, 3)
    h, c = wrapped(x)
    assert torch.equal(h, cell(x)[0])
    ((h * 10).sum() + (c * 10).sum()).backward()
    assert int(counter.seen) == 2 * 2 * 5 and int(counter.clipped) == 20
    bound = cell.weight_ih.grad.abs().max()
    cell.zero_grad()
    ((cell(x)[0] * 10).sum() + (cell(x)[1] * 10).sum()).backward()
    assert cell.weight_ih.grad.abs().max() > 100 * bound  # negative control: unclipped


def test_outputs_of_every_structure_are_walked():
    from tritonclip.error_clip import _clip_outputs, _Options

    options = _Options(1.0, None, None, None, None, 2.0, 1e-6, "torch", None)
    t = torch.ones(2, requires_grad=True) * 1
    packed = nn.utils.rnn.pack_sequence([torch.ones(3, 2, requires_grad=True) * 1])
    structured = (t, [t, {"a": t, "n": torch.arange(3)}], "text", torch.max(t * 1, dim=0),
                  packed)
    out = _clip_outputs(structured, options)
    assert out is structured  # the outputs themselves, with hooks on their tensors
    assert len(t._backward_hooks) == 1  # listed three times, hooked once
    assert len(structured[3].values._backward_hooks) == 1  # a torch.return_types structseq
    assert len(packed.data._backward_hooks) == 1  # a PackedSequence (named tuple)
    assert not structured[3].indices.requires_grad


@pytest.mark.parametrize("kind", ["value", "norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_is_unchanged_when_no_clipping_triggers(backend, kind):
    def run(clip: bool):
        torch.manual_seed(2)
        model = _Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        counter = tritonclip.ClipCounter()
        options = dict(clip_value=1e6) if kind == "value" else dict(max_norm=1e6, dim=-1)
        handle = (tritonclip.register_error_clip(model, filter=(nn.LSTMCell, nn.Linear),
                                                 backend=backend, counter=counter, **options)
                  if clip else None)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(4):
            x = torch.randn(4, 3, 4, generator=gen)
            loss = (model(x) - 1).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        if handle is not None:
            handle.remove()
            assert int(counter.clipped) == 0 and int(counter.seen) > 0  # hooks ran
        return torch.stack(losses), [p.detach() for p in model.parameters()]

    losses, params = run(False)
    clip_losses, clip_params = run(True)
    assert torch.equal(losses, clip_losses)  # bitwise: a coefficient of 1 changes no bit
    assert all(torch.equal(a, b) for a, b in zip(params, clip_params))


# ---------------------------------------------------------------------------------------
# backends and arguments
# ---------------------------------------------------------------------------------------


def test_auto_backend_on_cpu_runs_torch_ops(monkeypatch):
    monkeypatch.delenv("TRITONCLIP_BACKEND", raising=False)
    monkeypatch.setattr(ec_kernels, "row_clip_out", lambda *a, **k: pytest.fail("kernel"))
    g = _grad((4, 6), torch.float32)
    assert_clip_close(backward_of(g, g, max_norm=0.5, dim=-1),
                      reference.error_clip_grad(g, max_norm=0.5, dim=-1))


def test_backend_env_and_interpreter_policy(monkeypatch):
    x = torch.zeros(3, requires_grad=True)
    monkeypatch.setenv("TRITONCLIP_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        tritonclip.error_clip(x, clip_value=1.0)
    monkeypatch.setenv("TRITONCLIP_BACKEND", "triton")
    monkeypatch.setattr(tritonclip.kernels.config, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):  # at the call, not in backward
        tritonclip.error_clip(x, clip_value=1.0)


BAD = [
    (dict(clip_value=-1.0), ValueError, "clip_value"),
    (dict(clip_value=math.nan), ValueError, "clip_value"),
    (dict(clip_value="1"), TypeError, "clip_value"),
    (dict(lo=1.0, hi=0.5), ValueError, "lo"),
    (dict(clip_value=1.0, max_norm=1.0), ValueError, "max_norm"),
    (dict(lo=0.1, max_norm=1.0), ValueError, "not both"),
    (dict(), ValueError, "clip_value"),
    (dict(clip_value=1.0, dim=0), ValueError, "dim"),
    (dict(max_norm=-2.0), ValueError, "max_norm"),
    (dict(max_norm=1.0, dim=2), ValueError, "dim 2"),
    (dict(max_norm=1.0, dim=(0, -2)), ValueError, "twice"),
    (dict(max_norm=1.0, dim=()), ValueError, "dim"),
    (dict(max_norm=1.0, dim=1.0), TypeError, "dim"),
    (dict(max_norm=1.0, dim=True), TypeError, "dim"),
    (dict(max_norm=1.0, norm_type=0), ValueError, "norm_type"),
    (dict(max_norm=1.0, norm_type="-inf"), ValueError, "norm_type"),
    (dict(max_norm=1.0, norm_type="fro"), ValueError, "fro"),
    (dict(max_norm=1.0, eps=-1e-6), ValueError, "eps"),
    (dict(max_norm=1.0, backend="cuda"), ValueError, "cuda"),
    (dict(max_norm=1.0, counter=torch.zeros(2)), TypeError, "counter"),
    (dict(max_norm=1.0, counter=tritonclip.ClipCounter("meta")), ValueError, "meta"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise_at_the_call(kwargs, error, match):
    x = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(error, match=re.escape(match)):
        tritonclip.error_clip(x, **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="list"):
        tritonclip.error_clip([1.0], clip_value=1.0)
    with pytest.raises(TypeError, match="int64"):
        tritonclip.error_clip(torch.zeros(3, dtype=torch.int64), clip_value=1.0)
    with pytest.raises(TypeError, match="Module"):
        tritonclip.ErrorClip(lambda x: x, clip_value=1.0)
    with pytest.raises(TypeError, match="Module"):
        tritonclip.register_error_clip("model", clip_value=1.0, filter=nn.Linear)


def test_zero_dim_activation():
    x = torch.tensor(3.0, requires_grad=True)
    tritonclip.error_clip(x, max_norm=1.0, dim=0).backward(torch.tensor(4.0))
    assert abs(x.grad.item() - 4.0 / (4.0 + 1e-6)) < 1e-6


# ---------------------------------------------------------------------------------------
# the example cannot rot
# ---------------------------------------------------------------------------------------


def test_rnn_example_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
    try:
        import rnn_error_clip
    finally:
        sys.path.pop(0)
    out = tmp_path / "plot.png"
    result = rnn_error_clip.main(["--steps", "100", "--iters", "2", "--batch", "4",
                                  "--out", str(out)])
    assert out.stat().st_size > 0 and "slices clipped" in capsys.readouterr().out
    plain, clipped = result["plain"]["first_grad"], result["clipped"]["first_grad"]
    assert min(plain) > 100 * max(clipped)  # exploding vs bounded, already at 100 steps


def test_hooked_outputs_may_be_modified_in_place():
    # The hooks leave the module's own output tensor, so an in-place op after it (here
    # ReLU(inplace=True)) still works, and the gradient of the pre-ReLU value is clipped.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    x = torch.randn(2, 4, requires_grad=True)
    handle = tritonclip.register_error_clip(model, max_norm=1e-3, filter=nn.Linear)
    model(x).sum().backward()
    clipped, x.grad = x.grad.clone(), None
    handle.remove()
    out = model[0](x)
    out.retain_grad()
    torch.relu(out).sum().backward()
    coef = torch.clamp(1e-3 / (out.grad.norm() + 1e-6), max=1.0)
    torch.testing.assert_close(clipped, (out.grad * coef) @ model[0].weight)
    assert not torch.allclose(clipped, x.grad)  # negative control: the clip did something
