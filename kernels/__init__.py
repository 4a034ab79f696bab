"""Triton kernels of tritonclip and their launchers. No policy lives here: callers choose
groups, backends and coefficients; these functions launch over a :class:`LaunchPlan`."""

from . import clamp, error_clip, launch, norm, scale
from .clamp import clamp_
from .norm import (
    accumulation_dtype,
    finalize,
    fuses_coefficient,
    group_power,
    norm_clip,
    norm_partials,
    unscale_norm_clip,
)
from .plan import (
    CHUNK,
    VECTOR_BYTES,
    Launch,
    LaunchPlan,
    LRUCache,
    PlanCache,
    Streams,
    is_vector_aligned,
    keep_for_graphs,
    plan_cache,
)
from .rows import RowPlan, RowPlanCache, build_row_plan, row_plan_cache
from .scale import scale_, scale_each_

# Every kernel launcher of the package (kernels/launch.py), for tools and tests that switch
# the direct launch off and on or count launches.
LAUNCHERS = tuple(value for module in (norm, scale, clamp, error_clip)
                  for value in vars(module).values() if isinstance(value, launch.Launcher))

__all__ = [
    "CHUNK",
    "LAUNCHERS",
    "VECTOR_BYTES",
    "Launch",
    "LaunchPlan",
    "LRUCache",
    "PlanCache",
    "RowPlan",
    "RowPlanCache",
    "Streams",
    "accumulation_dtype",
    "build_row_plan",
    "clamp_",
    "finalize",
    "fuses_coefficient",
    "group_power",
    "is_vector_aligned",
    "keep_for_graphs",
    "norm_clip",
    "norm_partials",
    "plan_cache",
    "row_plan_cache",
    "scale_",
    "scale_each_",
    "unscale_norm_clip",
]
