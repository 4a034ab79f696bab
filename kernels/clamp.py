"""In-place multi-tensor clamp to [lo, hi] in a single read-write pass."""

from __future__ import annotations

import triton
import triton.language as tl

from ._helpers import chunk_bounds, from_bits, store_cast
from . import config
from .config import float64_bits, on_device, soft_bf16_rounding, stream_meta
from .launch import launch
from .plan import LaunchPlan


@triton.jit
def _clamp_chunk(base, start, end, lo, hi, DTYPE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(base + offs, mask=mask).to(ACC)
        y = tl.minimum(tl.maximum(x, lo), hi)
        tl.store(base + offs, store_cast(tl.where(x != x, x, y), DTYPE, SOFT_BF16), mask=mask)


# Sizes and bounds are typed and not specialized: one compilation per (dtype, alignment) serves
# every model and bound, and a plan may relaunch it (see launch.py).
@triton.jit(do_not_specialize=["first_spans", "first_chunks", "second_spans", "second_chunks",
                               "lo_bits", "hi_bits"])
def _clamp_kernel(
    # the two streams of a plan (see plan.Streams)
    first_table, first_spans: tl.int64, first_chunks: tl.int64,
    second_table, second_spans: tl.int64, second_chunks: tl.int64,
    # bounds, as the bits of float64 values (config.float64_bits)
    lo_bits: tl.int64, hi_bits: tl.int64,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """g = min(max(g, lo), hi) over chunk ``pid`` of the plan; NaN stays NaN (as torch.clamp)."""
    lo = from_bits(lo_bits).to(ACC)
    hi = from_bits(hi_bits).to(ACC)
    pid = tl.program_id(0).to(tl.int64)
    if pid < first_chunks:
        base, start, end = chunk_bounds(first_table, first_spans, first_chunks, pid,
                                        DTYPE, CHUNK, ALIGNED, VEC)
        _clamp_chunk(base, start, end, lo, hi, DTYPE, ACC, BLOCK, SOFT_BF16)
    else:  # the unaligned stream behind an aligned one
        base, start, end = chunk_bounds(second_table, second_spans, second_chunks,
                                        pid - first_chunks, DTYPE, CHUNK, False, VEC)
        _clamp_chunk(base, start, end, lo, hi, DTYPE, ACC, BLOCK, SOFT_BF16)


def clamp_meta(dtype, aligned: bool) -> dict:
    """The constexprs and launch options of a clamp launch over a plan of ``dtype`` whose
    first stream is ``aligned`` (also what kernels.registry compiles)."""
    return dict(stream_meta(dtype), ALIGNED=aligned, SOFT_BF16=soft_bf16_rounding())


def clamp_(plan: LaunchPlan, lo: float, hi: float) -> None:
    """Clamp every span of ``plan`` in place to [lo, hi] (lo <= hi, either may be infinite),
    in one launch."""
    streams = plan.streams
    if streams.n_programs == 0:
        return
    plan.used_on_current_stream()
    with on_device(plan.device):
        launch(_clamp_kernel, (streams.n_programs,), (*streams.args, float64_bits(lo), float64_bits(hi)),
               lambda: clamp_meta(plan.dtype, streams.first_aligned), plan.kept,
               (_clamp_kernel, config.generation))
