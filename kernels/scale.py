"""In-place multi-tensor scale by a coefficient that lives in device memory: one for the
whole plan, or one per span (row) of a row plan."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import chunk_bounds, store_cast
from . import config
from .config import on_device, soft_bf16_rounding, stream_meta
from .launch import launch
from .plan import LaunchPlan


@triton.jit
def _scale_chunk(base, start, end, coef, DTYPE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask)
        tl.store(base + offs, store_cast(x.to(ACC) * coef, DTYPE, SOFT_BF16), mask=mask)


@triton.jit
def _span_coefficient(first_table, first_spans, first_chunks, second_table, second_spans,
                      pid, order_ptr, coef_ptr):
    """coef[order[s]] for the span ``s`` of chunk ``pid`` (spans numbered across both
    streams, as a RowPlan's ``order`` numbers them)."""
    in_first = pid < first_chunks
    span = tl.where(
        in_first,
        tl.load(first_table + 2 * first_spans + pid, mask=in_first, other=0),
        first_spans + tl.load(second_table + 2 * second_spans + (pid - first_chunks),
                              mask=pid >= first_chunks, other=0))
    return tl.load(coef_ptr + tl.load(order_ptr + span))


# Sizes are typed and not specialized, nor is the coefficient's address: one compilation per
# (dtype, alignment, mode) serves every model, and a plan may relaunch it (see launch.py).
@triton.jit(do_not_specialize=["first_spans", "first_chunks", "second_spans", "second_chunks"],
            do_not_specialize_on_alignment=["coef_ptr"])
def _scale_kernel(
    # the two streams of a plan (see plan.Streams)
    first_table, first_spans: tl.int64, first_chunks: tl.int64,
    second_table, second_spans: tl.int64, second_chunks: tl.int64,
    # pointers: the coefficient (PER_SPAN: one per row, and the span -> row map)
    coef_ptr, order_ptr,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    SOFT_BF16: tl.constexpr, SKIP_AT_LEAST_ONE: tl.constexpr, PER_SPAN: tl.constexpr,
):
    """g *= coef over chunk ``pid`` of the plan (with PER_SPAN, the coefficient of the chunk's
    span: a chunk lies in one span); with SKIP_AT_LEAST_ONE (clipping), nothing is touched
    when coef >= 1. Without it (an AMP unscale folded in) every coefficient applies."""
    pid = tl.program_id(0).to(tl.int64)
    if PER_SPAN:
        coef = _span_coefficient(first_table, first_spans, first_chunks, second_table,
                                 second_spans, pid, order_ptr, coef_ptr)
    else:
        coef = tl.load(coef_ptr)
    # Clipping inactive: return before reading any gradient, so the scale pass costs one
    # 4-byte load per program. A NaN coefficient does not compare >= 1 and propagates.
    if SKIP_AT_LEAST_ONE and coef >= 1.0:
        return
    coef = coef.to(ACC)
    if pid < first_chunks:
        base, start, end = chunk_bounds(first_table, first_spans, first_chunks, pid,
                                        DTYPE, CHUNK, ALIGNED, VEC)
        _scale_chunk(base, start, end, coef, DTYPE, ACC, BLOCK, SOFT_BF16)
    else:  # the unaligned stream behind an aligned one
        base, start, end = chunk_bounds(second_table, second_spans, second_chunks,
                                        pid - first_chunks, DTYPE, CHUNK, False, VEC)
        _scale_chunk(base, start, end, coef, DTYPE, ACC, BLOCK, SOFT_BF16)


def scale_meta(dtype: torch.dtype, aligned: bool, skip_at_least_one: bool,
               per_span: bool) -> dict:
    """The constexprs and launch options of a scale launch over a plan of ``dtype`` whose
    first stream is ``aligned`` (also what kernels.registry compiles)."""
    return dict(stream_meta(dtype), ALIGNED=aligned, SOFT_BF16=soft_bf16_rounding(),
                SKIP_AT_LEAST_ONE=skip_at_least_one, PER_SPAN=per_span)


def _launch(plan: LaunchPlan, coef: torch.Tensor, order: torch.Tensor | None,
            skip_at_least_one: bool) -> None:
    streams = plan.streams
    if streams.n_programs == 0:
        return
    plan.used_on_current_stream()
    with on_device(plan.device):
        # (without PER_SPAN the order pointer is unused: the plan's table stands in, so that
        # no per-call tensor takes a specialized place)
        launch(_scale_kernel, (streams.n_programs,),
               (*streams.args, coef, plan.table if order is None else order),
               lambda: scale_meta(plan.dtype, streams.first_aligned, skip_at_least_one,
                                  order is not None), plan.kept,
               (_scale_kernel, skip_at_least_one, order is None, coef.dtype,
                config.generation))


def scale_(plan: LaunchPlan, coef: torch.Tensor, skip_at_least_one: bool = True) -> None:
    """Multiply every span of ``plan`` in place by ``coef`` (a one-element float32 or float64
    tensor on the plan's device), in one launch. With ``skip_at_least_one`` (a clip
    coefficient) a coefficient >= 1 leaves the memory untouched; without it (e.g. an unscale
    by 1/scale folded in) it is applied."""
    _launch(plan, coef, None, skip_at_least_one)


def scale_each_(rows: LaunchPlan, coef: torch.Tensor, skip_at_least_one: bool = True) -> None:
    """Multiply row ``r`` of the row plan ``rows`` in place by ``coef[r]``, in one launch.

    ``coef`` is a 1-D tensor of ``rows.n_rows`` coefficients on the plan's device, float32
    (float64 for float64 rows, so that their coefficient keeps its precision). With
    ``skip_at_least_one`` rows whose coefficient is >= 1 are left untouched, unread.
    """
    if coef.dim() != 1 or coef.numel() != rows.n_rows:
        raise ValueError(f"coef must hold {rows.n_rows} coefficients, got shape "
                         f"{tuple(coef.shape)}")
    _launch(rows, coef, rows.order, skip_at_least_one)
