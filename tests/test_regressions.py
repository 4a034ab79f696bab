"""One test (or a few) per bug found by the review and fuzzing of the one-core issue; each
failed before its fix."""

import math
import os
import subprocess
import sys

import pytest
import torch

import spawn
import tritonclip
from helpers import params_with, random_grads, run_in_threads
from tritonclip import _core, amp, reference_adaptive

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


# -- 1. AutoClip: an inf norm must not turn later healthy gradients into NaN -----------------

@pytest.mark.parametrize("percentile, history", [(90, 11), (99, 101), (50, 3), (25, 5)])
def test_autoclip_after_an_inf_norm_keeps_healthy_gradients_finite(percentile, history):
    # The percentile's position is a whole number here: the lerp computed inf * 0 = NaN.
    clipper = tritonclip.AutoClip(percentile=percentile, history=history)
    for step in range(history + 10):
        grads = random_grads([50], torch.float32, seed=step)
        if step == 3:
            grads[0][7] = math.inf
        clipper.step(params_with(grads))
        assert not clipper.last_threshold.isnan(), step  # inf while the inf is near: no clip
        if step != 3:
            assert torch.isfinite(grads[0]).all(), step


def test_autoclip_percentile_towards_inf_is_inf_not_nan():
    from tritonclip.adaptive import percentile_of

    values = torch.tensor([1.0, 2.0, math.inf])
    for q in (0.0, 25.0, 50.0, 60.0, 75.0, 100.0):
        got = float(percentile_of(values, q))
        assert not math.isnan(got), q
    assert float(percentile_of(values, 50.0)) == 2.0
    assert float(percentile_of(values, 75.0)) == math.inf
    finite = torch.rand(37, generator=torch.Generator().manual_seed(0))
    import numpy
    for q in (0.0, 10.0, 33.3, 50.0, 90.0, 100.0):
        assert float(percentile_of(finite, q)) == pytest.approx(
            float(numpy.percentile(finite.numpy(), q)), rel=1e-6)


# -- 2. Value bounds beyond a dtype's range -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_value_clip_with_a_bound_beyond_float16_range(backend):
    fp32 = torch.tensor([2e5, -3e5, 1.0, math.inf])
    fp16 = torch.tensor([60000.0, -1.0, math.inf, -math.inf]).half()
    before = fp16.clone()
    tritonclip.clip_grad_value_(params_with([fp32, fp16]), 1e5, backend=backend)
    assert fp32.tolist() == [1e5, -1e5, 1.0, 1e5]
    assert torch.equal(fp16, before)  # 1e5 rounds to inf in float16: nothing to clamp
    # between float16's largest value and the point where it rounds to inf: the largest
    near = torch.tensor([math.inf, 100.0]).half()
    tritonclip.clip_grad_value_(params_with([near]), 65510.0, backend=backend)
    assert near.tolist() == [65504.0, 100.0]


def test_value_clip_of_a_mixed_list_matches_across_backends():
    grads = [torch.tensor([3e38, -3e38, 7.0]), torch.tensor([1e4, -6e4, math.inf]).half(),
             torch.tensor([1e38, -math.inf, 2.0]).bfloat16()]
    copies = [g.clone() for g in grads]
    tritonclip.clip_grad_value_(params_with(grads), lo=-1e39, hi=2e38, backend="torch")
    if tritonclip.kernels.config.interpreted():
        tritonclip.clip_grad_value_(params_with(copies), lo=-1e39, hi=2e38, backend="triton")
        for a, b in zip(grads, copies):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_clip_bounds_beyond_float16_range(backend):
    x = torch.zeros(6, dtype=torch.float16, requires_grad=True)
    y = tritonclip.error_clip(x, lo=-1e5, hi=1.0, backend=backend)
    y.backward(torch.tensor([-60000.0, 2.0, 0.5, -math.inf, 1.5, 0.0]).half())
    assert x.grad.tolist() == [-60000.0, 1.0, 0.5, -math.inf, 1.0, 0.0]


# -- 3. Threads ---------------------------------------------------------------------------------

