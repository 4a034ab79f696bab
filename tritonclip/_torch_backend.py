"""The torch backend: the backend interface built from torch ops.

It takes every group: CPU tensors, complex and sparse gradients, devices Triton does not
target, and, whatever backend was asked for, gradients that are not one dense block of
memory. It still beats ``torch.nn.utils`` on CPU where the contract allows: merged spans mean
fewer tensors, the scale pass is skipped when the coefficient is >= 1 (reading a CPU scalar
costs no synchronisation), and value clipping is one ``clamp_`` pass instead of
``clamp_min_`` then ``clamp_max_``.
"""

from __future__ import annotations

import math

import torch
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

from . import _normmath
from ._backend import Backend, GroupLayout, RowGroup, row_dtype
from .kernels.config import compute_dtype

# On CPU, torch's norm of one long float32 tensor accumulates in few lanes: a 38.6M-element
# norm came out 2.7e-3 too small (p=2, torch 2.13, 2 cores). Taken as rows of 16384 elements
# whose norms are combined in float64, it is within 2e-8, in the same 5.7 ms.
_CPU_ROW = 16384

# Below this many elements a tensor costs more in Python per-call overhead (about 4 us)
# than a second pass over it: 32768 float32 elements read and written twice at 40 GB/s take
# 6.5 us. Such tensors are clamped by torch's two foreach passes, larger ones in one pass.
_ONE_PASS_CLAMP_MIN_NUMEL = 32768


def use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    """torch's tri-state rule: None = foreach where supported; True = required; False = loop."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach


def _values(t: torch.Tensor) -> torch.Tensor:
    """The elements whose norm is taken: a sparse tensor's coalesced values, else ``t``."""
    return t.coalesce().values() if t.is_sparse else t


def _long_norm(t: torch.Tensor, norm_type: float, dtype) -> torch.Tensor:
    """Norm of a long contiguous CPU tensor as rows of _CPU_ROW combined in float64."""
    flat = t.reshape(-1)
    n_rows = flat.numel() // _CPU_ROW
    parts = [torch.linalg.vector_norm(flat[: n_rows * _CPU_ROW].view(n_rows, _CPU_ROW),
                                      norm_type, dim=1, dtype=dtype)]
    if flat.numel() > n_rows * _CPU_ROW:
        parts.append(torch.linalg.vector_norm(flat[n_rows * _CPU_ROW:], norm_type,
                                              dtype=dtype).reshape(1))
    powers = _normmath.power_form(torch.cat(parts).to(torch.float64), norm_type)
    return _normmath.root(_normmath.reduce_power(powers, norm_type), norm_type)


def tensor_norms(tensors: list[torch.Tensor], norm_type: float, acc_dtype: torch.dtype,
                 device: torch.device, foreach: bool | None) -> torch.Tensor:
    """1-D tensor of each tensor's ``norm_type`` norm (count of nonzeros for 0), in acc_dtype."""
    if not tensors:
        return torch.zeros(0, dtype=acc_dtype, device=device)
    tensors = [_values(t) for t in tensors]
    dtype = acc_dtype
    if norm_type not in (1.0, 2.0, 0.0) and not math.isinf(norm_type):
        # torch's reduction for a general p sums |g|^p naively: over 1e5 elements its float32
        # result is off by 5e-5 (p=0.5). Accumulate those in float64 instead.
        dtype = torch.float64
    if tensors[0].is_complex():
        dtype = None  # the norm of a complex tensor is real; torch picks its dtype
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    short = []
    for i, t in enumerate(tensors):
        if device.type == "cpu" and t.numel() > 2 * _CPU_ROW and t.is_contiguous():
            norms[i] = _long_norm(t, norm_type, dtype)
        else:
            short.append(i)
    if short:
        batch = [tensors[i] for i in short]
        if use_foreach(batch, device, foreach):
            computed = torch._foreach_norm(batch, norm_type, dtype=dtype)
        else:
            computed = [torch.linalg.vector_norm(t, norm_type, dtype=dtype) for t in batch]
        for i, value in zip(short, computed):
            norms[i] = value
    else:
        use_foreach(tensors, device, foreach)  # raises for foreach=True where unsupported
    if len(short) < len(tensors):  # CPU only: long norms are float64, the others may not be
        norms = [n.to(acc_dtype) for n in norms]
    return torch.stack(norms).to(acc_dtype)


