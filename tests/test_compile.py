"""tritonclip inside ``torch.compile``: every public operation compiles with ``fullgraph=True``
as one custom op, gives the eager result (the same code runs inside the op), compiles once,
and passes ``torch.library.opcheck``; what cannot be an op falls back to eager with its
reason."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import spawn
import tritonclip
from helpers import random_grads
from tritonclip import amp

# dynamo itself instantiates autograd Functions while tracing them (torch 2.13)
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_params(dtypes=(torch.float32, torch.bfloat16, torch.float32), seed=0):
    """Parameters of several shapes and dtypes with exact random gradients (one without)."""
    shapes = [(7, 5), (13,), (3, 4, 2)]
    grads = random_grads([math.prod(s) for s in shapes], torch.float32, seed=seed, scale=2.0)
    gen = torch.Generator().manual_seed(seed + 100)
    params = []
    for shape, dtype, g in zip(shapes, dtypes, grads):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = g.to(dtype).reshape(shape)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient
    return params


def copy_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_same_result(compiled, eager):
    """Compiled against eager: the same structure, dtypes, shapes and devices, and values
    equal up to the rounding of CPU reductions, which depends on where the buffers lie (their
    SIMD head and tail; under ``aot_eager`` the op runs on copies of the gradients): a few
    units in the last place, far below any real error."""
    if isinstance(eager, torch.Tensor):
        assert isinstance(compiled, torch.Tensor) and compiled.dtype == eager.dtype
        assert compiled.shape == eager.shape and compiled.device == eager.device
        torch.testing.assert_close(compiled, eager, equal_nan=True)
    elif isinstance(eager, (tuple, list)):
        assert type(compiled) is type(eager) and len(compiled) == len(eager)
        for x, y in zip(compiled, eager):
            assert_same_result(x, y)
    else:
        assert compiled == eager


def _grads(ps):
    return [p.grad for p in ps if p.grad is not None]


# Each case: (id, function of (parameters, backend)). Arguments cover the op's options.
CASES = [
    ("clip_grad_norm_", lambda ps, b: tritonclip.clip_grad_norm_(ps, 0.5, backend=b)),
    ("clip_grad_norm_-inf-skip", lambda ps, b: tritonclip.clip_grad_norm_(
        ps, 0.5, "inf", nonfinite="skip", backend=b)),
    ("clip_grad_norm_-filter", lambda ps, b: tritonclip.clip_grad_norm_(
        ps, 0.5, 3.0, backend=b, norm_filter=lambda p: p.dim() > 1)),
    ("clip_grad_norm_-error", lambda ps, b: tritonclip.clip_grad_norm_(
        ps, 0.5, error_if_nonfinite=True, backend=b)),
    ("clip_grad_value_", lambda ps, b: tritonclip.clip_grad_value_(ps, 0.3, backend=b)),
    ("clip_grad_value_-lo-hi", lambda ps, b: tritonclip.clip_grad_value_(
        ps, lo=-0.2, hi=0.5, backend=b)),
    ("get_total_norm", lambda ps, b: tritonclip.get_total_norm(_grads(ps), 3.0, backend=b)),
    ("get_total_norm-per_tensor", lambda ps, b: tritonclip.get_total_norm(
        _grads(ps), per_tensor=True, backend=b)),
    ("get_total_norm-filter", lambda ps, b: tritonclip.get_total_norm(
        _grads(ps), backend=b, norm_filter=lambda t: t.dim() == 1)),
    ("clip_grads_with_norm_-number", lambda ps, b: tritonclip.clip_grads_with_norm_(
        ps, 0.5, 4.0, backend=b)),
    ("clip_grads_with_norm_-tensor", lambda ps, b: tritonclip.clip_grads_with_norm_(
        ps, 0.5, tritonclip.get_total_norm(_grads(ps), backend=b), backend=b)),
    ("clip_grad_norm_per_tensor_", lambda ps, b: tritonclip.clip_grad_norm_per_tensor_(
        ps, 0.4, backend=b)),
    ("clip_grad_agc_", lambda ps, b: tritonclip.clip_grad_agc_(ps, 0.05, backend=b)),
    ("amp.unscale_and_clip_grads_", lambda ps, b: amp.unscale_and_clip_grads_(
        _grads(ps), torch.tensor(0.25), 0.5, backend=b)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_compiles_whole_and_equals_eager(case, backend):
    eager_params, compiled_params = make_params(), make_params()
    expected = case(eager_params, backend)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(case, backend=counter, fullgraph=True)
    assert_same_result(compiled(compiled_params, backend), expected)
    assert_same_result([p.grad for p in compiled_params], [p.grad for p in eager_params])
    assert counter.frame_count == 1
    # the second call runs the same graph (no recompilation) on new values
    again = make_params(seed=1)
    with torch.no_grad():
        for p, q in zip(compiled_params, again):
            p.copy_(q)
            if p.grad is not None:
                p.grad.copy_(q.grad)
    assert_same_result(compiled(compiled_params, backend), case(again, backend))
    assert_same_result([p.grad for p in compiled_params], [p.grad for p in again])
    assert counter.frame_count == 1


def test_float64_gradients_give_a_float64_norm_under_compile():
    params = make_params((torch.float32, torch.float64, torch.bfloat16))
    compiled = torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 0.5), fullgraph=True,
                             backend="aot_eager")
    expected = tritonclip.clip_grad_norm_(copy_params(make_params(
        (torch.float32, torch.float64, torch.bfloat16))), 0.5)
    assert_same_result(compiled(params), expected)
    assert expected.dtype == torch.float64


def test_aliased_gradients_are_clipped_once_under_compile():
    """A parameter listed twice and gradients that are views of one bucket (DDP's
    gradient_as_bucket_view) enter the op as aliases: counted and scaled once, as eager."""
    def setups():
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 2.0)
        bucket = torch.arange(8.0)
        a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
        a.grad, b.grad = bucket[:4], bucket[4:]
        return [[p, p], [a, b]], bucket

    compiled = torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 1.0), fullgraph=True,
                             backend="aot_eager")
    (twice, views), bucket = setups()
    (eager_twice, eager_views), eager_bucket = setups()
    assert_same_result(compiled(twice), tritonclip.clip_grad_norm_(eager_twice, 1.0))
    assert_same_result(twice[0].grad, eager_twice[0].grad)
    assert_same_result(compiled(views), tritonclip.clip_grad_norm_(eager_views, 1.0))
    assert_same_result(bucket, eager_bucket)
    assert views[0].grad._base is bucket  # still views of the bucket
    # scaled once: 2 * 1 / (4 + eps), not 2 / 16
    torch.testing.assert_close(twice[0].grad, torch.full((4,), 0.5))


def test_inductor_calls_the_op_in_place_without_copies():
    """Inductor runs the op on the gradients themselves: no clone of them into the graph and
    no copy back (which would add 2N bytes of traffic and miss the layout cache)."""
    from torch._inductor.utils import run_and_get_code

    params, reference = make_params(), make_params()
    compiled = torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 0.5), fullgraph=True)
    total, code = run_and_get_code(compiled, params)
    assert_same_result(total, tritonclip.clip_grad_norm_(reference, 0.5))
    assert_same_result([p.grad for p in params], [p.grad for p in reference])
    source = "\n".join(code)
    assert "torch.ops.tritonclip.clip_grad_norm_.default" in source
    assert "clone" not in source and "copy_" not in source, source


def test_a_step_graph_breaks_only_where_torch_clip_and_step_do():
    """A compiled clip + optimizer step: tritonclip adds no graph (the optimizer's own
    ``_use_grad`` graph break is torch's), and gives the eager parameters."""
    def steps(clip, compile_):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

        def step(x):
            model(x).square().sum().backward()
            clip(list(model.parameters()), 0.5)
            optimizer.step()
            optimizer.zero_grad()

        if compile_:
            explanation = torch._dynamo.explain(step)(torch.ones(3, 6))
            torch._dynamo.reset()
            model.load_state_dict(torch.nn.Sequential(
                torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).state_dict())
            return explanation
        for i in range(3):
            step(torch.full((3, 6), float(i + 1)))
        return [p.detach().clone() for p in model.parameters()]

    torch_explained = steps(torch.nn.utils.clip_grad_norm_, True)
    ours_explained = steps(tritonclip.clip_grad_norm_, True)
    assert ours_explained.graph_count == torch_explained.graph_count
    assert ours_explained.graph_break_count == torch_explained.graph_break_count

    def trained(compile_):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        def clip_and_step():
            tritonclip.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()

        run = torch.compile(clip_and_step, backend="aot_eager") if compile_ else clip_and_step
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):  # (set, not backward: CPU matmuls vary with their buffers' addresses)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            run()
        return [p.detach() for p in model.parameters()]

    assert_same_result(trained(True), trained(False))


