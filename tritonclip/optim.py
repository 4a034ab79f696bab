"""Clipping folded into torch's fused optimizers: the norm is read once, and the optimizer's
own step applies the coefficient, instead of a separate read + write of every gradient.

torch's fused Adam, AdamW and SGD (``fused=True``) divide the gradients by a device tensor
``optimizer.grad_scale`` and skip the step where ``optimizer.found_inf`` is set; GradScaler
uses these to unscale. :func:`clip_into_` sets them so that the division also clips.

:func:`attach` (defined in ``_attach``) registers clipping on an optimizer once, as a step
pre-hook, and folds a plain global-norm clip into fused optimizers through :func:`clip_into_`.
"""

from __future__ import annotations

import torch

from . import _dispatch, _sharding, _validate, amp
from ._attach import ClipHandle, attach
from ._groups import group_tensors
from .clip_grad import clip_grad_norm_

__all__ = ["ClipHandle", "attach", "clip_into_", "folds_into"]

_HOOK_ATTRIBUTE = "_tritonclip_clip_into_hook"


_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
_MARKER = "_tritonclip_grad_scale_set"


def folds_into(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step divides the gradients by ``optimizer.grad_scale``: torch's
    Adam, AdamW, SGD and Adagrad with ``fused=True`` in every parameter group."""
    return (type(optimizer) in _FUSED
            and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(group.get("fused") for group in optimizer.param_groups))


def _scaler_keeps_grad_scale() -> bool:
    """GradScaler.step keeps an ``optimizer.grad_scale`` set after unscaling from torch 2.5
    (pytorch#123429); torch 2.4 replaces it with None, which would drop the clip."""
    return torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


@torch.no_grad()
def clip_into_(
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    backend: str | None = None,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
) -> torch.Tensor:
    r"""Clip the gradients of ``optimizer``'s parameters through its next step.

    Computes the total norm as :func:`tritonclip.clip_grad_norm_` does, but leaves the
    gradients alone: the coefficient :math:`\min(max\_norm / (norm + eps), 1)` is handed to
    the optimizer's fused step as ``optimizer.grad_scale = 1 / coef``, which divides the
    gradients by it while it updates the parameters. The gradients are read twice in all (for
    the norm, then by the optimizer) instead of four times (norm, scale, optimizer).

    Call it between ``backward()`` and ``optimizer.step()``; the attribute is removed after
    the step. With a ``scaler``, call it instead of ``scaler.unscale_(optimizer)`` and then
    ``scaler.step(optimizer)``, ``scaler.update()``: the norm is of the unscaled gradients,
    ``grad_scale`` becomes ``scale / coef``, and an inf/NaN gradient makes the scaler skip the
    step (its state is left as ``unscale_`` leaves it).

    An optimizer whose step does not apply ``grad_scale`` (not ``fused=True``) gets the plain
    recipe instead: :func:`tritonclip.clip_grad_norm_` (or, with a scaler,
    :func:`tritonclip.amp.unscale_and_clip_`), so the call is always correct.

    Args:
        optimizer (torch.optim.Optimizer): a fused Adam, AdamW or SGD (others fall back).
        max_norm, norm_type, error_if_nonfinite, foreach, backend, eps, nonfinite: as in
            :func:`tritonclip.clip_grad_norm_`.
        scaler (torch.amp.GradScaler, optional): the scaler of the gradients, if any.

    Returns:
        The total norm of the (unscaled) gradients: float32, 0-dim, on the first gradient's
        device.
    """
    mode = _validate.nonfinite_mode(nonfinite, error_if_nonfinite)
    extras = dict(foreach=foreach, backend=backend, eps=eps, nonfinite=mode)
    scaling = scaler is not None and scaler.is_enabled()
    _clear_stale(optimizer)
    if not folds_into(optimizer) or (scaling and not _scaler_keeps_grad_scale()):
        if scaling:
            return amp.unscale_and_clip_(scaler, optimizer, max_norm, norm_type, **extras)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return clip_grad_norm_(params, max_norm, norm_type, **extras)

    max_norm, norm_type, eps, mode, foreach = _validate.norm_clip_args(
        max_norm, norm_type, eps, mode, False, foreach)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    backend = _validate.backend_name(backend)
    grads = _validate.grads_of(params)
    local = _sharding.local_tensors(grads)
    groups = group_tensors(local, backend, purpose="scale")
    if not grads:
        return _dispatch.total_norm(grads, groups, norm_type, foreach)
    device = local[0].device
    if scaling:
        state, scale = amp.begin_unscale(scaler, optimizer)
        scaled = _dispatch.any_norm(grads, groups, norm_type, foreach, backend)
        total = scaled * _dispatch.move(amp.inverse_scale(scale), device)
        _dispatch.check_nonfinite(total, mode, norm_type)
        coef = _dispatch.clip_coefficient(total, max_norm, eps, skip_nonfinite=mode == "skip")
        # scaler.step hands grad_scale to the fused step, then deletes it
        optimizer.grad_scale = _dispatch.move(scale, device).float() / coef
        amp.end_unscale(state, amp.nonfinite_flag(scaled), grads)
    else:
        if local is not grads:  # DTensors
            total = _dispatch.any_norm(grads, groups, norm_type, foreach, backend)
            coef = _dispatch.clip_coefficient(total, max_norm, eps,
                                              skip_nonfinite=mode == "skip")
        else:  # one group: the norm kernel gives norm and coefficient (as clip_grad_norm_)
            total, coef = _dispatch.norm_and_coefficient(grads, groups, norm_type, foreach,
                                                         max_norm, eps,
                                                         skip_nonfinite=mode == "skip")
        _dispatch.check_nonfinite(total, mode, norm_type)
        optimizer.grad_scale = coef.reciprocal()
        _remove_after_step(optimizer)
    return total


def _remove_after_step(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.grad_scale`` as ours, to be deleted once the next step has used it.

    One permanent step post-hook per optimizer does the deleting (a hook that removed itself
    would mutate torch's hook dict while it is iterated); a step that raises leaves the mark,
    and the next :func:`clip_into_` clears the stale ``grad_scale`` first.
    """
    setattr(optimizer, _MARKER, True)
    if getattr(optimizer, _HOOK_ATTRIBUTE, None) is None:
        setattr(optimizer, _HOOK_ATTRIBUTE, optimizer.register_step_post_hook(
            lambda opt, args, kwargs: _clear_stale(opt)))


def _clear_stale(optimizer: torch.optim.Optimizer) -> None:
    if getattr(optimizer, _MARKER, False):
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
        setattr(optimizer, _MARKER, False)
