"""The same conformance on CUDA with compiled kernels, no host synchronisation, and int64
offsets. Run with `make test-gpu` (TRITON_INTERPRET=0); skipped without CUDA."""

import math

import pytest
import torch

import tritonclip
from helpers import (
    DTYPE_IDS,
    DTYPES,
    NORM_TYPES,
    applied_coefficient,
    assert_norm_close,
    assert_scaled_once,
    cached_plans,
    params_with,
    random_grads,
)
from tritonclip import kernels, reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_conformance_on_cuda(dtype, norm_type):
    sizes = [1, 63, 0, 4097, 70001, 1 << 20]
    grads = random_grads(sizes, dtype, device="cuda", seed=1)
    grads.append(random_grads([5000], dtype, device="cuda")[0][3:4003])  # misaligned view
    before = [g.clone() for g in grads]
    max_norm = 1e-3
    total = tritonclip.clip_grad_norm_(params_with(grads), max_norm, norm_type, backend="auto")
    assert total.device.type == "cuda"
    ref = reference.total_norm(before, norm_type)
    assert_norm_close(total.cpu(), ref)
    coef = applied_coefficient(total, max_norm)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_value_clip_on_cuda(dtype):
    grads = random_grads([4097, 70001, 3], dtype, device="cuda")
    before = [g.clone() for g in grads]
    tritonclip.clip_grad_value_(params_with(grads), lo=-0.2, hi=0.5)
    for g, b in zip(grads, before):
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        assert torch.equal(g, b.to(compute).clamp(-0.2, 0.5).to(dtype))


def test_no_host_synchronisation_in_steady_state():
    grads = random_grads([4097, 1 << 20, 63], torch.bfloat16, device="cuda")
    params = params_with(grads)
    tritonclip.clip_grad_norm_(params, 1.0)  # builds and caches the plan
    tritonclip.clip_grad_value_(params, 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm_type in (2.0, math.inf):
            tritonclip.clip_grad_norm_(params, 1.0, norm_type)
        tritonclip.clip_grad_norm_(params, 1.0, nonfinite="skip")
        tritonclip.clip_grad_value_(params, 1.0)
        tritonclip.get_total_norm([p.grad for p in params])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(cached_plans()) == 1


def test_tensor_larger_than_int32_indexing():
    n = 2**31 + 4099
    try:
        g = torch.zeros(n, dtype=torch.float16, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("needs 4 GiB of free GPU memory")
    g[-3:] = 2.0  # only the far end is nonzero: int32 offsets would miss or wrap
    g[0] = 1.0
    total = tritonclip.clip_grad_norm_(params_with([g]), 1.0, norm_type=1.0)
    assert float(total) == 7.0
    assert float(g[-1]) == pytest.approx(2.0 / 7.0, rel=1e-3)
    assert float(g[0]) == pytest.approx(1.0 / 7.0, rel=1e-3)


def test_bitwise_deterministic_across_runs_on_gpu():
    grads = random_grads([1 << 22, 70001, 4097] * 4, torch.bfloat16, device="cuda", seed=3)
    first = tritonclip.get_total_norm(grads, per_tensor=True)
    second = tritonclip.get_total_norm(grads, per_tensor=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_grads_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    grads = random_grads([4097, 70001], torch.float32, device="cuda:1")
    before = [g.clone() for g in grads]
    assert torch.cuda.current_device() == 0
    total = tritonclip.clip_grad_norm_(params_with(grads), 1e-3)
    assert total.device == torch.device("cuda:1")
    assert_norm_close(total.cpu(), reference.total_norm(before, 2.0))
    coef = applied_coefficient(total, 1e-3)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef)


def test_mixed_cpu_and_cuda_grads():
    grads = random_grads([4097], torch.float32, device="cpu") + \
        random_grads([70001], torch.bfloat16, device="cuda", seed=1)
    before = [g.clone() for g in grads]
    total = tritonclip.clip_grad_norm_(params_with(grads), 1e-3)
    assert total.device.type == "cpu"
    assert_norm_close(total, reference.total_norm(before, 2.0))
    coef = applied_coefficient(total, 1e-3)
    for g, b in zip(grads, before):
        assert_scaled_once(g, b, coef.to(g.device))


def test_strided_half_grads_scaled_with_a_float32_coefficient():
    parent = random_grads([64 * 64], torch.bfloat16, device="cuda")[0].view(64, 64)
    strided = parent[:, ::2]
    before = strided.clone()
    total = tritonclip.clip_grad_norm_(params_with([strided]), 1e-3)
    assert_scaled_once(strided, before, applied_coefficient(total, 1e-3))


def test_amp_unscale_and_clip_matches_two_calls_without_sync():
    import tritonclip.amp

    torch.manual_seed(0)
    models = [torch.nn.Linear(256, 256).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**14) for _ in models]
    x = torch.randn(64, 256, device="cuda")
    for step in range(3):
        norms = []
        for i, (model, optimizer, scaler) in enumerate(zip(models, optimizers, scalers)):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            if i == 0:
                scaler.unscale_(optimizer)
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1))
            else:
                if step == 2:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    norms.append(tritonclip.amp.unscale_and_clip_(scaler, optimizer, 0.1))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            scaler.step(optimizer)
            scaler.update()
        assert float(norms[1]) == pytest.approx(float(norms[0]), rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0])
