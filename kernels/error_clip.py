"""Kernels of error clipping's backward: the gradient of an activation, clipped out of place.

``clamp_out``: ``out = clamp(g, lo, hi)`` over a flat contiguous span: one read, one write.

``row_clip_out``: ``g`` viewed as ``[n_rows, row_len]`` (contiguous), each row scaled by its own
coefficient ``min(max_norm / (||row||_p + eps), 1)``:

- rows of up to ``FUSED_ROW_MAX`` elements: one fused kernel. A program takes a tile of
  ``BLOCK_R`` whole rows, reduces them (first read), computes their coefficients and writes
  the scaled rows (second read, from L1/L2 for rows this short): 2N bytes from DRAM.
- longer rows (and the whole-tensor clip, one row of ``numel``): partials per
  (row, chunk of ``SPLIT_CHUNK`` elements), a finalize that turns each row's partials into its
  coefficient, and a scale over (row, chunk): three launches, 3N bytes, with enough programs
  to fill a GPU however few the rows.

Norms accumulate in float32 (float64 for float64 gradients); the coefficient is float32 in
every case and is applied once, in the accumulation dtype, before one rounding to the
gradient's dtype (as ``clip_grad_norm_`` does). Reductions run in a fixed order (no float
atomics): two runs agree bit for bit. Optional counts (an int64 ``[clipped, seen]`` tensor)
are added with integer atomics, which are exact in any order, so nothing synchronises.

Everything takes contiguous tensors: the caller moves reduced dimensions last and copies
only where that is not already the memory order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import (
    NORM_MAX,
    NORM_SUM_ABS,
    NORM_SUM_POW,
    NORM_SUM_SQUARES,
    clip_coefficient,
    exact_root,
    from_bits,
    store_cast,
)
from .config import (
    TL_DTYPES,
    compute_dtype,
    finalize_config,
    float64_bits,
    on_device,
    soft_bf16_rounding,
    stream_config,
)
from .launch import launch
from .norm import norm_mode as _norm_mode
from .plan import VECTOR_BYTES, is_vector_aligned

# Rows up to this many elements take the fused kernel. A program then reads a row twice;
# 16 Ki elements (64 KiB of float32) still sit in L1/L2 for the second read, and past it the
# split path's extra launch costs less than the lost parallelism of one program per row.
# Not yet swept on a GPU (the benchmark issue owns that).
FUSED_ROW_MAX = 16 * 1024

# Elements per program of the split path (partials and scale). On an H100 (32M bf16/fp32
# elements as 1 or 64 rows), 8 Ki ran 5-7% faster than the streaming kernels' 64 Ki chunk (too
# few programs in flight); 4 Ki to 32 Ki were within noise of each other.
SPLIT_CHUNK = 8 * 1024

# Bytes per program of the clamp: two loop iterations of 8 KiB. On an H100 this matched a
# device copy and torch's clamp (32M bf16: 0.050-0.052 ms), where 64 Ki elements per program
# (128 KiB) took 0.063 ms.
CLAMP_CHUNK_BYTES = 16 * 1024


def norm_mode(norm_type: float) -> int:
    """The kernels' NORM constant (``norm.norm_mode``) for an order p > 0 or inf (what error
    clipping accepts)."""
    if not norm_type > 0:
        raise ValueError(f"row norms take an order p > 0 or inf, not {norm_type}")
    return _norm_mode(norm_type)


# ---------------------------------------------------------------------------------------
# @triton.jit helpers: the row reduction and the coefficient, shared by all row kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_power(
    x_ptr, row_start, row_mask, col_lo, col_hi, p,
    NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Power form (sum |x|^p, or max |x|) of columns [col_lo, col_hi) of a tile of rows:
    returns a [BLOCK_R] vector in ACC. A NaN element makes its row's value NaN."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for c0 in range(col_lo, col_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < col_hi)[None, :]
        x = tl.load(x_ptr + row_start[:, None] + cols[None, :], mask=mask, other=0).to(ACC)
        if NORM == NORM_SUM_SQUARES:
            acc += x * x
        elif NORM == NORM_SUM_ABS:
            acc += tl.abs(x)
        elif NORM == NORM_SUM_POW:
            # |x|^p = 2^(p log2|x|); masked lanes (and zeros) give 2^-inf = 0 since p > 0.
            acc += tl.where(mask, tl.exp2(p * tl.log2(tl.abs(x))), 0.0)
        else:  # NORM_MAX; NaN kept: GPU max drops it otherwise
            acc = tl.maximum(acc, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    if NORM == NORM_MAX:
        has_nan = tl.max((acc != acc).to(tl.int32), axis=1) > 0
        return tl.where(has_nan, float("nan"), tl.max(acc, axis=1))
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _coefficient(power, p, max_norm, eps, NORM: tl.constexpr, ACC: tl.constexpr):
    """float32 min(max_norm / (norm + eps), 1) from a power form, with the norm's root taken
    in ACC and rounded once to float32: the formula of clip_grad_norm_, with IEEE-rounded
    sqrt and reciprocal, so that it equals torch's ops on the same float32 norm."""
    if NORM == NORM_SUM_POW:
        norm = tl.exp2(tl.log2(power) / p)  # approximate on a GPU (a few ulp)
    else:
        norm = exact_root(power.to(ACC), NORM)
    return clip_coefficient(norm.to(tl.float32), max_norm, eps)


