"""Runs one operation over all groups, each with its backend, and combines the results."""

from __future__ import annotations

import math

import torch

from . import _sharding, _torch_backend, _triton_backend, distributed, kernels
from ._groups import Group, Layout, group_tensors, span_of_each

_BACKENDS = {"torch": _torch_backend, "triton": _triton_backend}


def accumulation_dtype(dtype: torch.dtype, norm_type: float) -> torch.dtype:
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
               foreach: bool | None, per_tensor: bool = False, process_group=None,
               device: torch.device | None = None):
    """The norm of ``tensors`` viewed as one vector, each storage region counted once: a
    float32 0-dim tensor on the first tensor's device (CPU when there is none). With a
    ``process_group``, the norm over the gradients of every rank of the group (one
    all-reduce; see :mod:`tritonclip.distributed`).

    With ``per_tensor`` also returns a 1-D float32 tensor of each input tensor's own norm.
    ``device`` overrides where the norm lives (e.g. the device of gradients that a filter
    left out of the norm).
    """
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    per_tensor_norms = (torch.zeros(len(tensors), dtype=torch.float32, device=device)
                        if per_tensor else None)
    if process_group is None and not any(g.spans or g.others for g in groups):
        total = torch.zeros((), dtype=torch.float32, device=device)
        return (total, per_tensor_norms) if per_tensor else total
    if not per_tensor and process_group is None and _fuses(tensors, groups, norm_type):
        # One launch: the norm kernel's last program writes the float32 norm itself.
        (group,) = [g for g in groups if g.spans or g.others]
        return _triton_backend.norm_and_coefficient(group, norm_type, 1.0, 0.0, False)[0]
    power, nan, inf = _reduced_power(tensors, groups, norm_type, foreach, device,
                                     process_group, per_tensor_norms)
    total = _finish(power, nan, inf, norm_type)
    return (total, per_tensor_norms) if per_tensor else total


def any_norm(grads: list[torch.Tensor], groups: list[Group], norm_type: float,
             foreach: bool | None, backend: str) -> torch.Tensor:
    """The norm of ``grads`` on this process: :func:`total_norm` of the ``groups`` made from
    their local tensors, or, when some are DTensors, the norm over their meshes."""
    if _sharding.has_dtensor(grads):
        return total_norm_of_sets(_sharding.norm_sets(grads), norm_type, foreach, backend,
                                  _sharding.local_tensors(grads[:1])[0].device)
    return total_norm(grads, groups, norm_type, foreach)


def total_norm_of_sets(sets, norm_type: float, foreach: bool | None, backend: str,
                       device: torch.device, name: str = "gradients") -> torch.Tensor:
    """The norm over several :class:`~tritonclip._sharding.NormSet`: each set's local value,
    all-reduced over the set's groups, then combined (see :func:`_reduce_sets`)."""
    items = []
    for norm_set in sets:
        groups = group_tensors(norm_set.tensors, backend, name=name)
        power, nan, inf = _local_power(norm_set.tensors, groups, norm_type, foreach, device,
                                       None, torch.float64)
        items.append((tuple(norm_set.reductions), power, nan, inf))
    power, nan, inf = _reduce_sets(items, norm_type, device)
    return _finish(power, nan, inf, norm_type)


def _reduce_sets(items, norm_type, device):
    """Combine ``(groups, power, nan, inf)`` items, all-reducing each over its groups in order.

    Items with the same remaining groups are combined before reducing, and the item with the
    most groups left is reduced first, so that e.g. FSDP x TP weights (tp, then dp) and
    FSDP-only parameters (dp) take two all-reduces, not three. Every rank holds sets of the
    same structure, so every rank issues the same collectives in the same order.
    """
    # Each item as [groups, their keys (computed once), power, nan, inf].
    items = [[groups, tuple(map(_group_key, groups)), power, nan, inf]
             for groups, power, nan, inf in items]
    while True:
        merged: dict[tuple, list] = {}
        for item in items:
            entry = merged.get(item[1])
            if entry is None:
                merged[item[1]] = item
            else:
                entry[2] = _torch_backend.reduce_power(torch.stack([entry[2], item[2]]),
                                                       norm_type)
                entry[3] = entry[3] | item[3]
                entry[4] = entry[4] | item[4]
        items = list(merged.values())
        pending = [entry for entry in items if entry[0]]
        if not pending:
            break
        entry = max(pending, key=lambda e: len(e[0]))  # the first of the longest
        group = entry[0][0]
        entry[0], entry[1] = entry[0][1:], entry[1][1:]
        entry[2], entry[3], entry[4] = distributed.all_reduce_power(entry[2], entry[3],
                                                                    entry[4], norm_type, group)
    if not items:
        identity = torch.full((), _identity(norm_type), dtype=torch.float64, device=device)
        false = torch.zeros((), dtype=torch.bool, device=device)
        return identity, false, false
    (_, _, power, nan, inf), = items
    return power, nan, inf


def _group_key(group):
    """Groups of the same ranks reduce alike, whichever object names them."""
    return tuple(distributed.ranks_of(group))


def _reduced_power(tensors, groups, norm_type, foreach, device, process_group, per_tensor_norms):
    """(power form, any NaN, any inf) of ``tensors``, all-reduced over ``process_group``."""
    # float64 across ranks: exact counts, and no rounding added by the reduction.
    dtype = torch.float64 if process_group is not None else None
    power, nan, inf = _local_power(tensors, groups, norm_type, foreach, device,
                                   per_tensor_norms, dtype)
    if process_group is not None:
        power, nan, inf = distributed.all_reduce_power(power, nan, inf, norm_type, process_group)
    return power, nan, inf


