"""Norm math on *power forms*, shared by the core and both backends.

A norm of order p is reduced through its power form: the sum of |g|^p (p = 2: sum of squares,
p = 1: sum of |g|), the max of |g| (p = inf), the min of |g| (p = -inf) or the count of
nonzero elements (p = 0). Power forms of disjoint parts combine by sum (max, min), across
groups and ranks alike, and the root is taken once at the end. Orders p > 0 show a NaN or inf
element by themselves; a count or a min does not, so the norm carries NaN/inf flags as well,
and a NaN (inf) gradient makes every norm that contains it NaN (inf), for every order.
"""

from __future__ import annotations

import math

import torch

from . import kernels


def accumulation_dtype(dtype: torch.dtype, norm_type: float) -> torch.dtype:
    """float64 for float64 (and complex128) gradients and for counts, float32 otherwise: the
    kernels' rule."""
    return kernels.accumulation_dtype(dtype.to_real() if dtype.is_complex else dtype, norm_type)


def result_dtype(dtypes) -> torch.dtype:
    """dtype of a norm or coefficient over gradients of ``dtypes``: float64 where a float64
    (or complex128) gradient takes part, so that its precision and range survive, else
    float32."""
    return (torch.float64 if any(d in (torch.float64, torch.complex128) for d in dtypes)
            else torch.float32)


def identity(norm_type: float) -> float:
    """The power form of no elements (what a rank without gradients contributes)."""
    return math.inf if norm_type == -math.inf else 0.0


def shows_nonfinite(norm_type: float) -> bool:
    """Whether the power form is non-finite whenever an element is: p > 0."""
    return norm_type > 0


def power_form(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Norms -> their contributions to a total: |.|^p (max, min, count as they are)."""
    if math.isinf(norm_type) or norm_type in (0.0, 1.0):
        return norms
    return norms.pow(norm_type)


def root(power: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Power form -> norm."""
    if math.isinf(norm_type) or norm_type in (0.0, 1.0):
        return power
    if norm_type == 2.0:
        return power.sqrt()
    return power.pow(1.0 / norm_type)


def reduce_power(values: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Power forms of disjoint parts (a 1-D tensor) -> the power form of their union."""
    if norm_type == math.inf:
        return values.max()
    if norm_type == -math.inf:
        return values.min()
    return values.sum()


def combine(values: list[torch.Tensor], norm_type: float, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    """Power forms (0-dim or 1-element tensors) -> one, 0-dim ``dtype`` on ``device``."""
    if not values:
        return torch.full((), identity(norm_type), dtype=dtype, device=device)
    moved = [v.reshape(()).to(device=device, dtype=dtype, non_blocking=device.type == "cuda")
             for v in values]
    return moved[0] if len(moved) == 1 else reduce_power(torch.stack(moved), norm_type)


def with_flags(norms: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor) -> torch.Tensor:
    """``norms`` made NaN where ``nan``, and inf where ``inf`` and still finite."""
    norms = torch.where(inf & torch.isfinite(norms), torch.full_like(norms, math.inf), norms)
    return torch.where(nan, torch.full_like(norms, math.nan), norms)


def finish(power: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor, norm_type: float,
           dtype: torch.dtype) -> torch.Tensor:
    """Power form and flags -> the norm, in ``dtype``."""
    total = root(power, norm_type).to(dtype)
    if norm_type == -math.inf:  # min over no element at all (every rank empty): 0, as alone
        total = torch.where(torch.isinf(total) & ~inf, torch.zeros_like(total), total)
    return with_flags(total, nan, inf)


def unscaled_clip(scaled: torch.Tensor, inv_scale: torch.Tensor, max_norm, eps: float,
                  skip_nonfinite: bool):
    """(norm, factor, found) of a clip of gradients a GradScaler scaled, from the norm of the
    ``scaled`` gradients and ``inv_scale`` (1 / scale, in its dtype, on its device): the norm
    of the unscaled gradients; the one factor that unscales and clips (1 where the norm is not
    finite and ``skip_nonfinite``: left as they are); ``found`` 1.0 where the scaled norm is
    not finite, else 0.0 (float32), what GradScaler.unscale_ would have found."""
    found = (~torch.isfinite(scaled)).float()
    total = scaled * inv_scale
    factor = clip_coefficient(total, max_norm, eps, False) * inv_scale
    if skip_nonfinite:
        factor = torch.where(found > 0, torch.ones_like(factor), factor)
    return total, factor, found


def clip_coefficient(total: torch.Tensor, max_norm, eps: float,
                     skip_nonfinite: bool) -> torch.Tensor:
    """min(max_norm / (total + eps), 1) in ``total``'s dtype (float32; float64 for float64
    gradients), as torch's clip_grad_norm_ and the kernels' epilogue compute it; 1 where the
    total is non-finite and ``skip_nonfinite``. ``max_norm`` may be a device tensor (adaptive
    thresholds). Where ``total + eps`` is 0 with ``max_norm`` 0 the coefficient is 1, not
    0 / 0 (the gradients are all zero: nothing to clip). No host synchronisation."""
    coef = torch.clamp(max_norm / (total + eps), max=1.0)
    if eps == 0 and (isinstance(max_norm, torch.Tensor) or max_norm == 0):
        coef = torch.where(total + eps == 0, torch.ones_like(coef), coef)
    if skip_nonfinite:
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    return coef
