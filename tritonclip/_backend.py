"""The backend interface, and the groups of gradients that backends work on.

The core lays gradients out as groups of one (device, dtype), each with the backend that runs
it (``_layout``), and calls these operations on them. Two backends implement them:
``_triton_backend`` (the Triton kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``; dense
float16/bfloat16/float32/float64 memory) and ``_torch_backend`` (torch ops: everything).
A backend says what it cannot take, and why (:meth:`Backend.unsupported`), so that a group
sent to torch always has a stated reason (``Group.reason``, and a debug log when the layout is
built).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import NamedTuple

import torch

from . import _normmath


class Span(NamedTuple):
    """``numel`` consecutive elements of one storage, from element ``start``."""

    base: int  # address of the storage's element 0
    start: int
    numel: int
    source: int  # position in the input list of a tensor of that storage
    whole: bool  # the span is exactly that tensor, which is contiguous: use it as is


@dataclasses.dataclass(eq=False)
class GroupLayout:
    """How one group of a tensor list lies in memory. It refers to tensors by their position
    in the list, never holds one, and so can be cached (with the launch plan built for it);
    backends get it with the call's tensors."""

    device: torch.device
    dtype: torch.dtype
    backend: "Backend"
    reason: str  # why this backend (the requested one, or why not Triton)
    spans: list[Span]  # disjoint and nonempty dense memory
    loose: list[int]  # positions of tensors that are not one dense block (torch groups only)
    plan: object = None  # the Triton backend's launch plan, built on first use

    def addresses(self) -> list[tuple[int, int]]:
        """(address, numel) of every span: what a kernel launch plan is built from."""
        size = self.dtype.itemsize
        return [(s.base + s.start * size, s.numel) for s in self.spans]


@dataclasses.dataclass(eq=False)
class RowGroup:
    """Distinct tensors of one (device, dtype, parameter dtype, backend), as rows: the
    first-dimension slices of each (unit-wise norms) or each whole tensor (one row)."""

    device: torch.device
    dtype: torch.dtype
    param_dtype: torch.dtype | None
    backend: "Backend"
    reason: str
    items: list[int]  # position of each distinct tensor in the input list
    n_rows: list[int]  # rows of each item
    plans: dict = dataclasses.field(default_factory=dict)  # Triton: row plans, by role
    indexes: dict = dataclasses.field(default_factory=dict)  # device index tensors, by use

    @property
    def total_rows(self) -> int:
        return sum(self.n_rows)


class Backend(abc.ABC):
    """What the core asks of a backend. Coefficients and norms are device tensors: nothing
    here reads one on the host (but the torch backend on CPU, where that costs no wait)."""

    name: str

    @abc.abstractmethod
    def unsupported(self, device: torch.device, dtype: torch.dtype,
                    layout: torch.layout) -> str | None:
        """Why this backend cannot take gradients of this kind, or None when it can."""

    # -- global norms and in-place ops over a group of spans --------------------------------
    # ``group`` is a GroupLayout, ``tensors`` the list of the call its positions refer to.
    @abc.abstractmethod
    def power(self, group: GroupLayout, tensors: list[torch.Tensor], norm_type: float,
              foreach: bool | None) -> torch.Tensor:
        """The power form of the group's elements (0-dim or 1-element, in
        ``_normmath.accumulation_dtype``)."""

    @abc.abstractmethod
    def norm_clip(self, group: GroupLayout, tensors: list[torch.Tensor], norm_type: float,
                  max_norm: float, eps: float, skip_nonfinite: bool,
                  inv_scale: torch.Tensor | None):
        """(norm, coefficient, found) of a group that holds every gradient of a clip, in one
        step, or None where the backend has no such step (the core then combines
        :meth:`power` values). ``found`` is None without ``inv_scale``; see
        ``kernels.norm_clip`` for the meaning of each value."""

    @abc.abstractmethod
    def scale_(self, group: GroupLayout, tensors: list[torch.Tensor], coef: torch.Tensor,
               foreach: bool | None, skip_at_least_one: bool) -> None:
        """Multiply the group's memory in place by ``coef`` (on the group's device); with
        ``skip_at_least_one`` a coefficient >= 1 may leave it untouched."""

    @abc.abstractmethod
    def clamp_(self, group: GroupLayout, tensors: list[torch.Tensor], lo: float, hi: float,
               foreach: bool | None) -> None:
        """Clamp the group's memory in place to [lo, hi] (NaN stays NaN)."""

    # -- rows: per-tensor and unit-wise norms ----------------------------------------------
    @abc.abstractmethod
    def row_norms(self, rows: RowGroup, tensors: list[torch.Tensor], role: str,
                  norm_type: float, foreach: bool | None):
        """(norm of every row, in item order, 1-D; power form of all rows together, 0-dim, or
        None where the backend does not have it at hand). ``role`` is "grads" or "params"
        (which tensors the rows are of), both accumulated in ``row_dtype``."""

    @abc.abstractmethod
    def scale_rows_(self, rows: RowGroup, tensors: list[torch.Tensor],
                    coef: torch.Tensor) -> None:
        """Multiply each row in place by its coefficient; rows whose coefficient is >= 1 stay
        bit for bit."""

    # -- the gradient of one activation, clipped out of place (error clipping) -------------
    @abc.abstractmethod
    def clip_activation(self, grad: torch.Tensor, spec) -> torch.Tensor:
        """The clip of ``grad`` (never written) that ``spec`` (``_core.ErrorClipSpec``) asks
        for: clamp to [lo, hi], or each slice over ``spec.dims`` scaled by its coefficient."""


def row_dtype(rows: RowGroup, norm_type: float) -> torch.dtype:
    """Accumulation dtype of a row group's norms and coefficients: float64 if a float64
    tensor (gradient or parameter) takes part, float32 otherwise."""
    dtypes = [rows.dtype] + ([rows.param_dtype] if rows.param_dtype is not None else [])
    return max((_normmath.accumulation_dtype(d, norm_type) for d in dtypes),
               key=lambda d: d.itemsize)
