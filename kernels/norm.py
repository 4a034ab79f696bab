"""Multi-tensor norm: per-chunk partial reductions and their deterministic finalize.

``norm_partials`` reads every span of a plan once and writes one partial per chunk:
sum of g^2, sum of |g|, sum of |g|^p, max |g|, min |g| or the count of nonzeros. ``finalize``
reduces those partials, in a fixed order, to the value of the whole group and optionally of
each span. No atomics anywhere, so two runs on the same input agree bit for bit.

Accumulation is float32 for float16/bfloat16/float32 gradients and float64 for float64;
nonzero counts are accumulated as integers and kept as float64 (exact below 2**53).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import (
    NORM_COUNT,
    NORM_MAX,
    NORM_MIN,
    NORM_SUM_ABS,
    NORM_SUM_POW,
    NORM_SUM_SQUARES,
    any_nan,
    chunk_bounds,
)
from .config import finalize_config, float64_bits, on_device, stream_meta
from .plan import LaunchPlan


# Sizes are not specialized: one compilation per (dtype, norm, alignment) serves every model.
@triton.jit(do_not_specialize=["n_spans", "n_chunks", "partial_offset", "p_bits"])
def _norm_partials_kernel(
    # pointers
    table_ptr, partials_ptr,
    # sizes
    n_spans, n_chunks, partial_offset,
    # order of the norm (NORM_SUM_POW only), as the bits of a float64: Triton passes Python
    # floats as float32, which would round p for float64 gradients
    p_bits,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr, NORM: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """partials[partial_offset + c] = reduction over chunk c of the plan's spans."""
    pid = tl.program_id(0).to(tl.int64)
    base, start, end = chunk_bounds(table_ptr, n_spans, n_chunks, pid, DTYPE, CHUNK, ALIGNED, VEC)

    if NORM == NORM_MIN:
        acc = tl.full([BLOCK], float("inf"), ACC)
    elif NORM == NORM_COUNT:
        acc = tl.zeros([BLOCK], tl.int32)
    else:
        acc = tl.zeros([BLOCK], ACC)

    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask, other=0).to(ACC)
        if NORM == NORM_SUM_SQUARES:
            acc += x * x
        elif NORM == NORM_SUM_ABS:
            acc += tl.abs(x)
        elif NORM == NORM_SUM_POW:
            # |x|^p = 2^(p log2|x|); masked lanes zeroed after the transform, since 0^p is
            # inf for p < 0.
            p = p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
            acc += tl.where(mask, tl.exp2(p * tl.log2(tl.abs(x))), 0.0)
        elif NORM == NORM_MAX:
            acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        elif NORM == NORM_MIN:
            acc = tl.minimum(acc, tl.where(mask, tl.abs(x), float("inf")),
                             propagate_nan=tl.PropagateNan.ALL)
        else:  # NORM_COUNT; masked lanes load 0 and are not counted; NaN counts as nonzero
            acc += (x != 0).to(tl.int32)

    if NORM == NORM_MAX:
        partial = tl.where(any_nan(acc), float("nan"), tl.max(acc, axis=0))
    elif NORM == NORM_MIN:
        partial = tl.where(any_nan(acc), float("nan"), tl.min(acc, axis=0))
    elif NORM == NORM_COUNT:
        partial = tl.sum(acc.to(tl.int64), axis=0).to(tl.float64)
    else:
        partial = tl.sum(acc, axis=0)
    tl.store(partials_ptr + partial_offset + pid, partial)


@triton.jit
def _finalize_kernel(
    # pointers
    partials_ptr, segments_ptr, out_ptr,
    # epilogue outputs (EPILOGUE only): the float32 norm and clip coefficient
    norm_ptr, coef_ptr,
    # epilogue scalars
    max_norm, eps,
    # meta-parameters
    NORM: tl.constexpr, BLOCK: tl.constexpr, EPILOGUE: tl.constexpr,
    SKIP_NONFINITE: tl.constexpr,
):
    """out[s] = reduction of partials[segments[s, 0]:segments[s, 1]]; 0 for an empty segment.

    With EPILOGUE (one program, segment 0 = the whole group; p = 0, 1, 2, inf or -inf, whose
    root is exact or a correctly rounded sqrt) it also writes the group's norm
    as float32 and the clip coefficient min(max_norm / (norm + eps), 1), computed with
    IEEE-rounded sqrt and reciprocal exactly as the torch ops would; with SKIP_NONFINITE a
    non-finite norm gives coefficient 1. This saves the half-dozen tiny launches of doing
    the root and the coefficient with torch ops.
    """
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(segments_ptr + 2 * pid)
    end = tl.load(segments_ptr + 2 * pid + 1)
    ACC: tl.constexpr = partials_ptr.dtype.element_ty
    if NORM == NORM_MIN:
        acc = tl.full([BLOCK], float("inf"), ACC)
    else:
        acc = tl.zeros([BLOCK], ACC)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if NORM == NORM_MAX:
            x = tl.load(partials_ptr + offs, mask=mask, other=0)
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        elif NORM == NORM_MIN:
            x = tl.load(partials_ptr + offs, mask=mask, other=float("inf"))
            acc = tl.minimum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc += tl.load(partials_ptr + offs, mask=mask, other=0)
    if NORM == NORM_MAX:
        value = tl.where(any_nan(acc), float("nan"), tl.max(acc, axis=0))
    elif NORM == NORM_MIN:
        value = tl.where(any_nan(acc), float("nan"), tl.min(acc, axis=0))
    else:
        value = tl.sum(acc, axis=0)
    value = tl.where(end > start, value, 0.0).to(ACC)
    tl.store(out_ptr + pid, value)
    if EPILOGUE:
        if NORM == NORM_SUM_SQUARES:
            if ACC == tl.float64:
                norm = tl.sqrt(value)  # float64 sqrt is IEEE-rounded (sqrt.rn.f64)
            else:
                norm = tl.sqrt_rn(value)  # tl.sqrt of float32 is an approximation
        else:  # p = 1, inf, -inf, 0: the power form is the norm
            # A general p's root (exp2/log2: approximate on a GPU) is left to torch.pow.
            tl.static_assert(NORM != NORM_SUM_POW)
            norm = value
        norm = norm.to(tl.float32)
        # torch evaluates `max_norm / (norm + eps)` as reciprocal(norm + eps) * max_norm; the
        # same two roundings give the same coefficient, bit for bit.
        coef = tl.div_rn(1.0, norm + eps) * max_norm
        coef = tl.minimum(coef, 1.0, propagate_nan=tl.PropagateNan.ALL)
        if SKIP_NONFINITE:
            finite = (norm == norm) & (tl.abs(norm) != float("inf"))
            coef = tl.where(finite, coef, 1.0)
        tl.store(norm_ptr, norm)
        tl.store(coef_ptr, coef)


