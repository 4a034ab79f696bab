"""What is timed: cases (a gradient set and an operation) and the implementations compared.

Bytes that must move per call (N = gradient bytes), the formulas every GB/s figure uses:

==========  ==========================  ==================  =======================
op          tritonclip                  torch foreach=True  torch foreach=False,
                                                            torch.compile
==========  ==========================  ==================  =======================
active      3N: read for the norm,      3N                  3N
            then read + write to scale
inactive    N: the scale kernel         3N: it multiplies   3N
            returns before touching     by 1
            memory
norm        N                           N                   N
value       2N: one clamp pass          4N: clamp_min_,     2N: one clamp_ per
                                        then clamp_max_     tensor
amp         3N: norm of the scaled      5N: unscale_ (read  5N
            grads, then one write of    + write), then the
            coef / scale                clip (3N)
step        N + 7N: norm, then a fused  3N + 7N: clip, then  ``optimizer-only``:
            AdamW step that applies     the same step        7N: the step alone
            the coefficient (read p,
            g, m, v; write p, m, v)
per_tensor  3N: per-tensor norms in     3N: _foreach_norm,   3N: clip_grad_norm_
            one pass, then one scale    coefficients,        per tensor
            pass with a coefficient     _foreach_mul_        (``torch-loop``)
            per tensor
agc         4N: row norms of weights    (none)               9N: timm's
            and gradients, then read +                       adaptive_clip_grad
            write of clipped rows                            (``torch-loop``):
                                                             norms 2N, multiply
                                                             2N, where 3N, copy 2N
error_clip  2N: each row read (the      (none)               3N: the tensor-hook
            second read from L2) and                         recipe per tensor
            its clipped copy written;                        (``torch-loop``): row
            3N for rows longer than                          norms N, then read +
            16 Ki elements (two reads)                       write (float32
                                                             temporaries not
                                                             counted)
==========  ==========================  ==================  =======================

error_clip is the backward of ``tritonclip.error_clip(x, max_norm=ERROR_CLIP_MAX_NORM,
dim=-1)``: each tensor of the set, taken as the gradient of an activation, is clipped out of
place, row by row along its last dimension (a 1-D tensor is one row), against the recipe a
user hand-rolls in a tensor hook.

The step case reports ``clip_overhead_ms`` (time minus the optimizer-only time) and
``overhead_vs_torch`` (tritonclip's overhead over torch's): what clipping adds to a step.

With ``--compile``, ``torch-compile`` (torch's clip, or the foreach recipe for the norm clip,
under ``torch.compile``) is compared with ``tritonclip-compile`` (tritonclip's function under
``torch.compile``: one custom op running the same kernels, so it moves what ``tritonclip``
moves; in the step case its clip is not folded: 3N + 7N), in the same run
(``speedup_vs_torch_compile``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import tritonclip
import tritonclip.amp

from . import shapes as shape_sets

OPS = ("active", "inactive", "norm", "value", "amp", "step", "per_tensor", "agc", "error_clip")
# --quick's default: the global-norm, value and AMP clips (the README's main job, in about a
# minute on the CPU); per_tensor, agc and error_clip run in full runs or with --ops.
QUICK_OPS = OPS[:6]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "mixed": [torch.bfloat16, torch.float32]}

def moved_bytes(impl: str, op: str, grads: list[torch.Tensor]) -> int:
    """Bytes that ``impl`` must move for ``op`` on ``grads`` (the table above). tritonclip's
    torch backend (CPU) clamps tensors below a size in two batched passes: counted as 4N, and
    runs the error clip's torch recipe: 3N."""
    if impl == "tritonclip" and op == "error_clip":
        from tritonclip.kernels.error_clip import FUSED_ROW_MAX

        return sum((2 if g.is_cuda and g.shape[-1] <= FUSED_ROW_MAX else 3)
                   * g.numel() * g.element_size() for g in grads)
    if impl == "tritonclip" and op == "value" and grads and grads[0].device.type != "cuda":
        from tritonclip._torch_backend import _ONE_PASS_CLAMP_MIN_NUMEL as one_pass

        return sum((2 if g.numel() >= one_pass else 4) * g.numel() * g.element_size()
                   for g in grads)
    return PASSES[impl][op] * sum(g.numel() * g.element_size() for g in grads)


