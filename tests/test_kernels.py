"""The kernels and plans directly: partials written everywhere, alignment routing, plan-cache
reuse without host-to-device copies, and bitwise determinism."""

import math

import pytest
import torch

import tritonclip
from helpers import DTYPE_IDS, DTYPES, PlanBuilds, params_with, random_grads
from tritonclip import _core, _normmath, kernels
from tritonclip.kernels import plan as plan_module

pytestmark = pytest.mark.interpreter


def _spans(tensors):
    return [(t.data_ptr(), t.numel()) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_misaligned_views_take_the_unaligned_launch(dtype):
    flat = torch.zeros(2048, dtype=dtype)
    vec = 16 // flat.element_size()
    aligned = flat[:1024]
    misaligned_pointer = flat[1:1001]
    odd_length = flat[1024:1024 + vec * 10 + 1]
    plan = kernels.build_plan(_spans([aligned, misaligned_pointer, odd_length]), flat.device,
                              dtype)
    by_kind = {launch.aligned: launch for launch in plan.launches}
    assert by_kind[True].n_spans == 1 and by_kind[False].n_spans == 2
    table = by_kind[True].table
    assert table[0].item() == aligned.data_ptr()
    unaligned_table = by_kind[False].table
    assert {unaligned_table[0].item(), unaligned_table[1].item()} == {
        misaligned_pointer.data_ptr(), odd_length.data_ptr()}
    assert kernels.is_vector_aligned(aligned.data_ptr(), 1024, flat.element_size())
    assert not kernels.is_vector_aligned(misaligned_pointer.data_ptr(), 1000, flat.element_size())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_mixed_alignment_gives_reference_results(dtype):
    flat = random_grads([3000], dtype)[0]
    views = [flat[1:1001], flat[1008:2008], flat[2010:2999]]
    total, norms = tritonclip.get_total_norm(views, backend="triton", per_tensor=True)
    expected = [torch.linalg.vector_norm(v.double()) for v in views]
    torch.testing.assert_close(norms.double(), torch.stack(expected), rtol=1e-5, atol=0)


def test_every_partial_and_output_is_written():
    grads = random_grads([70000, 5, 131072, 1], torch.float32)
    plan = kernels.build_row_plan([(t.data_ptr(), 1, t.numel()) for t in grads], grads[0].device, torch.float32)
    assert plan.n_partials == 2 + 1 + 2 + 1
    for norm_type in (2.0, math.inf, -math.inf, 0.0, 0.5):
        partials = kernels.norm_partials(plan, norm_type)
        assert not partials.isnan().any()  # torch.empty gives garbage; NaN would show up
        out = kernels.finalize(plan, partials, norm_type)
        assert out.shape == (1 + len(grads),) and not out.isnan().any()
    # Poisoned buffers through the launchers' own allocation path:
    original_empty = torch.empty
    try:
        torch.empty = lambda *a, **k: original_empty(*a, **k).fill_(float("nan"))
        partials = kernels.norm_partials(plan, 2.0)
        out = kernels.finalize(plan, partials, 2.0)
    finally:
        torch.empty = original_empty
    assert not partials.isnan().any() and not out.isnan().any()


def test_chunk_boundaries_are_exact():
    chunk = kernels.CHUNK
    sizes = [chunk - 1, chunk, chunk + 1]
    grads = [torch.ones(n) for n in sizes]
    plan = kernels.build_row_plan([(t.data_ptr(), 1, t.numel()) for t in grads], grads[0].device, torch.float32)
    out = kernels.finalize(plan, kernels.norm_partials(plan, 1.0), 1.0)
    assert out.tolist() == [float(sum(sizes))] + [float(n) for n in sizes]


@pytest.mark.parametrize("coef", [1.0, 1.5, float("inf")])
def test_scale_skips_memory_when_coefficient_is_at_least_one(coef):
    # 1.5 would change every element if the kernel did not return first.
    g = random_grads([100], torch.float32)[0]
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    before = g.clone()
    kernels.scale_(plan, torch.tensor([coef]))
    assert torch.equal(g, before)


def test_scale_propagates_a_nan_coefficient():
    g = random_grads([100], torch.float32)[0]
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    kernels.scale_(plan, torch.tensor([float("nan")]))  # as torch: NaN does not compare >= 1
    assert g.isnan().all()


def test_second_call_builds_no_plan_and_copies_nothing(monkeypatch):
    grads = random_grads([100, 4097, 3], torch.float32)
    params = params_with(grads)
    builds = PlanBuilds(monkeypatch)
    tritonclip.clip_grad_norm_(params, 0.1, backend="triton")
    assert builds.count == 1  # norm and scale share one plan
    # Building a table is the only place that makes a host tensor to copy to the device.
    monkeypatch.setattr(plan_module.torch, "tensor",
                        lambda *a, **k: pytest.fail("plan table rebuilt"))
    tritonclip.clip_grad_norm_(params, 0.1, backend="triton")
    tritonclip.clip_grad_value_(params, 0.1, backend="triton")
    tritonclip.get_total_norm([p.grad for p in params], backend="triton")
    assert builds.count == 1  # one layout (and plan) serves norms, scaling and clamping
    assert _core.CACHE.builds == 1


def test_the_cache_is_bounded():
    cache = _core.Cache(maxsize=2)
    for n in (1, 2, 3):
        cache.get_or_build(n, lambda n=n: [n])
    assert cache.builds == 3 and len(cache) == 2 and cache.get(1) is None
    assert cache.get(3) == [3] and cache.hits == 1
    pinned = [0]
    cache.pin(pinned)
    cache.clear()
    assert len(cache) == 0 and cache._pinned == [pinned]  # pinned for good


@pytest.mark.parametrize("norm_type", [2.0, 0.5, math.inf], ids=["2", "0.5", "inf"])
def test_bitwise_deterministic_across_runs(norm_type):
    # The interpreter runs programs one after another, so this mostly guards the fixed
    # reduction order of the code; tests/gpu repeats it where programs really race.
    grads = random_grads([70000, 4097, 63] * 3, torch.bfloat16, seed=9)
    first = tritonclip.get_total_norm(grads, norm_type, backend="triton", per_tensor=True)
    _core.clear_cache()
    second = tritonclip.get_total_norm(grads, norm_type, backend="triton", per_tensor=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_nonzero_count_is_exact_past_float32_integers():
    # Counts are integers per chunk and float64 across chunks: 2**24 + 1, which float32
    # cannot hold, survives the finalize exactly.
    g = torch.zeros(kernels.CHUNK + 1)
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    assert kernels.accumulation_dtype(torch.float32, 0.0) == torch.float64
    partials = kernels.norm_partials(plan, 0.0)
    assert partials.dtype == torch.float64 and partials.tolist() == [0.0, 0.0]
    partials.copy_(torch.tensor([2.0**24, 1.0], dtype=torch.float64))
    assert kernels.finalize(plan, partials, 0.0).item() == 2**24 + 1


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, -math.inf, 0.0],
                         ids=["2", "1", "inf", "-inf", "0"])