def test_threads_clipping_their_own_models_through_one_cache():
    # More distinct lists than the cache holds, from four threads at once: the cache's LRU
    # moved and deleted entries under another thread (KeyError) before it took a lock.
    lists_per_thread = _core.CACHE_SIZE // 2
    def work(seed):
        models = [random_grads([17, 5], torch.float32, seed=seed * 1000 + i)
                  for i in range(lists_per_thread)]
        for _ in range(3):
            for grads in models:
                expected = torch.linalg.vector_norm(torch.cat(grads).double())
                total = tritonclip.get_total_norm(grads)
                assert abs(float(total) / float(expected) - 1) < 1e-5

    assert run_in_threads(work) == []
    assert len(_core.CACHE) <= _core.CACHE_SIZE


# -- 4. Per-tensor norms of orders <= 0 show NaN and inf ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [0.0, -math.inf, -1.0, 0.5, 2.0, math.inf])
def test_per_tensor_norms_show_nan_and_inf_for_every_order(backend, norm_type):
    healthy = random_grads([40], torch.float32, seed=1)[0]
    with_nan = random_grads([40], torch.float32, seed=2)[0]
    with_nan[3] = math.nan
    with_inf = random_grads([40], torch.float32, seed=3)[0]
    with_inf[5] = -math.inf
    total, norms = tritonclip.get_total_norm([with_nan, healthy, with_inf], norm_type,
                                             backend=backend, per_tensor=True)
    assert math.isnan(norms[0]) and math.isfinite(norms[1]) and math.isnan(total)
    if norm_type > 0 or norm_type == 0.0:
        assert norms[2] == math.inf
    else:
        assert norms[2] == math.inf  # a min or negative order hides it unless flagged
    expected = tritonclip.get_total_norm([healthy], norm_type, backend=backend)
    torch.testing.assert_close(norms[1], expected, rtol=1e-6, atol=0)


def test_monitor_of_order_zero_counts_a_nan_gradient():
    model = torch.nn.Linear(4, 3)
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = math.nan
    monitor = tritonclip.GradNormMonitor(model, norm_type=0)
    monitor.record()
    assert monitor.to_dict()["nonfinite"] == [1]


# -- 5. float64 gradients beyond float32's range -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", [math.inf, 1.0])
def test_float64_norms_beyond_float32_range(backend, norm_type):
    g = torch.full((10,), 2e200, dtype=torch.float64)
    expected_grads = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(params_with([expected_grads]), 1.0, norm_type)
    total = tritonclip.clip_grad_norm_(params_with([g]), 1.0, norm_type, backend=backend)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, expected, rtol=1e-15, atol=0)  # (summation order)
    torch.testing.assert_close(g, expected_grads, rtol=1e-15, atol=0)  # clipped, not zeroed


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_coefficient_is_computed_in_float64(backend):
    grads = random_grads([300, 70], torch.float64, seed=4)
    expected = [g.clone() for g in grads]
    torch.nn.utils.clip_grad_norm_(params_with(expected), 0.3)
    tritonclip.clip_grad_norm_(params_with(grads), 0.3, backend=backend)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


# -- 7. AMP under sharding, and GradScaler state read only when it is there -----------------

def _sharded_amp_worker(rank, world):
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    torch.manual_seed(rank)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**10)
    scaler.scale(model(torch.randn(3, 8)).sum()).backward()
    if rank == 1:
        model.weight.grad[0, 0] = math.inf  # an overflow on one rank only
    before = [p.detach().clone() for p in model.parameters()]
    tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1.0)
    state = scaler._per_optimizer_states[id(optimizer)]
    assert all(float(f) > 0 for f in state["found_inf_per_device"].values()), rank
    scaler.step(optimizer)  # skipped on every rank
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), rank
    assert scaler.get_scale() == 2.0**9


def test_sharded_grad_scaler_skips_the_step_on_every_rank():
    spawn.run(_sharded_amp_worker, 2)


