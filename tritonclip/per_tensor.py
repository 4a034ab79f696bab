"""Per-tensor norm clipping: every gradient scaled by its own coefficient (Keras ``clipnorm``,
Paddle ``ClipGradByNorm``), in one norm launch and one scale launch per group."""

from __future__ import annotations

from typing import Optional

import torch

from . import _compile, _core, _normmath
from .clip_grad import TensorOrTensors

__all__ = ["clip_grad_norm_per_tensor_"]


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
) -> torch.Tensor:
    r"""Clip the norm of each parameter's gradient separately, in place.

    Every gradient :math:`g_i` is scaled by its own coefficient

    .. math::
        c_i = \min\left(\frac{max\_norm}{\lVert g_i \rVert_p + eps}, 1\right)

    With the Triton backend, the norms of all gradients of one (device, dtype) come from one
    norm launch plus one finalize launch, and all of them are scaled by one launch that reads
    each tensor's coefficient from a device table; a tensor whose coefficient is 1 is not
    touched. No host synchronisation (except ``nonfinite="error"``).

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is clipped;
            ``None`` gradients are skipped. A parameter listed twice is clipped once.
        max_norm (float): max norm of each gradient (>= 0).
        norm_type (float or str): order of the norm, > 0 (``'inf'`` allowed). Default: 2.0
        error_if_nonfinite (bool): raise ``RuntimeError`` (before any gradient is modified)
            if any gradient's norm is NaN or infinite. Default: False
        foreach (bool, optional): see :func:`tritonclip.get_total_norm`. Default: None
        backend (str, optional): see :func:`tritonclip.clip_grad_norm_`.
        eps (float): added to each norm before dividing. Default: 1e-6
        nonfinite (str): ``"propagate"`` (a NaN/inf norm scales its own gradient by a NaN or
            zero coefficient, as torch would), ``"error"``, or ``"skip"`` (a gradient whose
            norm is not finite is left untouched; the others are clipped). Default:
            ``"propagate"``

    Returns:
        The norm of each gradient before clipping: a 1-D tensor with one entry per parameter
        that has a gradient (in order), on the first gradient's device; float32, float64 when
        a float64 gradient takes part.

    Gradients that share memory (other than the same tensor listed twice) raise
    ``ValueError``: each must be scaled by its own coefficient.
    """
    parameters = _core.tensor_list(parameters, "parameters", warn_empty_generator=True)
    norm_type = _core.positive_norm_type(norm_type)
    max_norm, norm_type, eps, mode, foreach = _core.norm_clip_args(
        max_norm, norm_type, eps, nonfinite, error_if_nonfinite, foreach)
    backend = _core.backend_name(backend)
    if _compile.compiling():
        grads = _compile.grads_of(parameters)
        if _core.has_dtensor(grads):  # (DTensors cannot enter a custom op)
            return _compile.distributed(clip_grad_norm_per_tensor_, parameters, max_norm,
                                        norm_type, False, foreach, backend=backend, eps=eps,
                                        nonfinite=mode)
        return _clip_op(grads, max_norm, norm_type, eps, mode, foreach, backend)
    return _clip(_core.grads_of(parameters), max_norm, norm_type, eps, mode, foreach, backend)


def _clip(grads, max_norm, norm_type, eps, mode, foreach, backend) -> torch.Tensor:
    rows = _core.prepare_rows(grads, None, False, backend, "scale")
    device = grads[0].device if grads else torch.device("cpu")
    norms = [rows.norms(group, norm_type, foreach)[0] for group in rows.groups]
    coefs = [_normmath.clip_coefficient(n, max_norm, eps, mode == "skip") for n in norms]
    result = rows.gather(norms, device)
    _core.check_nonfinite(result, mode, norm_type)
    rows.scale_(coefs)
    return result



@_compile.op("clip_grad_norm_per_tensor_", mutates=("grads",),
             fake=lambda grads, *args: _compile.norm_like(grads, len(grads)))
def _clip_op(grads: list[torch.Tensor], max_norm: float, norm_type: float, eps: float,
             nonfinite: str, foreach: Optional[bool], backend: str) -> torch.Tensor:
    return _clip(grads, max_norm, norm_type, eps, nonfinite, foreach, backend)
