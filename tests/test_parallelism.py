"""Norms under each kind of parallelism, on CPU with gloo: DTensor (1-D and 2-D meshes, mixed
meshes, Partial), FSDP2, FSDP1 (both modes), DDP bucket views, tensor-parallel duplicates,
pipeline stages, FSDP2 x TP (a parallelized model), FSDP2 x pipeline. Each is compared with a single-process float64 reference
of the whole model (or with the parallel library's own clip, where it has one)."""

import math

import pytest
import torch
import torch.distributed as dist

import spawn

NORM_TYPES = [0.0, 0.5, 1.0, 2.0, math.inf, -math.inf]


def _full(seed, *shape):
    """The same tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _CountAllReduce:
    """Counts torch.distributed.all_reduce calls (the library's only collective)."""

    def __init__(self):
        self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self):
        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _dtensor_param(grad):
    from torch.distributed.tensor import DTensor

    p = torch.nn.Parameter(DTensor.from_local(torch.zeros_like(grad.to_local()),
                                              grad.device_mesh, grad.placements,
                                              shape=grad.shape, stride=grad.stride()))
    p.grad = grad
    return p


def _one_dimensional_mesh(rank, world, backend):
    """DTensors Shard (even and uneven), Replicate and Partial, beside a plain tensor."""
    import tritonclip
    from helpers import applied_coefficient, assert_norm_close, assert_scaled_once
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor import init_device_mesh
    from tritonclip import reference

    mesh = init_device_mesh("cpu", (world,))
    full = [_full(1, 8, 6), _full(2, 5), _full(3, 7), _full(4, 9), _full(5, 4)]

    def grads():
        partial_share = (rank + 1) / (world * (world + 1) / 2)  # addends summing to full[3]
        # (clones: a Replicate DTensor's local tensor may be the tensor it was made from)
        return [distribute_tensor(full[0].clone(), mesh, [Shard(0)]),
                distribute_tensor(full[1].clone(), mesh, [Shard(0)]),  # 3 + 2 rows: uneven
                distribute_tensor(full[2].clone(), mesh, [Replicate()]),
                DTensor.from_local(full[3] * partial_share, mesh, [Partial()]),
                full[4].clone()]  # a plain tensor, replicated like a DDP gradient

    for p in NORM_TYPES:
        with _CountAllReduce() as counter:
            total = tritonclip.get_total_norm(grads(), p, backend=backend)
        assert type(total) is torch.Tensor and total.dtype == torch.float32
        assert_norm_close(total, reference.total_norm(full, p), grads=full)
        assert counter.calls == 1  # the Shard set only; Replicate and plain need none
    # clipping scales every local tensor (the Partial addends too) by the global coefficient
    gs = grads()
    before = [g.to_local().clone() if isinstance(g, DTensor) else g.clone() for g in gs]
    total = tritonclip.clip_grad_norm_([_dtensor_param(g) if isinstance(g, DTensor)
                                        else _plain_param(g) for g in gs], 1.0, backend=backend)
    assert_norm_close(total, reference.total_norm(full, 2.0), grads=full)
    for g, b in zip(gs, before):
        assert_scaled_once(g.to_local() if isinstance(g, DTensor) else g, b,
                           applied_coefficient(total, 1.0))
    # a NaN in rank 0's shard: NaN on every rank, for every order; "skip" changes nothing
    for p in NORM_TYPES:
        gs = grads()
        if rank == 0:
            gs[0].to_local()[0, 0] = float("nan")
        assert math.isnan(float(tritonclip.get_total_norm(gs, p, backend=backend)))
    # value clip: local tensors clamped; Partial addends refused before anything changes
    gs = grads()
    with pytest.raises(ValueError, match="Partial"):
        tritonclip.clip_grad_value_([_dtensor_param(g) if isinstance(g, DTensor)
                                     else _plain_param(g) for g in gs], 0.5)
    assert torch.equal(gs[0].to_local(), distribute_tensor(full[0], mesh, [Shard(0)]).to_local())
    tritonclip.clip_grad_value_([_dtensor_param(gs[0])], 0.5, backend=backend)
    assert torch.equal(gs[0].full_tensor(), full[0].clamp(-0.5, 0.5))
    # a process group over the DTensors' own mesh would count them twice: refused
    gs = grads()
    with pytest.raises(ValueError, match="overlaps the device mesh"):
        tritonclip.get_total_norm(gs, process_group=dist.group.WORLD, backend=backend)
    # torch's get_total_norm of DTensors (a DTensor) is accepted by clip_grads_with_norm_
    gs = grads()[:3]
    before = [g.to_local().clone() for g in gs]
    theirs = torch.nn.utils.get_total_norm(gs)
    tritonclip.clip_grads_with_norm_([_dtensor_param(g) for g in gs], 1.0, theirs,
                                     backend=backend)
    coef = applied_coefficient(theirs.full_tensor(), 1.0)
    for g, b in zip(gs, before):
        assert_scaled_once(g.to_local(), b, coef)


