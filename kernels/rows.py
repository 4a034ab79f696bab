"""Launch plans whose spans are the *rows* of tensors: for per-row and per-tensor norms.

A row is ``row_len`` consecutive elements of a dense tensor: the first-dimension slices of a
weight (unit-wise norms, AGC) or the whole tensor (per-tensor norms, ``n_rows = 1``). The plan
is an ordinary :class:`~.plan.LaunchPlan` with one span per row and one finalize segment per
row, so ``norm_partials`` and ``finalize`` give every row's norm in two launches, and
``scale.scale_each_`` scales every row by its own coefficient in one.

The table is built with vectorized torch ops from one (address, n_rows, row_len) entry per
tensor, never with a Python loop over rows (an embedding has 50k of them). Its layout is
plan.py's, with the row index of each span, in launch order, appended (``order``)::

    [ launch rows (as plan.py) | segments: (0, P), then [start, end) per row | order x R ]
"""

from __future__ import annotations

from typing import Sequence

import torch

from .plan import CHUNK, VECTOR_BYTES, Launch, LaunchPlan


def _arange_within(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, position within owner) for ``sum(counts)`` items laid out owner by owner."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel()) - first[owner]


def build_row_plan(entries: Sequence[tuple[int, int, int]], device: torch.device,
                   dtype: torch.dtype) -> LaunchPlan:
    """The plan of the rows of tensors given as (address, n_rows, row_len), rows numbered
    tensor by tensor. Every entry must have n_rows >= 1 and row_len >= 1. The plan's
    ``order`` maps each span, in launch order, to its row; finalize segment ``1 + r`` is
    row ``r``."""
    size = dtype.itemsize
    vec = VECTOR_BYTES // size
    table = torch.tensor(list(entries), dtype=torch.int64).view(-1, 3)
    address, n_rows, row_len = table.unbind(1)
    tensor_of_row, local = _arange_within(n_rows)
    numel = row_len[tensor_of_row]
    row_address = address[tensor_of_row] + local * numel * size
    chunks = (numel + CHUNK - 1) // CHUNK
    aligned = (row_address % VECTOR_BYTES == 0) & (numel % vec == 0)
    total_rows = int(tensor_of_row.numel())

    parts, layout, orders = [], [], []
    seg_start = torch.zeros(total_rows, dtype=torch.int64)
    seg_end = torch.zeros(total_rows, dtype=torch.int64)
    rows_offset = n_partials = 0
    for flag in (True, False):  # plan.py's order: the aligned stream first
        members = torch.nonzero(aligned == flag).flatten()
        if members.numel() == 0:
            continue
        member_chunks = chunks[members]
        chunk_span, within = _arange_within(member_chunks)
        ends = torch.cumsum(member_chunks, 0)
        seg_start[members] = n_partials + ends - member_chunks
        seg_end[members] = n_partials + ends
        n_chunks = int(chunk_span.numel())
        layout.append((flag, rows_offset, int(members.numel()), n_chunks))
        parts += [row_address[members], numel[members], chunk_span, within * CHUNK]
        orders.append(members)
        rows_offset += 2 * int(members.numel()) + 2 * n_chunks
        n_partials += n_chunks
    segments = torch.cat([torch.tensor([0, n_partials]),
                          torch.stack([seg_start, seg_end], 1).flatten()])
    # One host-to-device copy per plan, as plan.py.
    flat = torch.cat(parts + [segments] + orders).to(device, non_blocking=True)
    launches = tuple(Launch(flag, flat[offset:], spans, n_chunks)
                     for flag, offset, spans, n_chunks in layout)
    n_segments = 1 + total_rows
    segments_end = rows_offset + 2 * n_segments
    return LaunchPlan(device, dtype, launches, n_partials,
                      flat[rows_offset:segments_end].view(-1, 2), n_segments, flat,
                      order=flat[segments_end:], n_rows=total_rows)
