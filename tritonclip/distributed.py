"""Distributed norms: one all-reduce of the local value per process group.

Each rank reduces its own gradients (or shards) to the norm's "power form": the sum of
|g|^p, the max or min of |g|, or the count of nonzeros. One all-reduce over the group combines
them (SUM, MAX for inf, MIN for -inf), and the root is taken afterwards on every rank, so all
ranks get the same norm and the same coefficient. It is stream-ordered on NCCL: no host
synchronisation.

Parameters that live on different groups (dense parameters sharded over data parallel ranks,
experts over expert-parallel ranks, stages over pipeline ranks) are given as a list of
``(parameters, group)`` pairs; each set is reduced over its group (``None``: not at all, e.g.
replicated DDP gradients), and the sets' values are combined on every rank.

MAX and MIN reductions may drop a NaN (they compare), and a count or a min hides an inf, so
the all-reduce carries NaN and inf flags beside the value: a NaN (inf) gradient on any rank
makes every rank's norm NaN (inf), for every norm type.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_power",
    "all_reduce_sum",
    "check_process_group",
    "megatron_norm_filter",
    "pairs_of",
    "same_members",
    "ranks_of",
    "reduction_device",
]


def pairs_of(process_group, name: str):
    """``process_group`` as a list of ``(list of tensors, group or None)`` pairs, or None when
    it is a single group (or None). Checks every group."""
    if not isinstance(process_group, (list, tuple)):
        check_process_group(process_group)
        return None
    pairs = []
    for index, pair in enumerate(process_group):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise TypeError(
                f"process_group[{index}] must be a (parameters, group) pair, got {pair!r}"
            )
        tensors, group = pair
        check_process_group(group)
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"process_group[{index}] holds a {type(t).__name__}, not a "
                                f"Tensor, among its {name}")
        pairs.append((tensors, group))
    return pairs


def same_members(whole: list[torch.Tensor], pairs, name: str) -> None:
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


def check_process_group(process_group) -> None:
    """``TypeError``/``ValueError`` for a ``process_group=`` argument that cannot be used."""
    if process_group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"process_group={process_group!r} needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD), got {type(process_group).__name__}"
        )


def all_reduce_power(power: torch.Tensor, nan: torch.Tensor, inf: torch.Tensor,
                     norm_type: float, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group-wide (power, any NaN, any inf) of a rank's local values (0-dim tensors).

    One all-reduce of ``[power, nan, inf]``: SUM for finite p and counts, MAX for inf, MIN
    for -inf (with the flags negated, so that MIN keeps them).
    """
    if norm_type == math.inf:
        op, sign = dist.ReduceOp.MAX, 1.0
    elif norm_type == -math.inf:
        op, sign = dist.ReduceOp.MIN, -1.0
    else:
        op, sign = dist.ReduceOp.SUM, 1.0
    device = reduction_device(group, power.device)
    buffer = torch.stack([power, nan.to(power.dtype) * sign, inf.to(power.dtype) * sign])
    buffer = buffer.to(device, non_blocking=device.type == "cuda")
    dist.all_reduce(buffer, op=op, group=group)
    buffer = buffer.to(power.device, non_blocking=power.device.type == "cuda")
    return buffer[0], buffer[1] != 0, buffer[2] != 0


def all_reduce_sum(value: torch.Tensor, group) -> torch.Tensor:
    """``value`` summed over ``group`` (a new tensor on ``value``'s device): stream-ordered on
    NCCL, no host synchronisation."""
    device = reduction_device(group, value.device)
    buffer = value.to(device, copy=True, non_blocking=device.type == "cuda")
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.to(value.device, non_blocking=value.device.type == "cuda")


def reduction_device(process_group, fallback: torch.device) -> torch.device:
    """Where the all-reduce happens, the same on every rank: a CUDA device when the group can
    reduce CUDA tensors (NCCL, alone or beside gloo, or the default backends with CUDA
    present), else the CPU. ``fallback`` is unused when the group decides."""
    backend = str(dist.get_backend(process_group))
    if torch.cuda.is_available() and backend != "gloo" and (
            "nccl" in backend or backend == "undefined"):
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return fallback


def ranks_of(group) -> list[int]:
    """The global ranks of ``group``'s members."""
    return dist.get_process_group_ranks(group)


def megatron_norm_filter(tensor_parallel_group=None):
    """A ``norm_filter`` for :func:`tritonclip.clip_grad_norm_` with Megatron-LM's rules.

    A parameter is counted in the norm when it is not ``shared`` (Megatron marks the second
    copy of a tied embedding ``shared=True``) and it is either split across the tensor-parallel
    ranks (``tensor_model_parallel=True``) or this is tensor-parallel rank 0: a parameter
    replicated on every tensor-parallel rank (a layer norm's weight) is counted once, and
    still scaled on every rank. Pair it with ``process_group`` spanning the tensor-parallel
    ranks (and the pipeline ranks, if any), e.g. ``torch.distributed.group.WORLD`` for
    TP x PP without data parallelism.

    Args:
        tensor_parallel_group (ProcessGroup, optional): the tensor-parallel group (``None``:
            no tensor parallelism; every non-shared parameter is counted).
    """
    check_process_group(tensor_parallel_group)
    first = tensor_parallel_group is None or dist.get_rank(tensor_parallel_group) == 0

    def counted(param: torch.Tensor) -> bool:
        if not isinstance(param, torch.nn.Parameter):
            raise TypeError(
                "megatron_norm_filter reads the attributes of parameters (tensor_model_parallel, "
                f"shared), but was given a {type(param).__name__}: pass parameters (e.g. to "
                "clip_grad_norm_), not their gradients"
            )
        if getattr(param, "shared", False):
            return False
        return bool(getattr(param, "tensor_model_parallel", False)) or first

    return counted
