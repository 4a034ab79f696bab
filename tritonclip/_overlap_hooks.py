"""Where the partial norms of :func:`tritonclip.overlap_norm` come from: which module kind
it is, which process groups each parameter's norm is reduced over (its key), how parameters
are chunked, and the wiring of torch's hooks (post-accumulate-grad hooks, DDP's and FSDP1's
communication hooks) to the callbacks of an ``OverlapNorm``. Nothing here holds norm state."""

from __future__ import annotations

import functools
import weakref

import torch

from . import _sharding, distributed

# A chunk is the unit of one multi-tensor launch in a hook: consecutive parameters (in reverse
# registration order, the order backward makes their gradients ready) up to this many, or
# this many elements. Fewer, larger chunks mean fewer launches during backward; smaller ones a
# shorter read after the last gradient is ready. Not yet tuned on a GPU (issue 16).
CHUNK_PARAMETERS = 32
CHUNK_ELEMENTS = 1 << 22


def kind(module: torch.nn.Module) -> str:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return "ddp"
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(module, FullyShardedDataParallel):
            return "fsdp1"
    return "hooks"


class Chunk:
    """Parameters measured together in a hook. ``arrived``: the positions whose gradients are
    ready since the last measurement; ``measured``: (weak gradient, version) pairs of a
    measurement that still stands in this round (None: none does); ``written``: whether its
    slot was written in this round."""

    __slots__ = ("index", "key", "params", "arrived", "measured", "written")

    def __init__(self, index: int, key: int, params: list[torch.Tensor]):
        self.index, self.key, self.params = index, key, params
        self.arrived: set[int] = set()
        self.measured: list | None = None
        self.written = False

    def unchanged(self) -> bool:
        """Whether every gradient is the one measured, not modified since."""
        for p, (ref, version) in zip(self.params, self.measured):
            g = p.grad
            if ref is None:
                if g is not None:
                    return False
            elif g is None or g is not ref() or g._version != version:
                return False
        return True


def keys(params, process_group, norm_filter, chain=None):
    """(key of each parameter, None where the filter leaves it out; the reduction chain of
    each key): the process groups the power form of a parameter's gradient is all-reduced
    over, in order (its DTensor mesh's Shard dimensions, then ``process_group``), or
    ``chain`` for every parameter (FSDP1)."""
    if chain is not None:
        return [0] * len(params), [chain]
    pairs = distributed.pairs_of(process_group, "parameters") if process_group is not None \
        else None
    outer_of = {}
    if pairs is not None:
        distributed.same_members(params, pairs, "module's trainable parameters")
        outer_of = {id(t): group for members, group in pairs for t in members}
    chains: dict[tuple, int] = {}
    groups: list[tuple] = []

    def key_of(chain: tuple) -> int:
        ranks = tuple(tuple(distributed.ranks_of(g)) for g in chain)
        if ranks not in chains:
            chains[ranks] = len(groups)
            groups.append(chain)
        return chains[ranks]

    keys = []
    for p in params:
        if norm_filter is not None and not norm_filter(p):
            keys.append(None)
            continue
        outer = outer_of[id(p)] if pairs is not None else process_group
        (_, chain), = _sharding.norm_sets([p], outer)
        keys.append(key_of(chain))
    # Every rank issues the same all-reduces: each outer group's own chain exists even where
    # this rank has no plain parameter in it (a pipeline stage of DTensors only).
    for outer in ([g for _, g in pairs] if pairs is not None else [process_group]):
        if outer is not None:
            key_of((outer,))
    if not groups:
        key_of(())
    return keys, groups


def chunks(params, keys) -> list[Chunk]:
    """Consecutive parameters of one key, in reverse order, up to the chunk limits."""
    out: list[Chunk] = []
    current: list = []
    elements = 0
    key = None
    for p, k in reversed(list(zip(params, keys))):
        if k is None:
            continue
        numel = p.to_local().numel() if _sharding.is_dtensor(p) else p.numel()
        if current and (k != key or len(current) >= CHUNK_PARAMETERS
                        or elements + numel > CHUNK_ELEMENTS):
            out.append(Chunk(len(out), key, current))
            current, elements = [], 0
        current.append(p)
        elements += numel
        key = k
    if current:
        out.append(Chunk(len(out), key, current))
    return out


# The hooks call back through weak references: torch keeps hooks where the garbage collector
# cannot see them (a tensor's hook dict, DDP's C++ reducer), so a strong reference from a hook
# to the handle, and from there to the module, would keep the model alive forever. The handle
# lives as long as the module (an attribute of it); once both are gone, a hook does nothing.


