"""In-place multi-tensor scale where every span (tensor or row) has its own coefficient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import chunk_bounds, store_cast
from .config import on_device, soft_bf16_rounding, stream_meta
from .rows import RowPlan


# Sizes are not specialized: one compilation per (dtype, alignment) serves every model.
@triton.jit(do_not_specialize=["n_spans", "n_chunks", "span_offset"])
def _scale_each_kernel(
    # pointers
    table_ptr, order_ptr, coef_ptr,
    # sizes
    n_spans, n_chunks, span_offset,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    SOFT_BF16: tl.constexpr, SKIP_AT_LEAST_ONE: tl.constexpr,
):
    """g *= coef[order[span_offset + span]] over chunk ``pid``, ``span`` being the chunk's
    span; with SKIP_AT_LEAST_ONE a coefficient >= 1 returns before touching memory (a chunk
    lies in one span, so the test is per program). NaN does not compare >= 1: it applies."""
    pid = tl.program_id(0).to(tl.int64)
    span = tl.load(table_ptr + 2 * n_spans + pid)
    row = tl.load(order_ptr + span_offset + span)
    coef = tl.load(coef_ptr + row)
    if SKIP_AT_LEAST_ONE and coef >= 1.0:
        return
    base, start, end = chunk_bounds(table_ptr, n_spans, n_chunks, pid, DTYPE, CHUNK, ALIGNED, VEC)
    coef = coef.to(ACC)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask)
        tl.store(base + offs, store_cast(x.to(ACC) * coef, DTYPE, SOFT_BF16), mask=mask)


def scale_each_(rows: RowPlan, coef: torch.Tensor, skip_at_least_one: bool = True) -> None:
    """Multiply row ``r`` of ``rows`` in place by ``coef[r]``.

    ``coef`` is a 1-D tensor of ``rows.n_rows`` coefficients on the plan's device, float32
    (float64 for float64 rows, so that their coefficient keeps its precision). With
    ``skip_at_least_one`` rows whose coefficient is >= 1 are left untouched, unread.
    """
    plan = rows.plan
    if coef.dim() != 1 or coef.numel() != rows.n_rows:
        raise ValueError(f"coef must hold {rows.n_rows} coefficients, got shape {tuple(coef.shape)}")
    meta = stream_meta(plan.dtype)
    with on_device(plan.device):
        for launch, span_offset in zip(plan.launches, rows.span_offsets):
            _scale_each_kernel[(launch.n_chunks,)](
                launch.table, rows.order, coef, launch.n_spans, launch.n_chunks, span_offset,
                ALIGNED=launch.aligned, SOFT_BF16=soft_bf16_rounding(),
                SKIP_AT_LEAST_ONE=skip_at_least_one, **meta,
            )