def norm_mode(norm_type: float) -> int:
    """The kernel's NORM constant for a (validated, float) norm order."""
    if norm_type == 2.0:
        mode = NORM_SUM_SQUARES
    elif norm_type == 1.0:
        mode = NORM_SUM_ABS
    elif norm_type == float("inf"):
        mode = NORM_MAX
    elif norm_type == float("-inf"):
        mode = NORM_MIN
    elif norm_type == 0.0:
        mode = NORM_COUNT
    else:
        mode = NORM_SUM_POW
    return mode.value


def accumulation_dtype(dtype: torch.dtype, norm_type: float) -> torch.dtype:
    """dtype of partials and group values: float64 for float64 grads and for counts."""
    if dtype == torch.float64 or norm_type == 0.0:
        return torch.float64
    return torch.float32


def norm_partials(plan: LaunchPlan, norm_type: float) -> torch.Tensor:
    """Launch the partial reduction over every span of ``plan``.

    Returns the partials (one per chunk) in :func:`accumulation_dtype`.
    """
    acc_dtype = accumulation_dtype(plan.dtype, norm_type)
    partials = torch.empty(plan.n_partials, dtype=acc_dtype, device=plan.device)
    mode = norm_mode(norm_type)
    meta = stream_meta(plan.dtype)
    with on_device(plan.device):
        for launch in plan.launches:
            _norm_partials_kernel[(launch.n_chunks,)](
                launch.table, partials,
                launch.n_spans, launch.n_chunks, launch.partial_offset,
                float64_bits(norm_type if mode == NORM_SUM_POW.value else 1.0),
                NORM=mode, ALIGNED=launch.aligned, **meta,
            )
    return partials


def finalize(plan: LaunchPlan, partials: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Reduce ``partials`` over the plan's segments.

    Returns a 1-D tensor in the partials' dtype: element 0 is the group's value, and, for a
    plan built with per-span segments, element 1 + i is span i's value (0 for an empty span).
    Values are in "power" form (sum |g|^p, max, min or count); roots are taken by the caller.
    """
    out = torch.empty(plan.n_segments, dtype=partials.dtype, device=plan.device)
    _launch_finalize(plan, partials, norm_type, out, out, out, plan.n_segments,
                     max_norm=0.0, eps=0.0, epilogue=False, skip_nonfinite=False)
    return out


def finalize_clip(plan: LaunchPlan, partials: torch.Tensor, norm_type: float, max_norm: float,
                  eps: float, skip_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``partials`` to the group's norm and clip coefficient in one launch.

    Returns (norm, coef): float32 0-dim tensors on the plan's device, with
    ``coef = min(max_norm / (norm + eps), 1)`` (1 where the norm is not finite and
    ``skip_nonfinite``). For a list whose gradients form a single group, and ``norm_type``
    0, 1, 2, inf or -inf (see :func:`fuses_coefficient`).
    """
    if not fuses_coefficient(norm_type):
        raise ValueError(f"finalize_clip takes norm_type 0, 1, 2, inf or -inf, not {norm_type}")
    out = torch.empty(1, dtype=partials.dtype, device=plan.device)
    norm = torch.empty((), dtype=torch.float32, device=plan.device)
    coef = torch.empty((), dtype=torch.float32, device=plan.device)
    _launch_finalize(plan, partials, norm_type, out, norm, coef, 1,
                     max_norm=max_norm, eps=eps, epilogue=True, skip_nonfinite=skip_nonfinite)
    return norm, coef


def fuses_coefficient(norm_type: float) -> bool:
    """Whether :func:`finalize_clip` takes this norm order: those whose root is exact (0, 1,
    inf, -inf) or a correctly rounded sqrt (2), so the fused result equals the unfused one."""
    return norm_mode(norm_type) != NORM_SUM_POW.value


def _launch_finalize(plan, partials, norm_type, out, norm, coef, n_programs, *, max_norm, eps,
                     epilogue, skip_nonfinite):
    block, num_warps = finalize_config()
    mode = norm_mode(norm_type)
    with on_device(plan.device):
        _finalize_kernel[(n_programs,)](
            partials, plan.segments, out, norm, coef, max_norm, eps,
            NORM=mode, BLOCK=block, EPILOGUE=epilogue, SKIP_NONFINITE=skip_nonfinite,
            num_warps=num_warps,
        )
