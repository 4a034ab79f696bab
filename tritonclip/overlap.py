"""Global-norm clipping whose norm is computed while backward runs.

A clip after backward reads every gradient once for the norm before the optimizer reads them
again. Each gradient is final at a known moment of backward, though: when autograd has
accumulated it (one process, FSDP2's sharded gradients), when its DDP bucket has been
all-reduced, or when its FSDP1 flat parameter has been reduce-scattered. :func:`overlap_norm`
hooks those moments and computes the partial norms there, while the device is still busy
with the backward of earlier layers; what is left at the step is a tiny finalize (combine the
partials, one all-reduce per chain of process groups, the coefficient on the device), and the
scale either folded into a fused optimizer step or done in one pass.

How partial norms are kept: every *source* (a chunk of parameters, a DDP bucket, an FSDP1
flat parameter) writes the power form of its gradients (see ``_normmath``) into its own slot
of a device buffer, overwriting what an earlier backward wrote there. A gradient accumulated
over micro-batches is therefore counted as the final sum; micro-batches that do not
synchronise (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``, FSDP1 ``no_sync``)
write nothing until the backward that does. The finalize sums the slots and zeroes them.
"""

from __future__ import annotations

import threading
import weakref

import torch

from . import _core, _normmath, amp
from . import _overlap_hooks as _hooks
from .optim import can_fold, clear_stale, fold_

__all__ = ["OverlapNorm", "overlap_norm"]

_REGISTERED = "_tritonclip_overlap_norm"


