"""Runs one operation over all groups, each with its backend, and combines the results."""

from __future__ import annotations

import math

import torch

from . import _torch_backend, _triton_backend, distributed, kernels
from ._groups import Group, Layout, span_of_each

_BACKENDS = {"torch": _torch_backend, "triton": _triton_backend}


def _accumulation_dtype(dtype: torch.dtype, norm_type: float) -> torch.dtype:
    """The kernels' rule (float64 for float64 and for counts), on the real dtype of complex
    gradients too."""
    return kernels.accumulation_dtype(dtype.to_real() if dtype.is_complex else dtype, norm_type)


_NONFINITE_ERROR = (
    "The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
    "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
    "anyway, set `error_if_nonfinite=False` (or nonfinite='skip' to leave them untouched)"
)


def check_nonfinite(total: torch.Tensor, mode: str, norm_type: float) -> None:
    """``RuntimeError`` for a non-finite norm in mode "error": the library's only host
    synchronisation, and only when asked for."""
    if mode == "error" and not bool(torch.isfinite(total)):
        raise RuntimeError(_NONFINITE_ERROR.format(norm_type=norm_type))


def move(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` without a host synchronisation where one can be avoided: copies to a
    CUDA device are asynchronous; a copy to the CPU blocks, since the CPU reads it next (only
    lists that mix CPU and CUDA gradients make one)."""
    return t.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")


def _identity(norm_type: float) -> float:
    """The power-form value of no elements: what a rank without gradients contributes."""
    return math.inf if norm_type == -math.inf else 0.0


def _combine(values: list[torch.Tensor], norm_type: float, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    """Group values (power form) -> one power-form value, 0-dim ``dtype`` on ``device``."""
    if not values:
        return torch.full((), _identity(norm_type), dtype=dtype, device=device)
    moved = [move(v, device, dtype) for v in values]
    if len(moved) == 1:
        return moved[0]
    return _torch_backend.reduce_power(torch.stack(moved), norm_type)


def total_norm(tensors: list[torch.Tensor], groups: list[Group], norm_type: float,
               foreach: bool | None, per_tensor: bool = False, process_group=None):
    """The norm of ``tensors`` viewed as one vector, each storage region counted once: a
    float32 0-dim tensor on the first tensor's device (CPU when there is none). With a
    ``process_group``, the norm over the gradients of every rank of the group (one
    all-reduce; see :mod:`tritonclip.distributed`).

    With ``per_tensor`` also returns a 1-D float32 tensor of each input tensor's own norm.
    """
    device = tensors[0].device if tensors else torch.device("cpu")
    per_tensor_norms = (torch.zeros(len(tensors), dtype=torch.float32, device=device)
                        if per_tensor else None)
    if process_group is None and not any(g.spans or g.others for g in groups):
        total = torch.zeros((), dtype=torch.float32, device=device)
        return (total, per_tensor_norms) if per_tensor else total
    power, nan, inf = _reduced_power(tensors, groups, norm_type, foreach, device,
                                     process_group, per_tensor_norms)
    total = _finish(power, nan, inf, norm_type)
    return (total, per_tensor_norms) if per_tensor else total


def total_norm_over_pairs(pairs, norm_type: float, foreach: bool | None,
                          device: torch.device) -> torch.Tensor:
    """The norm over several gradient sets, each reduced over its own process group (or
    local, for group None): ``pairs`` holds ``(tensors, groups, process_group)``."""
    parts = [_reduced_power(tensors, groups, norm_type, foreach, device, process_group, None,
                            dtype=torch.float64)
             for tensors, groups, process_group in pairs]
    power = _torch_backend.reduce_power(torch.stack([move(p, device) for p, _, _ in parts]),
                                        norm_type)
    nan = torch.stack([move(n, device) for _, n, _ in parts]).any()
    inf = torch.stack([move(i, device) for _, _, i in parts]).any()
    return _finish(power, nan, inf, norm_type)


def _reduced_power(tensors, groups, norm_type, foreach, device, process_group, per_tensor_norms,
                   dtype=None):
    """(power form, any NaN, any inf) of ``tensors``, all-reduced over ``process_group``."""
    values = []
    for group in groups:
        if not (group.spans or group.others):
            continue  # only empty tensors: nothing to count, and their norms stay 0
        backend = _BACKENDS[group.backend]
        acc = _accumulation_dtype(group.dtype, norm_type)
        if per_tensor_norms is not None:
            value = _group_per_tensor(tensors, group, backend, norm_type, acc, foreach,
                                      per_tensor_norms)
            if value is not None:
                values.append(value)
                continue
        values.append(backend.group_power(group, norm_type, acc, foreach)[0])
    if dtype is None:
        # float64 across ranks: exact counts, and no rounding added by the reduction.
        dtype = (torch.float64 if process_group is not None
                 or any(v.dtype == torch.float64 for v in values) else torch.float32)
    power = _combine(values, norm_type, device, dtype)
    probe = power if shows_nonfinite(norm_type) else _max_abs(groups, foreach, device, dtype)
    nan, inf = torch.isnan(probe), torch.isinf(probe)
    if process_group is not None:
        power, nan, inf = distributed.all_reduce_power(power, nan, inf, norm_type, process_group)
    return power, nan, inf


def _finish(power, nan, inf, norm_type: float) -> torch.Tensor:
    """Power form and flags -> the float32 norm."""
    total = _torch_backend.root(power, norm_type).to(torch.float32)
    if norm_type == -math.inf:  # min over no element at all (every rank empty): 0, as alone
        total = torch.where(torch.isinf(total) & ~inf, torch.zeros_like(total), total)
    # A NaN gradient anywhere makes the norm NaN, an inf one makes it inf, whatever the order
    # (sum |g|^p and max show them by themselves; a count or a min would hide them).
    total = torch.where(inf & torch.isfinite(total), torch.full_like(total, math.inf), total)
    return torch.where(nan, torch.full_like(total, math.nan), total)


def shows_nonfinite(norm_type: float) -> bool:
    """Whether the norm is non-finite whenever a gradient is: p > 0 (sum |g|^p, max |g|)."""
    return norm_type > 0


def _max_abs(groups, foreach, device, dtype) -> torch.Tensor:
    """max |g| over all groups (one more read), for norm orders that hide inf and NaN."""
    values = [_BACKENDS[g.backend].group_power(g, math.inf, _accumulation_dtype(g.dtype, 1.0),
                                               foreach)[0]
              for g in groups if g.spans or g.others]
    return _combine(values, math.inf, device, dtype)


def _group_per_tensor(tensors, group, backend, norm_type, acc, foreach, out):
    """Write each member's norm into ``out``; return the group's power-form value when the
    same pass gives it (the members' spans are disjoint and all dense), else None."""
    members = [tensors[i] for i in group.members]
    spans, which, disjoint = span_of_each(members, group.members)
    value, norms = None, None
    if spans:
        span_group = Group(Layout(group.device, group.dtype, group.backend, spans, [],
                                  group.members), tensors)
        value, norms = backend.group_power(span_group, norm_type, acc, foreach, per_span=True)
    leftover = [i for i, w in zip(group.members, which) if w is None and tensors[i].numel() > 0]
    dense = [(i, w) for i, w in zip(group.members, which) if w is not None]
    device = out.device
    if dense:
        targets = move(torch.tensor([i for i, _ in dense]), device)
        sources = move(torch.tensor([w for _, w in dense]), norms.device)
        out[targets] = move(norms[sources], device, torch.float32)
    if leftover:
        other = _torch_backend.tensor_norms(
            [tensors[i] for i in leftover], norm_type, acc, group.device, foreach
        )
        out[move(torch.tensor(leftover), device)] = move(other, device, torch.float32)
    return value if disjoint and not leftover else None


def norm_and_coefficient(tensors: list[torch.Tensor], groups: list[Group], norm_type: float,
                         foreach: bool | None, max_norm: float, eps: float,
                         skip_nonfinite: bool, process_group=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, clip coefficient) for ``clip_grad_norm_``.

    When all gradients form one Triton group of dense spans (one dtype on one device: the
    common case) and the norm is 0, 1, 2, inf or -inf, the norm kernel's last program
    computes both, and the whole clip is two launches: norm, scale. Otherwise the groups' values
    are combined with torch ops.
    """
    working = [g for g in groups if g.spans or g.others]
    if (process_group is None and len(working) == 1 and working[0].backend == "triton"
            and not working[0].others and shows_nonfinite(norm_type)
            and working[0].device == tensors[0].device
            and _triton_backend.kernels.fuses_coefficient(norm_type)):
        return _triton_backend.norm_and_coefficient(working[0], norm_type, max_norm, eps,
                                                    skip_nonfinite)
    total = total_norm(tensors, groups, norm_type, foreach, process_group=process_group)
    return total, clip_coefficient(total, max_norm, eps, skip_nonfinite)


def clip_coefficient(total: torch.Tensor, max_norm: float, eps: float,
                     skip_nonfinite: bool) -> torch.Tensor:
    """min(max_norm / (total + eps), 1) as a float32 0-dim tensor on total's device (0-dim so
    that torch ops scale a float16 gradient in float32 and keep its dtype, as the kernels do);
    1 where the total is non-finite and ``skip_nonfinite`` is set. No host synchronisation."""
    coef = torch.clamp(max_norm / (total.float() + eps), max=1.0)
    if skip_nonfinite:
        coef = torch.where(torch.isfinite(total), coef, torch.ones_like(coef))
    return coef


def scale_(groups: list[Group], coef: torch.Tensor, foreach: bool | None,
           skip_at_least_one: bool = True) -> None:
    """Multiply every group's distinct storage regions in place by ``coef`` (skipped where it
    is >= 1, if ``skip_at_least_one``: a clip coefficient)."""
    coefs = [move(coef, group.device) for group in groups]
    for group, group_coef in zip(groups, coefs):
        if group.spans or group.others:
            _BACKENDS[group.backend].scale_(group, group_coef, foreach, skip_at_least_one)


def clamp_(groups: list[Group], lo: float, hi: float, foreach: bool | None) -> None:
    """Clamp every group's distinct storage regions in place to [lo, hi]."""
    for group in groups:
        if group.spans or group.others:
            _BACKENDS[group.backend].clamp_(group, lo, hi, foreach)
