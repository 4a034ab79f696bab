"""tritonclip.overlap_norm under DDP, FSDP2, FSDP1 and TP/PP/EP groups, on CPU gloo ranks.

Each body trains two copies of a model side by side: one clipped after backward
(``clip_grad_norm_`` of torch, of FSDP1, or of tritonclip where torch has none for the
placements) and one clipped from the norm taken during backward. Norms must agree to 1e-6
and parameters after the run to 1e-5. Accumulation (no_sync, set_requires_gradient_sync),
unused parameters and a GradScaler with a NaN on one rank are part of the runs."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

import spawn

MAX_NORM = 0.05


def _layers(seed=0, n=6, width=64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)])


def _compare(runs, rtol=1e-6):
    (norms, params), (our_norms, our_params) = runs["after"], runs["overlap"]
    assert len(norms) == len(our_norms)
    for step, (a, b) in enumerate(zip(norms, our_norms)):
        if math.isfinite(a):
            assert b == pytest.approx(a, rel=rtol), f"step {step}: {b} vs {a}"
        else:
            assert not math.isfinite(b), f"step {step}"
    assert any(n > MAX_NORM for n in norms if math.isfinite(n))  # the clip was active
    # (the bound: within 1e-5. A fused step divides by 1 / coef where the clip
    # multiplied by coef; Adam amplifies that last-bit difference on near-zero moments)
    for a, b in zip(params, our_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _backward(model, step, rank, micro_batches):
    """``micro_batches`` backward passes, all but the last inside ``model.no_sync()``."""
    for micro in range(micro_batches):
        torch.manual_seed(100 * step + 10 * micro + rank)
        sync = micro == micro_batches - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            model(torch.randn(4, 64)).square().mean().backward()


def _value(norm) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def _ddp(rank, world, backend):
    """DDP (bucket views on and off, several buckets, rebuilt after the first step), with
    accumulation through no_sync, against clip_grad_norm_ + step; a user's comm hook
    composed; a step after no_sync only refused."""
    import tritonclip
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    for view, hook in ((False, None), (True, None), (True, default_hooks.fp16_compress_hook)):
        runs = {}
        for recipe in ("after", "overlap"):
            model = DDP(_layers(), gradient_as_bucket_view=view, bucket_cap_mb=0.03)
            if recipe == "after" and hook is not None:
                model.register_comm_hook(None, hook)
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
            handle = (tritonclip.overlap_norm(model, comm_hook=hook, comm_state=None,
                                              backend=backend)
                      if recipe == "overlap" else None)
            norms = []
            for step in range(4):
                optimizer.zero_grad(set_to_none=step % 2 == 0)
                _backward(model, step, rank, 3 if step >= 2 else 1)
                if recipe == "after":
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
                else:
                    # buckets measured by the comm hook (one bucket until DDP rebuilds them)
                    assert handle._arrivals >= (1 if step == 0 else 2)
                    norm = handle.clip_(MAX_NORM, optimizer)
                norms.append(_value(norm))
                optimizer.step()
            runs[recipe] = norms, [_local(p) for p in model.parameters()]
            if recipe == "overlap":
                with model.no_sync():
                    model(torch.randn(4, 64)).sum().backward()
                with pytest.raises(RuntimeError, match="no bucket was reduced"):
                    handle.total_norm()
        _compare(runs, rtol=1e-6 if hook is None else 1e-5)

    # A filter splits each bucket by parameter: the weights counted, the biases left out.
    runs = {}
    for recipe in ("after", "overlap"):
        model = DDP(_layers(), bucket_cap_mb=0.03)
        weights = {id(layer.weight) for layer in model.module}

        def counted(p):
            return id(p) in weights

        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        handle = tritonclip.overlap_norm(model, norm_filter=counted, backend=backend) \
            if recipe == "overlap" else None
        norms = []
        for step in range(3):
            optimizer.zero_grad()
            torch.manual_seed(100 * step + rank)
            model(torch.randn(4, 64)).square().sum().backward()
            norm = (tritonclip.clip_grad_norm_(model.parameters(), MAX_NORM, norm_filter=counted,
                                               backend=backend)
                    if recipe == "after" else handle.clip_(MAX_NORM, optimizer))
            norms.append(float(norm))
            optimizer.step()
        runs[recipe] = norms, [_local(p) for p in model.parameters()]
    _compare(runs)

    model = DDP(_layers())
    model.register_comm_hook(None, default_hooks.allreduce_hook)
    with pytest.raises(RuntimeError, match="pass yours as comm_hook"):
        tritonclip.overlap_norm(model)

    # DDP keeps its communication hook in C++: the hook holds the handle weakly, so the
    # model is freed; a removed handle's hook cannot be replaced, and says so
    import gc
    import weakref

    model = DDP(_layers())
    tritonclip.overlap_norm(model).remove()
    with pytest.raises(RuntimeError, match="cannot unregister"):
        tritonclip.overlap_norm(model)
    model(torch.randn(4, 64)).sum().backward()  # the removed handle's hook just reduces
    tritonclip.overlap_norm(DDP(_layers()))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None

    ignoring = _layers()
    DDP._set_params_and_buffers_to_ignore_for_model(ignoring, ["0.weight"])
    with pytest.raises(ValueError, match="DDP ignores 1 parameters"):
        tritonclip.overlap_norm(DDP(ignoring))


def _fsdp2_run(model_fn, recipe, rank, backend, reference_clip, scaler_nan_step=None,
               accumulate=True, width=64):
    import tritonclip

    model = model_fn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**8)
              if scaler_nan_step is not None else None)
    handle = tritonclip.overlap_norm(model, backend=backend) if recipe == "overlap" else None
    norms = []
    for step in range(4):
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        micro_batches = 2 if accumulate and step >= 2 else 1
        for micro in range(micro_batches):
            model.set_requires_gradient_sync(micro == micro_batches - 1)
            torch.manual_seed(100 * step + 10 * micro + rank)
            x = torch.randn(4, width)
            if step == scaler_nan_step and rank == 0:
                x[0, 0] = math.nan
            loss = model(x).square().sum()
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if recipe == "overlap":  # every chunk measured by FSDP2's hooks, none left late
            assert all(chunk.measured is not None for chunk in handle._chunks)
        if recipe == "after":
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = reference_clip(model)
        else:
            norm = handle.clip_(MAX_NORM, optimizer, scaler=scaler)
        norms.append(_value(norm))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return norms, [_local(p) for p in model.parameters()], scaler


def _fsdp2(rank, world, backend):
    """fully_shard per layer (1-D mesh), accumulation through set_requires_gradient_sync, and
    a GradScaler with a NaN on rank 0 only: every rank skips that step."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))

    def sharded():
        model = _layers()
        for layer in model:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def torch_clip(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)

    runs = {recipe: _fsdp2_run(sharded, recipe, rank, backend, torch_clip)[:2]
            for recipe in ("after", "overlap")}
    _compare(runs)

    norms, params, scaler = _fsdp2_run(sharded, "overlap", rank, backend, None,
                                       scaler_nan_step=1, accumulate=False)
    assert not math.isfinite(norms[1]) and all(math.isfinite(n) for i, n in enumerate(norms)
                                               if i != 1)
    assert scaler.get_scale() == 2.0**7  # backed off once, on every rank
    scales = [None] * world
    dist.all_gather_object(scales, (scaler.get_scale(), [float(p.sum()) for p in params]))
    assert all(s == scales[0][0] for s, _ in scales)