# Passes over the gradient bytes per call (see the table above), by implementation.
PASSES = {
    "tritonclip": {"active": 3, "inactive": 1, "norm": 1, "value": 2, "amp": 3, "step": 8,
                   "per_tensor": 3, "agc": 4, "error_clip": 2},
    "torch-foreach": {"active": 3, "inactive": 3, "norm": 1, "value": 4, "amp": 5, "step": 10,
                      "per_tensor": 3},
    "optimizer-only": {"step": 7},
    "torch-loop": {"active": 3, "inactive": 3, "norm": 1, "value": 2, "amp": 5,
                   "per_tensor": 3, "agc": 9, "error_clip": 3},
    "torch-compile": {"active": 3, "inactive": 3, "norm": 1, "value": 2, "step": 10},
    "tritonclip-compile": {"active": 3, "inactive": 1, "norm": 1, "value": 2, "step": 10},
}


# Before each timed call of the active case the gradients are restored (untimed) to a total
# norm of TOTAL_NORM, so that clipping at MAX_NORM really scales them every time. (Without
# the restore the norm settles at MAX_NORM - eps after two calls, where the float32
# coefficient rounds to exactly 1 and the clip becomes inactive.)
TOTAL_NORM = 10.0
MAX_NORM = 1.0
# The amp case treats the gradients as scaled by 8: unscaled norm 1.25, so the clip is active.
AMP_INV_SCALE = 0.125
# Per-tensor limit: below every tensor's own norm (TOTAL_NORM spread over up to a few
# thousand tensors), so every tensor is scaled.
PER_TENSOR_MAX_NORM = 1e-3
# AGC with weights of unit-variance entries: the threshold 0.01 * |w_i| is above a normalized
# gradient row's norm only for very long rows, so most rows are clipped.
AGC_CLIP_FACTOR = 0.01
# Error clipping's row limit: below a normalized row's norm for rows of more than about 100
# elements of a set of TOTAL_NORM, so most rows are scaled.
ERROR_CLIP_MAX_NORM = 1e-3


@dataclasses.dataclass
class GradientSet:
    """A named list of shapes, as a model's parameters or a sweep point."""

    name: str
    family: str  # "model", "one-tensor" or "many-small"
    shapes: list[tuple[int, ...]]

    @property
    def numel(self) -> int:
        return shape_sets.numel(self.shapes)


def gradient_sets(models, one_tensor_bytes, many_small_counts, element_size) -> list[GradientSet]:
    sets = [GradientSet(m, "model", shape_sets.MODELS[m]()) for m in models]
    sets += [GradientSet(f"1x{_size(b)}", "one-tensor", shape_sets.one_tensor(b, element_size))
             for b in one_tensor_bytes]
    sets += [GradientSet(f"{c}x4K", "many-small", shape_sets.many_small(c))
             for c in many_small_counts]
    return sets


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def make_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters carrying ``grads``; the weights are a broadcast scalar (never read)."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros((), device=g.device, dtype=g.dtype).expand(g.shape))
        p.grad = g
        params.append(p)
    return params


def normalize_(grads: list[torch.Tensor]) -> None:
    """Scale the gradients in place so that their total 2-norm is TOTAL_NORM."""
    total = tritonclip.get_total_norm(grads)
    coef = (TOTAL_NORM / total).item()
    torch._foreach_mul_(grads, coef)


def restorer(op: str, grads: list[torch.Tensor]):
    """The untimed step before each call: None, or (for the ops that scale: "active", "amp",
    "step", "per_tensor", "agc") a copy back of the normalized gradients. Other cases leave
    the gradients in a steady state: inactive and norm do not change them, and a clamp moves
    the same bytes on every call."""
    if op not in ("active", "amp", "step", "per_tensor", "agc"):
        return None
    saved = [g.clone() for g in grads]
    return lambda: torch._foreach_copy_(grads, saved)