def _plain_param(grad):
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    return p


def _small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                               torch.nn.Linear(16, 3))


def _fsdp2(rank, world, backend):
    """fully_shard: the norm of the DTensor gradients equals that of their full tensors, and
    torch's own clip of the same gradients."""
    import tritonclip
    from helpers import assert_norm_close
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from tritonclip import reference

    mesh = init_device_mesh("cpu", (world,))
    model = _small_model(0)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(10 + rank)  # different data per rank
    model(torch.randn(4, 8)).square().sum().backward()
    params = list(model.parameters())
    saved = [p.grad.to_local().clone() for p in params]
    full = [p.grad.full_tensor() for p in params]
    for p in NORM_TYPES:
        assert_norm_close(tritonclip.get_total_norm([q.grad for q in params], p,
                                                    backend=backend),
                          reference.total_norm(full, p))
    ours = tritonclip.clip_grad_norm_(params, 0.1, backend=backend)
    clipped = [p.grad.to_local().clone() for p in params]
    for p, s in zip(params, saved):
        p.grad.to_local().copy_(s)
    theirs = torch.nn.utils.clip_grad_norm_(params, 0.1)
    torch.testing.assert_close(ours, theirs.full_tensor(), rtol=1e-5, atol=0)
    for p, c in zip(params, clipped):
        torch.testing.assert_close(c, p.grad.to_local(), rtol=1e-5, atol=1e-7)


