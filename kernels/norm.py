"""Multi-tensor norm: per-chunk partial reductions and their deterministic finalize.

The norm kernel reads every span of a plan once and writes one partial per chunk: sum of g^2,
sum of |g|, sum of |g|^p, max |g|, min |g| or the count of nonzeros. Either the last of its
programs reduces the partials to the group's value (``group_power``; with ``norm_clip`` also
the norm, float32 or float64 for float64 gradients, and the clip coefficient), all in one
launch, or ``finalize`` reduces them per span (row) in a second launch. Partials are always reduced in index order, and no atomic touches a
value, so two runs on the same input agree bit for bit.

Accumulation is float32 for float16/bfloat16/float32 gradients and float64 for float64;
nonzero counts are accumulated as integers and kept as float64 (exact below 2**53).
"""

from __future__ import annotations

import math

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
    clip_coefficient,
    exact_root,
    from_bits,
)
from . import config
from .config import finalize_config, float64_bits, on_device, stream_meta
from .launch import launch
from .plan import LaunchPlan


@triton.jit
def _chunk_partial(base, start, end, p,
                   ACC: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """The reduction of elements [start, end) of ``base``."""
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
            acc += tl.where(mask, tl.exp2(p.to(ACC) * tl.log2(tl.abs(x))), 0.0)
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
    return partial


@triton.jit
def _reduce_partials(partials_ptr, start, end,
                     NORM: tl.constexpr, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """partials[start:end] reduced in a fixed order (so bit-reproducible); 0 when empty.
    CACHE is the loads' cache modifier: ".cg" (L2, not the SM's L1) where other programs
    wrote the partials during this launch."""
    ACC: tl.constexpr = partials_ptr.dtype.element_ty
    if NORM == NORM_MIN:
        acc = tl.full([BLOCK], float("inf"), ACC)
    else:
        acc = tl.zeros([BLOCK], ACC)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if NORM == NORM_MAX:
            x = tl.load(partials_ptr + offs, mask=mask, other=0, cache_modifier=CACHE)
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        elif NORM == NORM_MIN:
            x = tl.load(partials_ptr + offs, mask=mask, other=float("inf"), cache_modifier=CACHE)
            acc = tl.minimum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc += tl.load(partials_ptr + offs, mask=mask, other=0, cache_modifier=CACHE)
    if NORM == NORM_MAX:
        value = tl.where(any_nan(acc), float("nan"), tl.max(acc, axis=0))
    elif NORM == NORM_MIN:
        value = tl.where(any_nan(acc), float("nan"), tl.min(acc, axis=0))
    else:
        value = tl.sum(acc, axis=0)
    return tl.where(end > start, value, 0.0).to(ACC)


@triton.jit
def _clip_epilogue(value, norm_ptr, coef_ptr, inv_scale_ptr, found_ptr, max_norm, eps,
                   NORM: tl.constexpr, SKIP_NONFINITE: tl.constexpr, UNSCALE: tl.constexpr):
    """Write the norm of a power-form ``value`` (p = 0, 1, 2, inf or -inf, whose root is exact
    or a correctly rounded sqrt) in norm_ptr's dtype (float32; float64 for float64
    gradients), and the clip coefficient min(max_norm / (norm + eps), 1) in that dtype,
    computed with IEEE-rounded sqrt and reciprocal exactly as the torch ops would; with
    SKIP_NONFINITE a non-finite norm gives coefficient 1.

    With UNSCALE (a GradScaler's unscale folded in: ``value`` is of the *scaled* gradients),
    found[0] = 1.0 if that norm is not finite (else 0.0), the norm written is the scaled norm
    times inv_scale[0], and the coefficient written is the clip coefficient of that norm
    times inv_scale[0] (1 where found, with SKIP_NONFINITE): what the scale pass applies."""
    # (A general p's root, exp2/log2, is approximate on a GPU: left to torch.pow.)
    norm = exact_root(value, NORM).to(norm_ptr.dtype.element_ty)
    finite = (norm == norm) & (tl.abs(norm) != float("inf"))
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr).to(norm.dtype)
        tl.store(found_ptr, tl.where(finite, 0.0, 1.0))
        norm = norm * inv_scale
    coef = clip_coefficient(norm, max_norm, eps)
    if UNSCALE:
        coef = coef * inv_scale
    if SKIP_NONFINITE:
        coef = tl.where(finite, coef, 1.0)
    tl.store(norm_ptr, norm)
    tl.store(coef_ptr, coef)


# Sizes and scalars are typed and not specialized, and the per-call buffers are not specialized
# on alignment: one compilation per (dtype, norm, alignment, mode) serves every model, and a
# plan may relaunch it (see launch.py).
@triton.jit(do_not_specialize=["first_spans", "first_chunks", "second_spans", "second_chunks",
                               "p_bits", "max_norm_bits", "eps_bits"],
            do_not_specialize_on_alignment=["partials_ptr", "counter_ptr", "out_ptr",
                                            "norm_ptr", "coef_ptr", "inv_scale_ptr",
                                            "found_ptr"])
def _norm_kernel(
    # the two streams of a plan (see plan.Streams)
    first_table, first_spans: tl.int64, first_chunks: tl.int64,
    second_table, second_spans: tl.int64, second_chunks: tl.int64,
    # pointers
    partials_ptr, counter_ptr, out_ptr, norm_ptr, coef_ptr, inv_scale_ptr, found_ptr,
    # order of the norm (NORM_SUM_POW only), and the epilogue's scalars (EPILOGUE only), as
    # the bits of float64 values (config.float64_bits)
    p_bits: tl.int64, max_norm_bits: tl.int64, eps_bits: tl.int64,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr, NORM: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    FUSED: tl.constexpr, EPILOGUE: tl.constexpr, SKIP_NONFINITE: tl.constexpr,
    UNSCALE: tl.constexpr,
    FINALIZE_BLOCK: tl.constexpr,
):
    """partials[pid] = reduction over chunk ``pid`` of the plan's spans.

    With FUSED, the program that finishes last (found with an acquire-release counter) reduces
    all partials, in index order whichever program that is and with the finalize kernel's
    block (so the value equals ``finalize``'s bit for bit), into out[0]; with EPILOGUE it
    also writes the norm and the clip coefficient (see ``_clip_epilogue``). The whole norm,
    or the norm and coefficient of a clip, is then one launch, and still deterministic: no
    atomics touch the values.
    """
    p = from_bits(p_bits)
    pid = tl.program_id(0).to(tl.int64)
    if pid < first_chunks:
        base, start, end = chunk_bounds(first_table, first_spans, first_chunks, pid,
                                        DTYPE, CHUNK, ALIGNED, VEC)
        partial = _chunk_partial(base, start, end, p, ACC, NORM, BLOCK)
    else:
        # Only an aligned first stream has a second (unaligned) one; with an unaligned first
        # stream this branch is never taken.
        base, start, end = chunk_bounds(second_table, second_spans, second_chunks,
                                        pid - first_chunks, DTYPE, CHUNK, False, VEC)
        partial = _chunk_partial(base, start, end, p, ACC, NORM, BLOCK)
    tl.store(partials_ptr + pid, partial)

    if FUSED:
        n_programs = first_chunks + second_chunks
        # Every thread's store is done before the counter moves (barrier), and the release
        # half of the atomic publishes it at GPU scope; the acquire half orders the last
        # program's reads (".cg": from L2, past a stale L1) after everyone's stores.
        tl.debug_barrier()
        # The counter (one per plan and stream, plan.workspace) only grows (int64: no wrap in
        # any lifetime), and every launch adds exactly n_programs, so the last arrival of a
        # launch is the one whose count is n_programs - 1 modulo n_programs. Launches on one
        # stream run one after the other, and no two streams share a counter.
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived % n_programs == n_programs - 1:
            value = _reduce_partials(partials_ptr, 0, n_programs, NORM, FINALIZE_BLOCK, ".cg")
            tl.store(out_ptr, value)
            if EPILOGUE:
                _clip_epilogue(value, norm_ptr, coef_ptr, inv_scale_ptr, found_ptr,
                               from_bits(max_norm_bits), from_bits(eps_bits), NORM,
                               SKIP_NONFINITE, UNSCALE)


@triton.jit(do_not_specialize_on_alignment=["partials_ptr", "out_ptr"])
def _finalize_kernel(partials_ptr, segments_ptr, out_ptr,
                     NORM: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = reduction of partials[segments[s, 0]:segments[s, 1]]; 0 for an empty segment."""
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(segments_ptr + 2 * pid)
    end = tl.load(segments_ptr + 2 * pid + 1)
    tl.store(out_ptr + pid, _reduce_partials(partials_ptr, start, end, NORM, BLOCK, ""))


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


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the norm and coefficient that :func:`norm_clip` writes: float64 for float64
    gradients, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_meta(dtype: torch.dtype, aligned: bool, norm_type: float, fused: bool,
              epilogue: bool = False, skip_nonfinite: bool = False,
              unscale: bool = False) -> dict:
    """The constexprs and launch options of a norm launch over a plan of ``dtype`` whose
    first stream is ``aligned`` (also what kernels.registry compiles)."""
    return dict(stream_meta(dtype), NORM=norm_mode(norm_type), ALIGNED=aligned, FUSED=fused,
                EPILOGUE=epilogue, SKIP_NONFINITE=skip_nonfinite, UNSCALE=unscale,
                FINALIZE_BLOCK=finalize_config()[0])


def finalize_meta(norm_type: float) -> dict:
    """The constexprs and launch options of a finalize launch."""
    block, num_warps = finalize_config()
    return dict(NORM=norm_mode(norm_type), BLOCK=block, num_warps=num_warps)


def _launch_norm(plan: LaunchPlan, norm_type: float, partials, counter, out, norm, coef,
                 inv_scale, found, max_norm: float, eps: float, fused: bool,
                 epilogue: bool = False, skip_nonfinite: bool = False,
                 unscale: bool = False) -> None:
    streams = plan.streams
    mode = norm_mode(norm_type)
    p = norm_type if mode == NORM_SUM_POW.value else 1.0
    # What the launch's constexprs and tensor dtypes follow from, the plan's dtype and
    # alignment aside (see launch.launch).
    key = (_norm_kernel, mode, fused, epilogue, skip_nonfinite, unscale, config.generation)
    with on_device(plan.device):
        launch(_norm_kernel, (streams.n_programs,),
               (*streams.args, partials, counter, out, norm, coef, inv_scale, found,
                float64_bits(p), float64_bits(max_norm), float64_bits(eps)),
               lambda: norm_meta(plan.dtype, streams.first_aligned, norm_type, fused, epilogue,
                                 skip_nonfinite, unscale), plan.kept, key)


def norm_partials(plan: LaunchPlan, norm_type: float) -> torch.Tensor:
    """Launch the partial reduction over every span of ``plan`` (one launch).

    Returns the partials (one per chunk) in :func:`accumulation_dtype`, for :func:`finalize`.
    """
    partials = torch.empty(plan.n_partials, dtype=accumulation_dtype(plan.dtype, norm_type),
                           device=plan.device)
    if plan.streams.n_programs:
        counter = plan.workspace(partials.dtype)[2]  # unused without FUSED
        _launch_norm(plan, norm_type, partials, counter, partials, partials, partials,
                     partials, partials, 0.0, 0.0, fused=False)
    return partials


def finalize(plan: LaunchPlan, partials: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Reduce ``partials`` over the plan's segments (one launch).

    Returns a 1-D tensor in the partials' dtype: element 0 is the whole plan's value, and, for
    a row plan, element 1 + r is row r's value. Values are in "power" form (sum |g|^p, max,
    min or count); roots are taken by the caller.
    """
    out = torch.empty(plan.n_segments, dtype=partials.dtype, device=plan.device)
    plan.used_on_current_stream()
    with on_device(plan.device):
        launch(_finalize_kernel, (plan.n_segments,), (partials, plan.segments, out),
               lambda: finalize_meta(norm_type), plan.kept,
               (_finalize_kernel, norm_mode(norm_type), partials.dtype))
    return out


def group_power(plan: LaunchPlan, norm_type: float) -> torch.Tensor:
    """The power-form value of all of ``plan``'s spans as one vector, in one launch: a
    1-element tensor in :func:`accumulation_dtype` (the same value as ``finalize(...)[0]``)."""
    acc = accumulation_dtype(plan.dtype, norm_type)
    out = torch.empty(1, dtype=acc, device=plan.device)
    if not plan.streams.n_programs:  # only empty spans
        return out.fill_(math.inf if norm_type == -math.inf else 0.0)
    partials, _, counter = plan.workspace(acc)
    _launch_norm(plan, norm_type, partials, counter, out, out, out, out, out, 0.0, 0.0,
                 fused=True)
    return out


def norm_clip(plan: LaunchPlan, norm_type: float, max_norm: float, eps: float,
              skip_nonfinite: bool, inv_scale: torch.Tensor | None = None):
    """The group's norm and clip coefficient in one launch.

    Returns (norm, coef, found): 0-dim tensors on the plan's device in :func:`result_dtype`,
    with ``coef = min(max_norm / (norm + eps), 1)`` (1 where the norm is not finite and
    ``skip_nonfinite``); ``found`` is None. For ``norm_type`` 0, 1, 2, inf or -inf
    (:func:`fuses_coefficient`).

    With ``inv_scale`` (a GradScaler's ``1 / scale``, a float32 one-element tensor on the
    plan's device) the gradients are the *scaled* ones, and the unscale is folded in: ``norm``
    is of the unscaled gradients, ``coef`` is the factor to scale them by (``clip coefficient
    * inv_scale``; 1 where found and ``skip_nonfinite``) and ``found`` is a float32 0-dim
    tensor, 1.0 if the scaled norm is not finite, else 0.0: the values of the torch ops on
    the unfused norm, bit for bit.
    """
    if not fuses_coefficient(norm_type):
        raise ValueError(f"norm_clip takes norm_type 0, 1, 2, inf or -inf, not {norm_type}")
    if inv_scale is not None and inv_scale.dtype != torch.float32:
        raise ValueError(f"inv_scale must be float32, got {inv_scale.dtype}")
    device, dtype = plan.device, result_dtype(plan.dtype)
    norm = torch.empty((), dtype=dtype, device=device)
    coef = torch.empty((), dtype=dtype, device=device)
    found = None if inv_scale is None else torch.empty((), dtype=torch.float32, device=device)
    if not plan.streams.n_programs:  # only empty spans: norm 0, nothing to clip
        norm.fill_(0.0)
        if inv_scale is None:
            return norm, coef.fill_(1.0), None
        return norm, coef.copy_(inv_scale.reshape(())), found.fill_(0.0)
    acc = accumulation_dtype(plan.dtype, norm_type)
    partials, out, counter = plan.workspace(acc)
    _launch_norm(plan, norm_type, partials, counter, out, norm, coef,
                 coef if inv_scale is None else inv_scale, coef if found is None else found,
                 max_norm, eps, fused=True, epilogue=True, skip_nonfinite=skip_nonfinite,
                 unscale=inv_scale is not None)
    return norm, coef, found


def fuses_coefficient(norm_type: float) -> bool:
    """Whether :func:`norm_clip` takes this norm order: those whose root is exact (0, 1,
    inf, -inf) or a correctly rounded sqrt (2), so the fused result equals the unfused one."""
    return norm_mode(norm_type) != NORM_SUM_POW.value
