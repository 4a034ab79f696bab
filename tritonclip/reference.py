"""Plain float64 references of the clipping formulas, imported by tests and benchmarks.

They compute exactly what the documentation promises (including tritonclip's deliberate
differences from torch) on inputs upcast to float64, one tensor at a time, with no fusion and
no deduplication: callers pass each storage region once.
"""

from __future__ import annotations

import math

import torch


def total_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """Norm of the concatenation of ``tensors`` in float64; ``0`` counts nonzero elements; a
    NaN (inf) element makes any norm NaN (inf)."""
    flat = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t.numel() > 0]
    if not flat:
        return torch.tensor(0.0, dtype=torch.float64)
    vector = torch.cat([f.cpu() for f in flat])
    if norm_type == 0:
        norm = (vector != 0).sum().to(torch.float64)
    else:
        norm = torch.linalg.vector_norm(vector, norm_type)
    # tritonclip's rule for every order: a NaN element makes the norm NaN, an inf one inf
    # (torch's orders 0 and -inf can stay finite).
    if vector.isnan().any():
        return torch.tensor(math.nan, dtype=torch.float64)
    if vector.isinf().any() and torch.isfinite(norm):
        return torch.tensor(math.inf, dtype=torch.float64)
    return norm


def clip_coefficient(total: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """min(max_norm / (total + eps), 1) in float64."""
    return torch.clamp(max_norm / (total.to(torch.float64) + eps), max=1.0)


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   eps: float = 1e-6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(total norm, clipped copies of ``grads``) in float64."""
    total = total_norm(grads, norm_type)
    coef = clip_coefficient(total, max_norm, eps)
    return total, [g.detach().cpu().to(torch.float64) * coef for g in grads]


def clip_grad_value(grads: list[torch.Tensor], lo: float, hi: float) -> list[torch.Tensor]:
    """Clamped float64 copies of ``grads`` (NaN stays NaN)."""
    out = []
    for g in grads:
        x = g.detach().cpu().to(torch.float64)
        out.append(torch.where(torch.isnan(x), x, x.clamp(min=lo if lo > -math.inf else None,
                                                          max=hi if hi < math.inf else None)))
    return out


def error_clip_grad(grad: torch.Tensor, lo: float | None = None, hi: float | None = None,
                    max_norm: float | None = None, dim: int | tuple[int, ...] | None = None,
                    norm_type: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """What :func:`tritonclip.error_clip`'s backward makes of ``grad``, in float64 (and
    differentiable, for double-backward checks): clamped to [lo, hi] (NaN stays NaN), or each
    slice over ``dim`` (all of ``grad`` for None) scaled by min(max_norm / (norm + eps), 1)."""
    x = grad.to(torch.float64)
    if max_norm is None:
        low = -math.inf if lo is None else lo
        high = math.inf if hi is None else hi
        return torch.where(torch.isnan(x), x, x.clamp(min=low, max=high))
    norm = torch.linalg.vector_norm(x, norm_type, dim=dim, keepdim=True)
    return x * torch.clamp(max_norm / (norm + eps), max=1.0)
