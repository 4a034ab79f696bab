"""Distributed norms on CPU with gloo: spawned ranks, each holding a shard of one global set of
gradients, against a single-process float64 reference of the whole set."""

import math

import pytest
import torch
import torch.distributed as dist

import spawn

NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.5, math.inf, -math.inf]


def _global_grads():
    gen = torch.Generator().manual_seed(0)
    sizes = [63, 4097, 1, 300, 70001, 5, 129]
    return [torch.randn(n, generator=gen) for n in sizes]


def _shard(grads, rank, world):
    return [g.clone() for i, g in enumerate(grads) if i % world == rank]


def _worker(rank, world, backend_name):
    import tritonclip
    from helpers import applied_coefficient, assert_norm_close, assert_scaled_once, params_with
    from tritonclip import reference

    group = dist.group.WORLD
    everything = _global_grads()
    # 1. every norm type: the same global norm on every rank
    for p in NORM_TYPES:
        local = _shard(everything, rank, world)
        total = tritonclip.get_total_norm(local, p, process_group=group, backend=backend_name)
        assert_norm_close(total, reference.total_norm(everything, p), grads=everything)
    # 2. clipping: each rank scales its shard by the global coefficient
    local = _shard(everything, rank, world)
    before = [g.clone() for g in local]
    total = tritonclip.clip_grad_norm_(params_with(local), 1.0, process_group=group,
                                       backend=backend_name)
    assert_norm_close(total, reference.total_norm(everything, 2.0), grads=everything)
    for g, b in zip(local, before):
        assert_scaled_once(g, b, applied_coefficient(total, 1.0))
    # 3. a NaN on rank 0 only: every rank sees a NaN norm, for every norm type
    for p in NORM_TYPES:
        local = _shard(everything, rank, world)
        if rank == 0:
            local[0][5] = float("nan")
        total = tritonclip.get_total_norm(local, p, process_group=group, backend=backend_name)
        assert math.isnan(float(total)), (rank, p, float(total))
    # 4. ... and with nonfinite="skip" no rank changes any gradient
    local = _shard(everything, rank, world)
    if rank == 0:
        local[0][5] = float("nan")
    before = [g.clone() for g in local]
    tritonclip.clip_grad_norm_(params_with(local), 1e-3, process_group=group,
                               nonfinite="skip", backend=backend_name)
    for g, b in zip(local, before):
        assert torch.equal(g.nan_to_num(), b.nan_to_num())
    # 5. a rank with no gradients at all still takes part
    local = _shard(everything, rank, world) if rank != world - 1 else []
    expected = [g for i, g in enumerate(everything) if i % world != world - 1]
    total = tritonclip.clip_grad_norm_(params_with(local), 1.0, process_group=group,
                                       backend=backend_name)
    assert_norm_close(total, reference.total_norm(expected, 2.0), grads=expected)
    # 6. dense parameters replicated on every rank (group None) beside experts sharded
    #    over the group: the pairs count each once
    for p in NORM_TYPES:
        dense = params_with([g.clone() for g in everything[:3]])
        experts = params_with(_shard(everything[3:], rank, world))
        total = tritonclip.clip_grad_norm_(dense + experts, 1.0, p, backend=backend_name,
                                           process_group=[(dense, None), (experts, group)])
        assert_norm_close(total, reference.total_norm(everything, p), grads=everything)
    # 7. no rank has any gradient: 0 for every order, as in a single process
    for p in NORM_TYPES:
        total = tritonclip.get_total_norm([], p, process_group=group, backend=backend_name)
        assert float(total) == 0.0, (p, float(total))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend_name", [pytest.param("triton", marks=pytest.mark.interpreter),
                                          "torch"])
def test_sharded_norm_over_a_process_group(world, backend_name):
    spawn.run(_worker, world, backend_name)


def _fails_on_rank_1(rank, world):
    assert rank != 1, "rank 1's own assertion"
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1, which has failed


def _sums_over_the_group(rank, world):
    total = torch.ones(1)
    dist.all_reduce(total)
    assert total.item() == world


def test_negative_control_a_rank_failure_fails_the_test_with_its_traceback():
    # The harness (tests/spawn.py) cannot swallow a failure: a body failing on one rank fails
    # the test, naming the body and quoting that rank's own assertion; the ranks that the next
    # test gets are fresh ones that work.
    with pytest.raises(pytest.fail.Exception,
                       match=r"(?s)_fails_on_rank_1.*failed on rank.*rank 1's own assertion"):
        spawn.run(_fails_on_rank_1, 2)
    spawn.run(_sums_over_the_group, 2)


def test_process_group_argument_checked_before_any_change():
    import tritonclip
    from helpers import params_with

    g = torch.ones(4)
    with pytest.raises(ValueError, match="init_process_group"):
        tritonclip.clip_grad_norm_(params_with([g]), 0.1, process_group=object())
    assert torch.equal(g, torch.ones(4))


def test_local_pairs_equal_a_plain_clip_and_are_checked():
    import tritonclip
    from helpers import params_with, random_grads

    grads = random_grads([30, 40], torch.float32)
    a, b = params_with([grads[0]]), params_with([grads[1]])
    expected = tritonclip.get_total_norm(grads)
    torch.testing.assert_close(
        tritonclip.get_total_norm(grads, process_group=[([grads[0]], None), ([grads[1]], None)]),
        expected, rtol=1e-6, atol=0)
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="exactly"):
        tritonclip.clip_grad_norm_(a + b, 1e-3, process_group=[(a, None)])
    with pytest.raises(ValueError, match="one group"):
        tritonclip.clip_grad_norm_(a + b, 1e-3, process_group=[(a + b, None), (b, None)])
    with pytest.raises(TypeError, match="pair"):
        tritonclip.clip_grad_norm_(a + b, 1e-3, process_group=[a])
    assert all(torch.equal(g, c) for g, c in zip(grads, before))
    total = tritonclip.clip_grad_norm_(a + b, 1e-3, process_group=[(a, None), (b, None)])
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=0)