def _process_group_amp_worker(rank, world):
    import torch.distributed as dist

    grads = random_grads([50], torch.float32, seed=rank)
    whole = torch.cat([g.clone() for g in random_grads([50], torch.float32, seed=0)]
                      + [g.clone() for g in random_grads([50], torch.float32, seed=1)])
    total, found = tritonclip.amp.unscale_and_clip_grads_(
        [g * 8.0 for g in grads], torch.tensor(0.125), 1e9, process_group=dist.group.WORLD)
    expected = torch.linalg.vector_norm(whole.double())
    assert abs(float(total) / float(expected) - 1) < 1e-6 and float(found) == 0.0


def test_unscale_and_clip_takes_a_process_group():
    spawn.run(_process_group_amp_worker, 2)


class _OwnUnscaler(torch.amp.GradScaler):
    calls = 0

    def unscale_(self, optimizer):
        _OwnUnscaler.calls += 1
        return super().unscale_(optimizer)


@pytest.mark.parametrize("why", ["subclass", "missing-state"])
def test_scalers_that_cannot_be_folded_get_their_own_unscale(monkeypatch, why):
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = (_OwnUnscaler if why == "subclass" else torch.amp.GradScaler)(
        "cpu", init_scale=2.0**8)
    if why == "missing-state":
        monkeypatch.setattr(amp, "_STATE", amp._STATE + ("_no_such_attribute",))
    assert not amp.fuses(scaler)
    scaler.scale(model(torch.randn(2, 6)).sum()).backward()
    expected = [p.grad / 2.0**8 for p in model.parameters()]
    _OwnUnscaler.calls = 0
    total = amp.unscale_and_clip_(scaler, optimizer, 0.1)
    assert _OwnUnscaler.calls == (1 if why == "subclass" else 0)
    reference = torch.nn.utils.clip_grad_norm_(params_with(expected), 0.1)
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)


# -- 8. Smaller ones -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_given_total_norm_is_checked(backend):
    grads = random_grads([10], torch.float32)
    before = grads[0].clone()
    with pytest.raises(ValueError, match="one element"):
        tritonclip.clip_grads_with_norm_(params_with(grads), 1.0, torch.tensor([1.0, 2.0]),
                                         backend=backend)
    with pytest.raises(ValueError, match="total_norm"):
        tritonclip.clip_grads_with_norm_(params_with(grads), 1.0, torch.tensor(-3.0),
                                         backend=backend)
    with pytest.raises(ValueError, match="total_norm"):
        tritonclip.clip_grads_with_norm_(params_with(grads), 1.0, -3.0, backend=backend)
    assert torch.equal(grads[0], before)  # nothing touched, no sign flipped