def test_norm_clip_matches_the_torch_formula(dtype, norm_type):
    g = random_grads([70001], dtype, seed=4)[0]
    plan = kernels.build_plan(_spans([g]), g.device, dtype)
    partials = kernels.norm_partials(plan, norm_type)
    result = torch.float64 if dtype == torch.float64 else torch.float32
    expected_norm = _normmath.root(kernels.finalize(plan, partials, norm_type)[0],
                                   norm_type).to(result)
    for max_norm in (0.5, 1e9, math.inf, 0.1 + 1e-12):
        norm, coef, found = kernels.norm_clip(plan, norm_type, max_norm, 1e-6, False)
        assert norm.dtype == coef.dtype == result and found is None
        assert torch.equal(norm, expected_norm)  # the fused path changes no bit
        # float64 gradients: the threshold and eps keep float64 precision (0.1 + 1e-12)
        assert torch.equal(coef, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        # every launch adds one arrival per program: the count stays a multiple of them
        assert plan.workspace(partials.dtype)[2].item() % plan.streams.n_programs == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf, -math.inf, 0.0])
def test_fused_group_value_equals_the_two_launch_finalize(dtype, norm_type):
    # Both alignment classes, several chunks each: the last program's reduction must see
    # every partial, in the same order as the separate finalize.
    flat = random_grads([3 * kernels.CHUNK + 40], dtype, seed=9)[0]
    views = [flat[:kernels.CHUNK + 8], flat[kernels.CHUNK + 9:2 * kernels.CHUNK + 30],
             flat[2 * kernels.CHUNK + 32:]]
    # (a row plan keeps spans whole, so the unaligned stream has two chunks)
    plan = kernels.build_row_plan([(t.data_ptr(), 1, t.numel()) for t in views], flat.device,
                                  dtype)
    assert plan.streams.first_aligned and plan.streams.args[5] == 2
    fused = kernels.group_power(plan, norm_type)
    separate = kernels.finalize(plan, kernels.norm_partials(plan, norm_type), norm_type)
    assert torch.equal(fused, separate[:1])
    acc = kernels.accumulation_dtype(dtype, norm_type)
    assert plan.workspace(acc)[2].item() == plan.streams.n_programs