def test_error_if_nonfinite_raises_at_run_time_under_compile():
    """The check waits for the device inside the op, as in eager mode: compiled code raises
    the eager ``RuntimeError`` for a NaN gradient and leaves the gradients untouched."""
    params = make_params()
    compiled = torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 0.5,
                                                                   error_if_nonfinite=True),
                             fullgraph=True, backend="aot_eager")
    compiled(params)
    params[0].grad[0, 0] = math.nan
    before = [p.grad.clone() for p in params if p.grad is not None]
    with pytest.raises(RuntimeError, match="non-finite"):
        compiled(params)
    for b, p in zip(before, params):
        assert torch.equal(b.nan_to_num(), p.grad.nan_to_num())


def test_bad_arguments_raise_the_eager_error_under_compile():
    params = make_params()
    with pytest.raises(ValueError, match="max_norm"):
        torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, -1.0),
                      backend="aot_eager")(params)
    with pytest.raises(Exception, match="max_norm"):  # dynamo's Unsupported, same message
        torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, -1.0), fullgraph=True,
                      backend="aot_eager")(params)


def test_process_groups_fall_back_to_eager_with_their_reason():
    """A process group cannot enter a custom op: with fullgraph=True the error names the
    reason; the negative control (no group) compiles."""
    params = make_params()
    sentinel = object()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="process groups"):
        torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 0.5, process_group=sentinel),
                      fullgraph=True, backend="aot_eager")(params)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="process groups"):
        torch.compile(lambda ps: tritonclip.get_total_norm(_grads(ps),
                                                           process_group=sentinel),
                      fullgraph=True, backend="aot_eager")(params)
    torch.compile(lambda ps: tritonclip.clip_grad_norm_(ps, 0.5), fullgraph=True,
                  backend="aot_eager")(params)


