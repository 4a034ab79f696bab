"""The backward of :func:`tritonclip.error_clip`: the incoming gradient, clipped out of place.

Three implementations of one contract (:class:`Spec`):

- ``triton``: the kernels of ``tritonclip.kernels.error_clip`` (an out-of-place clamp; a row
  norm + scale, fused for rows of up to 16 Ki elements);
- ``torch``: the same arithmetic with torch ops (CPU without the interpreter, other devices);
- ``differentiable``: torch ops that autograd can differentiate, for ``create_graph=True``.

All three compute a norm coefficient in float32 from a norm accumulated in float32 (float64
for float64 gradients; the torch implementation on CPU accumulates in float64, see
:func:`_torch_norms`), and apply it once before one rounding to the gradient's dtype. The
incoming gradient is never written: autograd may hand the same tensor to other consumers, a
``retain_grad`` may hold it, and ``loss.sum()``'s gradient is an expanded (read-only) view.
"""

from __future__ import annotations

import dataclasses

import torch

from tritonclip.kernels import error_clip as kernels

from ._groups import dense_extent
from .kernels.config import compute_dtype


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated error clip: by value (``max_norm is None``: clamp to [lo, hi]) or by norm
    (each slice over ``dims``; ``None``: the whole tensor). ``counts``: int64 [clipped, seen]
    on the activation's device, or None."""

    lo: float
    hi: float
    max_norm: float | None
    dims: tuple[int, ...] | None
    norm_type: float
    eps: float
    backend: str  # "triton" or "torch", resolved at the forward call
    counts: torch.Tensor | None


def clip(grad: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The clipped copy of ``grad`` by the implementation that ``spec`` and the call ask for."""
    if torch.is_grad_enabled() and grad.requires_grad:
        return _differentiable(grad, spec)
    if grad.numel() == 0:
        if spec.counts is not None and spec.max_norm is not None:
            with torch.no_grad():
                spec.counts[1].add_(_n_rows(grad, spec.dims))
        return grad
    if spec.backend == "triton" and grad.layout == torch.strided:
        return _triton(grad, spec)
    return _torch(grad, spec)


def _n_rows(grad: torch.Tensor, dims) -> int:
    if dims is None:
        return 1
    n = 1
    for d, size in enumerate(grad.shape):
        if d not in dims:
            n *= size
    return n


# ---------------------------------------------------------------------------------------
# memory layout: the gradient as rows
# ---------------------------------------------------------------------------------------


def _flat_pair(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat input, flat output, output) for an op that does not care about element order:
    a dense gradient is read in its own memory order and the output gets its strides
    (``empty_like`` keeps them), so nothing is copied; any other one is made contiguous."""
    if not dense_extent(grad):
        grad = grad.contiguous()
    out = torch.empty_like(grad)  # same strides as a dense ``grad``
    n = grad.numel()
    return grad.as_strided((n,), (1,)), out.as_strided((n,), (1,)), out


def _rows(grad: torch.Tensor, dims: tuple[int, ...]):
    """(x, out, restore): ``grad`` as contiguous ``[n_rows, row_len]`` rows (the reduced
    dimensions moved last; a copy only when that is not already the memory order), an
    output of the same shape, and a function giving the output in ``grad``'s shape."""
    kept = [d for d in range(grad.dim()) if d not in dims]
    perm = kept + list(dims)
    moved = grad.permute(perm)
    x = moved.contiguous()
    row_len = 1
    for d in dims:
        row_len *= grad.shape[d]
    out = torch.empty_like(x)
    inverse = [0] * len(perm)
    for position, d in enumerate(perm):
        inverse[d] = position

    def restore(result: torch.Tensor) -> torch.Tensor:
        # A permuted view: autograd takes gradients of any strides.
        return result.view(moved.shape).permute(inverse)

    return x.view(-1, row_len), out.view(-1, row_len), restore


# ---------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------


def _triton(grad: torch.Tensor, spec: Spec) -> torch.Tensor:
    if spec.max_norm is None:
        x, out, result = _flat_pair(grad)
        kernels.clamp_out(x, out, spec.lo, spec.hi, spec.counts)
        return result
    if spec.dims is None:
        x, out, result = _flat_pair(grad)
        kernels.row_clip_out(x, out, spec.max_norm, spec.norm_type, spec.eps, spec.counts)
        return result
    x, out, restore = _rows(grad, spec.dims)
    kernels.row_clip_out(x, out, spec.max_norm, spec.norm_type, spec.eps, spec.counts)
    return restore(out)


def _torch_norms(x: torch.Tensor, norm_type: float, dim) -> torch.Tensor:
    """float32 norms of ``x`` over ``dim`` (keepdim), accumulated in float32 (float64 for
    float64) on a GPU and in float64 on CPU, where torch's float32 reduction of a long row
    loses digits (2.7e-3 relative over 38.6M elements, see ``_torch_backend``)."""
    acc = torch.float64 if x.device.type == "cpu" else compute_dtype(x.dtype)
    return torch.linalg.vector_norm(x, norm_type, dim=dim, keepdim=True, dtype=acc).float()


def _coefficients(norms: torch.Tensor, spec: Spec) -> torch.Tensor:
    # max_norm / t is reciprocal(t) * max_norm in torch, as in the kernels and clip_grad_norm_.
    return torch.clamp(spec.max_norm / (norms + spec.eps), max=1.0)


@torch.no_grad()
def _count(spec: Spec, clipped: torch.Tensor, seen: int) -> None:
    if spec.counts is not None:
        spec.counts[0].add_(clipped.sum())
        spec.counts[1].add_(seen)


def _count_clamped(spec: Spec, grad: torch.Tensor) -> None:
    """Count the elements a value clip changes; builds its temporaries only when counting."""
    if spec.counts is not None:
        with torch.no_grad():
            x = grad.to(compute_dtype(grad.dtype))
            _count(spec, (x < spec.lo) | (x > spec.hi), grad.numel())


def _torch(grad: torch.Tensor, spec: Spec) -> torch.Tensor:
    acc = compute_dtype(grad.dtype)
    if spec.max_norm is None:
        _count_clamped(spec, grad)
        return grad.clamp(spec.lo, spec.hi)  # NaN stays NaN
    coef = _coefficients(_torch_norms(grad, spec.norm_type, spec.dims), spec)
    _count(spec, coef < 1.0, coef.numel())
    return (grad.to(acc) * coef.to(acc)).to(grad.dtype)


def _differentiable(grad: torch.Tensor, spec: Spec) -> torch.Tensor:
    """The clip from differentiable torch ops (double backward): clamp passes the gradient
    where the value lies inside the bounds; the norm path differentiates through the norm."""
    if spec.max_norm is None:
        _count_clamped(spec, grad)
        return grad.clamp(spec.lo, spec.hi)
    acc = compute_dtype(grad.dtype)
    norms = torch.linalg.vector_norm(grad, spec.norm_type, dim=spec.dims, keepdim=True,
                                     dtype=acc)
    coef = _coefficients(norms.float(), spec)
    _count(spec, coef.detach() < 1.0, coef.numel())
    return (grad.to(acc) * coef.to(acc)).to(grad.dtype)
