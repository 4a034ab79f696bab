"""``@triton.jit`` helpers shared by the multi-tensor kernels."""

import triton
import triton.language as tl

# Norm modes (constexpr NORM). tl.constexpr so that kernels may read them as globals;
# launchers pass ``.value``.
NORM_SUM_SQUARES = tl.constexpr(0)  # p = 2: sum g^2
NORM_SUM_ABS = tl.constexpr(1)  # p = 1: sum |g|
NORM_SUM_POW = tl.constexpr(2)  # any other p != 0: sum |g|^p
NORM_MAX = tl.constexpr(3)  # p = inf: max |g|
NORM_MIN = tl.constexpr(4)  # p = -inf: min |g|
NORM_COUNT = tl.constexpr(5)  # p = 0: number of nonzero elements


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
def from_bits(bits):
    """The float64 whose bit pattern is ``bits`` (``config.float64_bits``). The interpreter
    passes small ints as int32: widen first."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def any_nan(x):
    """True when any element of the block ``x`` is NaN (GPU max/min reductions drop NaN)."""
    return tl.max((x != x).to(tl.int32), axis=0) > 0


@triton.jit
def store_cast(x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in DTYPE.

    Triton's interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest
    even, ``cvt.rn.bf16.f32``); with SOFT_BF16 the rounding is done here on the bits, so that
    CPU runs under TRITON_INTERPRET=1 give the GPU's results. Compiled kernels leave it off.
    """
    if SOFT_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def exact_root(power, NORM: tl.constexpr):
    """The norm from a power form whose root is exact or a correctly rounded sqrt: sqrt for
    NORM_SUM_SQUARES (IEEE-rounded: ``tl.sqrt`` of float32 is an approximation, of float64
    ``sqrt.rn.f64``), the value itself for 1, inf, -inf and 0."""
    tl.static_assert(NORM != NORM_SUM_POW)
    if NORM == NORM_SUM_SQUARES:
        if power.dtype == tl.float64:
            return tl.sqrt(power)
        else:
            return tl.sqrt_rn(power)
    else:
        return power


@triton.jit
def clip_coefficient(norm, max_norm, eps):
    """min(max_norm / (norm + eps), 1) in ``norm``'s dtype (float32, or float64 for float64
    gradients), as torch evaluates it for a Python scalar ``max_norm`` and ``eps`` (both
    rounded to that dtype first): reciprocal (IEEE-rounded), then multiply; the same roundings
    give the same coefficient, bit for bit. NaN propagates. Where ``norm + eps`` is 0 (a zero
    norm with ``eps=0``) the coefficient is 1: there is nothing to clip, and 0 / 0 would turn
    the zero gradients into NaN (torch gives NaN there: a documented difference)."""
    max_norm = tl.cast(max_norm, norm.dtype)
    denominator = norm + tl.cast(eps, norm.dtype)
    if denominator.dtype == tl.float64:
        reciprocal = 1.0 / denominator  # float64 division is IEEE-rounded (div.rn.f64)
    else:
        reciprocal = tl.div_rn(1.0, denominator)  # float32 "/" is approximate on a GPU
    coef = tl.minimum(reciprocal * max_norm, 1.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(denominator == 0, 1.0, coef)
