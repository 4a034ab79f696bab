"""In-place multi-tensor scale by a coefficient that lives in device memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import chunk_bounds, store_cast
from .config import on_device, soft_bf16_rounding, stream_meta
from .plan import LaunchPlan


@triton.jit
def _scale_chunk(base, start, end, coef, DTYPE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask)
        tl.store(base + offs, store_cast(x.to(ACC) * coef, DTYPE, SOFT_BF16), mask=mask)


# Sizes are not specialized: one compilation per (dtype, alignment) serves every model.
@triton.jit(do_not_specialize=["first_spans", "first_chunks", "second_spans", "second_chunks"])
def _scale_kernel(
    # the two streams of a plan (see plan.Streams)
    first_table, first_spans, first_chunks, second_table, second_spans, second_chunks,
    # pointers
    coef_ptr,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    SOFT_BF16: tl.constexpr, SKIP_AT_LEAST_ONE: tl.constexpr,
):
    """g *= coef over chunk ``pid`` of the plan; with SKIP_AT_LEAST_ONE (clipping), nothing is
    touched when coef >= 1. Without it (an AMP unscale folded in) every coefficient applies."""
    coef = tl.load(coef_ptr)
    # Clipping inactive: return before reading any gradient, so the scale pass costs one
    # 4-byte load per program. A NaN coefficient does not compare >= 1 and propagates.
    if SKIP_AT_LEAST_ONE and coef >= 1.0:
        return
    coef = coef.to(ACC)
    pid = tl.program_id(0).to(tl.int64)
    if pid < first_chunks:
        base, start, end = chunk_bounds(first_table, first_spans, first_chunks, pid,
                                        DTYPE, CHUNK, ALIGNED, VEC)
        _scale_chunk(base, start, end, coef, DTYPE, ACC, BLOCK, SOFT_BF16)
    else:  # the unaligned stream behind an aligned one
        base, start, end = chunk_bounds(second_table, second_spans, second_chunks,
                                        pid - first_chunks, DTYPE, CHUNK, False, VEC)
        _scale_chunk(base, start, end, coef, DTYPE, ACC, BLOCK, SOFT_BF16)


def scale_(plan: LaunchPlan, coef: torch.Tensor, skip_at_least_one: bool = True) -> None:
    """Multiply every span of ``plan`` in place by ``coef`` (a 1-element float32 tensor on the
    plan's device), in one launch. With ``skip_at_least_one`` (a clip coefficient) a
    coefficient >= 1 leaves the memory untouched; without it (e.g. an unscale by 1/scale
    folded in) it is applied."""
    streams = plan.streams
    if streams.n_programs == 0:
        return
    with on_device(plan.device):
        _scale_kernel[(streams.n_programs,)](
            *streams.args(), coef, ALIGNED=streams.first_aligned,
            SOFT_BF16=soft_bf16_rounding(), SKIP_AT_LEAST_ONE=skip_at_least_one,
            **stream_meta(plan.dtype),
        )
