"""From a list of gradients to disjoint memory spans, grouped by (device, dtype, layout).

Each distinct storage region is counted and written once: dense tensors (contiguous, or any
permutation of a contiguous block) are turned into [start, end) element intervals of their
storage; intervals that overlap (aliases, a parameter listed twice) or touch (DDP bucket views,
FSDP flat parameters) are merged into one span. Tensors that are not dense (a slice with a
step) cannot be described by one interval: they stay tensors and are handled by torch ops;
one that lies inside a dense span is dropped (its elements are already there), and one whose
memory range partly overlaps another gradient is rejected (see ``_strided_outside``).
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import weakref
from typing import NamedTuple

import torch

from . import _validate, kernels

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Span(NamedTuple):
    """``numel`` consecutive elements of one storage, from element ``start``."""

    base: int  # address of the storage's element 0
    start: int
    numel: int
    source: int  # position in the input list of a tensor of that storage
    whole: bool  # the span is exactly that tensor, which is contiguous: use it as is


@dataclasses.dataclass
class Layout:
    """How one (device, dtype, layout) group of a tensor list lies in memory. It refers to
    tensors by their position in the list, never holds one, and so can be cached."""

    device: torch.device
    dtype: torch.dtype
    backend: str  # "triton" or "torch"
    spans: list[Span]  # disjoint and nonempty
    others: list[int]  # positions of the non-dense or sparse tensors (torch ops)
    members: list[int]  # positions of all of this group's tensors
    # what is derived from the layout once: launch plans (by per_span), per-tensor tables
    derived: dict = dataclasses.field(default_factory=dict)


class Group:
    """A :class:`Layout` bound to the tensors of one call."""

    __slots__ = ("layout", "tensors", "_views")

    def __init__(self, layout: Layout, tensors: list[torch.Tensor]):
        self.layout = layout
        self.tensors = tensors
        self._views = None

    device = property(lambda self: self.layout.device)
    dtype = property(lambda self: self.layout.dtype)
    backend = property(lambda self: self.layout.backend)
    spans = property(lambda self: self.layout.spans)
    members = property(lambda self: self.layout.members)
    derived = property(lambda self: self.layout.derived)

    @property
    def others(self) -> list[torch.Tensor]:
        return [self.tensors[i] for i in self.layout.others]

    def addresses(self) -> list[tuple[int, int]]:
        """(address, numel) of every span: what a kernel launch plan is built from."""
        size = self.dtype.itemsize
        return [(s.base + s.start * size, s.numel) for s in self.spans]

    def views(self) -> list[torch.Tensor]:
        """Tensors over the spans, for torch ops (built once per call: norm and scale share
        them)."""
        if self._views is None:
            tensors = self.tensors
            self._views = [
                tensors[s.source] if s.whole
                else tensors[s.source].detach().as_strided((s.numel,), (1,), s.start)
                for s in self.spans
            ]
        return self._views


def dense_extent(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` consecutive elements of its storage."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter (which accepts CPU tensors), as the
    environment says at the call."""
    return kernels.config.interpreter_requested()


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype,
                    layout: torch.layout) -> str:
    """The backend for one group: see :func:`tritonclip.clip_grad_norm_` for the policy."""
    supported = dtype in TRITON_DTYPES and layout == torch.strided
    if requested == "torch" or (requested == "auto" and not (supported and device.type == "cuda")):
        return "torch"
    if requested == "auto":
        return "triton"
    if not supported:
        raise ValueError(
            f"backend='triton' handles dense float16/bfloat16/float32/float64 gradients; got "
            f"{dtype} with layout {layout} on {device}. Use backend='auto' to route them to torch."
        )
    if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
        return "triton"
    raise ValueError(
        f"backend='triton' cannot run on {device.type} tensors: Triton kernels need a CUDA "
        "device, or CPU tensors with the interpreter enabled (TRITON_INTERPRET=1 set before "
        "triton is imported)."
    )