def _local_power(tensors, groups, norm_type, foreach, device, per_tensor_norms, dtype):
    """(power form, any NaN, any inf) of this rank's ``tensors``, in ``dtype`` (None: float32,
    or float64 when a group accumulates in float64)."""
    values = []
    for group in groups:
        if not (group.spans or group.others):
            continue  # only empty tensors: nothing to count, and their norms stay 0
        backend = _BACKENDS[group.backend]
        acc = accumulation_dtype(group.dtype, norm_type)
        if per_tensor_norms is not None:
            value = _group_per_tensor(tensors, group, backend, norm_type, acc, foreach,
                                      per_tensor_norms)
            if value is not None:
                values.append(value)
                continue
        values.append(backend.group_power(group, norm_type, acc, foreach)[0])
    if dtype is None:
        dtype = (torch.float64 if any(v.dtype == torch.float64 for v in values)
                 else torch.float32)
    power = _combine(values, norm_type, device, dtype)
    probe = power if shows_nonfinite(norm_type) else _max_abs(groups, foreach, device, dtype)
    return power, torch.isnan(probe), torch.isinf(probe)


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
    values = [_BACKENDS[g.backend].group_power(g, math.inf, accumulation_dtype(g.dtype, 1.0),
                                               foreach)[0]
              for g in groups if g.spans or g.others]
    return _combine(values, math.inf, device, dtype)


def _group_per_tensor(tensors, group, backend, norm_type, acc, foreach, out):
    """Write each member's norm into ``out``; return the group's power-form value when the
    same pass gives it (the members' spans are disjoint and all dense), else None."""
    per = _per_tensor_layout(tensors, group, out.device)
    value = None
    if per.span_layout is not None:
        value, norms = backend.group_power(Group(per.span_layout, tensors), norm_type, acc,
                                           foreach, per_span=True)
        out[per.targets] = move(norms[per.sources], out.device, torch.float32)
    if per.leftover:
        other = _torch_backend.tensor_norms([tensors[i] for i in per.leftover], norm_type,
                                            acc, group.device, foreach)
        out[per.leftover_targets] = move(other, out.device, torch.float32)
    return value if per.disjoint and not per.leftover else None


class _PerTensorLayout:
    """What per-tensor norms of a group need besides the values, built once per layout: its
    spans (one per distinct dense tensor) and the device index tensors that scatter span norms
    to input positions, so a repeated call copies nothing from the host."""

    __slots__ = ("span_layout", "targets", "sources", "leftover", "leftover_targets",
                 "disjoint")

    def __init__(self, tensors, group, device):
        members = [tensors[i] for i in group.members]
        spans, which, self.disjoint = span_of_each(members, group.members)
        self.span_layout = (Layout(group.device, group.dtype, group.backend, spans, [],
                                   group.members) if spans else None)
        dense = [(i, w) for i, w in zip(group.members, which) if w is not None]
        self.targets = move(torch.tensor([i for i, _ in dense], dtype=torch.long), device)
        self.sources = move(torch.tensor([w for _, w in dense], dtype=torch.long),
                            group.device)
        self.leftover = [i for i, w in zip(group.members, which)
                         if w is None and tensors[i].numel() > 0]
        self.leftover_targets = move(torch.tensor(self.leftover, dtype=torch.long), device)


def _per_tensor_layout(tensors, group, device) -> _PerTensorLayout:
    key = ("per_tensor", device)
    per = group.derived.get(key)
    if per is None:
        per = group.derived[key] = _PerTensorLayout(tensors, group, device)
    return per


def norm_and_coefficient(tensors: list[torch.Tensor], groups: list[Group], norm_type: float,
                         foreach: bool | None, max_norm: float, eps: float,
                         skip_nonfinite: bool, process_group=None,
                         device: torch.device | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, clip coefficient) for ``clip_grad_norm_``.

    When all gradients form one Triton group of dense spans (one dtype on one device: the
    common case) and the norm is 0, 1, 2, inf or -inf, the norm kernel's last program
    computes both, and the whole clip is two launches: norm, scale. Otherwise the groups' values
    are combined with torch ops.
    """
    if process_group is None and _fuses(tensors, groups, norm_type):
        (group,) = [g for g in groups if g.spans or g.others]
        return _triton_backend.norm_and_coefficient(group, norm_type, max_norm, eps,
                                                    skip_nonfinite)
    total = total_norm(tensors, groups, norm_type, foreach, process_group=process_group,
                       device=device)
    return total, clip_coefficient(total, max_norm, eps, skip_nonfinite)


def fused_group(tensors, groups, norm_type) -> Group | None:
    """The group whose norm kernel alone gives the float32 norm (and clip coefficient), or
    None: there must be one Triton group of dense spans, on the first tensor's device, and
    an order > 0 whose root the kernel takes exactly (1, 2, inf)."""
    working = [g for g in groups if g.spans or g.others]
    return working[0] if _fuses(tensors, working, norm_type) else None


def _fuses(tensors, groups, norm_type) -> bool:
    working = [g for g in groups if g.spans or g.others]
    return (len(tensors) > 0 and len(working) == 1 and working[0].backend == "triton" and not working[0].others
            and shows_nonfinite(norm_type) and working[0].device == tensors[0].device
            and kernels.fuses_coefficient(norm_type))


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
