"""Drop-in replacements for the clipping functions of ``torch.nn.utils``."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from . import _compile, _core

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    nonfinite: str = "propagate",
    per_tensor: bool = False,
    process_group=None,
    norm_filter=None,
):
    r"""Compute the norm of an iterable of tensors, viewed as a single vector.

    Same arguments and meaning as :func:`torch.nn.utils.get_total_norm`.

    Args:
        tensors (Iterable[Tensor] or Tensor): tensors (usually gradients) whose norm is taken.
        norm_type (float or str): order of the norm: any float, ``'inf'`` or ``'-inf'``.
            ``0`` counts the nonzero elements. Default: 2.0
        error_if_nonfinite (bool): if True, raise ``RuntimeError`` when the norm is NaN or
            infinite (same as ``nonfinite="error"``). Default: False
        foreach (bool, optional): for the torch backend, use the ``torch._foreach_*`` ops
            (``None``: where the device supports them; ``True``: raise where it does not).
            The Triton kernels are multi-tensor whatever its value. Default: None
        backend (str, optional): see :func:`clip_grad_norm_`.
        nonfinite (str): ``"propagate"`` (return the non-finite norm), ``"error"`` (raise).
            ``"skip"`` means the same as ``"propagate"`` here. Default: ``"propagate"``
        per_tensor (bool): also return each tensor's own norm. Default: False
        process_group (ProcessGroup or list, optional): the norm is over the tensors of
            every rank of this group (each rank passes its own shards): one all-reduce, no
            host synchronisation; every rank gets the same value. A NaN on any rank gives NaN
            on all. Per-tensor norms stay local. A list of ``(tensors, group)`` pairs, as in
            :func:`clip_grad_norm_`. DTensors are reduced over their own mesh; see
            :func:`clip_grad_norm_`. Default: None (this process only)
        norm_filter (callable, optional): ``norm_filter(t)`` False leaves tensor ``t`` out
            of the norm; see :func:`clip_grad_norm_`. Default: None (all are counted)

    Returns:
        The total norm, a 0-dim tensor on the first tensor's device (a CPU tensor ``0.`` for
        empty input): float32, float64 when a float64 tensor takes part. With
        ``per_tensor=True``, a tuple ``(total, norms)`` where ``norms`` is a 1-D tensor of the
        same dtype holding the norm of each input tensor, in order (NaN or inf for a tensor
        with a NaN or inf element, whatever the order).

    Each distinct storage region is counted once: a tensor listed twice, or two views of
    the same memory, contribute their elements once.
    """
    # (prepare checks the items; an op's arguments are checked before it is called)
    tensors = _core.tensor_list(tensors, "tensors", check_items=_compile.compiling())
    norm_type = _core.norm_type_value(norm_type)
    mode = _core.nonfinite_mode(nonfinite, error_if_nonfinite)
    foreach = _core.foreach_value(foreach)
    backend = _core.backend_name(backend)
    if per_tensor and (norm_filter is not None or isinstance(process_group, (list, tuple))
                       or _core.has_dtensor(tensors)):
        raise ValueError("per_tensor=True takes plain tensors, a single process_group and "
                         "no norm_filter (per-tensor norms of shards would be the shards' "
                         "norms)")
    if _compile.compiling():
        if process_group is not None or _core.has_dtensor(tensors):
            return _compile.distributed(get_total_norm, tensors, norm_type, False, foreach,
                                        backend=backend, nonfinite=mode, per_tensor=per_tensor,
                                        process_group=process_group, norm_filter=norm_filter)
        if per_tensor:
            return _tensor_norms_op(tensors, norm_type, mode, foreach, backend)
        return _total_norm_op(tensors, norm_type, mode, foreach, backend,
                              _compile.counted(tensors, norm_filter))
    if per_tensor:
        return _tensor_norms(tensors, norm_type, mode, foreach, backend, process_group)
    return _total_norm(tensors, norm_type, mode, foreach, backend, process_group, norm_filter)


def _total_norm(tensors, norm_type, mode, foreach, backend, process_group=None,
                norm_filter=None) -> torch.Tensor:
    total = _core.prepare(tensors, backend, "read", parameters=False,
                          process_group=process_group,
                          norm_filter=norm_filter).norm(norm_type, foreach)
    _core.check_nonfinite(total, mode, norm_type)
    return total


def _tensor_norms(tensors, norm_type, mode, foreach, backend, process_group=None):
    if process_group is None:  # one read for both
        total, norms = _core.tensor_norms(tensors, backend, norm_type, foreach)
    else:
        total = _core.prepare(tensors, backend, "read", parameters=False,
                              process_group=process_group).norm(norm_type, foreach)
        norms = _core.tensor_norms(tensors, backend, norm_type, foreach)[1]
    _core.check_nonfinite(total, mode, norm_type)
    return total, norms


@_compile.op("get_total_norm", fake=lambda tensors, *args: _compile.norm_like(tensors))
def _total_norm_op(tensors: list[torch.Tensor], norm_type: float, nonfinite: str,
                   foreach: Optional[bool], backend: str,
                   counted: Optional[list[bool]]) -> torch.Tensor:
    return _total_norm(tensors, norm_type, nonfinite, foreach, backend,
                       norm_filter=_compile.filter_of(tensors, counted))


@_compile.op("get_tensor_norms", fake=lambda tensors, *args: (
    _compile.norm_like(tensors), _compile.norm_like(tensors, len(tensors))))
def _tensor_norms_op(tensors: list[torch.Tensor], norm_type: float, nonfinite: str,
                     foreach: Optional[bool], backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _tensor_norms(tensors, norm_type, nonfinite, foreach, backend)


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor | float,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    eps: float = 1e-6,
) -> None:
    r"""Scale the gradients of parameters given a pre-computed total norm.

    Same arguments and meaning as :func:`torch.nn.utils.clip_grads_with_norm_`:

    .. math::
        grad = grad \cdot \min\left(\frac{max\_norm}{total\_norm + eps}, 1\right)

    The coefficient is computed on the device and read there by the kernels: no host
    synchronisation, and when it is 1 the Triton scale kernel returns before touching memory.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is scaled.
        max_norm (float): max norm of the gradients (>= 0).
        total_norm (Tensor or float): the total norm to clip against: a non-negative
            number, or a real tensor of one element. A negative norm raises ``ValueError``
            when it is a number or a CPU tensor; on a GPU, checking it would wait for the
            device, so a negative norm there gives a NaN coefficient (and NaN gradients)
            rather than flipping their signs.
        foreach (bool, optional): see :func:`get_total_norm`.
        backend (str, optional): see :func:`clip_grad_norm_`.
        eps (float): added to the norm before dividing. Default: 1e-6
    """
    parameters = _core.tensor_list(parameters, "parameters")
    max_norm = _core.nonnegative(max_norm, "max_norm")
    eps = _core.nonnegative(eps, "eps", allow_inf=False)
    foreach = _core.foreach_value(foreach)
    backend = _core.backend_name(backend)
    if not _compile.compiling():
        return _scale_by_norm(parameters, True, max_norm, total_norm, eps, foreach, backend)
    grads = _compile.grads_of(parameters)
    if _core.has_dtensor(grads) or (isinstance(total_norm, torch.Tensor)
                                    and _core.has_dtensor([total_norm])):
        return _compile.distributed(clip_grads_with_norm_, parameters, max_norm, total_norm,
                                    foreach, backend=backend, eps=eps)
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_core.nonnegative(total_norm, "total_norm"))
    _scale_by_norm_op(grads, max_norm, total_norm, eps, foreach, backend)


def _scale_by_norm(items, parameters, max_norm, total_norm, eps, foreach, backend) -> None:
    grads = _core.prepare(items, backend, "scale", parameters=parameters)
    total_norm = _core.norm_tensor(total_norm, grads.device)
    if grads.groups:
        grads.scale_(grads.coefficient(total_norm, max_norm, eps), foreach)


@_compile.op("clip_grads_with_norm_", mutates=("grads",))
def _scale_by_norm_op(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor,
                      eps: float, foreach: Optional[bool], backend: str) -> None:
    _scale_by_norm(grads, False, max_norm, total_norm, eps, foreach, backend)


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    process_group=None,
    norm_filter=None,
) -> torch.Tensor:
    r"""Clip the gradient norm of an iterable of parameters.

    Same arguments and meaning as :func:`torch.nn.utils.clip_grad_norm_`: the norm is taken
    over all gradients viewed as one vector, and every gradient is scaled in place by

    .. math::
        \min\left(\frac{max\_norm}{total\_norm + eps}, 1\right)

    On CUDA, with the Triton backend, gradients of one dtype are clipped in two launches
    (the norm, whose last program also computes the coefficient, and the scale), with no host
    synchronisation (except ``nonfinite="error"``). Mixed dtypes or devices add a few small
    torch ops to combine the groups.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is clipped; a
            generator is consumed once. ``None`` gradients are skipped.
        max_norm (float): max norm of the gradients (>= 0; ``inf`` never clips).
        norm_type (float or str): order of the norm: any float, ``'inf'`` or ``'-inf'``.
            ``0`` counts the nonzero elements of all gradients. Default: 2.0
        error_if_nonfinite (bool): if True, raise ``RuntimeError`` (before any gradient is
            modified) when the total norm is NaN or infinite. Default: False
        foreach (bool, optional): see :func:`get_total_norm`. Default: None
        backend (str, optional): ``"auto"``, ``"triton"`` or ``"torch"``. ``None`` reads
            the environment variable ``TRITONCLIP_BACKEND`` and defaults to ``"auto"``, which
            runs the Triton kernels on CUDA float16/bfloat16/float32/float64 dense gradients
            and torch ops on everything else (CPU, complex, sparse, other devices, and a
            ROCm build of torch, where the kernels are compile-checked but untested).
            ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``; otherwise it raises
            ``ValueError`` before touching any gradient. Gradients that are not one dense
            block of memory (e.g. ``g[:, ::2]``) are handled by torch ops in every backend.
        eps (float): added to the norm before dividing. Default: 1e-6
        nonfinite (str): what a NaN/inf total norm does: ``"propagate"`` scales by the
            non-finite coefficient as torch does, ``"error"`` raises like
            ``error_if_nonfinite=True``, ``"skip"`` leaves every gradient untouched and
            returns the norm. Default: ``"propagate"``
        process_group (ProcessGroup or list, optional): clip by the norm over the gradients
            of every rank of this group (sharded parameters: FSDP, tensor parallel; each rank
            passes its own shards). One all-reduce of the local value, no host
            synchronisation; every rank computes the same coefficient, and a NaN on any rank
            is seen by all (so ``nonfinite="skip"`` leaves every rank's gradients untouched).
            A list of ``(parameters, group)`` pairs (group ``None``: no reduction) combines
            sets that live on different groups, e.g. dense parameters over data parallel
            ranks and experts over expert-parallel ranks; the pairs must hold exactly
            ``parameters``, each once. Gradients that are DTensors (FSDP2, tensor parallel)
            need no group: each is reduced over the mesh dimensions where it is ``Shard``
            (not ``Replicate``: counted once; ``Partial``: summed first), DTensors on
            different meshes or placements and plain tensors mix freely, and the norm is a
            plain tensor equal on every rank. A group given with DTensors must be one over
            which they are *not* already sharded (pipeline stages). Every rank must pass
            parameters of the same structure (the collectives follow it). Default: None
        norm_filter (callable, optional): ``norm_filter(param)`` False leaves ``param`` out
            of the norm, but its gradient is still scaled: e.g. a parameter replicated on
            every tensor-parallel rank is counted on one
            (:func:`tritonclip.distributed.megatron_norm_filter`). Default: None

    Returns:
        Total norm of the gradients (viewed as a single vector): a 0-dim tensor on the first
        gradient's device, float32, or float64 when a float64 gradient takes part (whose
        coefficient is then computed in float64 too).

    Deliberate differences from torch:
        * The norm is float32 for float16/bfloat16/float32 gradients (torch returns it in
          their dtype, which for bfloat16 gradients keeps only 8 bits of it).
        * With ``max_norm=0`` and ``eps=0``, gradients whose norm is 0 are left as they are
          (torch computes 0 / 0 and makes them NaN).
        * ``norm_type=0`` counts the nonzero elements of the concatenated gradients, as
          torch's docstring says; torch's code counts the gradients that have any.
        * A NaN (inf) gradient makes the norm NaN (inf) for every ``norm_type``; torch's
          orders 0 and -inf can stay finite.
        * A storage region shared by several gradients (a parameter listed twice, aliased
          grads) is counted once in the norm and scaled once.
    """
    parameters = _core.tensor_list(parameters, "parameters", warn_empty_generator=True)
    max_norm, norm_type, eps, mode, foreach = _core.norm_clip_args(
        max_norm, norm_type, eps, nonfinite, error_if_nonfinite, foreach)
    backend = _core.backend_name(backend)
    if not _compile.compiling():
        return _clip_norm(parameters, True, max_norm, norm_type, eps, mode, foreach, backend,
                          process_group, norm_filter)
    grads, counted = _compile.grads_counted(parameters, norm_filter)
    if process_group is not None or _core.has_dtensor(grads):
        return _compile.distributed(clip_grad_norm_, parameters, max_norm, norm_type, False,
                                    foreach, backend=backend, eps=eps, nonfinite=mode,
                                    process_group=process_group, norm_filter=norm_filter)
    return _clip_norm_op(grads, max_norm, norm_type, eps, mode, foreach, backend, counted)


def _clip_norm(items, parameters, max_norm, norm_type, eps, mode, foreach, backend,
               process_group=None, norm_filter=None) -> torch.Tensor:
    grads = _core.prepare(items, backend, "scale", parameters=parameters,
                          process_group=process_group, norm_filter=norm_filter)
    total, coef, _ = grads.norm_and_coefficient(norm_type, foreach, max_norm, eps,
                                                skip_nonfinite=mode == "skip")
    _core.check_nonfinite(total, mode, norm_type)
    grads.scale_(coef, foreach)
    return total


@_compile.op("clip_grad_norm_", mutates=("grads",),
             fake=lambda grads, *args: _compile.norm_like(grads))
def _clip_norm_op(grads: list[torch.Tensor], max_norm: float, norm_type: float, eps: float,
                  nonfinite: str, foreach: Optional[bool], backend: str,
                  counted: Optional[list[bool]]) -> torch.Tensor:
    return _clip_norm(grads, False, max_norm, norm_type, eps, nonfinite, foreach, backend,
                      norm_filter=_compile.filter_of(grads, counted))


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: float | None = None,
    foreach: bool | None = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    backend: str | None = None,
) -> None:
    r"""Clip the gradients of an iterable of parameters to a range, in place.

    Same arguments and meaning as :func:`torch.nn.utils.clip_grad_value_`, with asymmetric
    bounds as an extra: gradients are clamped to :math:`[-clip\_value, clip\_value]`, or to
    ``[lo, hi]``. One read-write pass (torch makes two: ``clamp_min_`` then ``clamp_max_``).
    NaN gradients stay NaN, as with ``torch.clamp``.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is clipped.
        clip_value (float, optional): symmetric bound (>= 0). Give it, or ``lo``/``hi``.
        foreach (bool, optional): see :func:`get_total_norm`. Default: None
        lo (float, optional): lower bound (``-inf`` when only ``hi`` is given).
        hi (float, optional): upper bound (``inf`` when only ``lo`` is given); ``lo <= hi``.
        backend (str, optional): see :func:`clip_grad_norm_`.
    """
    parameters = _core.tensor_list(parameters, "parameters")
    low, high = _core.value_bounds(clip_value, lo, hi)
    foreach = _core.foreach_value(foreach)
    backend = _core.backend_name(backend)
    if not _compile.compiling():
        return _clamp(parameters, True, low, high, foreach, backend)
    grads = _compile.grads_of(parameters)
    if _core.has_dtensor(grads):  # (DTensors cannot enter a custom op)
        return _compile.distributed(clip_grad_value_, parameters, foreach=foreach, lo=low,
                                    hi=high, backend=backend)
    _clamp_op(grads, low, high, foreach, backend)


def _clamp(items, parameters, low, high, foreach, backend) -> None:
    _core.prepare(items, backend, "clamp", parameters=parameters).clamp_(low, high, foreach)


@_compile.op("clip_grad_value_", mutates=("grads",))
def _clamp_op(grads: list[torch.Tensor], low: float, high: float, foreach: Optional[bool],
              backend: str) -> None:
    _clamp(grads, False, low, high, foreach, backend)