def test_unscale_and_clip_grads_rejects_what_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        amp.unscale_and_clip_grads_([1], torch.tensor(1.0), 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_norm_zero_with_eps_zero_keeps_zero_gradients(backend):
    zeros = torch.zeros(20)
    total = tritonclip.clip_grad_norm_(params_with([zeros]), 0.0, eps=0.0, backend=backend)
    assert float(total) == 0.0 and torch.equal(zeros, torch.zeros(20))
    ones = torch.ones(20)
    tritonclip.clip_grad_norm_(params_with([ones]), 0.0, eps=0.0, backend=backend)
    assert torch.equal(ones, torch.zeros(20))  # a nonzero gradient is still clipped to 0


def test_interpreter_asked_for_after_import_gives_the_documented_error():
    # The kernels were compiled (not interpreted) at import: a later TRITON_INTERPRET=1 cannot
    # make CPU tensors runnable, so backend="triton" on them must raise ValueError before
    # anything is touched, not Triton's "0 active drivers".
    code = ("import os, torch, tritonclip\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "g = torch.ones(4); p = torch.nn.Parameter(torch.zeros(4)); p.grad = g\n"
            "try:\n"
            "    tritonclip.clip_grad_norm_([p], 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    assert 'TRITON_INTERPRET' in str(e) and torch.equal(g, torch.ones(4))\n"
            "    print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_clip_under_torch_func(backend):
    def f(x):
        return (tritonclip.error_clip(x, max_norm=1.0, backend=backend) * 3.0).sum()

    x = torch.ones(4)
    grad = torch.func.grad(f)(x)
    torch.testing.assert_close(grad, torch.full((4,), 0.5))  # ||3*ones(4)|| = 6 -> 1
    batched = torch.func.vmap(torch.func.grad(f))(torch.ones(3, 4))
    torch.testing.assert_close(batched, torch.full((3, 4), 0.5))
    jacobian = torch.func.jacrev(lambda x: tritonclip.error_clip(x, clip_value=0.5,
                                                                 backend=backend))(x)
    torch.testing.assert_close(jacobian, 0.5 * torch.eye(4))


# -- found by review of the change ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_row_layouts_follow_the_shapes_of_reused_memory(backend):
    memory = torch.randn(32)
    weight = torch.nn.Parameter(torch.randn(32))
    for shape in [(4, 8), (8, 4), (2, 16)]:  # the same addresses and sizes, other rows
        w = torch.nn.Parameter(weight.detach().view(shape))
        w.grad = memory.view(shape)
        expected = reference_adaptive.agc([w], [w.grad.clone()], 0.01)
        tritonclip.clip_grad_agc_([w], 0.01, backend=backend)
        torch.testing.assert_close(w.grad.double(), expected[0], rtol=1e-5, atol=1e-7)
        memory.copy_(torch.randn(32))
    g = torch.randn(12)
    tritonclip.get_total_norm([g, g.view(3, 4)], per_tensor=True, backend=backend)
    p = torch.nn.Parameter(torch.zeros(12))
    p.grad = g
    tritonclip.clip_grad_norm_per_tensor_([p, p], 1.0, backend=backend)  # listed twice: fine


def _empty_rank_amp_worker(rank, world):
    import torch.distributed as dist

    grads = random_grads([50], torch.float32, seed=0) if rank == 0 else []
    total, found = tritonclip.amp.unscale_and_clip_grads_(
        [g * 8.0 for g in grads], torch.tensor(0.125), 1e9, process_group=dist.group.WORLD)
    expected = torch.linalg.vector_norm(random_grads([50], torch.float32, seed=0)[0].double())
    assert abs(float(total) / float(expected) - 1) < 1e-6 and float(found) == 0.0


def test_a_rank_without_gradients_takes_part_in_the_amp_all_reduce():
    spawn.run(_empty_rank_amp_worker, 2)


def _sharded_fp16_worker(rank, world):
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = torch.nn.Linear(8, 4).half()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**4)
    scaler.scale(model(torch.randn(3, 8).half()).float().sum()).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() / 16
                                                   for p in model.parameters()]))
    total = tritonclip.amp.unscale_and_clip_(scaler, optimizer, 1e9)
    assert abs(float(total) / float(expected) - 1) < 1e-3


def test_sharded_grad_scaler_takes_float16_gradients():
    spawn.run(_sharded_fp16_worker, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bfloat16_total_norm_gives_a_float32_coefficient(backend):
    g = torch.full((4,), 1.5)  # norm 3
    tritonclip.clip_grads_with_norm_(params_with([g]), 1.0, torch.tensor(3.0).bfloat16(),
                                     backend=backend)
    expected = torch.full((4,), 1.5) * torch.clamp(1.0 / (torch.tensor(3.0) + 1e-6), max=1.0)
    assert torch.equal(g, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_norm_dtype_does_not_depend_on_the_backend(backend):
    grads = [torch.randn(10), torch.randn(10, dtype=torch.float64)]
    params = params_with(grads)
    total = tritonclip.clip_grad_norm_(params, 1e9, backend=backend,
                                       norm_filter=lambda p: p.dtype == torch.float32)
    assert total.dtype == torch.float64  # a float64 gradient is in the list


def test_complex128_gradients_are_scaled_by_a_float64_coefficient():
    g = torch.randn(10, dtype=torch.complex128)
    expected = g.clone()
    torch.nn.utils.clip_grad_norm_(params_with([expected]), 0.1)
    tritonclip.clip_grad_norm_(params_with([g]), 0.1)
    torch.testing.assert_close(g, expected, rtol=1e-15, atol=0)