class _Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x, use_b):
        return self.a(x) + (self.b(x) if use_b else 0)


def _fsdp2_partial_accumulation(rank, world, backend):
    """Micro-batches that all synchronise (FSDP2's default), the last leaving a parameter
    without a gradient: FSDP2 adds into the local shard without moving the DTensor's
    version, and the chunk is measured again at the step."""
    import tritonclip
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = fully_shard(_Branches(), mesh=mesh)
    handle = tritonclip.overlap_norm(model, backend=backend)
    for micro, use_b in enumerate((True, False, True, False)):
        torch.manual_seed(10 * micro + rank)
        model(torch.randn(4, 64), use_b).square().sum().backward()
        if micro % 2:
            ours = handle.total_norm()
            theirs = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
            assert float(ours) == pytest.approx(float(theirs.full_tensor()), rel=1e-6)


def _fsdp2_two_dimensional(rank, world, backend):
    """HSDP (replicate x shard) and FSDP x TP meshes on 4 ranks, against tritonclip's clip
    after backward (torch's cannot combine the two meshes of FSDP x TP)."""
    import tritonclip
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    def clip_after(model):
        return tritonclip.clip_grad_norm_(list(model.parameters()), MAX_NORM, backend=backend)

    hsdp_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))

    def hsdp():
        model = _layers(n=3)
        for layer in model:
            fully_shard(layer, mesh=hsdp_mesh)
        return fully_shard(model, mesh=hsdp_mesh)

    # (on HSDP the replicas see the same data: the seed is the shard rank's)
    shard_rank = hsdp_mesh.get_local_rank("shard")
    runs = {recipe: _fsdp2_run(hsdp, recipe, shard_rank, backend, clip_after)[:2]
            for recipe in ("after", "overlap")}
    _compare(runs)

    tp_mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))

    def fsdp_tp():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 16), torch.nn.LayerNorm(16))
        parallelize_module(model, tp_mesh["tp"], {"0": ColwiseParallel(),
                                                  "2": RowwiseParallel()})
        return fully_shard(model, mesh=tp_mesh["dp"])

    dp_rank = tp_mesh.get_local_rank("dp")
    runs = {recipe: _fsdp2_run(fsdp_tp, recipe, dp_rank, backend, clip_after, width=16)[:2]
            for recipe in ("after", "overlap")}
    _compare(runs)


