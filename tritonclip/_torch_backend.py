"""The torch backend: the same contract as the Triton backend, built from torch ops.

Used for CPU tensors, complex and sparse gradients, devices Triton does not target, and, in
every backend, for gradients that are not one dense block of memory. It still beats
``torch.nn.utils`` on CPU where the contract allows: merged spans mean fewer tensors, the scale
pass is skipped when the coefficient is >= 1 (reading a CPU scalar costs no synchronisation),
and value clipping is one ``clamp_`` pass instead of ``clamp_min_`` then ``clamp_max_``.
"""

from __future__ import annotations

import math

import torch
from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

from ._groups import Group


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


# On CPU, torch's norm of one long float32 tensor accumulates in few lanes: a 38.6M-element
# norm came out 2.7e-3 too small (p=2, torch 2.13, 2 cores). Taken as rows of 16384 elements
# whose norms are combined in float64, it is within 2e-8, in the same 5.7 ms.
_CPU_ROW = 16384


def _long_norm(t: torch.Tensor, norm_type: float, dtype) -> torch.Tensor:
    """Norm of a long contiguous CPU tensor as rows of _CPU_ROW combined in float64."""
    flat = t.reshape(-1)
    n_rows = flat.numel() // _CPU_ROW
    parts = [torch.linalg.vector_norm(flat[: n_rows * _CPU_ROW].view(n_rows, _CPU_ROW),
                                      norm_type, dim=1, dtype=dtype)]
    if flat.numel() > n_rows * _CPU_ROW:
        parts.append(torch.linalg.vector_norm(flat[n_rows * _CPU_ROW:], norm_type,
                                              dtype=dtype).reshape(1))
    powers = power_form(torch.cat(parts).to(torch.float64), norm_type)
    return root(reduce_power(powers, norm_type), norm_type)


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


def power_form(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Per-tensor norms -> their contribution to a total: |.|^p (max, min, count as is)."""
    if math.isinf(norm_type) or norm_type in (0.0, 1.0):
        return norms
    return norms.pow(norm_type)


def root(power: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Power form (sum |g|^p, max, min, count) -> norm."""
    if math.isinf(norm_type) or norm_type in (0.0, 1.0):
        return power
    if norm_type == 2.0:
        return power.sqrt()
    return power.pow(1.0 / norm_type)


def reduce_power(values: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Combine power-form values (sum; max for inf; min for -inf) into one 0-dim tensor."""
    if norm_type == math.inf:
        return values.max()
    if norm_type == -math.inf:
        return values.min()
    return values.sum()


def group_power(group: Group, norm_type: float, acc_dtype: torch.dtype, foreach: bool | None,
                per_span: bool = False):
    """(power-form value of the group, per-span norms or None), like the Triton backend."""
    norms = tensor_norms(group.views(), norm_type, acc_dtype, group.device, foreach)
    powers = power_form(norms, norm_type)
    others = power_form(tensor_norms(group.others, norm_type, acc_dtype, group.device, foreach),
                        norm_type)
    value = reduce_power(torch.cat([powers, others]), norm_type)
    return value, (norms if per_span else None)


def mul_(t: torch.Tensor, coef: torch.Tensor) -> None:
    """``t *= coef`` with the product formed in float32 for float16/bfloat16 ``t``, as the
    kernels and ``torch._foreach_mul_`` do. (A plain ``mul_`` by a 0-dim CUDA tensor first
    rounds the coefficient to the tensor's dtype: 8 bits for bfloat16.)"""
    if t.dtype in (torch.float16, torch.bfloat16) and coef.device.type != "cpu":
        t.copy_(t.float().mul_(coef))
    else:
        t.mul_(coef)


def scale_(group: Group, coef: torch.Tensor, foreach: bool | None,
           skip_at_least_one: bool = True) -> None:
    """Multiply the group's gradients in place by ``coef``; skipped on CPU when coef >= 1 (if
    ``skip_at_least_one``), since reading a CPU scalar costs no synchronisation."""
    if skip_at_least_one and coef.device.type == "cpu" and coef.item() >= 1.0:
        return
    tensors = group.views() + group.others
    if use_foreach(tensors, group.device, foreach):
        torch._foreach_mul_(tensors, coef)
    else:
        for t in tensors:
            mul_(t, coef)


# Below this many elements a tensor costs more in Python per-call overhead (about 4 us)
# than a second pass over it: 32768 float32 elements read and written twice at 40 GB/s take
# 6.5 us. Such tensors are clamped by torch's two foreach passes, larger ones in one pass.
_ONE_PASS_CLAMP_MIN_NUMEL = 32768


def clamp_(group: Group, lo: float, hi: float, foreach: bool | None) -> None:
    """Clamp the group's gradients in place to [lo, hi]: one read-write pass per large
    tensor; small dense tensors in two batched foreach passes (fewer calls)."""
    tensors = group.views() + group.others
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