# Layouts of recent tensor lists. Training clips the same parameters every step, and their
# gradients usually come back at the same addresses: the signature (a few attribute reads per
# tensor) then replaces the grouping, merging, checks and plan look-up of a new call.
_LAYOUT_CACHE_SIZE = 16
_layout_cache: collections.OrderedDict = collections.OrderedDict()


def group_tensors(tensors: list[torch.Tensor], requested_backend: str, name: str = "gradients",
                  purpose: str = "read") -> list[Group]:
    """Group ``tensors`` by (device, dtype, layout) into merged, deduplicated spans.

    Every group is checked (:func:`_validate.check_group`) and given its backend before this
    returns, so a ``TypeError``/``ValueError`` comes before anything is launched. A list with
    the same signature as a recent one (:func:`_signature`) reuses its layouts.
    """
    layouts = _same_tensors(tensors, requested_backend, purpose)
    if layouts is None:
        key = _signature(tensors, requested_backend, purpose)
        layouts = _layout_cache.get(key) if key is not None else None
        if layouts is None:
            layouts = _layouts(tensors, requested_backend, name, purpose)
            if key is not None:
                _remember(_layout_cache, key, layouts)
        else:
            _layout_cache.move_to_end(key)
        if key is not None:
            _remember_tensors(tensors, requested_backend, purpose, layouts)
    return [Group(layout, tensors) for layout in layouts]


def _remember(cache: collections.OrderedDict, key, value) -> None:
    cache[key] = value
    while len(cache) > _LAYOUT_CACHE_SIZE:
        cache.popitem(last=False)


# The fastest path: the very same tensor objects as a recent call (gradients kept between
# steps: bucket views, flat buffers, zero_grad(set_to_none=False)). Their identities
# (weak references, so nothing is kept alive), addresses and sizes are compared, about
# 0.15 us per tensor against the signature's 0.5 us; a tensor object whose memory moved
# (``.data =``, ``set_``) or was resized shows a new address or size. (One that was given
# other strides over the same memory in place, with ``as_strided_``, would not; nothing in
# training does that to a gradient.)
_by_identity: collections.OrderedDict = collections.OrderedDict()
_DEREF = weakref.ref.__call__


def _same_tensors(tensors, requested_backend, purpose):
    key = (requested_backend, purpose, interpreter_enabled(), tuple(map(id, tensors)))
    entry = _by_identity.get(key)
    if entry is None:
        return None
    refs, pointers, numels, layouts = entry
    if not (all(map(operator.is_, map(_DEREF, refs), tensors))
            and tuple(map(torch.Tensor.data_ptr, tensors)) == pointers
            and tuple(map(torch.Tensor.numel, tensors)) == numels):
        del _by_identity[key]
        return None
    _by_identity.move_to_end(key)
    return layouts


def _remember_tensors(tensors, requested_backend, purpose, layouts) -> None:
    key = (requested_backend, purpose, interpreter_enabled(), tuple(map(id, tensors)))
    _remember(_by_identity, key, (tuple(map(weakref.ref, tensors)),
                                  tuple(map(torch.Tensor.data_ptr, tensors)),
                                  tuple(map(torch.Tensor.numel, tensors)), layouts))


def _signature(tensors: list[torch.Tensor], requested_backend: str, purpose: str):
    """Everything the layouts depend on, or None for lists that are not cached (sparse).

    Addresses, sizes, storage offsets (which storage a tensor is in), dtypes, devices and
    contiguity; shape and strides of non-contiguous tensors; and what the checks and the
    backend choice depend on besides.
    """
    try:
        pointers = tuple(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:  # sparse tensors have no data pointer
        return None
    contiguous = tuple(map(torch.Tensor.is_contiguous, tensors))
    strided = tuple((i, tensors[i].shape, tensors[i].stride())
                    for i, c in enumerate(contiguous) if not c)
    return (requested_backend, purpose, interpreter_enabled(), pointers,
            tuple(map(torch.Tensor.numel, tensors)),
            tuple(map(torch.Tensor.storage_offset, tensors)),
            tuple(map(_DTYPE, tensors)), tuple(map(_DEVICE, tensors)), contiguous, strided)


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def _layouts(tensors, requested_backend, name, purpose) -> list[Layout]:
    buckets: dict[tuple, list[int]] = {}
    for index, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype, t.layout), []).append(index)
    layouts = []
    for (device, dtype, layout), indices in buckets.items():
        members = [tensors[i] for i in indices]
        _validate.check_group(device, dtype, layout, members, indices, name, purpose)
        backend = resolve_backend(requested_backend, device, dtype, layout)
        if layout == torch.strided:
            spans, others = _merge(members, indices, dtype.itemsize)
        else:
            spans, others = [], _unique(members, indices)
        layouts.append(Layout(device, dtype, backend, spans, others, indices))
    return layouts


