"""The Triton backend: the backend interface over the kernels of ``tritonclip.kernels``.

It takes dense float16/bfloat16/float32/float64 memory on CUDA devices, or on the CPU when
Triton runs in its interpreter (``TRITON_INTERPRET=1`` set before triton is imported). A group
is launched over through its launch plan, built on first use and kept with the group's layout
(so with it in the core's cache): a steady-state call builds nothing and copies nothing from
the host.
"""

from __future__ import annotations

import torch

from . import _normmath, kernels
from ._backend import Backend, GroupLayout, RowGroup, row_dtype
from .kernels import error_clip as error_clip_kernels

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _plan(layout: GroupLayout) -> kernels.LaunchPlan:
    plan = layout.plan
    if plan is None:  # two threads may both build it: either plan is right
        plan = layout.plan = kernels.build_plan(layout.addresses(), layout.device, layout.dtype)
    return plan


def _row_plan(rows: RowGroup, tensors: list[torch.Tensor], role: str) -> kernels.LaunchPlan:
    plan = rows.plans.get(role)
    if plan is None:
        dtype = rows.dtype if role == "grads" else rows.param_dtype
        entries = [(tensors[i].data_ptr(), r, tensors[i].numel() // r)
                   for i, r in zip(rows.items, rows.n_rows)]
        plan = rows.plans.setdefault(role, kernels.build_row_plan(entries, rows.device, dtype))
    return plan


class TritonBackend(Backend):
    name = "triton"

    def unsupported(self, device, dtype, layout):
        if dtype not in DTYPES or layout != torch.strided:
            return (f"the Triton kernels take dense float16/bfloat16/float32/float64 memory, "
                    f"not {dtype} with layout {layout}")
        if device.type == "cuda" or (device.type == "cpu" and kernels.config.interpreted()):
            return None
        return (f"Triton kernels cannot run on {device.type} tensors: they need a CUDA device, "
                "or CPU tensors with the interpreter enabled (TRITON_INTERPRET=1 set before "
                "triton is imported)")

    # -- spans ------------------------------------------------------------------------------
    def power(self, group, tensors, norm_type, foreach):
        return kernels.group_power(_plan(group), norm_type)

    def norm_clip(self, group, tensors, norm_type, max_norm, eps, skip_nonfinite, inv_scale):
        if not kernels.fuses_coefficient(norm_type):
            return None
        return kernels.norm_clip(_plan(group), norm_type, max_norm, eps, skip_nonfinite,
                                 inv_scale)

    def scale_(self, group, tensors, coef, foreach, skip_at_least_one):
        kernels.scale_(_plan(group), coef, skip_at_least_one)

    def clamp_(self, group, tensors, lo, hi, foreach):
        kernels.clamp_(_plan(group), lo, hi)

    # -- rows -------------------------------------------------------------------------------
    def row_norms(self, rows: RowGroup, tensors, role, norm_type, foreach):
        plan = _row_plan(rows, tensors, role)
        values = kernels.finalize(plan, kernels.norm_partials(plan, norm_type), norm_type)
        values = values.to(row_dtype(rows, norm_type))
        return _normmath.root(values[1:], norm_type), values[0]

    def scale_rows_(self, rows: RowGroup, tensors, coef):
        kernels.scale_each_(_row_plan(rows, tensors, "grads"), coef)

    # -- activations ------------------------------------------------------------------------
    def clip_activation(self, grad, spec):
        if spec.max_norm is None:
            x, out, result = _flat_pair(grad)
            error_clip_kernels.clamp_out(x, out, spec.lo, spec.hi, spec.counts)
            return result
        if spec.dims is None:
            x, out, result = _flat_pair(grad)
            error_clip_kernels.row_clip_out(x, out, spec.max_norm, spec.norm_type, spec.eps,
                                            spec.counts)
            return result
        x, out, restore = _as_rows(grad, spec.dims)
        error_clip_kernels.row_clip_out(x, out, spec.max_norm, spec.norm_type, spec.eps,
                                        spec.counts)
        return restore(out)


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


def _flat_pair(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flat input, flat output, output) for an op that does not care about element order:
    a dense gradient is read in its own memory order and the output gets its strides
    (``empty_like`` keeps them), so nothing is copied; any other one is made contiguous."""
    if not dense_extent(grad):
        grad = grad.contiguous()
    out = torch.empty_like(grad)  # same strides as a dense ``grad``
    n = grad.numel()
    return grad.as_strided((n,), (1,)), out.as_strided((n,), (1,)), out


def _as_rows(grad: torch.Tensor, dims: tuple[int, ...]):
    """(x, out, restore): ``grad`` as contiguous ``[n_rows, row_len]`` rows (the reduced
    dimensions moved last; a copy only when that is not already the memory order), an
    output of the same shape, and a function giving the output in ``grad``'s shape."""
    kept = [d for d in range(grad.dim()) if d not in dims]
    perm = kept + list(dims)
    moved = grad.permute(perm)
    x = moved.contiguous()
    row_len = 1
    for d in dims:
        row_len *= grad.shape[d]
    out = torch.empty_like(x)
    inverse = [0] * len(perm)
    for position, d in enumerate(perm):
        inverse[d] = position

    def restore(result: torch.Tensor) -> torch.Tensor:
        # A permuted view: autograd takes gradients of any strides.
        return result.view(moved.shape).permute(inverse)

    return x.view(-1, row_len), out.view(-1, row_len), restore


TRITON = TritonBackend()
