"""Triton kernels of tritonclip and their launchers. No policy lives here: callers choose
groups, backends and coefficients, and keep the plans; these functions launch over a
:class:`LaunchPlan` (or, for error clipping, over one contiguous tensor)."""

from . import clamp, error_clip, launch, norm, scale
from .clamp import clamp_
from .norm import (
    accumulation_dtype,
    finalize,
    fuses_coefficient,
    group_power,
    norm_clip,
    norm_partials,
    result_dtype,
)
from .plan import CHUNK, VECTOR_BYTES, Launch, LaunchPlan, Streams, build_plan, is_vector_aligned
from .rows import build_row_plan
from .scale import scale_, scale_each_

__all__ = [
    "CHUNK",
    "VECTOR_BYTES",
    "Launch",
    "LaunchPlan",
    "Streams",
    "accumulation_dtype",
    "build_plan",
    "build_row_plan",
    "clamp_",
    "error_clip",
    "finalize",
    "fuses_coefficient",
    "group_power",
    "is_vector_aligned",
    "launch",
    "norm_clip",
    "norm_partials",
    "result_dtype",
    "scale_",
    "scale_each_",
]