def clear_layout_cache() -> None:
    _layout_cache.clear()
    _by_identity.clear()


def _unique(tensors: list[torch.Tensor], positions: list[int]) -> list[int]:
    """Positions of the sparse tensors, each tensor once."""
    seen, result = set(), []
    for t, position in zip(tensors, positions):
        if id(t) not in seen:
            seen.add(id(t))
            result.append(position)
    return result


def _merge(tensors: list[torch.Tensor], positions: list[int], itemsize: int):
    """(merged dense spans, non-dense tensors) of one group; see the module docstring."""
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
    spans: list[Span] = []
    for base, start, end, position, contiguous in intervals:
        last = spans[-1] if spans else None
        if last is not None and last.base == base and start <= last.start + last.numel:
            # Overlapping or touching: extend the last span (a contained one changes nothing).
            if end > last.start + last.numel:
                spans[-1] = Span(base, last.start, end - last.start, last.source, False)
        else:
            spans.append(Span(base, start, end - start, position, contiguous))
    return spans, _strided_outside(spans, strided)


def _strided_outside(spans: list[Span], strided: list[tuple[int, torch.Tensor]]):
    """The non-dense tensors whose elements no dense span already covers.

    A non-dense view that lies inside a dense span (``g`` and ``g[::2]``) is dropped: its
    elements are counted and scaled with the span. One whose memory range partly overlaps a
    span or another non-dense view cannot be counted once without an element-wise check, and
    raises ``ValueError`` (before anything is launched) rather than count elements twice.
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
        overlapping = [s for s in spans
                       if s.base == base and s.start < end and start < s.start + s.numel]
        inside = overlapping and overlapping[0].start <= start
        if inside and end <= overlapping[0].start + overlapping[0].numel:
            continue  # inside one dense span
        clash = overlapping or [k for k in kept if k[0] == base and k[1] < end and start < k[2]]
        if clash:
            raise ValueError(
                f"gradient {position} (shape {tuple(t.shape)}, stride {t.stride()}) is a "
                "non-contiguous view whose memory range overlaps another gradient's: its "
                "elements cannot be counted once. Pass contiguous gradients, or the whole "
                "tensor they are views of."
            )
        kept.append((base, start, end, position))
    return [k[3] for k in kept]


def span_of_each(tensors: list[torch.Tensor], positions: list[int]
                 ) -> tuple[list[Span], list[int | None], bool]:
    """Per-tensor spans for per-tensor norms (``positions``: the tensors' places in the list
    that the spans' ``source`` refers to).

    Returns (unique dense spans, index of each tensor's span or None when the tensor is empty
    or not dense, whether the unique spans are pairwise disjoint).
    """
    index_of: dict[tuple[int, int, int], int] = {}
    spans = []
    which: list[int | None] = []
    for t, position in zip(tensors, positions):
        if t.numel() == 0 or t.layout != torch.strided or not dense_extent(t):
            which.append(None)
            continue
        base = t.data_ptr() - t.storage_offset() * t.element_size()
        key = (base, t.storage_offset(), t.numel())
        if key not in index_of:
            index_of[key] = len(spans)
            spans.append(Span(base, t.storage_offset(), t.numel(), position, t.is_contiguous()))
        which.append(index_of[key])
    ordered = sorted(spans, key=lambda s: (s.base, s.start))
    disjoint = all(
        a.base != b.base or a.start + a.numel <= b.start for a, b in zip(ordered, ordered[1:])
    )
    return spans, which, disjoint
