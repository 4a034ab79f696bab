"""Drop-in replacements for the clipping functions of ``torch.nn.utils``."""

from __future__ import annotations

from typing import Iterable

import torch

from . import _dispatch, _sharding, _validate, distributed
from ._groups import group_tensors

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor]

def _same_members(whole: list[torch.Tensor], pairs, name: str) -> None:
    """Every tensor of ``whole`` in exactly one pair, and nothing else in the pairs."""
    seen: dict[int, int] = {}
    for index, (tensors, _) in enumerate(pairs):
        for t in tensors:
            if id(t) in seen:
                raise ValueError(f"a tensor is in process_group[{seen[id(t)]}] and "
                                 f"process_group[{index}]: each belongs to one group")
            seen[id(t)] = index
    if set(seen) != {id(t) for t in whole}:
        raise ValueError(f"the (parameters, group) pairs of process_group must hold exactly "
                         f"the {name} passed: {len(seen)} in the pairs, {len(whole)} passed")


def _counted(tensors: list[torch.Tensor], norm_filter) -> list[torch.Tensor]:
    """The tensors that ``norm_filter`` keeps in the norm (all, without one)."""
    if norm_filter is None:
        return tensors
    if not callable(norm_filter):
        raise TypeError(f"norm_filter must be a callable taking a tensor, got {norm_filter!r}")
    return [t for t in tensors if norm_filter(t)]


