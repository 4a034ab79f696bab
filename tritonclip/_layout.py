"""From a list of tensors to the groups the backends work on: built once per list, cached by
the core.

*Spans* (global norms, scaling, clamping): each distinct storage region is counted and
written once. Dense tensors (contiguous, or any permutation of a contiguous block) are turned
into [start, end) element intervals of their storage; intervals that overlap (aliases, a
parameter listed twice) or touch (DDP bucket views, FSDP flat parameters) are merged into one
span. Tensors that are not dense (a slice with a step) cannot be described by one interval:
they stay tensors, handled by torch ops; one that lies inside a dense span is dropped (its
elements are already there), and one whose memory range partly overlaps another gradient is
rejected (see ``_strided_outside``).

*Rows* (per-tensor and unit-wise norms): each distinct tensor, whole or as its first-dimension
slices, scaled by its own coefficient; distinct tensors must not share memory.

Every group gets its backend here (:func:`choose_backend`), and every check of the tensors
runs here, before anything is launched. A layout records the problems it found per purpose
(reading, scaling, clamping), so that a cached layout raises for a call that modifies the
gradients what a fresh one would.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ._backend import Backend, GroupLayout, RowGroup, Span
from ._torch_backend import TORCH
from ._triton_backend import TRITON, dense_extent

_log = logging.getLogger("tritonclip")

PURPOSES = ("read", "scale", "clamp")


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype,
                   layout: torch.layout) -> tuple[Backend, str]:
    """(backend, reason) for gradients of one kind; see :func:`tritonclip.clip_grad_norm_` for
    the policy: ``"auto"`` runs Triton on CUDA where it can, ``"triton"`` raises
    ``ValueError`` where it cannot, ``"torch"`` always runs torch ops."""
    if requested == "torch":
        return TORCH, "backend='torch' was requested"
    why_not = TRITON.unsupported(device, dtype, layout)
    if requested == "triton":
        if why_not is not None:
            raise ValueError(f"backend='triton' cannot take {dtype} gradients with layout "
                             f"{layout} on {device}: {why_not}. Use backend='auto' to route "
                             "them to torch.")
        return TRITON, "backend='triton' was requested"
    if why_not is None and device.type == "cuda":
        if rocm():
            return TORCH, ROCM_REASON
        return TRITON, "backend='auto' on a CUDA device"
    return TORCH, why_not or "backend='auto' runs the Triton kernels on CUDA devices only"


# On a ROCm build of torch the device type is "cuda" too. The kernels compile for gfx90a and
# gfx942 (tests/codegen.py checks their AMDGCN in CI) but have never run on AMD hardware, so
# "auto" keeps to torch's ops there, which are known to work; "triton" is the opt-in.
ROCM_REASON = ("backend='auto' runs torch ops on ROCm: the Triton kernels are compile-checked "
               "for gfx90a and gfx942 but not hardware-tested there (backend='triton' opts in)")


def rocm() -> bool:
    """Whether this torch is a ROCm (HIP) build."""
    return getattr(torch.version, "hip", None) is not None


@dataclasses.dataclass(eq=False)
class Problem:
    """A check that failed, raised when a call of one of ``purposes`` uses the layout."""

    purposes: tuple[str, ...]
    error: type
    message: str  # with "{name}" where the tensor list's name goes


@dataclasses.dataclass(eq=False)
class SpanLayout:
    groups: list[GroupLayout]
    problems: list[Problem]  # checked by the core at every use (_core.check)
    float64: bool  # whether a float64 (or complex128) tensor is in the list


@dataclasses.dataclass(eq=False)
class RowLayout:
    groups: list[RowGroup]
    # for each input position: (group index, item index), or None (an empty tensor)
    where: list[tuple[int, int] | None]
    disjoint: bool  # the distinct tensors share no memory
    problems: list[Problem]


def _check_kind(device, dtype, layout, members, positions, problems) -> None:
    """Problems of one (device, dtype, layout) kind of tensors."""
    first = f"{{name}}[{positions[0]}]"
    if device.type == "meta":
        problems.append(Problem(PURPOSES, ValueError,
                                f"{first} is on the meta device (shape "
                                f"{tuple(members[0].shape)}): it has no values to clip"))
    if not (dtype.is_floating_point or dtype.is_complex):
        problems.append(Problem(PURPOSES, TypeError,
                                f"{first} has dtype {dtype}; gradients are floating point"))
    if dtype.is_complex:
        problems.append(Problem(("clamp",), TypeError,
                                f"{first} is {dtype}: complex values cannot be clamped"))
    has_overlap = getattr(torch, "_debug_has_internal_overlap", None)
    for position, t in zip(positions, members):
        if layout == torch.strided:
            # Only a non-contiguous tensor can map two elements to one address.
            if has_overlap is not None and not t.is_contiguous() and has_overlap(t) == 1:
                problems.append(Problem(
                    ("scale", "clamp"), ValueError,
                    f"{{name}}[{position}] (shape {tuple(t.shape)}, stride {t.stride()}) has "
                    "elements that share memory (an expanded view): it cannot be modified in "
                    "place"))
        elif t.is_sparse and not t.is_coalesced():
            problems.append(Problem(
                ("clamp",), ValueError,
                f"{{name}}[{position}] is an uncoalesced sparse tensor: clamping its duplicate "
                "entries one by one would not bound their sum; call .coalesce() first"))


def spans(tensors: list[torch.Tensor], requested: str) -> SpanLayout:
    """The span layout of ``tensors``: one group per (device, dtype, backend), dense spans
    merged, the rest loose (in a torch group)."""
    kinds: dict[tuple, list[int]] = {}
    for index, t in enumerate(tensors):
        kinds.setdefault((t.device, t.dtype, t.layout), []).append(index)
    problems: list[Problem] = []
    groups = []
    for (device, dtype, layout), positions in kinds.items():
        members = [tensors[i] for i in positions]
        _check_kind(device, dtype, layout, members, positions, problems)
        if problems and problems[-1].purposes == PURPOSES:
            continue  # no backend for meta tensors or integer "gradients"
        backend, reason = choose_backend(requested, device, dtype, layout)
        if layout == torch.strided:
            dense, loose = _merge(members, positions, dtype.itemsize, problems)
        else:
            dense, loose = [], _unique(members, positions)
        made = []
        if dense:
            made.append(GroupLayout(device, dtype, backend, reason, dense, []))
        if loose:  # not one dense block: torch ops in every backend
            made.append(GroupLayout(device, dtype, TORCH, "not one dense block of memory",
                                    [], loose))
        for group in made:
            if group.backend is TORCH and device.type == "cuda":
                _log.debug("%s gradients on %s: torch ops (%s)", dtype, device, group.reason)
        groups += made
    float64 = any(t.dtype in (torch.float64, torch.complex128) for t in tensors)
    return SpanLayout(groups, problems, float64)


def _unique(tensors: list[torch.Tensor], positions: list[int]) -> list[int]:
    """Positions of the sparse tensors, each tensor once."""
    seen, result = set(), []
    for t, position in zip(tensors, positions):
        if id(t) not in seen:
            seen.add(id(t))
            result.append(position)
    return result


def _merge(tensors, positions, itemsize, problems):
    """(merged dense spans, positions of the non-dense tensors) of one kind of tensors."""
    intervals = []
    strided = []
    for index, t in enumerate(tensors):
        numel = t.numel()
        if numel == 0:
            continue
        contiguous = t.is_contiguous()
        if contiguous or dense_extent(t):
            start = t.storage_offset()
            base = t.data_ptr() - start * itemsize
            intervals.append((base, start, start + numel, positions[index], contiguous))
        else:
            strided.append((positions[index], t))
    intervals.sort()
    merged: list[Span] = []
    for base, start, end, position, contiguous in intervals:
        last = merged[-1] if merged else None
        if last is not None and last.base == base and start <= last.start + last.numel:
            # Overlapping or touching: extend the last span (a contained one changes nothing).
            if end > last.start + last.numel:
                merged[-1] = Span(base, last.start, end - last.start, last.source, False)
        else:
            merged.append(Span(base, start, end - start, position, contiguous))
    return merged, _strided_outside(merged, strided, problems)


def _strided_outside(merged: list[Span], strided: list[tuple[int, torch.Tensor]], problems):
    """The non-dense tensors whose elements no dense span already covers.

    A non-dense view that lies inside a dense span (``g`` and ``g[::2]``) is dropped: its
    elements are counted and scaled with the span. One whose memory range partly overlaps a
    span or another non-dense view cannot be counted once without an element-wise check: a
    problem for every purpose, raised before anything is launched, rather than count elements
    twice.
    """
    kept: list[tuple[int, int, int, int]] = []
    seen = set()
    for position, t in strided:
        key = (t.data_ptr(), t.shape, t.stride())
        if key in seen:
            continue
        seen.add(key)
        start = t.storage_offset()
        end = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
        base = t.data_ptr() - start * t.element_size()
        overlapping = [s for s in merged
                       if s.base == base and s.start < end and start < s.start + s.numel]
        inside = overlapping and overlapping[0].start <= start
        if inside and end <= overlapping[0].start + overlapping[0].numel:
            continue  # inside one dense span
        if overlapping or [k for k in kept if k[0] == base and k[1] < end and start < k[2]]:
            problems.append(Problem(
                PURPOSES, ValueError,
                f"gradient {position} (shape {tuple(t.shape)}, stride {t.stride()}) is a "
                "non-contiguous view whose memory range overlaps another gradient's: its "
                "elements cannot be counted once. Pass contiguous gradients, or the whole "
                "tensor they are views of."))
            continue
        kept.append((base, start, end, position))
    return [k[3] for k in kept]


# -- rows -----------------------------------------------------------------------------------

def rows_of(t: torch.Tensor, unitwise: bool) -> int:
    """Rows of a tensor: its first dimension for unit-wise norms of a tensor of 2+ dims, else 1."""
    return t.shape[0] if unitwise and t.dim() > 1 else 1


def _describe(t: torch.Tensor):
    if t.layout != torch.strided:
        return (id(t), t.layout)
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses that a strided tensor's elements span."""
    start = t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return start, start + (last + 1) * t.element_size()