def test_last_program_sees_every_partial(norm_type):
    # The fused norm's handshake under load: thousands of programs of both alignment classes
    # racing to be last, many times over, must give the separate finalize's value bit for
    # bit (a lost store would show as a different sum), and leave the counter at 0.
    flat = random_grads([3000 * kernels.CHUNK + 77], torch.float32, device="cuda", seed=5)[0]
    views = [flat[:1000 * kernels.CHUNK], flat[1000 * kernels.CHUNK + 1:]]
    plan = kernels.build_plan([(v.data_ptr(), v.numel()) for v in views], flat.device,
                              torch.float32)
    expected = kernels.finalize(plan, kernels.norm_partials(plan, norm_type), norm_type)[:1]
    values = torch.stack([kernels.group_power(plan, norm_type) for _ in range(200)])
    assert torch.equal(values, expected.expand(200, 1))
    assert plan.counter.item() % plan.streams.n_programs == 0


def test_nccl_single_rank_smoke():
    # One NCCL rank: the all-reduce runs on the GPU, stream-ordered, and the result equals
    # the local clip; no host synchronisation once the plan is cached.
    import datetime

    import torch.distributed as dist

    from spawn import HANG_GUARD_S, free_port

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=HANG_GUARD_S))
    try:
        grads = random_grads([4097, 1 << 20, 63], torch.bfloat16, device="cuda", seed=3)
        before = [g.clone() for g in grads]
        expected = tritonclip.clip_grad_norm_(params_with([g.clone() for g in grads]), 1e-2)
        params = params_with(grads)
        tritonclip.clip_grad_norm_(params_with([g.clone() for g in grads]), 1e-2,
                                   process_group=dist.group.WORLD)  # warm: plan, NCCL comm
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            total = tritonclip.clip_grad_norm_(params, 1e-2, process_group=dist.group.WORLD)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # float64 across ranks vs the fused float32 path: equal to a float32 rounding
        torch.testing.assert_close(total, expected, rtol=2e-7, atol=0)
        for g, b in zip(grads, before):
            assert_scaled_once(g, b, applied_coefficient(total, 1e-2))
    finally:
        dist.destroy_process_group()


def test_clip_captures_into_a_cuda_graph():
    # Many small tensors are host-bound; a clip has no host sync and reuses its plan, so it
    # can be captured once and replayed (the fused norm's counter only grows: each launch
    # adds a multiple of its programs).
    grads = random_grads([4096] * 2000, torch.float32, device="cuda", seed=7, scale=3.0)
    params = params_with(grads)
    before = [g.clone() for g in grads]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: builds the layout and the plan's table
        tritonclip.clip_grad_norm_(params, 1.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = tritonclip.clip_grad_norm_(params, 1.0)
    for g, b in zip(grads, before):  # capture ran nothing
        g.copy_(b)
    for _ in range(3):
        for g, b in zip(grads, before):
            g.copy_(b)
        graph.replay()
        torch.cuda.synchronize()
        assert_norm_close(total.cpu(), reference.total_norm(before, 2.0))
        coef = applied_coefficient(total, 1.0)
        for g, b in zip(grads, before):
            assert_scaled_once(g, b, coef)


def test_two_streams_clip_the_same_gradients_concurrently():
    # Each stream has its own arrival counter and partials (kernels.plan.LaunchPlan.workspace):
    # clips of the same gradients launched at once on two streams all get the right norm.
    # (max_norm is large: the clips read the gradients and write nothing.)
    grads = random_grads([3 * kernels.CHUNK + 5] * 8, torch.float32, device="cuda", seed=11)
    params = params_with(grads)
    expected = tritonclip.clip_grad_norm_(params, 1e9)
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    totals = []
    for _ in range(50):
        for stream in streams:
            with torch.cuda.stream(stream):
                totals.append(tritonclip.clip_grad_norm_(params, 1e9))
    torch.cuda.synchronize()
    assert all(torch.equal(total, expected) for total in totals)