def _sharded_norm(whole, pairs, process_group, norm_type, foreach, backend, device, norm_filter,
                  grads_of_members, name):
    """The norm through norm sets (DTensor meshes, (parameters, group) pairs)."""
    sets = []
    for members, group in pairs if pairs is not None else [(whole, process_group)]:
        sets += _sharding.norm_sets(grads_of_members(_counted(members, norm_filter)), group)
    return _dispatch.total_norm_of_sets(sets, norm_type, foreach, backend, device, name)


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
        The total norm, a float32 0-dim tensor on the first tensor's device (a CPU tensor
        ``0.`` for empty input). With ``per_tensor=True``, a tuple ``(total, norms)`` where
        ``norms`` is a 1-D float32 tensor holding the norm of each input tensor, in order.

    Each distinct storage region is counted once: a tensor listed twice, or two views of
    the same memory, contribute their elements once.
    """
    tensors = _validate.tensor_list(tensors, "tensors")
    norm_type = _validate.norm_type_value(norm_type)
    mode = _validate.nonfinite_mode(nonfinite, error_if_nonfinite)
    foreach = _validate.foreach_value(foreach)
    backend = _validate.backend_name(backend)
    pairs = distributed.pairs_of(process_group, "tensors")
    local = _sharding.local_tensors(tensors)
    groups = group_tensors(local, backend, name="tensors")
    if pairs is not None:
        _same_members(tensors, pairs, "tensors")
    sharded = pairs is not None or local is not tensors  # (local is a new list: DTensors)
    if per_tensor and (sharded or norm_filter is not None):
        raise ValueError("per_tensor=True takes plain tensors, a single process_group and no "
                         "norm_filter (per-tensor norms of shards would be the shards' norms)")
    if sharded:
        device = groups[0].device if groups else torch.device("cpu")
        result = _sharded_norm(tensors, pairs, process_group, norm_type, foreach, backend,
                               device, norm_filter, lambda ts: ts, "tensors")
    elif norm_filter is not None:
        counted = _counted(tensors, norm_filter)
        result = _dispatch.total_norm(counted, group_tensors(counted, backend, name="tensors"),
                                      norm_type, foreach, process_group=process_group)
    else:
        result = _dispatch.total_norm(tensors, groups, norm_type, foreach,
                                      per_tensor=per_tensor, process_group=process_group)
    _dispatch.check_nonfinite(result[0] if per_tensor else result, mode, norm_type)
    return result


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
        total_norm (Tensor or float): the total norm to clip against.
        foreach (bool, optional): see :func:`get_total_norm`.
        backend (str, optional): see :func:`clip_grad_norm_`.
        eps (float): added to the norm before dividing. Default: 1e-6
    """
    parameters = _validate.tensor_list(parameters, "parameters")
    max_norm = _validate.nonnegative(max_norm, "max_norm")
    eps = _validate.nonnegative(eps, "eps", allow_inf=False)
    foreach = _validate.foreach_value(foreach)
    grads = _sharding.local_tensors(_validate.grads_of(parameters))
    groups = group_tensors(grads, _validate.backend_name(backend), purpose="scale")
    if not grads:
        return
    if not isinstance(total_norm, torch.Tensor):
        total_norm = torch.tensor(_validate.nonnegative(total_norm, "total_norm"))
    elif _sharding.is_dtensor(total_norm):  # torch's get_total_norm of DTensor gradients
        total_norm = total_norm.full_tensor()
    total_norm = _dispatch.move(total_norm, grads[0].device)
    coef = _dispatch.clip_coefficient(total_norm, max_norm, eps, skip_nonfinite=False)
    _dispatch.scale_(groups, coef, foreach)


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
        Total norm of the gradients (viewed as a single vector): a float32 0-dim tensor on
        the first gradient's device.

    Deliberate differences from torch:
        * The norm is float32 whatever the gradients' dtype (torch returns it in that dtype,
          which for bfloat16 gradients keeps only 8 bits of it).
        * ``norm_type=0`` counts the nonzero elements of the concatenated gradients, as
          torch's docstring says; torch's code counts the gradients that have any.
        * A NaN (inf) gradient makes the norm NaN (inf) for every ``norm_type``; torch's
          orders 0 and -inf can stay finite.
        * A storage region shared by several gradients (a parameter listed twice, aliased
          grads) is counted once in the norm and scaled once.
    """
    parameters = _validate.tensor_list(parameters, "parameters", warn_empty_generator=True)
    max_norm, norm_type, eps, mode, foreach = _validate.norm_clip_args(
        max_norm, norm_type, eps, nonfinite, error_if_nonfinite, foreach)
    backend = _validate.backend_name(backend)
    pairs = distributed.pairs_of(process_group, "parameters")
    grads = _validate.grads_of(parameters)
    local = _sharding.local_tensors(grads)
    groups = group_tensors(local, backend, purpose="scale")
    skip = mode == "skip"
    if pairs is not None:
        _same_members(parameters, pairs, "parameters")
    if pairs is not None or local is not grads:  # (local is a new list: DTensors)
        device = groups[0].device if groups else torch.device("cpu")
        total = _sharded_norm(parameters, pairs, process_group, norm_type, foreach, backend,
                              device, norm_filter, _validate.grads_of, "gradients")
        coef = _dispatch.clip_coefficient(total, max_norm, eps, skip_nonfinite=skip)
    elif norm_filter is not None:
        counted = _validate.grads_of(_counted(parameters, norm_filter))
        total, coef = _dispatch.norm_and_coefficient(
            counted, group_tensors(counted, backend), norm_type, foreach, max_norm, eps,
            skip_nonfinite=skip, process_group=process_group,
            device=grads[0].device if grads else None)
    elif not grads and process_group is None:
        return _dispatch.total_norm(grads, groups, norm_type, foreach)
    else:
        total, coef = _dispatch.norm_and_coefficient(grads, groups, norm_type, foreach,
                                                     max_norm, eps, skip_nonfinite=skip,
                                                     process_group=process_group)
    _dispatch.check_nonfinite(total, mode, norm_type)
    _dispatch.scale_(groups, coef, foreach)
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
    parameters = _validate.tensor_list(parameters, "parameters")
    low, high = _validate.value_bounds(clip_value, lo, hi)
    foreach = _validate.foreach_value(foreach)
    grads = _validate.grads_of(parameters)
    local = _sharding.local_tensors(grads)
    if local is not grads:  # DTensors
        _sharding.check_no_partial(grads, "gradients")
    groups = group_tensors(local, _validate.backend_name(backend), purpose="clamp")
    _dispatch.clamp_(groups, low, high, foreach)
