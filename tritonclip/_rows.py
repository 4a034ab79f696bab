"""Per-row norms and per-row scaling, for clipping that gives each tensor (or each row of a
tensor) its own coefficient: :func:`tritonclip.clip_grad_norm_per_tensor_` (one row per
tensor) and :func:`tritonclip.clip_grad_agc_` (rows = first-dimension slices).

Tensors are grouped by (device, gradient dtype, parameter dtype, backend). A Triton group holds
contiguous tensors only: its rows are one :class:`~tritonclip.kernels.RowPlan`, whose norms
take two launches (partials, finalize) and whose scaling takes one. Everything else (CPU
without the interpreter, non-contiguous or sparse gradients) runs torch ops per tensor.
Layouts are cached by a signature of the tensor lists, as in ``_groups``.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _dispatch, _torch_backend, _validate, kernels
from ._groups import TRITON_DTYPES, interpreter_enabled, resolve_backend

_CACHE_SIZE = 16
_cache = kernels.LRUCache(_CACHE_SIZE)


@dataclasses.dataclass
class RowGroup:
    """Items (distinct tensors) of one (device, dtype, param dtype, backend) group."""

    device: torch.device
    dtype: torch.dtype
    param_dtype: torch.dtype | None
    backend: str
    items: list[int]  # position of each distinct item in the input list
    n_rows: list[int]  # rows of each item
    grad_rows: kernels.RowPlan | None = None  # Triton groups only
    param_rows: kernels.RowPlan | None = None  # Triton groups with parameters only
    cache: dict = dataclasses.field(default_factory=dict)  # derived device tensors

    @property
    def total_rows(self) -> int:
        return sum(self.n_rows)


@dataclasses.dataclass
class RowLayout:
    groups: list[RowGroup]
    # for each input position: (group index, item index), or None (empty tensor)
    where: list[tuple[int, int] | None]


def rows_of(t: torch.Tensor, unitwise: bool) -> int:
    """Rows of a tensor: its first dimension for unit-wise norms of a tensor of 2+ dims, else 1."""
    return t.shape[0] if unitwise and t.dim() > 1 else 1


def layout(grads: list[torch.Tensor], params: list[torch.Tensor] | None, unitwise: bool,
           requested_backend: str) -> RowLayout:
    """The (cached) row layout of ``grads`` (with their ``params`` for AGC). Checks every
    tensor and builds every plan before returning, so errors come before any launch."""
    if any(t.layout != torch.strided for t in grads + (params or [])):
        # A sparse tensor has no address to key a cache by (an id can be reused).
        return _build(grads, params, unitwise, requested_backend)
    key = _signature(grads, params, unitwise, requested_backend)
    return _cache.get_or_build(key, lambda: _build(grads, params, unitwise, requested_backend))


def clear_cache() -> None:
    _cache.clear()


def _describe(t: torch.Tensor):
    if t.layout != torch.strided:  # within one call only: such lists are never cached
        return (id(t), t.layout)
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _signature(grads, params, unitwise, requested_backend):
    return (requested_backend, unitwise, interpreter_enabled(), tuple(map(_describe, grads)),
            None if params is None else tuple(map(_describe, params)))


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses that a strided tensor's elements span."""
    start = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return start, start + (last + 1) * t.element_size()


def _check_disjoint(grads: list[torch.Tensor], distinct: list[int], name: str) -> None:
    """Distinct gradients must not share memory: each is scaled by its own coefficient."""
    spans = sorted((*_extent(grads[i]), i) for i in distinct
                   if grads[i].layout == torch.strided and grads[i].device.type != "meta")
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(
                f"{name}[{a}] and {name}[{b}] share memory: each gradient is scaled by its own "
                "coefficient, so overlapping gradients cannot both be clipped. Pass each "
                "storage region once."
            )


def _build(grads, params, unitwise, requested_backend) -> RowLayout:
    name = "gradients"
    seen: dict = {}
    where: list[tuple[int, int] | None] = [None] * len(grads)
    distinct = []
    item_of: dict[int, int] = {}  # position of a distinct item -> its first position
    for i, g in enumerate(grads):
        if params is not None and params[i].shape != g.shape:
            raise ValueError(f"parameters[{i}] has shape {tuple(params[i].shape)} but its "
                             f"gradient has shape {tuple(g.shape)}")
        if g.numel() == 0:
            continue
        key = _describe(g)
        if key in seen:
            item_of[i] = seen[key]
            continue
        seen[key] = i
        item_of[i] = i
        distinct.append(i)
    _check_disjoint(grads, distinct, name)

    buckets: dict[tuple, list[int]] = {}
    for i in distinct:
        g = grads[i]
        p = params[i] if params is not None else None
        _validate.check_group(g.device, g.dtype, g.layout, [g], [i], name, "scale")
        if p is not None and g.layout != torch.strided:
            raise TypeError(f"{name}[{i}] is a sparse gradient: unit-wise clipping needs a dense "
                            "gradient")
        if p is not None and not p.dtype.is_floating_point:
            raise TypeError(f"parameters[{i}] has dtype {p.dtype}; expected floating point")
        backend = resolve_backend(requested_backend, g.device, g.dtype, g.layout)
        if backend == "triton" and not _kernel_ready(g, p):
            backend = "torch"  # not contiguous, or a parameter the kernels cannot read
        key = (g.device, g.dtype, None if p is None else p.dtype, backend)
        buckets.setdefault(key, []).append(i)

    groups = []
    for (device, dtype, param_dtype, backend), members in buckets.items():
        n_rows = [rows_of(grads[i], unitwise) for i in members]
        group = RowGroup(device, dtype, param_dtype, backend, members, n_rows)
        if backend == "triton":
            group.grad_rows = kernels.row_plan_cache.get(_entries(grads, members, n_rows),
                                                         device, dtype)
            if params is not None:
                group.param_rows = kernels.row_plan_cache.get(
                    _entries(params, members, n_rows), device, param_dtype)
        groups.append(group)
    for gi, group in enumerate(groups):
        for ii, position in enumerate(group.items):
            where[position] = (gi, ii)
    for i, first in item_of.items():
        where[i] = where[first]
    return RowLayout(groups, where)