def test_norm_clip_refuses_a_general_p():
    # Its root would be an approximate exp2/log2 on a GPU: such norms take the torch root.
    g = torch.ones(10)
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    assert not kernels.fuses_coefficient(3.5) and kernels.fuses_coefficient(2.0)
    with pytest.raises(ValueError, match="3.5"):
        kernels.norm_clip(plan, 3.5, 1.0, 1e-6, False)


@pytest.mark.parametrize("skip", [False, True])
def test_norm_clip_nonfinite(skip):
    g = torch.tensor([1.0, float("nan"), 2.0])
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    for norm_type in (2.0, 1.0, math.inf, -math.inf):
        norm, coef, _ = kernels.norm_clip(plan, norm_type, 1.0, 1e-6, skip)
        assert norm.isnan()
        assert coef.item() == 1.0 if skip else coef.isnan()


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(kernels.launch, "observers",
                        [lambda kernel, meta: log.append(kernel.fn.__name__)])
    return log


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_a_norm_clip_is_two_launches_and_a_value_clip_one(launches, norm_type):
    # Aligned and unaligned spans of one dtype: still one launch per pass.
    flat = random_grads([4000], torch.float32, seed=2, scale=10.0)[0]
    params = params_with([flat[:1024], flat[1025:2000], flat[2004:4000]])
    tritonclip.clip_grad_norm_(params, 1.0, norm_type, backend="triton")
    assert len(launches) == 2, launches
    launches.clear()
    tritonclip.clip_grad_value_(params, 0.1, backend="triton")
    assert len(launches) == 1, launches
    launches.clear()
    tritonclip.get_total_norm([p.grad for p in params], norm_type, backend="triton")
    assert len(launches) == 1, launches


def test_general_p_keeps_float64_precision_for_float64_grads():
    # p = 0.3 is not a float32: passed as float32 it would shift |g|^p by ~1e-8 relative.
    # (The interpreter keeps Python floats as float64 anyway; this guards the bits' round trip,
    # and tests/codegen.py compiles the i64 signature a GPU launch uses.)
    g = torch.rand(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e3
    total = tritonclip.get_total_norm([g], 0.3, backend="triton")
    plan = kernels.build_plan(_spans([g]), g.device, torch.float64)
    power = kernels.finalize(plan, kernels.norm_partials(plan, 0.3), 0.3)[0]
    expected = g.abs().pow(0.3).sum()
    assert abs(float(power) / float(expected) - 1) < 1e-12
    assert total.dtype == torch.float64  # float64 gradients: a float64 norm
    assert abs(float(total) / float(expected ** (1 / 0.3)) - 1) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_long_misaligned_span_streams_its_aligned_body(dtype):
    # flat[1:] is misaligned by one element: its head (up to the 16-byte boundary) and tail
    # take the unaligned loop, the body the 128-bit one. Neighbours stay untouched.
    flat = random_grads([6000], dtype, seed=3, scale=5.0)[0]
    view = flat[1:5999]
    vec = 16 // flat.element_size()
    plan = kernels.build_plan(_spans([view]), flat.device, dtype)
    by_kind = {launch.aligned: launch for launch in plan.launches}
    head = vec - 1
    body = (view.numel() - head) // vec * vec
    assert by_kind[True].n_spans == 1 and by_kind[True].table[1].item() == body
    assert by_kind[False].n_spans == 2
    assert {by_kind[False].table[2].item(), by_kind[False].table[3].item()} == {
        head, view.numel() - head - body}
    before = flat.clone()
    total = tritonclip.clip_grad_norm_(params_with([view]), 1.0, backend="triton")
    expected = torch.linalg.vector_norm(before[1:5999].double())
    assert abs(float(total) / float(expected) - 1) < 1e-5
    from helpers import applied_coefficient, assert_scaled_once
    assert_scaled_once(view, before[1:5999], applied_coefficient(total, 1.0))
    assert torch.equal(flat[:1], before[:1]) and torch.equal(flat[5999:], before[5999:])
    # a short misaligned span is not worth cutting
    short = kernels.build_plan(_spans([flat[1:100]]), flat.device, dtype)
    assert [launch.aligned for launch in short.launches] == [False]


def test_repeated_per_tensor_norms_build_and_copy_nothing(monkeypatch):
    # The per-tensor index tables live with the cached layout: a second call on the same
    # gradients makes no plan and no host-to-device index tensor.
    grads = random_grads([300, 7, 4096], torch.float32, seed=1)
    first = tritonclip.get_total_norm(grads, backend="triton", per_tensor=True)
    builds = PlanBuilds(monkeypatch)
    made = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or original(*a, **k))
    second = tritonclip.get_total_norm(grads, backend="triton", per_tensor=True)
    assert builds.count == 0 and not made
    assert torch.equal(first[1], second[1])


