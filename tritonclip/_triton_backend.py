"""The Triton backend: plans from the kernel package's cache, and launches over them.

Gradients of a group that are not one dense block (Group.others) are handled with torch ops
on the same device, so they are correct, though they cost an extra launch or two.
"""

from __future__ import annotations

import torch

from tritonclip import kernels

from . import _torch_backend
from ._groups import Group


def _plan(group: Group, per_span: bool = False) -> kernels.LaunchPlan:
    """The group's launch plan, looked up once per call (norm and scale share it)."""
    plan = group.derived.get(per_span)
    if plan is None:
        plan = kernels.plan_cache.get(group.addresses(), group.device, group.dtype, per_span)
        group.derived[per_span] = plan
    return kernels.keep_for_graphs(plan)


def group_power(group: Group, norm_type: float, acc_dtype: torch.dtype, foreach: bool | None,
                per_span: bool = False):
    """(power-form value of the group, per-span norms or None): one launch for the spans
    (two with ``per_span``: partials, then a finalize per span), plus torch ops for the
    leftovers."""
    parts = []
    per = None
    if group.spans:
        plan = _plan(group, per_span)
        if per_span:
            partials = kernels.norm_partials(plan, norm_type)
            values = kernels.finalize(plan, partials, norm_type).to(acc_dtype)
            per = _torch_backend.root(values[1:], norm_type)
        else:
            values = kernels.group_power(plan, norm_type).to(acc_dtype)
        parts.append(values[:1])
    if group.others:
        norms = _torch_backend.tensor_norms(group.others, norm_type, acc_dtype, group.device,
                                            foreach)
        parts.append(_torch_backend.power_form(norms, norm_type))
    if not group.others:
        return parts[0][0], per
    return _torch_backend.reduce_power(torch.cat(parts), norm_type), per


def norm_and_coefficient(group: Group, norm_type: float, max_norm: float, eps: float,
                         skip_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 norm, clip coefficient) of a group of dense spans: one launch."""
    return kernels.norm_clip(_plan(group), norm_type, max_norm, eps, skip_nonfinite)


def unscale_norm_and_factor(group: Group, norm_type: float, max_norm: float, eps: float,
                            skip_nonfinite: bool, inv_scale: torch.Tensor):
    """(unscaled norm, scale factor, found_inf) of a group of dense scaled gradients: one
    launch (see ``kernels.unscale_norm_clip``)."""
    return kernels.unscale_norm_clip(_plan(group), norm_type, max_norm, eps, skip_nonfinite,
                                     inv_scale)


def scale_(group: Group, coef: torch.Tensor, foreach: bool | None,
           skip_at_least_one: bool = True) -> None:
    """One launch; every program returns at once when coef >= 1 (if ``skip_at_least_one``)."""
    if group.spans:
        kernels.scale_(_plan(group), coef, skip_at_least_one)
    for t in group.others:
        _torch_backend.mul_(t, coef)


def clamp_(group: Group, lo: float, hi: float, foreach: bool | None) -> None:
    if group.spans:
        kernels.clamp_(_plan(group), lo, hi)
    for t in group.others:
        t.clamp_(lo, hi)
