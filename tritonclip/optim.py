"""Clipping folded into torch's fused optimizers: the norm is read once, and the optimizer's
own step applies the coefficient, instead of a separate read + write of every gradient.

torch's fused Adam, AdamW, SGD and Adagrad (``fused=True``) divide the gradients by a device
tensor ``optimizer.grad_scale`` and skip the step where ``optimizer.found_inf`` is set;
GradScaler uses these to unscale. :func:`clip_into_` sets them so that the division also
clips. (``tritonclip.attach`` registers clipping on an optimizer once, and folds a plain
global-norm clip into fused optimizers through :func:`clip_into_`.)
"""

from __future__ import annotations

import torch

from . import _compile, _core, amp
from .clip_grad import clip_grad_norm_

__all__ = ["can_fold", "clear_stale", "clip_into_", "fold_", "folds_into"]

_HOOK_ATTRIBUTE = "_tritonclip_clip_into_hook"
_FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
MARKER = "_tritonclip_grad_scale_set"


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

    An optimizer whose step does not apply ``grad_scale`` (not ``fused=True``), or a scaler
    whose unscale cannot be folded (:func:`tritonclip.amp.fuses`), gets the plain recipe
    instead: :func:`tritonclip.clip_grad_norm_` (or, with a scaler,
    :func:`tritonclip.amp.unscale_and_clip_`), so the call is always correct.

    Args:
        optimizer (torch.optim.Optimizer): a fused Adam, AdamW, SGD or Adagrad (others fall
            back).
        max_norm, norm_type, error_if_nonfinite, foreach, backend, eps, nonfinite: as in
            :func:`tritonclip.clip_grad_norm_`.
        scaler (torch.amp.GradScaler, optional): the scaler of the gradients, if any.

    Returns:
        The total norm of the (unscaled) gradients: 0-dim, on the first gradient's device
        (float32; float64 when a float64 gradient takes part).
    """
    if _compile.compiling():
        return _compile.stateful(clip_into_, optimizer, max_norm, norm_type,
                                 error_if_nonfinite, foreach, scaler=scaler, backend=backend,
                                 eps=eps, nonfinite=nonfinite)
    mode = _core.nonfinite_mode(nonfinite, error_if_nonfinite)
    scaling = scaler is not None and scaler.is_enabled()
    clear_stale(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not can_fold(optimizer, scaler if scaling else None):
        extras = dict(foreach=foreach, backend=backend, eps=eps, nonfinite=mode)
        if scaling:
            return amp.unscale_and_clip_(scaler, optimizer, max_norm, norm_type, **extras)
        return clip_grad_norm_(params, max_norm, norm_type, **extras)

    max_norm, norm_type, eps, mode, foreach = _core.norm_clip_args(
        max_norm, norm_type, eps, mode, False, foreach)
    grads = _core.prepare(params, _core.backend_name(backend), "read", parameters=True)
    if not grads.tensors:
        return grads.norm(norm_type, foreach)
    skip = mode == "skip"
    if scaling:
        state, scale = amp.begin_unscale(scaler, optimizer)
        inv_scale = _core.move(amp.inverse_scale(scale), grads.device)
        total, _, found_inf = grads.norm_and_coefficient(norm_type, foreach, max_norm, eps,
                                                         skip, inv_scale)
        _core.check_nonfinite(total, mode, norm_type)
        fold_(optimizer, grads.coefficient(total, max_norm, eps, skip), scale)
        amp.end_unscale(scaler, state, found_inf, _core.grads_of(params))
    else:
        total, coef, _ = grads.norm_and_coefficient(norm_type, foreach, max_norm, eps, skip)
        _core.check_nonfinite(total, mode, norm_type)
        fold_(optimizer, coef)
    return total


def can_fold(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
    """Whether a clip coefficient can be folded into ``optimizer``'s next step (with the
    unscale of an enabled ``scaler``, when one is given)."""
    return folds_into(optimizer) and (scaler is None or (_scaler_keeps_grad_scale()
                                                         and amp.fuses(scaler)))


def fold_(optimizer: torch.optim.Optimizer, coef: torch.Tensor,
          scale: torch.Tensor | None = None) -> None:
    """Hand the clip coefficient ``coef`` (a device tensor) to ``optimizer``'s next fused step
    as ``grad_scale = 1 / coef``, removed after that step; with a GradScaler's ``scale``
    (gradients still scaled), ``grad_scale = scale / coef``, which ``scaler.step`` hands to
    the step and then deletes. (Check :func:`can_fold` first.)"""
    if scale is None:
        optimizer.grad_scale = coef.float().reciprocal()
        _remove_after_step(optimizer)
    else:
        optimizer.grad_scale = (_core.move(scale, coef.device).float() / coef).float()


def _remove_after_step(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.grad_scale`` as ours, to be deleted once the next step has used it.

    One permanent step post-hook per optimizer does the deleting (a hook that removed itself
    would mutate torch's hook dict while it is iterated); a step that raises leaves the mark,
    and the next :func:`clip_into_` clears the stale ``grad_scale`` first.
    """
    setattr(optimizer, MARKER, True)
    if getattr(optimizer, _HOOK_ATTRIBUTE, None) is None:
        setattr(optimizer, _HOOK_ATTRIBUTE, optimizer.register_step_post_hook(
            lambda opt, args, kwargs: clear_stale(opt)))


def clear_stale(optimizer: torch.optim.Optimizer) -> None:
    """Delete a ``grad_scale`` that :func:`fold_` set for a step that never used it (the step
    raised)."""
    if getattr(optimizer, MARKER, False):
        if hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
        setattr(optimizer, MARKER, False)