@triton.jit
def _scale_rows(
    x_ptr, out_ptr, row_start, row_mask, col_lo, col_hi, coef,
    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """out[r, c] = x[r, c] * coef[r] over columns [col_lo, col_hi), rounded once to DTYPE."""
    coef = coef.to(ACC)[:, None]
    for c0 in range(col_lo, col_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < col_hi)[None, :]
        offs = row_start[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask).to(ACC)
        tl.store(out_ptr + offs, store_cast(x * coef, DTYPE, SOFT_BF16), mask=mask)


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


# Sizes and bounds are not specialized (a value of 1 would become a constexpr, and every new
# activation size or bound would compile anew).
@triton.jit(do_not_specialize=["numel", "lo_bits", "hi_bits"])
def _clamp_out_kernel(
    # pointers
    x_ptr, out_ptr, counts_ptr,
    # sizes
    numel,
    # bounds, as the bits of float64 values (config.float64_bits)
    lo_bits: tl.int64, hi_bits: tl.int64,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, SOFT_BF16: tl.constexpr, COUNT: tl.constexpr,
):
    """out = min(max(x, lo), hi) over chunk ``pid`` of a flat span (NaN stays NaN); with
    COUNT, counts += [elements changed, elements seen]."""
    pid = tl.program_id(0).to(tl.int64)
    if ALIGNED:
        # The launcher checked numel % VEC == 0 (pointers are 16-byte aligned: Triton
        # specializes on that by itself); masks then stay uniform per 16-byte vector. An
        # identity here, written so the compiler sees the divisibility: tl.multiple_of has no
        # op to attach to on a kernel argument (and do_not_specialize keeps Triton's own
        # divisibility-by-16 specialization off).
        numel = (numel // VEC) * VEC
    start = pid * CHUNK
    end = tl.minimum(start + CHUNK, numel)
    lo = from_bits(lo_bits).to(ACC)
    hi = from_bits(hi_bits).to(ACC)
    changed = tl.zeros([BLOCK], tl.int32)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        y = tl.minimum(tl.maximum(x, lo), hi)
        if COUNT:
            changed += ((x < lo) | (x > hi)).to(tl.int32)  # masked lanes load 0: inside
        tl.store(out_ptr + offs, store_cast(tl.where(x != x, x, y), DTYPE, SOFT_BF16),
                 mask=mask)
    if COUNT:
        tl.atomic_add(counts_ptr, tl.sum(changed.to(tl.int64), axis=0))
        tl.atomic_add(counts_ptr + 1, end - start)


@triton.jit(do_not_specialize=["n_rows", "row_len", "p", "max_norm", "eps"])
def _row_clip_fused_kernel(
    # pointers
    x_ptr, out_ptr, counts_ptr,
    # sizes
    n_rows, row_len,
    # scalars: norm order (NORM_SUM_POW only), clip threshold, eps (float32)
    p, max_norm, eps,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr, NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    SOFT_BF16: tl.constexpr, COUNT: tl.constexpr,
):
    """out[r] = x[r] * min(max_norm / (||x[r]||_p + eps), 1) for the BLOCK_R rows of program
    ``pid`` (rows of at most FUSED_ROW_MAX elements); with COUNT, counts += [rows clipped
    (coefficient < 1), rows seen]."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    if ALIGNED:
        # row_len % VEC == 0 (checked by the launcher): every row starts on a 16-byte vector
        # and the column masks are uniform per vector, so loads and stores are 128-bit. The
        # identity shows the compiler that divisibility (see _clamp_out_kernel).
        row_len = (row_len // VEC) * VEC
    row_start = rows * row_len
    power = _row_power(x_ptr, row_start, row_mask, 0, row_len, p, NORM, ACC, BLOCK_R, BLOCK_C)
    coef = _coefficient(power, p, max_norm, eps, NORM, ACC)
    if COUNT:
        tl.atomic_add(counts_ptr, tl.sum(((coef < 1.0) & row_mask).to(tl.int64), axis=0))
        tl.atomic_add(counts_ptr + 1, tl.sum(row_mask.to(tl.int64), axis=0))
    _scale_rows(x_ptr, out_ptr, row_start, row_mask, 0, row_len, coef, DTYPE, ACC, BLOCK_C,
                SOFT_BF16)


@triton.jit
def _row_chunk(row_len, chunks_per_row, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
               VEC: tl.constexpr):
    """(row, row start as a 1-row block, its mask, [col_lo, col_hi)) of this program's chunk:
    chunk ``pid % chunks_per_row`` of row ``pid // chunks_per_row`` (long rows)."""
    pid = tl.program_id(0).to(tl.int64)
    if ALIGNED:
        row_len = (row_len // VEC) * VEC  # an identity, as in the fused kernel
    row = pid // chunks_per_row
    col_lo = (pid % chunks_per_row) * CHUNK
    col_hi = tl.minimum(col_lo + CHUNK, row_len)
    row_start = tl.full([1], 0, tl.int64) + row * row_len
    row_mask = tl.full([1], 1, tl.int1)
    return row, row_start, row_mask, col_lo, col_hi


@triton.jit(do_not_specialize=["row_len", "chunks_per_row", "p"])
def _row_partials_kernel(
    # pointers
    x_ptr, partials_ptr,
    # sizes
    row_len, chunks_per_row,
    # norm order (NORM_SUM_POW only)
    p,
    # meta-parameters
    ACC: tl.constexpr, NORM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr,
):
    """partials[pid] = power form of chunk ``pid % chunks_per_row`` of row
    ``pid // chunks_per_row`` (long rows)."""
    _, row_start, row_mask, col_lo, col_hi = _row_chunk(row_len, chunks_per_row, CHUNK,
                                                        ALIGNED, VEC)
    power = _row_power(x_ptr, row_start, row_mask, col_lo, col_hi, p, NORM, ACC, 1, BLOCK)
    pid = tl.program_id(0).to(tl.int64)
    tl.store(partials_ptr + pid + tl.arange(0, 1), power)


@triton.jit(do_not_specialize=["chunks_per_row", "p", "max_norm", "eps"])
def _row_finalize_kernel(
    # pointers
    partials_ptr, coef_ptr, counts_ptr,
    # sizes
    chunks_per_row,
    # scalars
    p, max_norm, eps,
    # meta-parameters
    NORM: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr,
):
    """coef[row] = min(max_norm / (norm + eps), 1) from row ``pid``'s partials, reduced in a
    fixed order; with COUNT, counts += [row clipped, 1]."""
    row = tl.program_id(0).to(tl.int64)
    ACC: tl.constexpr = partials_ptr.dtype.element_ty
    start = row * chunks_per_row
    end = start + chunks_per_row
    acc = tl.zeros([BLOCK], ACC)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(partials_ptr + offs, mask=offs < end, other=0)
        if NORM == NORM_MAX:
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc += x
    if NORM == NORM_MAX:
        has_nan = tl.max((acc != acc).to(tl.int32), axis=0) > 0
        power = tl.where(has_nan, float("nan"), tl.max(acc, axis=0))
    else:
        power = tl.sum(acc, axis=0)
    coef = _coefficient(power, p, max_norm, eps, NORM, ACC)
    tl.store(coef_ptr + row, coef)
    if COUNT:
        tl.atomic_add(counts_ptr, (coef < 1.0).to(tl.int64))
        tl.atomic_add(counts_ptr + 1, 1)


@triton.jit(do_not_specialize=["row_len", "chunks_per_row"])
def _row_scale_kernel(
    # pointers
    x_ptr, out_ptr, coef_ptr,
    # sizes
    row_len, chunks_per_row,
    # meta-parameters
    DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    """out = x * coef[row] over chunk ``pid % chunks_per_row`` of row ``pid // chunks_per_row``."""
    row, row_start, row_mask, col_lo, col_hi = _row_chunk(row_len, chunks_per_row, CHUNK,
                                                          ALIGNED, VEC)
    coef = tl.load(coef_ptr + row + tl.arange(0, 1))
    _scale_rows(x_ptr, out_ptr, row_start, row_mask, col_lo, col_hi, coef, DTYPE, ACC, BLOCK,
                SOFT_BF16)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _aligned(length: int, *tensors: torch.Tensor) -> bool:
    """Whether 16-byte vectors fit: every base address aligned and ``length`` (a row or the
    whole span) a multiple of the vector, so no vector straddles a row end or a mask edge."""
    return all(is_vector_aligned(t.data_ptr(), length, t.element_size()) for t in tensors)


def _check(x: torch.Tensor, out: torch.Tensor, counts: torch.Tensor | None) -> None:
    # Launcher contract (the Python API has validated user input before this).
    if not (x.is_contiguous() and out.is_contiguous() and x.shape == out.shape
            and x.dtype == out.dtype and x.device == out.device and x.dtype in TL_DTYPES):
        raise ValueError(
            f"x and out must be contiguous tensors of one float dtype, shape and device; got "
            f"{x.dtype}{tuple(x.shape)} on {x.device} and {out.dtype}{tuple(out.shape)} on "
            f"{out.device}"
        )
    if counts is not None and (counts.dtype != torch.int64 or counts.numel() < 2
                               or counts.device != x.device or not counts.is_contiguous()):
        raise ValueError("counts must be a contiguous int64 tensor of 2 elements on x's device")


def clamp_out_meta(dtype: torch.dtype, aligned: bool, count: bool) -> dict:
    """Constexprs and launch options of :func:`clamp_out` (also what kernels.registry
    compiles)."""
    block, num_warps = stream_config(dtype)
    return dict(DTYPE=TL_DTYPES[dtype], ACC=TL_DTYPES[compute_dtype(dtype)],
                CHUNK=CLAMP_CHUNK_BYTES // dtype.itemsize, BLOCK=block, ALIGNED=aligned,
                VEC=VECTOR_BYTES // dtype.itemsize, SOFT_BF16=soft_bf16_rounding(),
                COUNT=count, num_warps=num_warps)


def clamp_out(x: torch.Tensor, out: torch.Tensor, lo: float, hi: float,
              counts: torch.Tensor | None = None) -> None:
    """``out = clamp(x, lo, hi)`` elementwise (NaN stays NaN); ``x`` and ``out`` contiguous of
    one shape and dtype. With ``counts`` (int64, 2 elements), adds [elements outside
    [lo, hi], elements] to it on the device."""
    _check(x, out, counts)
    numel = x.numel()
    if numel == 0:
        return
    meta = clamp_out_meta(x.dtype, _aligned(numel, x, out), counts is not None)
    with on_device(x.device):
        launch(_clamp_out_kernel, (triton.cdiv(numel, meta["CHUNK"]),),
               (x, out, counts if counts is not None else x, numel, float64_bits(lo),
                float64_bits(hi)), meta)


def fused_tile(row_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the fused kernel: a tile of the streaming kernels' size (8 KiB),
    as wide as the row (power of two, at least one 16-byte vector) and as many rows tall as fit.
    Widths are powers of two, so the number of compilations grows with log2(row_len) only."""
    block, _ = stream_config(dtype)
    vec = VECTOR_BYTES // dtype.itemsize
    width = min(max(triton.next_power_of_2(max(row_len, 1)), vec), block)
    return max(block // width, 1), width


def row_metas(dtype: torch.dtype, aligned: bool, norm_type: float, row_len: int,
              count: bool) -> dict:
    """Constexprs and launch options of each kernel :func:`row_clip_out` launches for rows
    of ``row_len``, by kernel name ("fused", or "partials", "finalize" and "scale"); also what
    kernels.registry compiles."""
    common = dict(ACC=TL_DTYPES[compute_dtype(dtype)], NORM=norm_mode(norm_type),
                  ALIGNED=aligned, VEC=VECTOR_BYTES // dtype.itemsize)
    if row_len <= FUSED_ROW_MAX:
        block_r, block_c = fused_tile(row_len, dtype)
        return {"fused": dict(common, DTYPE=TL_DTYPES[dtype], BLOCK_R=block_r, BLOCK_C=block_c,
                              SOFT_BF16=soft_bf16_rounding(), COUNT=count, num_warps=4)}
    block, num_warps = stream_config(dtype)
    fin_block, fin_warps = finalize_config()
    return {
        "partials": dict(common, CHUNK=SPLIT_CHUNK, BLOCK=block, num_warps=num_warps),
        "finalize": dict(NORM=common["NORM"], BLOCK=fin_block, COUNT=count,
                         num_warps=fin_warps),
        "scale": dict(DTYPE=TL_DTYPES[dtype], ACC=common["ACC"], CHUNK=SPLIT_CHUNK,
                      BLOCK=block, ALIGNED=aligned, VEC=common["VEC"],
                      SOFT_BF16=soft_bf16_rounding(), num_warps=num_warps),
    }


def row_clip_out(x: torch.Tensor, out: torch.Tensor, max_norm: float, norm_type: float,
                 eps: float, counts: torch.Tensor | None = None) -> None:
    """Scale each row of ``x`` (contiguous, viewed as ``[n_rows, row_len]`` with
    ``row_len = x.shape[-1]``; 1-D: one row) by ``min(max_norm / (||row||_p + eps), 1)``
    into ``out``. ``norm_type``: p > 0 or inf. With ``counts`` (int64, 2 elements), adds
    [rows whose coefficient is < 1, rows] to it on the device."""
    _check(x, out, counts)
    row_len = x.shape[-1] if x.dim() else 1
    n_rows = x.numel() // row_len if row_len else 0
    if x.numel() == 0:
        if counts is not None and n_rows:
            counts[1].add_(n_rows)  # empty rows: norm 0, never clipped
        return
    p = norm_type if norm_mode(norm_type) == NORM_SUM_POW.value else 1.0
    counts_arg = counts if counts is not None else x
    metas = row_metas(x.dtype, _aligned(row_len, x, out), norm_type, row_len,
                      counts is not None)
    with on_device(x.device):
        if "fused" in metas:
            launch(_row_clip_fused_kernel, (triton.cdiv(n_rows, metas["fused"]["BLOCK_R"]),),
                   (x, out, counts_arg, n_rows, row_len, p, max_norm, eps), metas["fused"])
            return
        chunks_per_row = triton.cdiv(row_len, SPLIT_CHUNK)
        grid = (n_rows * chunks_per_row,)
        partials = torch.empty(grid[0], dtype=compute_dtype(x.dtype), device=x.device)
        coef = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        launch(_row_partials_kernel, grid, (x, partials, row_len, chunks_per_row, p),
               metas["partials"])
        launch(_row_finalize_kernel, (n_rows,),
               (partials, coef, counts_arg, chunks_per_row, p, max_norm, eps),
               metas["finalize"])
        launch(_row_scale_kernel, grid, (x, out, coef, row_len, chunks_per_row),
               metas["scale"])
