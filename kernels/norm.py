"""Multi-tensor norm: per-chunk partial reductions and their deterministic finalize.

The norm kernel reads every span of a plan once and writes one partial per chunk: sum of g^2,
sum of |g|, sum of |g|^p, max |g|, min |g| or the count of nonzeros. Either the last of its
programs reduces the partials to the group's value (``group_power``; with ``norm_clip`` also the
float32 norm and the clip coefficient), all in one launch, or ``finalize`` reduces them per
span in a second launch. Partials are always reduced in index order, and no atomic touches a
value, so two runs on the same input agree bit for bit.

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
    clip_coefficient,
    exact_root,
)
from .config import finalize_config, float64_bits, on_device, stream_meta
from .launch import Launcher
from .plan import VECTOR_BYTES, LaunchPlan


@triton.jit
def _chunk_partial(base, start, end, p_bits,
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
    """Write the float32 norm of a power-form ``value`` (p = 0, 1, 2, inf or -inf, whose root
    is exact or a correctly rounded sqrt) and the clip coefficient min(max_norm / (norm +
    eps), 1), computed with IEEE-rounded sqrt and reciprocal exactly as the torch ops would;
    with SKIP_NONFINITE a non-finite norm gives coefficient 1.

    With UNSCALE (a GradScaler's unscale folded in: ``value`` is of the *scaled* gradients),
    found[0] = 1.0 if that norm is not finite (else 0.0), the norm written is the scaled norm
    times inv_scale[0], and the coefficient written is the clip coefficient of that norm
    times inv_scale[0] (1 where found, with SKIP_NONFINITE): what the scale pass applies."""
    # (A general p's root, exp2/log2, is approximate on a GPU: left to torch.pow.)
    norm = exact_root(value, NORM).to(tl.float32)
    finite = (norm == norm) & (tl.abs(norm) != float("inf"))
    if UNSCALE:
        inv_scale = tl.load(inv_scale_ptr)
        tl.store(found_ptr, tl.where(finite, 0.0, 1.0))
        norm = norm * inv_scale
    coef = clip_coefficient(norm, max_norm, eps)
    if UNSCALE:
        coef = coef * inv_scale
    if SKIP_NONFINITE:
        coef = tl.where(finite, coef, 1.0)
    tl.store(norm_ptr, norm)
    tl.store(coef_ptr, coef)


# Sizes are not specialized: one compilation per (dtype, norm, alignment) serves every model.
@triton.jit(do_not_specialize=["first_spans", "first_chunks", "second_spans", "second_chunks",
                               "p_bits"])
def _norm_kernel(
    # the two streams of a plan (see plan.Streams)
    first_table, first_spans, first_chunks, second_table, second_spans, second_chunks,
    # pointers
    partials_ptr, counter_ptr, out_ptr, norm_ptr, coef_ptr, inv_scale_ptr, found_ptr,
    # order of the norm (NORM_SUM_POW only), as the bits of a float64: Triton passes Python
    # floats as float32, which would round p for float64 gradients
    p_bits,
    # epilogue scalars (EPILOGUE only)
    max_norm, eps,
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
    pid = tl.program_id(0).to(tl.int64)
    if pid < first_chunks:
        base, start, end = chunk_bounds(first_table, first_spans, first_chunks, pid,
                                        DTYPE, CHUNK, ALIGNED, VEC)
        partial = _chunk_partial(base, start, end, p_bits, ACC, NORM, BLOCK)
    else:
        # Only an aligned first stream has a second (unaligned) one; with an unaligned first
        # stream this branch is never taken.
        base, start, end = chunk_bounds(second_table, second_spans, second_chunks,
                                        pid - first_chunks, DTYPE, CHUNK, False, VEC)
        partial = _chunk_partial(base, start, end, p_bits, ACC, NORM, BLOCK)
    tl.store(partials_ptr + pid, partial)

    if FUSED:
        n_programs = first_chunks + second_chunks
        # Every thread's store is done before the counter moves (barrier), and the release
        # half of the atomic publishes it at GPU scope; the acquire half orders the last
        # program's reads (".cg": from L2, past a stale L1) after everyone's stores.
        tl.debug_barrier()
        # The counter only grows (int64: no wrap in any lifetime), and every launch adds
        # exactly n_programs, so the last arrival of a launch is the one whose count is
        # n_programs - 1 modulo n_programs. Without a reset there is nothing to lose: even
        # if two launches over one plan were ever to overlap (unsupported), the launches
        # after them would find the count aligned again.
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived % n_programs == n_programs - 1:
            value = _reduce_partials(partials_ptr, 0, n_programs, NORM, FINALIZE_BLOCK, ".cg")
            tl.store(out_ptr, value)
            if EPILOGUE:
                _clip_epilogue(value, norm_ptr, coef_ptr, inv_scale_ptr, found_ptr, max_norm,
                               eps, NORM, SKIP_NONFINITE, UNSCALE)


@triton.jit
def _finalize_kernel(partials_ptr, segments_ptr, out_ptr,
                     NORM: tl.constexpr, BLOCK: tl.constexpr):
    """out[s] = reduction of partials[segments[s, 0]:segments[s, 1]]; 0 for an empty segment."""
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(segments_ptr + 2 * pid)
    end = tl.load(segments_ptr + 2 * pid + 1)
    tl.store(out_ptr + pid, _reduce_partials(partials_ptr, start, end, NORM, BLOCK, ""))


_launch_norm_kernel = Launcher(_norm_kernel)
_launch_finalize_kernel = Launcher(_finalize_kernel)


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


def _launch_norm(plan: LaunchPlan, norm_type: float, *, fused: bool, epilogue: bool = False,
                 max_norm: float = 0.0, eps: float = 0.0, skip_nonfinite: bool = False,
                 inv_scale: torch.Tensor | None = None, found: torch.Tensor | None = None):
    """(partials, out, norm, coef) after one launch of the norm kernel over ``plan``."""
    acc_dtype = accumulation_dtype(plan.dtype, norm_type)
    device = plan.device
    streams = plan.streams
    if epilogue:  # the caller gets the norm and coefficient only: partials and out are scratch
        partials, out = _epilogue_scratch(plan, acc_dtype)
    else:
        partials = torch.empty(plan.n_partials, dtype=acc_dtype, device=device)
        out = torch.empty(1, dtype=acc_dtype, device=device)
    norm = torch.empty((), dtype=torch.float32, device=device)
    coef = torch.empty((), dtype=torch.float32, device=device)
    if streams.n_programs == 0:  # only empty spans
        out.fill_(0.0)
        return partials, out, norm, coef
    mode = norm_mode(norm_type)
    with on_device(device):
        _launch_norm_kernel(
            (streams.n_programs,),
            *streams.args, partials, plan.counter, out, norm, coef,
            coef if inv_scale is None else inv_scale, coef if found is None else found,
            float64_bits(norm_type if mode == NORM_SUM_POW.value else 1.0), max_norm, eps,
            NORM=mode, ALIGNED=streams.first_aligned, FUSED=fused, EPILOGUE=epilogue,
            SKIP_NONFINITE=skip_nonfinite, UNSCALE=inv_scale is not None,
            FINALIZE_BLOCK=finalize_config()[0],
            **stream_meta(plan.dtype),
        )
    return partials, out, norm, coef


def _epilogue_scratch(plan: LaunchPlan, acc_dtype: torch.dtype):
    """(partials, out) of a clip launch over ``plan``: one buffer kept with the plan. Launches
    over one plan are ordered on one stream (see :func:`norm_clip`), so each reads the buffer
    after the previous one is done with it."""
    key = ("norm_clip", acc_dtype)
    views = plan.scratch.get(key)
    if views is None:
        pad = VECTOR_BYTES // acc_dtype.itemsize  # both views 16-byte aligned, as if allocated
        buffer = torch.empty(pad + plan.n_partials, dtype=acc_dtype, device=plan.device)
        views = plan.scratch.setdefault(key, (buffer[pad:], buffer[:1]))
    return views


def norm_partials(plan: LaunchPlan, norm_type: float) -> torch.Tensor:
    """Launch the partial reduction over every span of ``plan`` (one launch).

    Returns the partials (one per chunk) in :func:`accumulation_dtype`, for :func:`finalize`.
    """
    return _launch_norm(plan, norm_type, fused=False)[0]


def finalize(plan: LaunchPlan, partials: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Reduce ``partials`` over the plan's segments (one launch).

    Returns a 1-D tensor in the partials' dtype: element 0 is the group's value, and, for a
    plan built with per-span segments, element 1 + i is span i's value (0 for an empty span).
    Values are in "power" form (sum |g|^p, max, min or count); roots are taken by the caller.
    """
    out = torch.empty(plan.n_segments, dtype=partials.dtype, device=plan.device)
    block, num_warps = finalize_config()
    with on_device(plan.device):
        _launch_finalize_kernel((plan.n_segments,), partials, plan.segments, out,
                                NORM=norm_mode(norm_type), BLOCK=block, num_warps=num_warps)
    return out


def group_power(plan: LaunchPlan, norm_type: float) -> torch.Tensor:
    """The power-form value of all of ``plan``'s spans as one vector, in one launch: a
    1-element tensor in :func:`accumulation_dtype` (the same value as ``finalize(...)[0]``)."""
    return _launch_norm(plan, norm_type, fused=True)[1]


def norm_clip(plan: LaunchPlan, norm_type: float, max_norm: float, eps: float,
              skip_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's norm and clip coefficient in one launch.

    Returns (norm, coef): float32 0-dim tensors on the plan's device, with
    ``coef = min(max_norm / (norm + eps), 1)`` (1 where the norm is not finite and
    ``skip_nonfinite``). For a list whose gradients form a single group, and ``norm_type``
    0, 1, 2, inf or -inf (see :func:`fuses_coefficient`).

    The launch uses the plan's arrival counter: two launches over one plan must not run
    concurrently (on two streams at once: their results would be wrong, though later
    launches are right again); one after the other, as in training, is fine.
    """
    if not fuses_coefficient(norm_type):
        raise ValueError(f"norm_clip takes norm_type 0, 1, 2, inf or -inf, not {norm_type}")
    _, out, norm, coef = _launch_norm(plan, norm_type, fused=True, epilogue=True,
                                      max_norm=max_norm, eps=eps, skip_nonfinite=skip_nonfinite)
    if plan.streams.n_programs == 0:
        coef.fill_(1.0)
        norm.fill_(0.0)
    return norm, coef


def unscale_norm_clip(plan: LaunchPlan, norm_type: float, max_norm: float, eps: float,
                      skip_nonfinite: bool, inv_scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GradScaler's unscale folded into :func:`norm_clip`, in one launch over the *scaled*
    gradients: returns (norm of the unscaled gradients, the factor to scale them by
    (``coef * inv_scale``; 1 where found and ``skip_nonfinite``), found: 1.0 if the scaled
    norm is not finite, else 0.0), float32 0-dim tensors; ``inv_scale`` is a float32
    1-element tensor on the plan's device. The same values as the torch ops on the
    unfused norm, bit for bit."""
    if not fuses_coefficient(norm_type):
        raise ValueError(f"unscale_norm_clip takes norm_type 0, 1, 2, inf or -inf, not "
                         f"{norm_type}")
    found = torch.empty((), dtype=torch.float32, device=plan.device)
    _, _, norm, factor = _launch_norm(plan, norm_type, fused=True, epilogue=True,
                                      max_norm=max_norm, eps=eps,
                                      skip_nonfinite=skip_nonfinite, inv_scale=inv_scale,
                                      found=found)
    if plan.streams.n_programs == 0:
        norm.fill_(0.0)
        found.fill_(0.0)
        factor.copy_(inv_scale.reshape(()))
    return norm, factor, found


def fuses_coefficient(norm_type: float) -> bool:
    """Whether :func:`norm_clip` takes this norm order: those whose root is exact (0, 1,
    inf, -inf) or a correctly rounded sqrt (2), so the fused result equals the unfused one."""
    return norm_mode(norm_type) != NORM_SUM_POW.value