def register_chunks(chunks_: list[Chunk], on_ready) -> list:
    """A post-accumulate-grad hook on every parameter of ``chunks_``:
    ``on_ready(chunk_index, position)`` (a bound method, held weakly) once its gradient is
    accumulated (autograd's, or FSDP2's after the reduce-scatter of its shard). Returns the
    removable handles."""
    ready = weakref.WeakMethod(on_ready)

    def hook(chunk_index, position, param):
        method = ready()
        if method is not None:
            method(chunk_index, position)

    return [p.register_post_accumulate_grad_hook(functools.partial(hook, chunk.index, position))
            for chunk in chunks_ for position, p in enumerate(chunk.params)]


def _register_comm_hook(module, state, hook, kind: str) -> None:
    """``module.register_comm_hook``, with the one-hook-only refusal of DDP and FSDP1 made
    clear; once registered a communication hook cannot be removed, so it is remembered on the
    module."""
    if getattr(module, _COMM_HOOK, False):
        raise RuntimeError(f"overlap_norm has already registered {kind}'s communication hook on "
                           f"this model, which {kind} cannot unregister: keep using that "
                           "handle (remove() stopped its measuring)")
    try:
        module.register_comm_hook(state, hook)
    except (RuntimeError, AssertionError) as error:
        if "once" not in str(error) and "already" not in str(error):
            raise
        raise RuntimeError(f"overlap_norm registers {kind}'s communication hook and {kind} "
                           f"takes one: pass yours as comm_hook= instead ({error})") from None
    setattr(module, _COMM_HOOK, True)


_COMM_HOOK = "_tritonclip_overlap_comm_hook"


def register_ddp(module, comm_hook, comm_state, on_reduced) -> None:
    """DDP's communication hook: ``comm_hook`` (default: DDP's all-reduce), then
    ``on_reduced(bucket, reduced)`` (a bound method, held weakly), which returns the reduced
    bucket DDP takes."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if comm_hook is None:
        comm_hook, comm_state = default_hooks.allreduce_hook, module.process_group
    reduced_ = weakref.WeakMethod(on_reduced)

    def after(bucket, future):
        value = future.value()
        value = value[0] if isinstance(value, (list, tuple)) else value
        method = reduced_()
        return value if method is None else method(bucket, value)

    def hook(state, bucket):
        return comm_hook(state, bucket).then(functools.partial(after, bucket))

    _register_comm_hook(module, comm_state, hook, "DDP")


def fsdp1_chain(module, process_group) -> tuple[tuple, bool]:
    """(the process groups an FSDP1 shard's norm is reduced over, whether it shards)."""
    from torch.distributed.fsdp import ShardingStrategy

    strategy = module.sharding_strategy
    if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP,
                        ShardingStrategy.NO_SHARD):
        raise ValueError(f"overlap_norm supports FSDP1's FULL_SHARD, SHARD_GRAD_OP and "
                         f"NO_SHARD, not {strategy.name} (FSDP1 takes no communication "
                         "hook there)")
    sharded = strategy is not ShardingStrategy.NO_SHARD
    distributed.check_process_group(process_group)
    chain = (module.process_group,) if sharded else ()
    return chain + ((process_group,) if process_group is not None else ()), sharded


def register_fsdp1(module, comm_hook, comm_state, sharded: bool, on_reduced) -> int:
    """FSDP1's communication hook: ``comm_hook`` (default: FSDP's reduce-scatter, or its
    all-reduce for NO_SHARD), then ``on_reduced(shard)`` (a bound method, held weakly).
    Returns the number of FSDP units (an upper bound on the flat parameters reduced per
    backward)."""
    from torch.distributed.algorithms._comm_hooks import default_hooks
    from torch.distributed.fsdp import FullyShardedDataParallel

    if comm_hook is None:
        comm_state = default_hooks.DefaultState(module.process_group)
        comm_hook = default_hooks.reduce_scatter_hook if sharded else default_hooks.allreduce_hook

    reduced_ = weakref.WeakMethod(on_reduced)

    def hook(state, grad, output=None):
        if output is None:
            comm_hook(state, grad)
        else:
            comm_hook(state, grad, output)
        method = reduced_()
        if method is not None:
            method(grad if output is None else output)

    _register_comm_hook(module, comm_state, hook, "FSDP1")
    return len(FullyShardedDataParallel.fsdp_modules(module))