def _fsdp1(rank, world, backend):
    """FSDP1 FULL_SHARD and NO_SHARD (accumulation inside no_sync), against FSDP's own
    clip_grad_norm_ + step."""
    import tritonclip
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    for strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD):
        runs = {}
        for recipe in ("after", "overlap"):
            model = FSDP(torch.nn.Sequential(FSDP(_layers(n=2), sharding_strategy=strategy,
                                                  device_id=torch.device("cpu")),
                                             FSDP(_layers(1, n=2), sharding_strategy=strategy,
                                                  device_id=torch.device("cpu"))),
                         sharding_strategy=strategy, device_id=torch.device("cpu"))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            handle = tritonclip.overlap_norm(model, backend=backend) if recipe == "overlap" \
                else None
            norms = []
            for step in range(4):
                optimizer.zero_grad()
                _backward(model, step, rank, 2 if step >= 2 else 1)
                norm = (model.clip_grad_norm_(MAX_NORM) if recipe == "after"
                        else handle.clip_(MAX_NORM, optimizer))
                norms.append(_value(norm))
                optimizer.step()
            runs[recipe] = norms, [_local(p) for p in model.parameters()]
        _compare(runs)
    # A backward whose step was skipped (a GradScaler's inf) is overwritten by the next one,
    # though the root FSDP unit owns no parameter (fewer flat parameters than units).
    model = FSDP(torch.nn.Sequential(FSDP(_layers(n=2), device_id=torch.device("cpu")),
                                     FSDP(_layers(1, n=2), device_id=torch.device("cpu"))),
                 device_id=torch.device("cpu"))
    handle = tritonclip.overlap_norm(model, backend=backend)
    for step in range(3):
        model.zero_grad()
        torch.manual_seed(step + rank)
        x = torch.randn(4, 64)
        if step == 0:
            x[0, 0] = math.inf  # (this step is skipped: no finalize)
        model(x).square().mean().backward()
    theirs = model.clip_grad_norm_(math.inf)
    assert float(handle.total_norm()) == pytest.approx(float(theirs), rel=1e-6)
    with pytest.raises(RuntimeError, match="pass yours as comm_hook"):
        other = FSDP(_layers(n=1), device_id=torch.device("cpu"))
        other.register_comm_hook(None, lambda state, grad, output: None)
        tritonclip.overlap_norm(other)

    with pytest.raises(ValueError, match="FSDP1 takes no norm_filter"):
        tritonclip.overlap_norm(FSDP(_layers(n=1), device_id=torch.device("cpu")),
                                norm_filter=lambda p: True)