def _compiled_with_group(rank, world):
    import torch.distributed as dist

    params = make_params(seed=rank)
    reference = copy_params(params)
    compiled = torch.compile(
        lambda ps: tritonclip.clip_grad_norm_(ps, 0.5, process_group=dist.group.WORLD),
        backend="aot_eager")
    total = compiled(params)
    expected = tritonclip.clip_grad_norm_(reference, 0.5, process_group=dist.group.WORLD)
    assert_same_result(total, expected)
    assert_same_result([p.grad for p in params], [p.grad for p in reference])


def test_process_group_clip_runs_eagerly_inside_a_compiled_function():
    spawn.run(_compiled_with_group, 2)


# -- AMP ---------------------------------------------------------------------------------------


def _amp_state(compile_, scaler_type=torch.amp.GradScaler):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = scaler_type("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1024
    fn = lambda: amp.unscale_and_clip_(scaler, optimizer, 0.5)  # noqa: E731
    if compile_:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    total = fn()
    state = scaler._per_optimizer_states[id(optimizer)]
    return total, [p.grad for p in model.parameters()], state


def test_amp_unscale_and_clip_compiles_and_leaves_the_scaler_as_eager():
    total, grads, state = _amp_state(True)
    eager_total, eager_grads, eager_state = _amp_state(False)
    assert_same_result(total, eager_total)
    assert_same_result(grads, eager_grads)
    assert state["stage"] is eager_state["stage"] is amp.OptState.UNSCALED
    assert_same_result(state["found_inf_per_device"], eager_state["found_inf_per_device"])


def test_amp_scalers_that_do_not_fold_fall_back_to_eager():
    class OwnUnscale(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            return super().unscale_(optimizer)

    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch.amp"):
        _amp_state(True, OwnUnscale)


# -- error clipping ----------------------------------------------------------------------------


def _error_clipped(backend, compile_):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    w = torch.randn(6, 6, generator=gen)
    counter = tritonclip.ClipCounter()

    def f(x):
        h = tritonclip.error_clip(x @ w, clip_value=0.05, counter=counter, backend=backend)
        h = tritonclip.error_clip(torch.tanh(h) @ w, max_norm=0.3, dim=1, backend=backend)
        return (h ** 2).sum()

    if compile_:
        f = torch.compile(f, fullgraph=True, backend="aot_eager")
    f(x).backward()
    f(x).backward()
    return x.grad, counter.counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_clip_compiles_whole_and_equals_eager(backend):
    grad, counts = _error_clipped(backend, True)
    eager_grad, eager_counts = _error_clipped(backend, False)
    assert_same_result(grad, eager_grad)
    assert_same_result(counts, eager_counts)
    assert 0 < counts[0] < counts[1]  # some elements clipped, not all


# -- the ops themselves ------------------------------------------------------------------------


def _samples():
    """(op, args) for every op, on gradients of two dtypes (float64: the fake's dtype)."""
    ops = torch.ops.tritonclip

    def grads(dtype=torch.float64):
        return [torch.randn(5, 3), torch.randn(7, dtype=dtype)]

    inv_scale = torch.tensor(0.5)
    return [
        (ops.get_total_norm, (grads(), 2.0, "propagate", None, "auto", None)),
        (ops.get_total_norm, (grads(torch.bfloat16), 1.0, "propagate", None, "auto",
                              [True, False])),
        (ops.get_total_norm, ([], 2.0, "propagate", None, "auto", None)),
        (ops.get_tensor_norms, (grads(), 2.0, "propagate", None, "auto")),
        (ops.clip_grad_norm_, (grads(), 0.5, 2.0, 1e-6, "propagate", None, "auto", None)),
        (ops.clip_grad_norm_, (grads(torch.float32), 0.5, math.inf, 1e-6, "skip", None,
                               "auto", [False, True])),
        (ops.clip_grads_with_norm_, (grads(), 0.5, torch.tensor(3.0), 1e-6, None, "auto")),
        (ops.clip_grad_value_, (grads(), -0.1, 0.2, None, "auto")),
        (ops.clip_grad_norm_per_tensor_, (grads(), 0.5, 2.0, 1e-6, "propagate", None,
                                          "auto")),
        (ops.clip_grad_agc_, (grads(torch.float32), [torch.randn(5, 3), torch.randn(7)],
                              0.01, 1e-3, 2.0, None, "auto")),
        (ops.unscale_and_clip_grads_, (grads(), inv_scale, 0.5, 2.0, 1e-6, "propagate", None,
                                       "auto")),
        (ops.unscale_and_clip_grads_, ([], inv_scale, 0.5, 2.0, 1e-6, "propagate", None,
                                       "auto")),
        (ops.error_clip_backward, (torch.randn(4, 6), -0.5, 0.5, None, None, 2.0, 1e-6,
                                   "torch", torch.zeros(2, dtype=torch.int64))),
        (ops.error_clip_backward, (torch.randn(4, 6), -math.inf, math.inf, 0.3, [1], 2.0,
                                   1e-6, "torch", None)),
    ]


def test_every_op_has_a_sample():
    registered = {name for name in dir(torch.ops.tritonclip)
                  if isinstance(getattr(torch.ops.tritonclip, name),
                                torch._ops.OpOverloadPacket)}
    sampled = {op._qualified_op_name.split("::")[1] for op, _ in _samples()}
    assert registered == sampled


@pytest.mark.parametrize("index", range(len(_samples())))
def test_opcheck(index):
    op, args = _samples()[index]
    torch.library.opcheck(op, args)


# -- what stays eager --------------------------------------------------------------------------


def _stateful_calls():
    model = torch.nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    zclip = tritonclip.ZClip(warmup_steps=1)
    return model, [lambda: tritonclip.optim.clip_into_(optimizer, 0.5),
                   lambda: zclip.step(model.parameters()),
                   lambda: zclip(model.parameters())]


@pytest.mark.parametrize("index", range(3))
def test_stateful_operations_run_eagerly_with_their_reason(index):
    model, calls = _stateful_calls()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Python-side state"):
        torch.compile(calls[index], fullgraph=True, backend="aot_eager")()
    # without fullgraph: a graph break, and the eager result
    compiled_total = torch.compile(calls[index], backend="aot_eager")()
    compiled_grads = [p.grad for p in model.parameters()]
    model, calls = _stateful_calls()
    assert_same_result(compiled_total, calls[index]())
    assert_same_result(compiled_grads, [p.grad for p in model.parameters()])