def test_the_counter_counts_every_arrival():
    # Nothing resets the counter, so no arrival is ever lost: after k launches it holds k
    # times the programs, whatever the interleaving (two launches that overlapped would
    # still leave it a multiple, and the launches after them right).
    g = random_grads([3 * kernels.CHUNK], torch.float32, seed=6)[0]
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    values = [kernels.group_power(plan, 2.0) for _ in range(4)]
    assert plan.workspace(torch.float32)[2].item() == 4 * plan.streams.n_programs == 12
    assert all(torch.equal(v, values[0]) for v in values)


def test_each_stream_has_its_own_counter_and_partials(monkeypatch):
    # Two streams launching over one plan at once must not share the arrival counter or the
    # partials. (On a CPU every launch has the stream None; streams are simulated here.)
    g = random_grads([3 * kernels.CHUNK], torch.float32, seed=6)[0]
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    stream = ["a"]
    monkeypatch.setattr(plan_module, "_current_stream", lambda device: stream[0])
    first = plan.workspace(torch.float32)
    kernels.group_power(plan, 2.0)
    stream[0] = "b"
    second = plan.workspace(torch.float32)
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(first, second))
    kernels.group_power(plan, 2.0)
    kernels.group_power(plan, 2.0)
    assert first[2].item() == 3 and second[2].item() == 6  # programs counted per stream
    assert plan.workspace(torch.float64)[2] is second[2]  # one counter per stream


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("poison", [None, "inf", "nan"])
def test_unscale_norm_clip_equals_the_torch_ops(skip, norm_type, poison):
    # The AMP epilogue against the recipe it replaces: the norm of the scaled gradients,
    # then torch ops for found_inf, the unscaled norm, the coefficient and the factor.
    g = random_grads([70001], torch.float32, seed=8, scale=512.0)[0]
    if poison:
        g[7] = float(poison)
    plan = kernels.build_plan(_spans([g]), g.device, torch.float32)
    for inv in (2.0**-9, 2.0**-16, 1.0):
        inv_scale = torch.tensor(inv)
        total, factor, found = kernels.norm_clip(plan, norm_type, 0.5, 1e-6, skip, inv_scale)
        scaled, _, _ = kernels.norm_clip(plan, norm_type, 1.0, 0.0, False)
        expected_found = (~torch.isfinite(scaled)).float()
        expected_total = scaled * inv_scale
        expected = torch.clamp(0.5 / (expected_total + 1e-6), max=1.0) * inv_scale
        if skip:
            expected = torch.where(expected_found > 0, torch.ones_like(expected), expected)
        assert torch.equal(found, expected_found)
        assert torch.equal(total, expected_total) or (total.isnan() and expected_total.isnan())
        assert torch.equal(factor, expected) or (factor.isnan() and expected.isnan())


def test_amp_unscale_and_clip_is_two_launches(launches):
    from tritonclip import amp

    flat = random_grads([4000], torch.float32, seed=2, scale=100.0)[0]
    grads = [flat[:1024], flat[1025:2000], flat[2004:4000]]
    amp.unscale_and_clip_grads_(grads, torch.tensor(2.0**-8), 1.0, backend="triton")
    assert len(launches) == 2, launches