def _compiled_clip_norm():
    """A torch.compile'd global-norm clip, the recipe a user would write."""

    def clip(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        norms = torch._foreach_norm(grads, 2.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    # Each gradient set is a new graph; without a reset dynamo stops compiling after
    # recompile_limit (8) sets and silently runs the function eagerly.
    torch._dynamo.reset()
    return torch.compile(clip, dynamic=False)


COMPILED = ("torch-compile", "tritonclip-compile")


def implementations(include_compile: bool) -> list[str]:
    """The implementations compared, tritonclip first."""
    impls = ["tritonclip", "torch-foreach", "torch-loop"]
    return impls + list(COMPILED) if include_compile else impls


def step_implementations(include_compile: bool) -> list[str]:
    """The step case's implementations: the step alone last (the others' clip overhead is
    their time minus its)."""
    return ["tritonclip", "torch-foreach", *(COMPILED if include_compile else ()),
            "optimizer-only"]


def _compiled(fn: Callable[[], object]) -> Callable[[], object]:
    torch._dynamo.reset()  # (as in _compiled_clip_norm)
    return torch.compile(fn, dynamic=False)


def _compiled_tritonclip(op: str, params, grads) -> Callable[[], object]:
    """tritonclip's clip inside a torch.compile'd function, as a user would write it (one
    custom op per call)."""
    if op == "norm":
        return _compiled(lambda: tritonclip.get_total_norm(grads))
    if op == "value":
        return _compiled(lambda: tritonclip.clip_grad_value_(params, 1e-3))
    if op in ("active", "inactive"):
        max_norm = MAX_NORM if op == "active" else 1e9
        return _compiled(lambda: tritonclip.clip_grad_norm_(params, max_norm))
    raise KeyError(op)


def step_callables(grads: list[torch.Tensor], include_compile: bool = False
                   ) -> dict[str, Callable[[], object]]:
    """For the step case: a fused AdamW over real weights carrying ``grads``, stepped alone,
    after torch's clip, with the clip folded in by :func:`tritonclip.optim.clip_into_`, and
    (``include_compile``) after torch's or tritonclip's clip compiled with torch.compile."""
    import tritonclip.optim

    weights = []
    for g in grads:
        w = torch.nn.Parameter(torch.zeros_like(g))
        w.grad = g
        weights.append(w)
    # A tiny learning rate keeps the weights sane over thousands of timed steps.
    optimizer = torch.optim.AdamW(weights, lr=1e-9, fused=True)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(weights, MAX_NORM, foreach=True)
        optimizer.step()

    def clip_into_step():
        tritonclip.optim.clip_into_(optimizer, MAX_NORM)
        optimizer.step()

    fns = {"tritonclip": clip_into_step, "torch-foreach": clip_then_step,
           "optimizer-only": optimizer.step}
    if include_compile:
        torch._dynamo.reset()
        for impl, clip in zip(COMPILED, (torch.nn.utils.clip_grad_norm_,
                                         tritonclip.clip_grad_norm_)):
            compiled = torch.compile(lambda clip=clip: clip(weights, MAX_NORM), dynamic=False)
            fns[impl] = lambda compiled=compiled: (compiled(), optimizer.step())
    return fns


def _torch_unscale_(grads: list[torch.Tensor], inv_scale: torch.Tensor) -> None:
    """What GradScaler.unscale_ does: the foreach non-finite check + unscale, per dtype."""
    found_inf = torch.zeros((), device=inv_scale.device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)


def callable_for(impl: str, op: str, params, grads) -> Callable[[], object]:
    """The zero-argument function that performs ``op`` with ``impl`` on the given gradients."""
    if impl == "tritonclip-compile":
        return _compiled_tritonclip(op, params, grads)
    max_norm = {"active": MAX_NORM, "inactive": 1e9, "amp": MAX_NORM}.get(op)
    if op == "amp":
        inv_scale = torch.tensor(AMP_INV_SCALE, device=grads[0].device)
        if impl == "tritonclip":
            return lambda: tritonclip.amp.unscale_and_clip_grads_(grads, inv_scale, max_norm)
        if impl == "torch-compile":
            raise KeyError(op)
        if grads[0].is_cuda and any(g.dtype == torch.bfloat16 for g in grads):
            # GradScaler's CUDA unscale has no bfloat16 kernel on some torch versions (2.11),
            # and bfloat16 training has no scaler: the amp case is for float16.
            raise KeyError(op)
        foreach = impl == "torch-foreach"

        def two_calls():
            _torch_unscale_(grads, inv_scale)
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)

        return two_calls
    if op == "per_tensor":
        return _per_tensor_callable(impl, params, grads)
    if op == "agc":
        return _agc_callable(impl, grads)
    if op == "error_clip":
        return _error_clip_callable(impl, grads)
    if impl == "tritonclip":
        if op == "norm":
            return lambda: tritonclip.get_total_norm(grads)
        if op == "value":
            return lambda: tritonclip.clip_grad_value_(params, 1e-3)
        return lambda: tritonclip.clip_grad_norm_(params, max_norm)
    if impl == "torch-compile":
        if op == "norm":
            return _compiled(lambda: torch.nn.utils.get_total_norm(grads))
        if op == "value":
            return _compiled(lambda: torch.nn.utils.clip_grad_value_(params, 1e-3))
        compiled = _compiled_clip_norm()
        return lambda: compiled(grads, max_norm)
    foreach = impl == "torch-foreach"
    if op == "norm":
        return lambda: torch.nn.utils.get_total_norm(grads, foreach=foreach)
    if op == "value":
        return lambda: torch.nn.utils.clip_grad_value_(params, 1e-3, foreach=foreach)
    return lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)


