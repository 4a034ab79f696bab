"""Mixed precision: the GradScaler's unscale and a global-norm clip fused into two passes.

The usual recipe reads and writes the gradients five times their size::

    scaler.unscale_(optimizer)                          # read + write (2N), finds inf/NaN
    torch.nn.utils.clip_grad_norm_(params, max_norm)    # read (N), then read + write (2N)

:func:`unscale_and_clip_` reads them once for the norm of the *scaled* gradients (which is
non-finite whenever a gradient is), and writes them once, multiplied by ``coef / scale``: 3N.
It leaves the GradScaler as ``unscale_`` would, so ``scaler.step`` skips the step on
overflow and ``scaler.update`` adjusts the scale as with the two calls.

One difference: the norm is of the *scaled* gradients, so a norm that overflows float32 only
once scaled (|g| * scale beyond about 1.8e19 for p = 2) counts as an overflow: the step is
skipped and the scale backed off, where the two calls would clip and step. Gradients that
large are a diverging run either way.

The GradScaler's state is private (``_per_optimizer_states``, ``_scale``, ``_enabled``):
it is read only after a feature check (:func:`fuses`), and only for ``torch.amp.GradScaler``
itself and torch's ``ShardedGradScaler`` (FSDP), whose ``found_inf`` is all-reduced over its
process group as its own ``unscale_`` does. Any other scaler (a subclass with its own
``unscale_``, or a torch whose GradScaler lacks that state) gets its own ``unscale_`` and then
:func:`tritonclip.clip_grad_norm_`: correct, in five passes.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _compile, _core, distributed
from .clip_grad import clip_grad_norm_

try:
    from torch.amp.grad_scaler import OptState
except ImportError:  # pragma: no cover - depends on the torch version
    OptState = None

try:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
except ImportError:  # pragma: no cover - torch without distributed
    ShardedGradScaler = None

__all__ = ["fuses", "unscale_and_clip_", "unscale_and_clip_grads_"]

_STATE = ("_per_optimizer_states", "_scale", "_enabled")

_eager = _compile.eager(
    "tritonclip.amp.unscale_and_clip_ compiles for a torch.amp.GradScaler without "
    "process_group; torch.compile does not trace torch.amp's own code, which other scalers "
    "(a subclass, ShardedGradScaler: its found_inf is all-reduced) need, so with them it runs "
    "eagerly (a graph break)")


@torch.no_grad()
def unscale_and_clip_grads_(
    grads: list[torch.Tensor],
    inv_scale: torch.Tensor,
    max_norm: float,
    norm_type: float | str = 2.0,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Unscale gradients by ``inv_scale`` and clip them to ``max_norm``, in two passes.

    Every gradient is multiplied in place by

    .. math::
        \frac{1}{scale} \cdot \min\left(\frac{max\_norm}{norm / scale + eps}, 1\right)

    where ``norm`` is the ``norm_type`` norm of the scaled gradients, read in one pass.

    Args:
        grads (list[Tensor]): the scaled gradients, of any float dtypes and devices.
        inv_scale (Tensor): ``1 / scale``, a float32 one-element tensor (on any device; it is
            read there, never on the host).
        max_norm, norm_type, foreach, backend, eps, process_group: as in
            :func:`tritonclip.clip_grad_norm_`.
        nonfinite (str): as in :func:`tritonclip.clip_grad_norm_`; ``"skip"`` leaves the
            (still scaled) gradients untouched when a gradient is inf or NaN.

    Returns:
        ``(total_norm, found_inf)``: the norm of the unscaled gradients (0-dim, on the first
        gradient's device; float32, float64 when a float64 gradient takes part) and 1.0 if any
        gradient (on any rank of ``process_group``) is inf or NaN, else 0.0 (float32, 0-dim,
        same device).
    """
    grads = _core.tensor_list(grads, "grads", check_items=False)  # (prepare checks them)
    max_norm, norm_type, eps, mode, foreach = _core.norm_clip_args(
        max_norm, norm_type, eps, nonfinite, False, foreach)
    if not isinstance(inv_scale, torch.Tensor) or inv_scale.numel() != 1:
        raise TypeError(f"inv_scale must be a one-element tensor, got {_core._short(inv_scale)}")
    backend = _core.backend_name(backend)
    if not _compile.compiling():
        return _unscale_and_clip(grads, inv_scale, max_norm, norm_type, eps, mode, foreach,
                                 backend, process_group)
    if process_group is not None or _core.has_dtensor(grads):
        return _compile.distributed(unscale_and_clip_grads_, grads, inv_scale, max_norm,
                                    norm_type, foreach, backend=backend, eps=eps,
                                    nonfinite=mode, process_group=process_group)
    return _unscale_and_clip_op(grads, inv_scale, max_norm, norm_type, eps, mode, foreach,
                                backend)