def _kernel_ready(g: torch.Tensor, p: torch.Tensor | None) -> bool:
    if not g.is_contiguous():
        return False
    if p is None:
        return True
    return (p.is_contiguous() and p.dtype in TRITON_DTYPES and p.device == g.device
            and p.layout == torch.strided)


def _entries(tensors, members, n_rows):
    return [(tensors[i].data_ptr(), r, tensors[i].numel() // r) for i, r in zip(members, n_rows)]


def compute_dtype(group: RowGroup, norm_type: float) -> torch.dtype:
    """Accumulation dtype of a group's norms and coefficients: float64 if a float64 tensor
    takes part, float32 otherwise."""
    dtypes = [group.dtype] + ([group.param_dtype] if group.param_dtype is not None else [])
    accs = {_dispatch.accumulation_dtype(d, norm_type) for d in dtypes}
    return torch.float64 if torch.float64 in accs else torch.float32


def row_norms(group: RowGroup, tensors: list[torch.Tensor], norm_type: float,
              use_params: bool, foreach: bool | None) -> torch.Tensor:
    """Norm of every row of the group (items in order, rows in order), 1-D, compute dtype."""
    acc = compute_dtype(group, norm_type)
    if group.backend == "triton":
        rows = kernels.keep_for_graphs(group.param_rows if use_params else group.grad_rows)
        partials = kernels.norm_partials(rows.plan, norm_type)
        power = kernels.finalize(rows.plan, partials, norm_type)[1:]
        return _torch_backend.root(power.to(acc), norm_type)
    members = [tensors[i] for i in group.items]
    if all(r == 1 for r in group.n_rows):  # whole tensors: torch's multi-tensor norms
        return _torch_backend.tensor_norms(members, norm_type, acc, group.device, foreach)
    # A general p is summed naively by torch: accumulate it in float64 (as _torch_backend).
    dtype = acc if norm_type in (1.0, 2.0) or norm_type == float("inf") else torch.float64
    parts = [torch.linalg.vector_norm(t.reshape(r, -1), norm_type, dim=1, dtype=dtype)
             for t, r in zip(members, group.n_rows)]
    return torch.cat(parts).to(acc)


def scale_rows_(group: RowGroup, grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply each row of the group's gradients in place by its coefficient (rows whose
    coefficient is >= 1 are left untouched)."""
    if group.backend == "triton":
        kernels.scale_each_(kernels.keep_for_graphs(group.grad_rows), coef)
        return
    members = [grads[i] for i in group.items]
    if (all(r == 1 for r in group.n_rows) and group.dtype in (torch.float32, torch.float64)
            and all(g.layout == torch.strided for g in members)):
        # Whole tensors of a dtype the coefficient needs no rounding for: one foreach call
        # (x * 1 is x bit for bit, so rows that are not clipped stay as they are).
        coef = torch.where(coef >= 1, torch.ones_like(coef), coef).to(group.dtype)
        torch._foreach_mul_(members, list(coef.unbind()))
        return
    offset = 0
    for i, r in zip(group.items, group.n_rows):
        g = grads[i]
        c = coef[offset:offset + r]
        offset += r
        if g.is_sparse:
            _torch_backend.mul_(g, c.reshape(()))
            continue
        c = c.reshape((r,) + (1,) * (g.dim() - 1)) if r > 1 else c.reshape(())
        # rows with a coefficient >= 1 stay bit for bit (as the kernel leaves them)
        c = torch.where(c >= 1, torch.ones_like(c), c)
        if g.dtype in (torch.float16, torch.bfloat16):
            g.copy_(g.float() * c)
        else:
            g.mul_(c.to(g.dtype) if not g.dtype.is_complex else c)


def gather_items(layout_: RowLayout, values: list[torch.Tensor], n_inputs: int,
                 device: torch.device) -> torch.Tensor:
    """Per-input float32 values from per-group item values (one row per item); 0 for empty
    inputs. One group without duplicates or empty tensors needs no gather at all."""
    groups = layout_.groups
    if (len(groups) == 1 and len(groups[0].items) == n_inputs
            and groups[0].items == list(range(n_inputs))):
        return _dispatch.move(values[0], device).float()
    out = torch.zeros(n_inputs, dtype=torch.float32, device=device)
    for gi, (group, value) in enumerate(zip(groups, values)):
        targets = [i for i, w in enumerate(layout_.where) if w is not None and w[0] == gi]
        sources = [layout_.where[i][1] for i in targets]
        index = group.cache.get(("gather", str(device)))
        if index is None:
            index = (torch.tensor(targets, device=device), torch.tensor(sources, device=value.device))
            group.cache[("gather", str(device))] = index
        out[index[0]] = _dispatch.move(value[index[1]], device).float()
    return out


