"""Multi-tensor launch plans: the device tables that let one launch cover many tensors.

A plan describes a list of *spans* (base address, element count) of one dtype on one device.
Each span is cut into chunks of ``CHUNK`` elements; one Triton program handles one chunk. The
plan's single int64 device tensor holds, per launch::

    [ base address x S | element count x S | chunk -> span x C | chunk -> first element x C ]

followed by the reduction segments used by ``finalize`` (pairs of [start, end) partial indices)
and one int64 counter of arrivals (it only grows), with which the fused norm kernel's programs
find the last of them (see ``norm.norm_clip``).

Spans whose base address is 16-byte aligned and whose length is a multiple of the 16-byte
vector go to the ``aligned`` launch, which is compiled with divisibility hints so that the
streaming loops use 128-bit loads and stores; the others go to the ``unaligned`` launch. (A
long span that is not aligned is first cut into an unaligned head, an aligned body and an
unaligned tail, except in per-span plans.)
Both alignment classes are covered by *one* kernel launch (:class:`Streams`): programs
``[0, n_first)`` take chunks of the first class (aligned, when there are any) and the rest
take chunks of the unaligned class, each through its own specialized loop. Partials are
indexed by program id, so a reduction stays one buffer.

Plans are cached by ``(device, dtype, per-span segments, ((address, numel), ...))``: a second
call on the same gradients builds nothing and copies nothing from host to device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Sequence

import torch

# Elements per program. 64 Ki elements (256 KiB of float32) keeps a few hundred programs in
# flight for 100 MB of gradients while making the partials buffer (one value per chunk)
# negligible: 1 KiB of partials per 256 MiB of float32 gradients. Not yet tuned on a GPU.
CHUNK = 64 * 1024

# Bytes per vector access; the aligned specialization asserts this divisibility.
VECTOR_BYTES = 16

_CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: the spans of one alignment class."""

    aligned: bool
    table: torch.Tensor  # view into the plan table starting at this launch's rows
    n_spans: int
    n_chunks: int
    partial_offset: int  # index of this launch's first partial in the shared buffer


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Device tables for one (device, dtype) list of spans."""

    device: torch.device
    dtype: torch.dtype
    launches: tuple[Launch, ...]
    n_partials: int
    segments: torch.Tensor  # int64 [n_segments, 2]: [start, end) of partials per output
    n_segments: int
    counter: torch.Tensor  # int64 [1]: the fused norm's arrival count (only grows)
    # Device buffers that launches over this plan reuse, by name (see norm.norm_clip): made
    # once, so a steady-state clip allocates only what it returns.
    scratch: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @functools.cached_property
    def streams(self) -> "Streams":
        """The arguments of one launch over every span (see :class:`Streams`); made once."""
        if not self.launches:  # only empty spans: nothing to launch
            return Streams(False, self.counter, 0, 0, self.counter, 0, 0)
        first = self.launches[0]
        second = self.launches[1] if len(self.launches) > 1 else None
        if second is None:
            return Streams(first.aligned, first.table, first.n_spans, first.n_chunks,
                           first.table, 0, 0)
        return Streams(True, first.table, first.n_spans, first.n_chunks,
                       second.table, second.n_spans, second.n_chunks)


@dataclasses.dataclass(frozen=True)
class Streams:
    """One launch over both alignment classes of a plan.

    Program ``pid < first_chunks`` handles chunk ``pid`` of the first table (aligned when
    ``first_aligned``); the others handle chunk ``pid - first_chunks`` of the second table,
    which is always unaligned (and empty unless the first is aligned). The grid is
    ``n_programs``, and program ``pid`` owns partial ``pid``.
    """

    first_aligned: bool
    first_table: torch.Tensor
    first_spans: int
    first_chunks: int
    second_table: torch.Tensor
    second_spans: int
    second_chunks: int

    @property
    def n_programs(self) -> int:
        return self.first_chunks + self.second_chunks

    @functools.cached_property
    def args(self) -> tuple:
        """Positional kernel arguments, in the order the streaming kernels declare them."""
        return (self.first_table, self.first_spans, self.first_chunks,
                self.second_table, self.second_spans, self.second_chunks)


def is_vector_aligned(address: int, numel: int, element_size: int) -> bool:
    """Whether a span can take the 128-bit vectorized specialization."""
    vec = VECTOR_BYTES // element_size
    return address % VECTOR_BYTES == 0 and numel % vec == 0


# A span whose address or length is not a multiple of 16 bytes would run entirely in the scalar
# loop. From this many elements on, it is cut into an unaligned head (up to the first 16-byte
# boundary), an aligned body and an unaligned tail, so that all but < 2 vectors of it stream
# with 128-bit accesses; below it the extra span costs more than it saves.
SPLIT_MIN_ELEMENTS = 1024


def _split_misaligned(spans: Sequence[tuple[int, int]], element_size: int):
    """``spans`` with every long misaligned one cut into head, aligned body and tail."""
    vec = VECTOR_BYTES // element_size
    out = []
    for address, numel in spans:
        if (numel < SPLIT_MIN_ELEMENTS or address % element_size
                or is_vector_aligned(address, numel, element_size)):
            out.append((address, numel))
            continue
        head = (-address % VECTOR_BYTES) // element_size
        body = (numel - head) // vec * vec
        pieces = ((address, head), (address + head * element_size, body),
                  (address + (head + body) * element_size, numel - head - body))
        out.extend(piece for piece in pieces if piece[1])
    return out


def _build(
    spans: Sequence[tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
    per_span: bool,
) -> LaunchPlan:
    element_size = dtype.itemsize
    if not per_span:  # per-span plans keep one span per input: each is a finalize segment
        spans = _split_misaligned(spans, element_size)
    classes = {True: [], False: []}
    for index, (address, numel) in enumerate(spans):
        if numel > 0:
            classes[is_vector_aligned(address, numel, element_size)].append(index)

    rows: list[int] = []
    layout = []  # (aligned, table offset, n_spans, n_chunks, partial offset)
    span_partials = [(0, 0)] * len(spans)  # [start, end) of each span's partials
    n_partials = 0
    for aligned in (True, False):
        members = classes[aligned]
        if not members:
            continue
        chunk_span: list[int] = []
        chunk_start: list[int] = []
        for local, index in enumerate(members):
            numel = spans[index][1]
            n = -(-numel // CHUNK)
            span_partials[index] = (n_partials + len(chunk_span), n_partials + len(chunk_span) + n)
            chunk_span.extend([local] * n)
            chunk_start.extend(range(0, numel, CHUNK))
        layout.append((aligned, len(rows), len(members), len(chunk_span), n_partials))
        rows.extend(spans[i][0] for i in members)
        rows.extend(spans[i][1] for i in members)
        rows.extend(chunk_span)
        rows.extend(chunk_start)
        n_partials += len(chunk_span)

    segments_offset = len(rows)
    segment_rows = [(0, n_partials)]
    if per_span:
        segment_rows.extend(span_partials)
    for start, end in segment_rows:
        rows.extend((start, end))
    rows.append(0)  # the arrival counter

    # One host-to-device copy per plan; the plan is cached so steady state makes none.
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    launches = tuple(
        Launch(aligned, table[offset:], n_spans, n_chunks, partial_offset)
        for aligned, offset, n_spans, n_chunks, partial_offset in layout
    )
    segments = table[segments_offset:-1].view(-1, 2)
    return LaunchPlan(device, dtype, launches, n_partials, segments, len(segment_rows),
                      table[-1:])


class LRUCache:
    """A small thread-safe LRU cache of built objects, with hit/build counters (for tests and
    benchmarks)."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.builds = 0
        self.hits = 0
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, key, build):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
        if item is None:
            item = build()
            with self._lock:
                self.builds += 1
                self._items[key] = item
                while len(self._items) > self.maxsize:
                    self._items.popitem(last=False)
        return item

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.builds = 0
            self.hits = 0


# Plans launched while a CUDA graph was being captured. The graph holds their tables'
# addresses, so they are kept for the process's life, whatever the caches evict.
_captured: list = []


def keep_for_graphs(plan):
    """Keep ``plan`` (anything holding device tables) alive for good when the current stream
    is capturing a CUDA graph; returns it."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        if not any(kept is plan for kept in _captured):
            _captured.append(plan)
    return plan


class PlanCache(LRUCache):
    """Launch plans, keyed by (device, dtype, per_span, spans)."""

    def __init__(self, maxsize: int = _CACHE_SIZE):
        super().__init__(maxsize)

    def get(
        self,
        spans: Sequence[tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype,
        per_span: bool = False,
    ) -> LaunchPlan:
        return self.get_or_build((device, dtype, per_span, tuple(spans)),
                                 lambda: _build(spans, device, dtype, per_span))


plan_cache = PlanCache()