def _unscale_and_clip(grads, inv_scale, max_norm, norm_type, eps, mode, foreach, backend,
                      process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    prepared = _core.prepare(grads, backend, "scale", parameters=False,
                             process_group=process_group, name="grads")
    device = prepared.device if grads else inv_scale.device
    inv_scale = _core.move(inv_scale.reshape(()), device, torch.float32)
    if not grads and process_group is None:  # (with a group, take part in its all-reduce)
        return torch.zeros((), device=device), torch.zeros((), device=device)
    total, factor, found_inf = prepared.norm_and_coefficient(
        norm_type, foreach, max_norm, eps, mode == "skip", inv_scale)
    _core.check_nonfinite(total, mode, norm_type)
    prepared.scale_(factor, foreach, skip_at_least_one=False)
    return total, found_inf


def _unscale_and_clip_fake(grads, inv_scale, *args):
    if not grads:
        return tuple(inv_scale.new_empty((), dtype=torch.float32) for _ in range(2))
    return _compile.norm_like(grads), grads[0].new_empty((), dtype=torch.float32)


@_compile.op("unscale_and_clip_grads_", mutates=("grads",), fake=_unscale_and_clip_fake)
def _unscale_and_clip_op(grads: list[torch.Tensor], inv_scale: torch.Tensor, max_norm: float,
                         norm_type: float, eps: float, nonfinite: str,
                         foreach: Optional[bool], backend: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return _unscale_and_clip(grads, inv_scale, max_norm, norm_type, eps, nonfinite, foreach,
                             backend)


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale as GradScaler.unscale_ computes it: the reciprocal in float64 for an exact
    power-of-two inverse, except on MPS (no float64 there)."""
    if scale.device.type == "mps":
        return scale.reciprocal()
    return scale.double().reciprocal().float()


def fuses(scaler: torch.amp.GradScaler) -> bool:
    """Whether :func:`unscale_and_clip_` can fold ``scaler``'s unscale into the clip: it is a
    ``torch.amp.GradScaler`` whose ``unscale_`` is torch's own (or torch's
    ``ShardedGradScaler``), and its private state is there to be read."""
    unscale = type(scaler).unscale_
    known = unscale is torch.amp.GradScaler.unscale_ or (
        ShardedGradScaler is not None and unscale is ShardedGradScaler.unscale_)
    return known and OptState is not None and all(hasattr(scaler, name) for name in _STATE)


@torch.no_grad()
def unscale_and_clip_(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    process_group=None,
) -> torch.Tensor:
    r"""``scaler.unscale_(optimizer)`` then a global-norm clip of its gradients, in two passes.

    A drop-in for::

        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params_of(optimizer), max_norm, norm_type)

    that reads the gradients once and writes them once (3N bytes instead of 5N). The scaler
    is left as ``unscale_`` leaves it: the optimizer's stage is ``UNSCALED`` and its
    ``found_inf_per_device`` holds 1.0 on every gradient device when any gradient is inf or
    NaN, so ``scaler.step(optimizer)`` skips the step and ``scaler.update()`` backs the scale
    off exactly as with the two calls. (With inf/NaN present the gradients are left
    multiplied by a zero or NaN coefficient, as the two calls leave them; the step is skipped
    either way. ``nonfinite="skip"`` leaves them scaled and untouched instead.)

    A ``ShardedGradScaler`` (FSDP) has ``found_inf`` all-reduced over its process group, as
    its ``unscale_`` does, so every rank skips the same steps. Scalers this cannot fold (see
    :func:`fuses`) get their own ``unscale_`` followed by :func:`tritonclip.clip_grad_norm_`.

    Args:
        scaler (torch.amp.GradScaler): the scaler whose ``scale`` produced the gradients.
        optimizer (torch.optim.Optimizer): whose parameters' gradients are unscaled and clipped.
        max_norm, norm_type, foreach, backend, eps, process_group: as in
            :func:`tritonclip.clip_grad_norm_` (``process_group``: the ranks whose shards
            make up the gradients, e.g. FSDP's).
        error_if_nonfinite (bool): raise ``RuntimeError`` on an inf/NaN gradient (with AMP an
            overflow is routine; the default lets the scaler skip the step). Default: False
        nonfinite (str): ``"propagate"`` (default), ``"error"`` or ``"skip"``, as above.

    Returns:
        The total norm of the *unscaled* gradients, 0-dim, on the first gradient's device
        (float32; float64 when a float64 gradient takes part). A disabled scaler makes this
        :func:`tritonclip.clip_grad_norm_`.
    """
    mode = _core.nonfinite_mode(nonfinite, error_if_nonfinite)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    extras = dict(foreach=foreach, backend=backend, eps=eps, nonfinite=mode,
                  process_group=process_group)
    if _compile.compiling():
        if not _compiles(scaler, process_group):
            return _eager(unscale_and_clip_, scaler, optimizer, max_norm, norm_type, False,
                          **extras)
        enabled = scaler._enabled  # (is_enabled is torch.amp code, which dynamo skips)
    else:
        enabled = scaler.is_enabled()
    if not enabled:
        return clip_grad_norm_(params, max_norm, norm_type, **extras)
    if not fuses(scaler):
        scaler.unscale_(optimizer)
        return clip_grad_norm_(params, max_norm, norm_type, **extras)
    state, scale = begin_unscale(scaler, optimizer)
    grads = (_compile.grads_of if _compile.compiling() else _core.grads_of)(params)
    sharded = ShardedGradScaler is not None and isinstance(scaler, ShardedGradScaler)
    for index, g in enumerate(grads):
        if g.dtype == torch.float16 and not sharded:  # (ShardedGradScaler allows them)
            raise ValueError(
                f"gradients[{index}] is float16: GradScaler does not unscale float16 "
                "gradients (keep the parameters in float32 under autocast)"
            )
    total, found_inf = unscale_and_clip_grads_(
        grads, inverse_scale(scale), max_norm, norm_type, foreach, backend=backend, eps=eps,
        nonfinite=mode, process_group=process_group)
    end_unscale(scaler, state, found_inf, grads)
    return total


def _compiles(scaler, process_group) -> bool:
    """Whether :func:`unscale_and_clip_` can run with ``scaler`` in compiled code: it folds
    (:func:`fuses`) and needs no collective (not sharded, no ``process_group``)."""
    sharded = ShardedGradScaler is not None and isinstance(scaler, ShardedGradScaler)
    return fuses(scaler) and not sharded and process_group is None


def begin_unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer):
    """(the optimizer's GradScaler state, the scale tensor), after the checks that
    ``GradScaler.unscale_`` makes first (for a scaler that :func:`fuses`)."""
    states = scaler._per_optimizer_states
    # (set back: under torch.compile, the entry a defaultdict creates on a miss is otherwise
    # lost, torch 2.13)
    state = states[id(optimizer)] = states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    if scaler._scale is None:  # (GradScaler._check_scale_growth_tracker's check)
        raise RuntimeError("unscale_and_clip_ found no scale: call scaler.scale(loss) before "
                           "it in the iteration")
    return state, scaler._scale


def end_unscale(scaler, state: dict, found_inf: torch.Tensor,
                grads: list[torch.Tensor]) -> None:
    """Leave the state as ``unscale_`` does: ``found_inf`` on every gradient device (summed
    over a ``ShardedGradScaler``'s process group), stage UNSCALED (so ``step`` consults it and
    ``update`` backs the scale off)."""
    group = getattr(scaler, "process_group", None)
    if ShardedGradScaler is not None and isinstance(scaler, ShardedGradScaler):
        found_inf = distributed.all_reduce_sum(found_inf, group)
    devices = dict.fromkeys(g.device for g in grads)
    state["found_inf_per_device"] = {d: _core.move(found_inf, d) for d in devices}
    state["stage"] = OptState.UNSCALED
