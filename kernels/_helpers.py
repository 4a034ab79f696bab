"""``@triton.jit`` helpers shared by the multi-tensor kernels."""

import triton
import triton.language as tl

# Norm modes (constexpr NORM). Numbers are part of the kernels' contract with the launchers.
NORM_SUM_SQUARES = 0  # p = 2: sum g^2
NORM_SUM_ABS = 1  # p = 1: sum |g|
NORM_SUM_POW = 2  # any other p != 0: sum |g|^p
NORM_MAX = 3  # p = inf: max |g|
NORM_MIN = 4  # p = -inf: min |g|
NORM_COUNT = 5  # p = 0: number of nonzero elements


@triton.jit
def chunk_bounds(
    table_ptr, n_spans, n_chunks, pid,
    DTYPE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """Base pointer and [start, end) element range of chunk ``pid`` from a plan table."""
    span = tl.load(table_ptr + 2 * n_spans + pid)
    start = tl.load(table_ptr + 2 * n_spans + n_chunks + pid)
    base = tl.load(table_ptr + span).to(tl.pointer_type(DTYPE))
    numel = tl.load(table_ptr + n_spans + span)
    start = tl.multiple_of(start, CHUNK)
    if ALIGNED:
        # The plan builder routes a span here only if its address is 16-byte aligned and its
        # length a multiple of VEC elements: the table cannot tell the compiler, so we do.
        base = tl.multiple_of(base, 16)
        numel = tl.multiple_of(numel, VEC)
    end = tl.minimum(start + CHUNK, numel)
    return base, start, end


@triton.jit
def any_nan(x):
    """True when any element of the block ``x`` is NaN (GPU max/min reductions drop NaN)."""
    return tl.max((x != x).to(tl.int32), axis=0) > 0