def _fsdp1(rank, world, backend):
    """FullyShardedDataParallel, use_orig_params False and True: the same norm and clipped
    gradients as FSDP's own clip_grad_norm_."""
    import tritonclip
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (False, True):
        for norm_type in (2.0, 1.0, math.inf):
            models = []
            for _ in range(2):
                model = FSDP(_small_model(0), use_orig_params=use_orig_params,
                             device_id=torch.device("cpu"))
                torch.manual_seed(10 + rank)
                model(torch.randn(4, 8)).square().sum().backward()
                models.append(model)
            ours = tritonclip.clip_grad_norm_(models[0].parameters(), 0.1, norm_type,
                                              process_group=models[0].process_group,
                                              backend=backend)
            theirs = models[1].clip_grad_norm_(0.1, norm_type)
            torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=0)
            for a, b in zip(models[0].parameters(), models[1].parameters()):
                assert (a.grad is None) == (b.grad is None)
                if a.grad is not None:
                    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def _ddp_bucket_views(rank, world, backend):
    """DDP with gradient_as_bucket_view: one span per bucket, no communication, and the norm
    and clip of torch on the same (already averaged) gradients."""
    import tritonclip
    from torch.nn.parallel import DistributedDataParallel as DDP
    from tritonclip import _core

    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 64) for _ in range(6)]
    model = DDP(torch.nn.Sequential(*layers), gradient_as_bucket_view=True,
                bucket_cap_mb=0.03)  # ~2 layers per bucket
    torch.manual_seed(10 + rank)
    # The first iteration runs with one bucket (first_bucket_bytes); the second forward
    # rebuilds the buckets at bucket_cap_mb.
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        model(torch.randn(4, 64)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    buckets = {g.untyped_storage().data_ptr() for g in grads}
    assert len(buckets) > 1
    (group,) = _core._span_layout(grads, backend).groups
    assert len(group.spans) == len(buckets)  # every bucket's views merged into one span
    saved = [g.clone() for g in grads]
    with _CountAllReduce() as counter:
        ours = tritonclip.clip_grad_norm_(model.parameters(), 0.1, backend=backend)
    assert counter.calls == 0
    clipped = [g.clone() for g in grads]
    for g, s in zip(grads, saved):
        g.copy_(s)
    theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    for c, g in zip(clipped, grads):
        torch.testing.assert_close(c, g, rtol=1e-5, atol=1e-7)


def _tensor_parallel_duplicates(rank, world, backend):
    """Megatron-style TP: split weights counted on every rank, a replicated layer norm on
    rank 0 only (and scaled on all)."""
    import tritonclip
    from helpers import applied_coefficient, assert_norm_close, assert_scaled_once, params_with
    from tritonclip import reference
    from tritonclip.distributed import megatron_norm_filter

    column, row, norm = _full(1, 8, 6), _full(2, 6, 8), _full(3, 6)
    for p in NORM_TYPES:
        params = params_with([column.chunk(world, 0)[rank].clone(),
                              row.chunk(world, 1)[rank].contiguous(), norm.clone()])
        params[0].tensor_model_parallel = params[1].tensor_model_parallel = True
        group = dist.group.WORLD
        total = tritonclip.clip_grad_norm_(params, 0.5, p, process_group=group,
                                           norm_filter=megatron_norm_filter(group),
                                           backend=backend)
        assert_norm_close(total, reference.total_norm([column, row, norm], p), grads=[column, row, norm])
        # the replicated parameter is scaled on every rank, rank 0 or not
        assert_scaled_once(params[2].grad, norm, applied_coefficient(total, 0.5))
    # negative control: without the filter the layer norm is counted once per rank
    params = params_with([column.chunk(world, 0)[rank].clone(),
                          row.chunk(world, 1)[rank].contiguous(), norm.clone()])
    total = tritonclip.get_total_norm([q.grad for q in params], process_group=dist.group.WORLD)
    doubled = reference.total_norm([column, row] + [norm] * world, 2.0)
    assert_norm_close(total, doubled)


def _pipeline_stages(rank, world, backend):
    """Stages hold different layers and a tied embedding whose second copy is ``shared``."""
    import tritonclip
    from helpers import assert_norm_close, params_with
    from tritonclip import reference
    from tritonclip.distributed import megatron_norm_filter

    stages = [[_full(10 * s + i, 5 + i, 3) for i in range(2)] for s in range(world)]
    embedding = _full(99, 11, 3)
    for p in NORM_TYPES:
        params = params_with([t.clone() for t in stages[rank]] + [embedding.clone()])
        params[-1].shared = rank == world - 1  # the last stage's copy of the tied weight
        total = tritonclip.clip_grad_norm_(params, 1.0, p, process_group=dist.group.WORLD,
                                           norm_filter=megatron_norm_filter(),
                                           backend=backend)
        expected = [t for stage in stages for t in stage] + [embedding]
        assert_norm_close(total, reference.total_norm(expected, p), grads=expected)


def _two_dimensional_mesh(rank, world, backend):
    """FSDP x TP placements on a 2-D mesh, another mesh beside it, and a plain tensor."""
    import tritonclip
    from helpers import assert_norm_close
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh
    from tritonclip import reference

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    flat_mesh = init_device_mesh("cpu", (world,))
    full = [_full(1, 8, 8), _full(2, 8), _full(3, 6), _full(4, 5), _full(5, 12), _full(6, 3)]
    for p in NORM_TYPES:
        grads = [distribute_tensor(full[0], mesh, [Shard(0), Shard(1)]),
                 distribute_tensor(full[1], mesh, [Shard(0), Replicate()]),
                 distribute_tensor(full[2], mesh, [Replicate(), Shard(0)]),
                 distribute_tensor(full[3], mesh, [Replicate(), Replicate()]),
                 distribute_tensor(full[4], flat_mesh, [Shard(0)]),
                 full[5].clone()]
        with _CountAllReduce() as counter:
            total = tritonclip.get_total_norm(grads, p, backend=backend)
        assert_norm_close(total, reference.total_norm(full, p), grads=full)
        # (tp, dp) weights merge with the dp-only set after their tp reduction: 4, not 5
        assert counter.calls == 4


def _fsdp2_times_tensor_parallel(rank, world, backend):
    """A real 2-D model: parallelize_module (colwise, rowwise) on tp, fully_shard on dp. Its
    gradients mix _StridedShard, Shard and Replicate placements on the 2-D mesh with a layer
    norm's on the 1-D dp mesh (torch's own clip cannot stack norms across those meshes)."""
    import tritonclip
    from helpers import applied_coefficient, assert_norm_close, assert_scaled_once
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    from tritonclip import reference

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8),
                                torch.nn.LayerNorm(8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    torch.manual_seed(10 + mesh.get_local_rank("dp"))
    model(torch.randn(4, 8)).square().sum().backward()
    params = list(model.parameters())
    assert len({p.grad.device_mesh for p in params}) == 2
    full = [p.grad.full_tensor() for p in params]
    for p in NORM_TYPES:
        assert_norm_close(tritonclip.get_total_norm([q.grad for q in params], p,
                                                    backend=backend),
                          reference.total_norm(full, p))
    before = [p.grad.to_local().clone() for p in params]
    total = tritonclip.clip_grad_norm_(params, 0.5, backend=backend)
    assert_norm_close(total, reference.total_norm(full, 2.0), grads=full)
    for q, b in zip(params, before):
        assert_scaled_once(q.grad.to_local(), b, applied_coefficient(total, 0.5))


def _fsdp2_times_pipeline(rank, world, backend):
    """Each pipeline stage's parameters sharded over its data-parallel ranks (DTensors on the
    stage's sub-mesh), and the stages combined over the pipeline group."""
    import tritonclip
    from helpers import assert_norm_close
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    from tritonclip import reference

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_local_rank("pp")
    stages = [[_full(10 * s + i, 6 + i, 4) for i in range(3)] for s in range(2)]
    everything = [t for s in stages for t in s]
    for p in NORM_TYPES:
        grads = [distribute_tensor(t, mesh["dp"], [Shard(0)]) for t in stages[stage]]
        with _CountAllReduce() as counter:
            total = tritonclip.get_total_norm(grads, p, process_group=mesh.get_group("pp"),
                                              backend=backend)
        assert_norm_close(total, reference.total_norm(everything, p), grads=everything)
        assert counter.calls == 2  # dp, then pp


BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "torch"]


