"""Multi-tensor launch plans: the device tables that let one launch cover many tensors.

A plan describes a list of *spans* (base address, element count) of one dtype on one device.
Each span is cut into chunks of ``CHUNK`` elements; one Triton program handles one chunk. The
plan's single int64 device tensor holds, per launch::

    [ base address x S | element count x S | chunk -> span x C | chunk -> first element x C ]

followed by the reduction segments used by ``finalize`` (pairs of [start, end) partial
indices: the whole plan, then, for a row plan (``kernels.rows``), one per row) and, for a row
plan, the row of each span.

Spans whose base address is 16-byte aligned and whose length is a multiple of the 16-byte
vector go to the ``aligned`` stream, which is compiled with divisibility hints so that the
streaming loops use 128-bit loads and stores; the others go to the ``unaligned`` stream. (A
long span that is not aligned is first cut into an unaligned head, an aligned body and an
unaligned tail.) Both streams are covered by *one* kernel launch (:class:`Streams`): programs
``[0, n_first)`` take chunks of the first stream (aligned, when there are any) and the rest
take chunks of the unaligned stream, each through its own specialized loop. Partials are
indexed by program id, so a reduction stays one buffer.

A plan keeps what its launches need besides the tables, per CUDA stream (:meth:`LaunchPlan.
workspace`): the fused norm's arrival counter and its partials. Launches on one stream run one
after the other, so each finds the buffers free; launches on two streams never share them.
Every launch over a plan first calls :meth:`LaunchPlan.used_on_current_stream`: the first
one on a stream records that stream on the tables (``Tensor.record_stream``), so that freeing the
plan while a kernel still reads its tables there cannot hand their memory to another
allocation. Plans are not cached here: the
caller keeps them (tritonclip's one cache holds them with the layout they were built for).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Sequence

import torch
from triton.runtime.driver import driver

# Elements per program. 64 Ki elements (256 KiB of float32) keeps a few hundred programs in
# flight for 100 MB of gradients while making the partials buffer (one value per chunk)
# negligible: 1 KiB of partials per 256 MiB of float32 gradients. Not yet tuned on a GPU.
CHUNK = 64 * 1024

# Bytes per vector access; the aligned specialization asserts this divisibility.
VECTOR_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Launch:
    """The spans of one alignment class: a view of the plan table from this stream's rows."""

    aligned: bool
    table: torch.Tensor
    n_spans: int
    n_chunks: int


@dataclasses.dataclass(frozen=True)
class Streams:
    """One launch over both alignment classes of a plan.

    Program ``pid < first_chunks`` handles chunk ``pid`` of the first table (aligned when
    ``first_aligned``); the others handle chunk ``pid - first_chunks`` of the second table,
    which is always unaligned (and empty unless the first is aligned). The grid is
    ``n_programs``, and program ``pid`` owns partial ``pid``.
    """

    first_aligned: bool
    args: tuple  # (first table, spans, chunks, second table, spans, chunks): kernel order

    @property
    def n_programs(self) -> int:
        return self.args[2] + self.args[5]