def mul_(t: torch.Tensor, coef: torch.Tensor) -> None:
    """``t *= coef`` with the product formed in float32 for float16/bfloat16 ``t``, as the
    kernels and ``torch._foreach_mul_`` do. (A plain ``mul_`` by a 0-dim CUDA tensor first
    rounds the coefficient to the tensor's dtype: 8 bits for bfloat16.)"""
    if t.dtype in (torch.float16, torch.bfloat16) and coef.device.type != "cpu":
        t.copy_(t.float().mul_(coef))
    else:
        t.mul_(coef)


def views(group: GroupLayout, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The group's memory as tensors: each span (the tensor itself when it is one whole
    contiguous tensor), then the loose tensors."""
    return [tensors[s.source] if s.whole
            else tensors[s.source].detach().as_strided((s.numel,), (1,), s.start)
            for s in group.spans] + [tensors[i] for i in group.loose]


def value_bound(bound: float, dtype: torch.dtype) -> float:
    """A clamp bound as clamping ``dtype`` values to it in float32 (float64) and rounding once,
    as the kernels do, acts: a finite bound beyond the dtype's range becomes the dtype's
    largest value, or an infinity where it rounds to one (torch's ``clamp_`` raises for it)."""
    mantissa_bits = _MANTISSA_BITS.get(dtype)
    if math.isinf(bound) or mantissa_bits is None:
        return bound
    info = torch.finfo(dtype)
    if abs(bound) <= info.max:
        return bound
    ulp = 2.0 ** (math.floor(math.log2(info.max)) - mantissa_bits)
    magnitude = math.inf if abs(bound) >= info.max + ulp / 2 else info.max
    return math.copysign(magnitude, bound)


_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


class TorchBackend(Backend):
    name = "torch"

    def unsupported(self, device, dtype, layout):
        return None

    # -- spans ------------------------------------------------------------------------------
    def norm_clip(self, group, tensors, norm_type, max_norm, eps, skip_nonfinite, inv_scale):
        return None  # the core combines power() values with torch ops

    def power(self, group, tensors, norm_type, foreach):
        acc = _normmath.accumulation_dtype(group.dtype, norm_type)
        norms = tensor_norms(views(group, tensors), norm_type, acc, group.device, foreach)
        return _normmath.reduce_power(_normmath.power_form(norms, norm_type), norm_type)

    def scale_(self, group, tensors, coef, foreach, skip_at_least_one):
        # On CPU the coefficient is read without waiting for anything: skip the pass at >= 1.
        if skip_at_least_one and coef.device.type == "cpu" and coef.item() >= 1.0:
            return
        tensors = views(group, tensors)
        if coef.dtype == torch.float64 and group.dtype not in (torch.float64, torch.complex128):
            coef = coef.float()  # a float64 coefficient (float64 gradients elsewhere in the
            # list) applies to float32 arithmetic here, as the kernels apply it
        if use_foreach(tensors, group.device, foreach):
            torch._foreach_mul_(tensors, coef)
        else:
            for t in tensors:
                mul_(t, coef)

    def clamp_(self, group, tensors, lo, hi, foreach):
        lo, hi = value_bound(lo, group.dtype), value_bound(hi, group.dtype)
        tensors = views(group, tensors)
        batched = use_foreach(tensors, group.device, foreach)
        small = []
        for t in tensors:
            if batched and not t.is_sparse and t.numel() < _ONE_PASS_CLAMP_MIN_NUMEL:
                small.append(t)
            else:
                (t._values() if t.is_sparse else t).clamp_(lo, hi)
        if small:
            if lo > -math.inf:
                torch._foreach_clamp_min_(small, lo)
            if hi < math.inf:
                torch._foreach_clamp_max_(small, hi)

    # -- rows -------------------------------------------------------------------------------
    def row_norms(self, rows: RowGroup, tensors, role, norm_type, foreach):
        acc = row_dtype(rows, norm_type)
        members = [tensors[i] for i in rows.items]
        if all(r == 1 for r in rows.n_rows):  # whole tensors: torch's multi-tensor norms
            return tensor_norms(members, norm_type, acc, rows.device, foreach), None
        # A general p is summed naively by torch: accumulate it in float64 (as tensor_norms).
        dtype = acc if norm_type in (1.0, 2.0) or math.isinf(norm_type) else torch.float64
        parts = [torch.linalg.vector_norm(t.reshape(r, -1), norm_type, dim=1, dtype=dtype)
                 for t, r in zip(members, rows.n_rows)]
        return torch.cat(parts).to(acc), None

    def scale_rows_(self, rows: RowGroup, tensors, coef):
        members = [tensors[i] for i in rows.items]
        if (all(r == 1 for r in rows.n_rows) and rows.dtype in (torch.float32, torch.float64)
                and all(g.layout == torch.strided for g in members)):
            # Whole tensors of a dtype the coefficient needs no rounding for: one foreach call
            # (x * 1 is x bit for bit, so rows that are not clipped stay as they are).
            coef = torch.where(coef >= 1, torch.ones_like(coef), coef).to(rows.dtype)
            torch._foreach_mul_(members, list(coef.unbind()))
            return
        offset = 0
        for g, r in zip(members, rows.n_rows):
            c = coef[offset:offset + r]
            offset += r
            if g.is_sparse:
                mul_(g, c.reshape(()))
                continue
            c = c.reshape((r,) + (1,) * (g.dim() - 1)) if r > 1 else c.reshape(())
            # rows with a coefficient >= 1 stay bit for bit (as the kernel leaves them)
            c = torch.where(c >= 1, torch.ones_like(c), c)
            if g.dtype in (torch.float16, torch.bfloat16):
                g.copy_(g.float() * c)
            else:
                g.mul_(c.to(g.dtype) if not g.dtype.is_complex else c)

    # -- activations ------------------------------------------------------------------------
    def clip_activation(self, grad, spec):
        """The clip with torch ops; differentiable (double backward goes through the norm;
        a clamp passes the gradient where the value lies inside the bounds). Norms
        accumulate in float32 (float64 for float64) on a GPU and in float64 on CPU, where
        torch's float32 reduction of a long row loses digits (see ``_CPU_ROW``)."""
        if spec.max_norm is None:
            lo = value_bound(spec.lo, grad.dtype)
            hi = value_bound(spec.hi, grad.dtype)
            if spec.counts is not None:
                with torch.no_grad():
                    x = grad.to(compute_dtype(grad.dtype))
                    _count(spec.counts, (x < spec.lo) | (x > spec.hi), grad.numel())
            return grad.clamp(lo, hi)  # NaN stays NaN
        acc = compute_dtype(grad.dtype)
        differentiable = torch.is_grad_enabled() and grad.requires_grad
        norm_dtype = torch.float64 if grad.device.type == "cpu" and not differentiable else acc
        norms = torch.linalg.vector_norm(grad, spec.norm_type, dim=spec.dims, keepdim=True,
                                         dtype=norm_dtype).float()
        # max_norm / t is reciprocal(t) * max_norm in torch, as in the kernels.
        coef = torch.clamp(spec.max_norm / (norms + spec.eps), max=1.0)
        if spec.counts is not None:
            with torch.no_grad():
                _count(spec.counts, coef.detach() < 1.0, coef.numel())
        return (grad.to(acc) * coef.to(acc)).to(grad.dtype)


def _count(counts: torch.Tensor, clipped: torch.Tensor, seen: int) -> None:
    counts[0].add_(clipped.sum())
    counts[1].add_(seen)


TORCH = TorchBackend()
