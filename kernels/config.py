"""Launch configuration of the streaming kernels, keyed by gradient dtype.

Without a GPU measurement yet, the block is sized so that every thread of 4 warps issues
four 16-byte accesses per loop iteration: BLOCK = 4 warps * 32 threads * 4 vectors * 16 bytes
/ element size. That is the usual shape of a bandwidth-bound Triton elementwise loop. The
sweep that should replace it with a measured table is ``python -m tritonclip.bench.tune``
(``scripts/gpu_session.sh tune``); it has not run on a GPU yet.
"""

import contextlib
import functools
import os
import struct
import types
from typing import Mapping

import torch
import triton.language as tl

from .plan import CHUNK, VECTOR_BYTES

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

_NUM_WARPS = 4
_BYTES_PER_ITERATION = _NUM_WARPS * 32 * 4 * 16  # 8 KiB

# Counts the changes of the two constants above (stream_tuning): part of the keys under which
# plans keep compiled kernels (kernels.launch), so that a change reaches every launch.
generation = 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of the kernels: float64 for float64 gradients, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stream_config(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK elements per loop iteration, num_warps) of the streaming kernels."""
    return _BYTES_PER_ITERATION // dtype.itemsize, _NUM_WARPS


@contextlib.contextmanager
def stream_tuning(bytes_per_iteration: int, num_warps: int):
    """Launch the streaming kernels with ``bytes_per_iteration`` (BLOCK times the element
    size) and ``num_warps`` inside the block; for the tuning sweep (tritonclip.bench.tune).
    Each thread must get at least one 16-byte vector per iteration."""
    global _BYTES_PER_ITERATION, _NUM_WARPS, generation
    if num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")
    if bytes_per_iteration < num_warps * 32 * VECTOR_BYTES or \
            bytes_per_iteration & (bytes_per_iteration - 1):
        raise ValueError(f"bytes_per_iteration must be a power of two of at least "
                         f"{num_warps * 32 * VECTOR_BYTES} for {num_warps} warps, got "
                         f"{bytes_per_iteration}")
    saved = _BYTES_PER_ITERATION, _NUM_WARPS
    _BYTES_PER_ITERATION, _NUM_WARPS = bytes_per_iteration, num_warps
    stream_meta.cache_clear()
    generation += 1
    try:
        yield
    finally:
        _BYTES_PER_ITERATION, _NUM_WARPS = saved
        stream_meta.cache_clear()
        generation += 1


# Not state: a pure function of the dtype and the two module constants above (whose only
# writer, stream_tuning, clears it), cached because every launch asks for it.
@functools.cache
def stream_meta(dtype: torch.dtype) -> Mapping:
    """Meta-parameters shared by the streaming kernels (norm partials, scale, clamp) for
    gradients of ``dtype``; the caller adds ALIGNED (per launch) and kernel-specific ones.
    (Read-only: one mapping per dtype serves every launch.)"""
    block, num_warps = stream_config(dtype)
    return types.MappingProxyType(dict(
        DTYPE=TL_DTYPES[dtype], ACC=TL_DTYPES[compute_dtype(dtype)], CHUNK=CHUNK, BLOCK=block,
        VEC=VECTOR_BYTES // dtype.itemsize, num_warps=num_warps))


def finalize_config() -> tuple[int, int]:
    """(BLOCK, num_warps) of the finalize kernel: partials are few, one warp group suffices."""
    return 1024, 4


def interpreter_requested() -> bool:
    """Whether the environment asks, now, for Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once, at import, as Triton reads it: @triton.jit wraps the kernels for its interpreter
# or for compilation when they are defined.
_INTERPRETED = interpreter_requested()


def interpreted() -> bool:
    """Whether this process's kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def soft_bf16_rounding() -> bool:
    """Whether kernels must round to bfloat16 in software (under Triton's interpreter, whose
    float32 -> bfloat16 conversion truncates); see ``_helpers.store_cast``."""
    return _INTERPRETED


def on_device(device: torch.device):
    """Context in which to launch on ``device``: Triton launches on the *current* CUDA device
    and its current stream, so gradients on cuda:1 need cuda:1 made current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def float64_bits(value: float) -> int:
    """The bit pattern of ``value`` as a float64, as a signed int: how the kernels take float
    scalars (parameters annotated ``tl.int64``, bitcast back with ``_helpers.from_bits``).
    Triton passes a Python float as float32, and its interpreter rounds one to float32 when
    it is cast, so this is how float64 gradients keep the precision of their bounds, order
    and threshold."""
    return struct.unpack("<q", struct.pack("<d", value))[0]
