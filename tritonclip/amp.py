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
"""

from __future__ import annotations


import torch
from torch.amp.grad_scaler import OptState

from . import _dispatch, _sharding, _triton_backend, _validate
from ._groups import group_tensors

__all__ = ["unscale_and_clip_", "unscale_and_clip_grads_"]


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
        max_norm, norm_type, foreach, backend, eps: as in :func:`tritonclip.clip_grad_norm_`.
        nonfinite (str): as in :func:`tritonclip.clip_grad_norm_`; ``"skip"`` leaves the
            (still scaled) gradients untouched when a gradient is inf or NaN.

    Returns:
        ``(total_norm, found_inf)``: the norm of the unscaled gradients (float32, 0-dim, on
        the first gradient's device) and 1.0 if any gradient is inf or NaN, else 0.0 (float32,
        0-dim, same device).
    """
    max_norm, norm_type, eps, mode, foreach = _validate.norm_clip_args(
        max_norm, norm_type, eps, nonfinite, False, foreach)
    if not isinstance(inv_scale, torch.Tensor) or inv_scale.numel() != 1:
        raise TypeError(f"inv_scale must be a one-element tensor, got {inv_scale!r}")
    backend = _validate.backend_name(backend)
    grads = list(grads)
    local = _sharding.local_tensors(grads)
    groups = group_tensors(local, backend, purpose="scale")
    device = local[0].device if grads else inv_scale.device
    inv_scale = _dispatch.move(inv_scale.reshape(()), device, torch.float32)
    if not grads:
        return torch.zeros((), device=device), torch.zeros((), device=device)

    group = None if local is not grads else _dispatch.fused_group(local, groups, norm_type)
    if group is not None:
        # One launch gives the unscaled norm, the factor and found_inf (the same values as
        # the torch ops below, bit for bit): with the scale, two launches in all.
        total, factor, found_inf = _triton_backend.unscale_norm_and_factor(
            group, norm_type, max_norm, eps, mode == "skip", inv_scale)
        _dispatch.check_nonfinite(total, mode, norm_type)
    else:
        scaled_norm = _dispatch.any_norm(grads, groups, norm_type, foreach, backend)
        found_inf = nonfinite_flag(scaled_norm)
        total = scaled_norm * inv_scale
        _dispatch.check_nonfinite(total, mode, norm_type)
        coef = _dispatch.clip_coefficient(total, max_norm, eps, skip_nonfinite=False)
        factor = coef * inv_scale
        if mode == "skip":
            factor = torch.where(found_inf > 0, torch.ones_like(factor), factor)
    _dispatch.scale_(groups, factor, foreach, skip_at_least_one=False)
    return total, found_inf


def nonfinite_flag(norm: torch.Tensor) -> torch.Tensor:
    """1.0 if the norm is inf or NaN, else 0.0 (float32): :func:`tritonclip.get_total_norm`'s
    norm is non-finite whenever a gradient is, for every norm order."""
    return (~torch.isfinite(norm)).float()


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale as GradScaler.unscale_ computes it: the reciprocal in float64 for an exact
    power-of-two inverse, except on MPS (no float64 there)."""
    if scale.device.type == "mps":
        return scale.reciprocal()
    return scale.double().reciprocal().float()


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

    Args:
        scaler (torch.amp.GradScaler): the scaler whose ``scale`` produced the gradients.
        optimizer (torch.optim.Optimizer): whose parameters' gradients are unscaled and clipped.
        max_norm, norm_type, foreach, backend, eps: as in :func:`tritonclip.clip_grad_norm_`.
        error_if_nonfinite (bool): raise ``RuntimeError`` on an inf/NaN gradient (with AMP an
            overflow is routine; the default lets the scaler skip the step). Default: False
        nonfinite (str): ``"propagate"`` (default), ``"error"`` or ``"skip"``, as above.

    Returns:
        The total norm of the *unscaled* gradients, float32 0-dim, on the first gradient's
        device. A disabled scaler makes this :func:`tritonclip.clip_grad_norm_`.

    This reads GradScaler's private state (``_scale``, ``_per_optimizer_states``), as torch's
    own ``step`` does; it is tested against the two-call recipe step by step.
    """
    mode = _validate.nonfinite_mode(nonfinite, error_if_nonfinite)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not scaler.is_enabled():
        from .clip_grad import clip_grad_norm_

        return clip_grad_norm_(params, max_norm, norm_type, foreach=foreach, backend=backend,
                               eps=eps, nonfinite=mode)
    state, scale = begin_unscale(scaler, optimizer)
    grads = _validate.grads_of(params)
    for index, g in enumerate(grads):
        if g.dtype == torch.float16:
            raise ValueError(
                f"gradients[{index}] is float16: GradScaler does not unscale float16 "
                "gradients (keep the parameters in float32 under autocast)"
            )
    inv_scale = inverse_scale(scale)
    total, found_inf = unscale_and_clip_grads_(
        grads, inv_scale, max_norm, norm_type, foreach, backend=backend, eps=eps,
        nonfinite=mode,
    )
    end_unscale(state, found_inf, grads)
    return total


def begin_unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer):
    """(the optimizer's GradScaler state, the scale tensor), after the checks that
    ``GradScaler.unscale_`` makes first."""
    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError(
            "unscale_() has already been called on this optimizer since the last update()."
        )
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    scale, _ = scaler._check_scale_growth_tracker("unscale_")
    return state, scale


def end_unscale(state: dict, found_inf: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Leave the state as ``GradScaler.unscale_`` does: ``found_inf`` on every gradient
    device, stage UNSCALED (so ``step`` consults it and ``update`` backs the scale off)."""
    devices = dict.fromkeys(g.device for g in grads)
    state["found_inf_per_device"] = {d: _dispatch.move(found_inf, d) for d in devices}
    state["stage"] = OptState.UNSCALED
