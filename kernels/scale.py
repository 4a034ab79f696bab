"""In-place multi-tensor scale by a coefficient that lives in device memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import chunk_bounds, store_cast
from .config import on_device, soft_bf16_rounding, stream_meta
from .plan import LaunchPlan


# Sizes are not specialized: one compilation per (dtype, alignment) serves every model.
@triton.jit(do_not_specialize=["n_spans", "n_chunks"])
def _scale_kernel(
    # pointers
    table_ptr, coef_ptr,
    # sizes
    n_spans, n_chunks,
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
    pid = tl.program_id(0).to(tl.int64)
    base, start, end = chunk_bounds(table_ptr, n_spans, n_chunks, pid, DTYPE, CHUNK, ALIGNED, VEC)
    coef = coef.to(ACC)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask)
        tl.store(base + offs, store_cast(x.to(ACC) * coef, DTYPE, SOFT_BF16), mask=mask)


def scale_(plan: LaunchPlan, coef: torch.Tensor, skip_at_least_one: bool = True) -> None:
    """Multiply every span of ``plan`` in place by ``coef`` (a 1-element float32 tensor on the
    plan's device). With ``skip_at_least_one`` (a clip coefficient) a coefficient >= 1 leaves
    the memory untouched; without it (e.g. an unscale by 1/scale folded in) it is applied."""
    meta = stream_meta(plan.dtype)
    with on_device(plan.device):
        for launch in plan.launches:
            _scale_kernel[(launch.n_chunks,)](
                launch.table, coef, launch.n_spans, launch.n_chunks,
                ALIGNED=launch.aligned, SOFT_BF16=soft_bf16_rounding(),
                SKIP_AT_LEAST_ONE=skip_at_least_one, **meta,
            )
