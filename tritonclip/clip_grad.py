"""Drop-in replacements for the clipping functions of ``torch.nn.utils``."""

from __future__ import annotations

from typing import Iterable

import torch

from . import _core

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
    tensors = _core.tensor_list(tensors, "tensors", check_items=False)  # (prepare checks)
    norm_type = _core.norm_type_value(norm_type)
    mode = _core.nonfinite_mode(nonfinite, error_if_nonfinite)
    foreach = _core.foreach_value(foreach)
    backend = _core.backend_name(backend)
    if per_tensor:
        if (norm_filter is not None or isinstance(process_group, (list, tuple))
                or _core.has_dtensor(tensors)):
            raise ValueError("per_tensor=True takes plain tensors, a single process_group and "
                             "no norm_filter (per-tensor norms of shards would be the shards' "
                             "norms)")
        if process_group is None:  # one read for both
            total, norms = _core.tensor_norms(tensors, backend, norm_type, foreach)
        else:
            total = _core.prepare(tensors, backend, "read", parameters=False,
                                  process_group=process_group).norm(norm_type, foreach)
            norms = _core.tensor_norms(tensors, backend, norm_type, foreach)[1]
        _core.check_nonfinite(total, mode, norm_type)
        return total, norms
    total = _core.prepare(tensors, backend, "read", parameters=False,
                          process_group=process_group,
                          norm_filter=norm_filter).norm(norm_type, foreach)
    _core.check_nonfinite(total, mode, norm_type)
    return total


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
    grads = _core.prepare(parameters, _core.backend_name(backend), "scale", parameters=True)
    total_norm = _core.norm_tensor(total_norm, grads.device)
    if grads.groups:
        grads.scale_(grads.coefficient(total_norm, max_norm, eps), foreach)


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
            and torch ops on everything else (CPU, complex, sparse, other devices).
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
    grads = _core.prepare(parameters, _core.backend_name(backend), "scale", parameters=True,
                          process_group=process_group, norm_filter=norm_filter)
    total, coef, _ = grads.norm_and_coefficient(norm_type, foreach, max_norm, eps,
                                                skip_nonfinite=mode == "skip")
    _core.check_nonfinite(total, mode, norm_type)
    grads.scale_(coef, foreach)
    return total


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
    grads = _core.prepare(parameters, _core.backend_name(backend), "clamp", parameters=True)
    grads.clamp_(low, high, foreach)