def overlap_norm(
    module: torch.nn.Module,
    norm_type: float | str = 2.0,
    *,
    process_group=None,
    norm_filter=None,
    comm_hook=None,
    comm_state=None,
    foreach: bool | None = None,
    backend: str | None = None,
) -> "OverlapNorm":
    r"""Compute the total norm of ``module``'s gradients while backward runs.

    Registers hooks on ``module`` once; after each backward, :meth:`OverlapNorm.clip_` clips
    the gradients (folded into a fused optimizer's step where it can) and
    :meth:`OverlapNorm.total_norm` returns the norm, both without reading the gradients
    again and without a host synchronisation. The norm is that of
    :func:`tritonclip.clip_grad_norm_` over the module's trainable parameters with the same
    ``process_group`` and ``norm_filter``, to float32 rounding.

    Where the partial norms are taken:

    - a plain module (one process, or tensor parallel with DTensor parameters): a
      post-accumulate-grad hook on every parameter; a chunk of up to 32 parameters (or 4 Mi
      elements, ``_overlap_hooks.CHUNK_PARAMETERS``/``CHUNK_ELEMENTS``) is measured in one
      launch once all of its gradients are ready;
    - ``DistributedDataParallel``: a communication hook that measures each bucket after its
      all-reduce (``comm_hook``/``comm_state``: a DDP hook of yours to run first, e.g.
      ``fp16_compress_hook``; default: DDP's all-reduce). The gradients are replicated, so
      the norm needs no all-reduce of its own;
    - FSDP2 (``fully_shard``): the post-accumulate-grad hooks FSDP2 runs on the sharded
      gradients after each reduce-scatter; the norm is all-reduced over the meshes at the end;
    - ``FullyShardedDataParallel`` (FSDP1, not hybrid): a communication hook that measures
      each flat parameter's shard after its reduce-scatter (``comm_hook``/``comm_state``: an
      FSDP hook of yours to run instead of FSDP's default).

    Gradient accumulation: the norm is that of the gradients as the last backward left them
    (a source measured twice keeps the second value). Under DDP and FSDP, micro-batches that
    do not synchronise are not measured; the synchronising one measures the accumulated sum.
    FSDP1 is the exception: it adds each reduce-scatter to the sharded gradient left from
    before, after the hook has measured it, so under FSDP1 accumulate inside ``no_sync()``
    (the sum is then reduced, and measured, once), as FSDP1 recommends anyway; two
    synchronising backward passes in one step are not detected there.

    Gradients changed after backward: for a plain module and FSDP2, a gradient that is
    replaced, modified in place (its version counter moved), set to None, or never measured
    (an unused parameter with a stale gradient) is measured again at the finalize. Writes
    that move no version counter (``.data``, collectives, ``GradScaler.unscale_``, which
    ``total_norm(scaler)`` accounts for) are not seen. Under DDP and FSDP1 the buckets and
    shards are measured as the communication produced them; a change made after backward is
    not seen. The parameters covered are those requiring a gradient now.

    Args:
        module (nn.Module): the model (DDP, FSDP1 and FSDP2 models are recognised).
        norm_type (float or str): the order, > 0 (``'inf'`` included). Default: 2.0
        process_group, norm_filter: as in :func:`tritonclip.clip_grad_norm_` (e.g. the
            pipeline group, ``(parameters, group)`` pairs for experts, Megatron's filter);
            not with FSDP1 (but its own process group).
        comm_hook, comm_state: see above (DDP and FSDP1 only).
        foreach, backend: as in :func:`tritonclip.clip_grad_norm_`.

    Returns:
        An :class:`OverlapNorm` handle.

    Raises:
        TypeError, ValueError: bad arguments; RuntimeError: hooks already registered on the
        module, or a DDP/FSDP1 communication hook already registered. Nothing is registered
        when it raises.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    norm_type = _core.norm_type_value(norm_type)
    if not norm_type > 0:
        raise ValueError(f"overlap_norm takes an order > 0 (a sum of powers or a max, which "
                         f"partial norms combine into), got norm_type={norm_type!r}")
    if norm_filter is not None and not callable(norm_filter):
        raise TypeError(f"norm_filter must be a callable taking a tensor, got {norm_filter!r}")
    if (comm_hook is None) != (comm_state is None) and comm_hook is None:
        raise ValueError("comm_state is given without a comm_hook")
    if comm_hook is not None and not callable(comm_hook):
        raise TypeError(f"comm_hook must be callable, got {comm_hook!r}")
    if getattr(module, _REGISTERED, None) is not None:
        raise RuntimeError("overlap_norm is already registered on this module; remove() the "
                           "handle first")
    return OverlapNorm(module, norm_type, process_group, norm_filter, comm_hook, comm_state,
                       _core.foreach_value(foreach), _core.backend_name(backend))


class OverlapNorm:
    """What :func:`overlap_norm` returns: the hooks of one module and the partial norms of
    the current backward.

    Attributes:
        last_norm (Tensor or None): the norm of the last finalize (0-dim, on the device).
        parameters (list[Tensor]): the trainable parameters covered, in module order.
    """

    def __init__(self, module, norm_type, process_group, norm_filter, comm_hook, comm_state,
                 foreach, backend):
        self.module = module
        self.norm_type = norm_type
        self.foreach = foreach
        self.backend = backend
        self.kind = _hooks.kind(module)
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self.last_norm: torch.Tensor | None = None
        self._active = True
        self._handles: list = []
        # optimizers checked by clip_ -> their parameter count then (add_param_group)
        self._optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # (DDP's callbacks run in gloo's threads)
        self._in_backward = False  # (FSDP1: an arrival has been seen in this backward)
        if not self.parameters:
            raise ValueError("module has no parameter that requires a gradient")
        chain = sharded = None
        if self.kind == "fsdp1":
            if norm_filter is not None or isinstance(process_group, (list, tuple)):
                raise ValueError("overlap_norm on FSDP1 takes no norm_filter and no "
                                 "(parameters, group) pairs: its flat parameters mix many")
            chain, sharded = _hooks.fsdp1_chain(module, process_group)
        if self.kind == "ddp" and getattr(module, "parameters_to_ignore", None):
            raise ValueError(f"DDP ignores {len(module.parameters_to_ignore)} parameters, whose "
                             "gradients are in no bucket: overlap_norm would not see them")
        self._key_of, self._groups = _hooks.keys(self.parameters, process_group, norm_filter,
                                                 chain)
        self.dtype = _normmath.result_dtype(p.dtype for p in self.parameters)
        self._sources = self._register(comm_hook, comm_state, sharded)
        self._slots: list[torch.Tensor] = []  # per key, one slot per source (_slots_on)
        self._arrivals = 0  # sources measured since the last finalize (DDP, FSDP1)
        setattr(module, _REGISTERED, self)

    @property
    def device(self) -> torch.device:
        """Where the norm lives: the first parameter's device, now (the model may have moved
        since registration)."""
        return _core.local_tensors(self.parameters[:1], "parameters")[0].device

    def _slots_on(self, device: torch.device) -> list[torch.Tensor]:
        """The slot buffers, made (zeros) on ``device`` where they are not there yet (once, under
        the lock: DDP's first buckets may arrive in several threads at once)."""
        slots = self._slots
        if not slots or slots[0].device != device:
            with self._lock:
                slots = self._slots
                if not slots or slots[0].device != device:
                    dtype = torch.float32 if device.type == "mps" else torch.float64
                    slots = self._slots = [torch.zeros(self._sources, dtype=dtype, device=device)
                                           for _ in self._groups]
        return slots

    def _register(self, comm_hook, comm_state, sharded) -> int:
        """Register the hooks; the number of sources (slots per key)."""
        if self.kind == "ddp":
            # buckets hold whole parameters: at most one bucket per parameter
            self._param_keys = {id(p): k for p, k in zip(self.parameters, self._key_of)}
            _hooks.register_ddp(self.module, comm_hook, comm_state, self._bucket_ready)
            return len(self.parameters)
        if self.kind == "fsdp1":
            return _hooks.register_fsdp1(self.module, comm_hook, comm_state, sharded,
                                         self._flat_ready)
        if comm_hook is not None:
            raise ValueError("comm_hook is for DistributedDataParallel and FSDP1 modules; this "
                             f"is a {type(self.module).__name__}")
        self._chunks = _hooks.chunks(self.parameters, self._key_of)
        self._handles = _hooks.register_chunks(self._chunks, self._gradient_ready)
        return len(self._chunks)

    def remove(self) -> None:
        """Unregister the hooks. (A DDP or FSDP1 communication hook cannot be unregistered:
        it keeps running the communication, and measures nothing more.)"""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        if getattr(self.module, _REGISTERED, None) is self:
            delattr(self.module, _REGISTERED)

    # -- hooks ----------------------------------------------------------------------------
    @torch.no_grad()
    def _gradient_ready(self, chunk_index: int, position: int) -> None:
        chunk = self._chunks[chunk_index]
        if chunk.measured is not None:
            # accumulated again since it was measured (FSDP2 adds to the local shard without
            # moving the DTensor's version): measured again when complete, else at the step
            chunk.measured = None
        chunk.arrived.add(position)
        if len(chunk.arrived) == len(chunk.params):
            self._measure(chunk)

    def _measure(self, chunk: _hooks.Chunk) -> None:
        grads = [p.grad for p in chunk.params]
        chunk.measured = [(None, 0) if g is None else (weakref.ref(g), g._version)
                          for g in grads]
        chunk.arrived = set()
        chunk.written = True
        self._write(chunk.key, chunk.index, [g for g in grads if g is not None])

    @torch.no_grad()
    def _bucket_ready(self, bucket, reduced: torch.Tensor) -> torch.Tensor:
        if not self._active:
            return reduced
        params = bucket.parameters()
        keys = [self._param_keys[id(p)] for p in params]
        if len(set(keys)) == 1 and keys[0] is not None:  # (no filter: the whole bucket)
            self._write(keys[0], bucket.index(), [reduced])
        else:
            by_key: dict[int, list] = {}
            offset = 0
            for p, key in zip(params, keys):
                if key is not None:
                    by_key.setdefault(key, []).append(reduced[offset:offset + p.numel()])
                offset += p.numel()
            for key, views in by_key.items():
                self._write(key, bucket.index(), views)
        with self._lock:
            self._arrivals += 1
        return reduced

    @torch.no_grad()
    def _flat_ready(self, shard: torch.Tensor) -> None:
        if not self._active:
            return
        # Flat parameters are reduced in the same order by every backward, and each backward
        # numbers them from 0: one whose step was skipped (e.g. by a GradScaler) is
        # overwritten by the next one. (FSDP1's hooks run in the autograd engine's thread,
        # which runs the queued callback at the end of the backward.)
        if not self._in_backward:
            self._in_backward, self._position = True, 0
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self._write(0, self._position, [shard])
        self._position += 1
        self._arrivals += 1

    def _backward_done(self) -> None:
        self._in_backward = False

    def _write(self, key: int, index: int, grads: list[torch.Tensor]) -> None:
        slot = self._slots_on(self.device)[key][index]
        if not grads:
            slot.zero_()
            return
        slot.copy_(self._power(grads))

    def _power(self, grads: list[torch.Tensor]) -> torch.Tensor:
        local = _core.local_tensors(grads, "gradients")
        return _core.prepare(local, self.backend, "read", parameters=False).local_power(
            self.norm_type, self.foreach)

    # -- finalize -------------------------------------------------------------------------
    @torch.no_grad()
    def total_norm(self, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
        """Finalize the partial norms of this backward: the total norm, a 0-dim tensor on the
        device (float32; float64 when a float64 parameter takes part). No host
        synchronisation. With an enabled GradScaler, the norm of the unscaled gradients
        (the hooks saw scaled ones). Call once per step: it starts the next round.

        Raises:
            RuntimeError: under DDP or FSDP1, when no backward has synchronised since the
                last finalize.
        """
        self.last_norm = total = self._unscaled_total(scaler)
        return total

    def _unscaled_total(self, scaler, unscaled_since: bool | None = None) -> torch.Tensor:
        """The total norm, unscaled by an enabled ``scaler``; ``unscaled_since``: the scaler
        has unscaled the gradients since backward, so what is measured late is unscaled
        (None: whether ``scaler.unscale_`` has run for an optimizer since the last update;
        it moves no version counter, so nothing is measured again for it)."""
        if scaler is None or not scaler.is_enabled():
            return self._finish()
        if scaler._scale is None:
            raise RuntimeError("the scaler has no scale yet: call scaler.scale(loss) first")
        if unscaled_since is None:
            unscaled_since = amp.OptState is not None and any(
                state.get("stage") is amp.OptState.UNSCALED
                for state in scaler._per_optimizer_states.values())
        scale = _core.move(scaler._scale, self.device, torch.float64)
        total = self._finish(scale if unscaled_since else None)
        return total * _core.move(amp.inverse_scale(scaler._scale), total.device, total.dtype)

    def _finish(self, late_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The (raw) total norm of the current round; starts the next round. Gradients
        measured late are multiplied by ``late_scale`` first (in power form)."""
        if not self._active:
            raise RuntimeError("this overlap_norm handle was removed: it measures nothing")
        p = self.norm_type
        device = self.device
        extra = self._late_powers() if self.kind == "hooks" else self._check_arrivals()
        all_slots = self._slots_on(device)
        if late_scale is not None:  # (in the slots' dtype: a scale^p may overflow float32)
            factor = _normmath.power_form(late_scale.to(all_slots[0].dtype), p)
            extra = {key: power.to(factor.dtype) * factor for key, power in extra.items()}
        items = []
        for key, (slots, groups) in enumerate(zip(all_slots, self._groups)):
            power = _normmath.reduce_power(slots, p)
            if key in extra:
                power = _normmath.combine([power, extra[key]], p, device, slots.dtype)
            items.append((groups, power, torch.isnan(power), torch.isinf(power)))
        power, nan, inf = _core.reduce_sets(items, p, device)
        for slots in all_slots:
            slots.zero_()
        self._arrivals = 0
        return _normmath.finish(power, nan, inf, p, self.dtype)

    def _late_powers(self) -> dict[int, torch.Tensor]:
        """Measure, in one launch per key, the chunks whose gradients changed since they were
        measured, or that were not measured in this round (unused parameters, stale or
        user-set gradients); their slots are zeroed first."""
        late: dict[int, list] = {}
        for chunk in self._chunks:
            written, chunk.written = chunk.written, False
            if chunk.measured is not None and chunk.unchanged():
                chunk.measured = None
                continue
            if written:  # (a value from earlier in this round: a micro-batch before)
                self._slots_on(self.device)[chunk.key][chunk.index].zero_()
            chunk.measured = None
            chunk.arrived = set()
            grads = late.setdefault(chunk.key, [])
            grads.extend(p.grad for p in chunk.params if p.grad is not None)
        return {key: self._power(grads) for key, grads in late.items() if grads}

    def _check_arrivals(self) -> dict:
        if self._arrivals == 0 and any(p.grad is not None for p in self.parameters):
            raise RuntimeError(
                f"no {'bucket' if self.kind == 'ddp' else 'flat parameter'} was reduced since "
                "the last finalize: overlap_norm measures gradients as the synchronising "
                "backward reduces them (a step after only no_sync() backward passes, or a "
                "second finalize in one step, has nothing measured)"
            )
        return {}

    @torch.no_grad()
    def clip_(
        self,
        max_norm: float,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        eps: float = 1e-6,
        error_if_nonfinite: bool = False,
        nonfinite: str = "propagate",
    ) -> torch.Tensor:
        r"""Finalize the norm and clip the gradients by it: what
        :func:`tritonclip.clip_grad_norm_` does, without reading the gradients for the norm.

        With a fused ``optimizer`` (``fused=True`` Adam, AdamW, SGD, Adagrad), the coefficient
        is folded into its next step as :func:`tritonclip.optim.clip_into_` does: the
        gradients are not touched at all. Otherwise they are scaled in one pass.

        With an enabled ``scaler`` (the gradients are still scaled: call this instead of
        ``scaler.unscale_(optimizer)``, then ``scaler.step(optimizer)`` and
        ``scaler.update()``): the norm is of the unscaled gradients, an inf/NaN gradient
        makes the scaler skip the step (on every rank: the flag is in the norm's
        all-reduce), and the unscale is folded into the fused step or into the one pass.

        Args:
            max_norm (float): max norm of the gradients.
            optimizer (torch.optim.Optimizer, optional): the optimizer of the next step (for
                the fold; required with a ``scaler``).
            scaler (torch.amp.GradScaler, optional): the scaler of the gradients.
            eps, error_if_nonfinite, nonfinite: as in :func:`tritonclip.clip_grad_norm_`.

        Returns:
            The total norm of the (unscaled) gradients, as :meth:`total_norm`.
        """
        max_norm, _, eps, mode, _ = _core.norm_clip_args(max_norm, self.norm_type, eps,
                                                         nonfinite, error_if_nonfinite, None)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if optimizer is not None:
            self.check_optimizer(optimizer)
            clear_stale(optimizer)
        scaling = scaler is not None and scaler.is_enabled()
        if scaling and optimizer is None:
            raise ValueError("clip_ with a scaler needs the optimizer (the scaler keeps its "
                             "state per optimizer)")
        if scaling and not amp.fuses(scaler):
            raise ValueError(f"clip_ folds the unscale of a torch.amp.GradScaler; "
                             f"{type(scaler).__name__} overrides unscale_")
        state = scale = None
        if scaling:
            state, scale = amp.begin_unscale(scaler, optimizer)
        total = self._finish()
        skip = mode == "skip"
        if scaling:  # (the same arithmetic as amp.unscale_and_clip_ and optim.clip_into_)
            inv_scale = _core.move(amp.inverse_scale(scale), total.device, total.dtype)
            total, factor, found = _normmath.unscaled_clip(total, inv_scale, max_norm, eps, skip)
        _core.check_nonfinite(total, mode, self.norm_type)
        coef = _normmath.clip_coefficient(total, max_norm, eps, skip)
        if optimizer is not None and can_fold(optimizer, scaler if scaling else None):
            fold_(optimizer, coef, scale)
        else:
            self._scale_(factor if scaling else coef, skip_at_least_one=not scaling)
        if scaling:
            amp.end_unscale(scaler, state, found, _core.grads_of(self.parameters))
        self.last_norm = total
        return total

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """``ValueError`` unless ``optimizer``'s trainable parameters are exactly those the
        handle covers (the module's when it was registered): the coefficient it is handed is
        theirs. Checked again only when its parameter count changes."""
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        if self._optimizers.get(optimizer) == count:
            return
        theirs = {id(p) for group in optimizer.param_groups for p in group["params"]
                  if p.requires_grad}
        ours = {id(p) for p in self.parameters}
        if ours != theirs:
            raise ValueError(
                f"the optimizer's trainable parameters are not those overlap_norm covers (the "
                f"module's that required a gradient when it was registered): "
                f"{len(ours - theirs)} covered ones are not the optimizer's, "
                f"{len(theirs - ours)} of the optimizer's are not covered (were the parameters "
                "replaced after registration, e.g. by to_empty()? register once they are final)"
            )
        self._optimizers[optimizer] = count

    def _scale_(self, factor: torch.Tensor, skip_at_least_one: bool = True) -> None:
        """Scale every gradient in place by ``factor`` (one pass)."""
        grads = _core.prepare(self.parameters, self.backend, "scale", parameters=True)
        grads.scale_(factor, self.foreach, skip_at_least_one)