def _groups(rank, world, backend):
    """Pipeline stages (process_group), experts beside replicated dense layers ((params,
    group) pairs) and Megatron-style tensor parallel duplicates (norm_filter), against
    tritonclip's clip_grad_norm_ with the same arguments; and a stage whose parameters are
    all filtered out still takes part in the all-reduce."""
    import tritonclip

    world_group = dist.group.WORLD

    def run(model_fn, process_group_fn, norm_filter_fn=None, steps=3):
        runs = {}
        for recipe in ("after", "overlap"):
            model = model_fn()
            params = [p for p in model.parameters()]
            optimizer = torch.optim.SGD(params, lr=0.05)
            group = process_group_fn(model)
            norm_filter = norm_filter_fn() if norm_filter_fn else None
            handle = (tritonclip.overlap_norm(model, process_group=group,
                                              norm_filter=norm_filter, backend=backend)
                      if recipe == "overlap" else None)
            norms = []
            for step in range(steps):
                optimizer.zero_grad()
                torch.manual_seed(100 * step + rank)
                model(torch.randn(4, 64)).square().mean().backward()
                norm = (tritonclip.clip_grad_norm_(params, MAX_NORM, process_group=group,
                                                   norm_filter=norm_filter, backend=backend)
                        if recipe == "after" else handle.clip_(MAX_NORM))
                norms.append(float(norm))
                optimizer.step()
            runs[recipe] = norms, [_local(p) for p in params]
        _compare(runs)

    # pipeline: each rank its own stage
    run(lambda: _layers(seed=rank, n=2 + rank), lambda model: world_group)

    # a NaN on one stage makes every rank's norm NaN (the flag rides the all-reduce)
    for bad in (math.nan, math.inf):
        model = _layers(seed=rank, n=2)
        handle = tritonclip.overlap_norm(model, process_group=world_group, backend=backend)
        x = torch.randn(4, 64)
        if rank == 1:
            x[0, 0] = bad
        model(x).sum().backward()
        total = float(handle.total_norm())
        assert math.isnan(total) if math.isnan(bad) else not math.isfinite(total), total
        handle.remove()

    # experts: dense layers replicated (same data on every rank: seed without the rank),
    # one expert per rank
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = _layers(seed=0, n=2)
            self.expert = _layers(seed=10 + rank, n=1)

        def forward(self, x):
            return self.expert(self.dense(x))

    def pairs(model):
        return [(list(model.dense.parameters()), None),
                (list(model.expert.parameters()), world_group)]

    run(Experts, pairs)

    # tensor parallel duplicates: a replicated layer counted once (rank 0's)
    def tp_model():
        model = _layers(seed=rank, n=2)
        model[0].weight.tensor_model_parallel = True
        model[1].weight.tensor_model_parallel = True
        return model

    run(tp_model, lambda model: world_group,
        lambda: tritonclip.distributed.megatron_norm_filter(world_group))


# One test per body: the ranks are shared (tests/spawn.py), so a body costs no process start.
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("body", [_ddp, _fsdp2, _fsdp2_partial_accumulation, _fsdp1, _groups],
                         ids=lambda body: body.__name__.strip("_"))
def test_two_ranks(body, backend):
    spawn.run(body, 2, backend)


@pytest.mark.parametrize("backend", ["torch"])
def test_four_ranks(backend):
    spawn.run(_fsdp2_two_dimensional, 4, backend)