# One test per body: the ranks are shared (tests/spawn.py), so a body costs no process start.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("body", [_one_dimensional_mesh, _fsdp2, _fsdp1, _ddp_bucket_views,
                                  _tensor_parallel_duplicates, _pipeline_stages],
                         ids=lambda body: body.__name__.strip("_"))
def test_two_ranks(body, backend):
    spawn.run(body, 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("body", [_two_dimensional_mesh, _fsdp2_times_tensor_parallel,
                                  _fsdp2_times_pipeline, _one_dimensional_mesh],
                         ids=lambda body: body.__name__.strip("_"))
def test_four_ranks(body, backend):
    spawn.run(body, 4, backend)


def test_norm_filter_and_per_tensor_are_checked():
    import tritonclip
    from helpers import params_with

    g = torch.ones(4)
    with pytest.raises(TypeError, match="norm_filter"):
        tritonclip.clip_grad_norm_(params_with([g]), 0.1, norm_filter="layernorm")
    with pytest.raises(ValueError, match="per_tensor"):
        tritonclip.get_total_norm([g], per_tensor=True, norm_filter=lambda t: True)
    assert torch.equal(g, torch.ones(4))


def test_norm_filter_leaves_a_tensor_out_of_the_norm_but_scales_it():
    import tritonclip
    from helpers import params_with

    params = params_with([torch.full((4,), 3.0), torch.full((9,), 1.0)])
    total = tritonclip.clip_grad_norm_(params, 1.0, norm_filter=lambda p: p.numel() == 4)
    assert float(total) == 6.0
    assert torch.allclose(params[1].grad, torch.full((9,), 1.0 / (6.0 + 1e-6)))


def test_megatron_filter_refuses_gradients():
    import tritonclip
    from helpers import params_with
    from tritonclip.distributed import megatron_norm_filter

    (p,) = params_with([torch.ones(4)])
    assert megatron_norm_filter()(p)
    with pytest.raises(TypeError, match="parameters"):
        tritonclip.get_total_norm([p.grad], norm_filter=megatron_norm_filter())