def _overlap(grads: list[torch.Tensor], distinct: list[int]) -> tuple[int, int] | None:
    """Two distinct gradients that share memory, or None."""
    extents = sorted((*_extent(grads[i]), i) for i in distinct
                     if grads[i].layout == torch.strided and grads[i].device.type != "meta")
    for (_, end_a, a), (start_b, _, b) in zip(extents, extents[1:]):
        if start_b < end_a:
            return a, b
    return None


def _kernel_ready(g: torch.Tensor, p: torch.Tensor | None, n_rows: int) -> bool:
    """Whether the Triton row kernels can read ``g`` (and ``p``) as rows: contiguous, or, for
    a whole-tensor row, dense in any order."""
    if not (g.is_contiguous() or (n_rows == 1 and dense_extent(g))):
        return False
    return p is None or (p.is_contiguous() and p.dtype in (torch.float16, torch.bfloat16,
                                                           torch.float32, torch.float64)
                         and p.device == g.device and p.layout == torch.strided)


def rows(grads: list[torch.Tensor], params: list[torch.Tensor] | None, unitwise: bool,
         requested: str) -> RowLayout:
    """The row layout of ``grads`` (with their ``params`` for AGC)."""
    problems: list[Problem] = []
    seen: dict = {}
    where: list[tuple[int, int] | None] = [None] * len(grads)
    distinct = []
    item_of: dict[int, int] = {}  # position -> the first position of the same tensor
    for i, g in enumerate(grads):
        if params is not None and params[i].shape != g.shape:
            problems.append(Problem(PURPOSES, ValueError,
                                    f"parameters[{i}] has shape {tuple(params[i].shape)} but "
                                    f"its gradient has shape {tuple(g.shape)}"))
        if g.numel() == 0:
            continue
        key = _describe(g)
        if key in seen:
            item_of[i] = seen[key]
            continue
        seen[key] = item_of[i] = i
        distinct.append(i)
    shared = _overlap(grads, distinct)
    if shared is not None:
        a, b = shared
        problems.append(Problem(
            ("scale",), ValueError,
            f"{{name}}[{a}] and {{name}}[{b}] share memory: each gradient is scaled by its own "
            "coefficient, so overlapping gradients cannot both be clipped. Pass each storage "
            "region once."))

    buckets: dict[tuple, list[int]] = {}
    reasons: dict[tuple, str] = {}
    for i in distinct:
        g = grads[i]
        p = params[i] if params is not None else None
        before = len(problems)
        _check_kind(g.device, g.dtype, g.layout, [g], [i], problems)
        if p is not None and g.layout != torch.strided:
            problems.append(Problem(PURPOSES, TypeError,
                                    f"{{name}}[{i}] is a sparse gradient: unit-wise clipping "
                                    "needs a dense gradient"))
        if p is not None and not p.dtype.is_floating_point:
            problems.append(Problem(PURPOSES, TypeError,
                                    f"parameters[{i}] has dtype {p.dtype}; expected floating "
                                    "point"))
        if any(problem.purposes == PURPOSES for problem in problems[before:]):
            continue
        backend, reason = choose_backend(requested, g.device, g.dtype, g.layout)
        if backend is TRITON and not _kernel_ready(g, p, rows_of(g, unitwise)):
            backend, reason = TORCH, "not contiguous, or a parameter the kernels cannot read"
        key = (g.device, g.dtype, None if p is None else p.dtype, backend)
        buckets.setdefault(key, []).append(i)
        reasons[key] = reason

    groups = []
    for (device, dtype, param_dtype, backend), members in buckets.items():
        n_rows = [rows_of(grads[i], unitwise) for i in members]
        groups.append(RowGroup(device, dtype, param_dtype, backend,
                               reasons[(device, dtype, param_dtype, backend)], members, n_rows))
    for gi, group in enumerate(groups):
        for ii, position in enumerate(group.items):
            where[position] = (gi, ii)
    for i, first in item_of.items():
        where[i] = where[first]
    return RowLayout(groups, where, shared is None, problems)