def _per_tensor_callable(impl, params, grads):
    """Each tensor clipped to its own norm: tritonclip's two passes, the foreach recipe a
    user would write, or ``clip_grad_norm_`` called per tensor (Keras' ``clipnorm``)."""
    max_norm = PER_TENSOR_MAX_NORM
    if impl == "tritonclip":
        return lambda: tritonclip.clip_grad_norm_per_tensor_(params, max_norm)
    if impl == "torch-foreach":
        def foreach():
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, 1e-6)
            torch._foreach_reciprocal_(norms)
            torch._foreach_mul_(norms, max_norm)
            torch._foreach_clamp_max_(norms, 1.0)
            torch._foreach_mul_(grads, norms)
        return foreach
    if impl == "torch-loop":
        return lambda: [torch.nn.utils.clip_grad_norm_([p], max_norm, foreach=False)
                        for p in params]
    raise KeyError("per_tensor")


def agc_params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters with real (unit-variance) weights, which AGC reads, carrying ``grads``."""
    gen = torch.Generator(device=grads[0].device).manual_seed(0)
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g).normal_(generator=gen))
        p.grad = g
        params.append(p)
    return params


def _agc_callable(impl, grads):
    params = agc_params(grads)
    if impl == "tritonclip":
        return lambda: tritonclip.clip_grad_agc_(params, AGC_CLIP_FACTOR)
    if impl == "torch-loop":
        return lambda: _timm_agc(params, AGC_CLIP_FACTOR)
    raise KeyError("agc")


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm(2.0)
    return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def _timm_agc(params, clip_factor, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad (norm_type 2), as timm writes it."""
    for p in params:
        g = p.grad
        max_norm = _unitwise_norm(p).clamp_(min=eps).mul_(clip_factor)
        grad_norm = _unitwise_norm(g)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped))


def _error_clip_callable(impl, grads):
    """The backward clip of ``error_clip(x, max_norm=ERROR_CLIP_MAX_NORM, dim=-1)`` for each
    tensor of ``grads`` (out of place), or the tensor-hook recipe it replaces."""
    from tritonclip import _core
    from tritonclip.error_clip import _Options

    if impl == "tritonclip":
        options = _Options(None, None, None, ERROR_CLIP_MAX_NORM, -1, 2.0, 1e-6, None, None)
        specs = [(g, options.spec(g)) for g in grads]
        return lambda: [_core.clip_activation_grad(g, spec) for g, spec in specs]
    if impl == "torch-loop":
        return lambda: [hook_recipe(g, ERROR_CLIP_MAX_NORM) for g in grads]
    raise KeyError("error_clip")


def hook_recipe(g: torch.Tensor, max_norm: float, dim: int | None = -1,
                eps: float = 1e-6) -> torch.Tensor:
    """What a tensor hook clipping an activation's gradient by norm does by hand: float32
    norms over ``dim`` (None: the whole tensor), the coefficient, the scale, the cast."""
    norm = torch.linalg.vector_norm(g, dim=dim, keepdim=True, dtype=torch.float32)
    return (g.float() * torch.clamp(max_norm / (norm + eps), max=1.0)).to(g.dtype)