@dataclasses.dataclass(eq=False)
class LaunchPlan:
    """Device tables for one (device, dtype) list of spans (or rows), and per-stream buffers."""

    device: torch.device
    dtype: torch.dtype
    launches: tuple[Launch, ...]
    n_partials: int
    segments: torch.Tensor  # int64 [n_segments, 2]: [start, end) of partials per output
    n_segments: int
    table: torch.Tensor  # the one device allocation every view above points into
    order: torch.Tensor | None = None  # row plans: int64 [n_rows], row of each span
    n_rows: int = 0
    # compiled kernels of this plan's launches (see launch.launch)
    kept: dict = dataclasses.field(default_factory=dict, repr=False)
    _workspaces: dict = dataclasses.field(default_factory=dict, repr=False)
    _counters: dict = dataclasses.field(default_factory=dict, repr=False)  # one per stream
    _streams: set = dataclasses.field(default_factory=set, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @functools.cached_property
    def streams(self) -> Streams:
        """The arguments of one launch over every span (see :class:`Streams`); made once."""
        if not self.launches:  # only empty spans: nothing to launch
            return Streams(False, (self.table, 0, 0, self.table, 0, 0))
        first = self.launches[0]
        second = self.launches[1] if len(self.launches) > 1 else None
        if second is None:
            return Streams(first.aligned, (first.table, first.n_spans, first.n_chunks,
                                           first.table, 0, 0))
        return Streams(True, (first.table, first.n_spans, first.n_chunks,
                              second.table, second.n_spans, second.n_chunks))

    def used_on_current_stream(self):
        """Note the stream the next launch runs on (returned): the first launch on a CUDA
        stream records it on the plan's tables (see the module docstring)."""
        stream = _current_stream(self.device)
        if stream not in self._streams:
            with self._lock:
                if self.device.type == "cuda" and stream not in self._streams:
                    self.table.record_stream(torch.cuda.current_stream(self.device))
                self._streams.add(stream)
        return stream

    def workspace(self, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
        """(partials, out, counter) of a fused norm launch on the current stream: ``n_partials``
        values and one more in ``acc_dtype``, 16-byte aligned, and the int64 arrival counter
        (it only grows; see ``norm._norm_kernel``). Made once per stream and dtype."""
        stream = self.used_on_current_stream()
        key = (stream, acc_dtype)
        buffers = self._workspaces.get(key)
        if buffers is None:
            with self._lock:
                buffers = self._workspaces.get(key)
                if buffers is None:
                    buffers = self._workspaces[key] = self._new_workspace(stream, acc_dtype)
        return buffers

    def _new_workspace(self, stream, acc_dtype):
        counter = self._counters.get(stream)
        if counter is None:
            counter = self._counters[stream] = torch.zeros(1, dtype=torch.int64,
                                                           device=self.device)
        pad = VECTOR_BYTES // acc_dtype.itemsize
        buffer = torch.empty(pad + self.n_partials, dtype=acc_dtype, device=self.device)
        return buffer[pad:], buffer[:1], counter


def _current_stream(device: torch.device):
    """The stream a launch on ``device`` runs on, as Triton reads it (None off CUDA, where the
    interpreter runs one launch at a time)."""
    if device.type != "cuda":
        return None
    return driver.active.get_current_stream(device.index)


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


def build_plan(spans: Sequence[tuple[int, int]], device: torch.device,
               dtype: torch.dtype) -> LaunchPlan:
    """The plan of ``spans`` ((address, numel) of ``dtype`` elements on ``device``): one
    host-to-device copy; keep the plan to launch over the same spans again."""
    element_size = dtype.itemsize
    spans = _split_misaligned(spans, element_size)
    classes = {True: [], False: []}
    for index, (address, numel) in enumerate(spans):
        if numel > 0:
            classes[is_vector_aligned(address, numel, element_size)].append(index)

    rows: list[int] = []
    layout = []  # (aligned, table offset, n_spans, n_chunks)
    n_partials = 0
    for aligned in (True, False):
        members = classes[aligned]
        if not members:
            continue
        chunk_span: list[int] = []
        chunk_start: list[int] = []
        for local, index in enumerate(members):
            numel = spans[index][1]
            chunk_span.extend([local] * -(-numel // CHUNK))
            chunk_start.extend(range(0, numel, CHUNK))
        layout.append((aligned, len(rows), len(members), len(chunk_span)))
        rows.extend(spans[i][0] for i in members)
        rows.extend(spans[i][1] for i in members)
        rows.extend(chunk_span)
        rows.extend(chunk_start)
        n_partials += len(chunk_span)
    segments_offset = len(rows)
    rows.extend((0, n_partials))

    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    launches = tuple(Launch(aligned, table[offset:], n_spans, n_chunks)
                     for aligned, offset, n_spans, n_chunks in layout)
    return LaunchPlan(device, dtype, launches, n_partials, table[segments_offset:].view(-1, 2),
                      1, table)
