"""kernels.launch: plans relaunch the compiled kernel Triton returned, and only where nothing but
the constexprs and tensor dtypes can change Triton's choice of kernel. Checked without a GPU:
the kernels' declarations here, and compiled kernels launched into a null driver in a
subprocess (tests/launch_check.py; the suite's own kernels are interpreted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import tritonclip
from helpers import params_with, random_grads, run_in_threads
from tritonclip import kernels
from tritonclip.kernels import registry

_HERE = os.path.dirname(__file__)

@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, os.path.join(_HERE, "launch_check.py")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_relaunched_kernels_specialize_on_nothing_a_call_can_change(report):
    # Every argument is a constexpr (in the relaunch key), a typed scalar that is not
    # specialized, a per-call pointer not specialized on alignment, or a plan table.
    assert report["rule"] == {"_norm_kernel": [], "_finalize_kernel": [], "_scale_kernel": [],
                              "_clamp_kernel": []}
    assert report["rule_control"] == ["x_ptr", "n"]  # negative control: the rule can fail


def test_relaunches_run_the_kernel_triton_would_and_skip_its_binding(report):
    scenarios = report["scenarios"]
    assert len(scenarios) == 10
    for name, result in scenarios.items():
        assert result["launches"] > 0, name
        assert result["same_calls"], name
        assert result["through_triton"] == 0, name


def test_negative_control_another_variant_is_told_apart(report):
    assert report["control_same"] is False


@pytest.mark.interpreter
def test_interpreted_launches_from_several_threads():
    # Triton's interpreter patches triton.language while it runs a kernel: two threads
    # interpreting at once fail unless launches take turns (kernels.launch).
    def work(seed):
        for _ in range(3):
            grads = random_grads([3000, 70], torch.float32, seed=seed)
            total = tritonclip.clip_grad_norm_(params_with(grads), 0.1, backend="triton")
            assert torch.isfinite(total)

    assert run_in_threads(work) == []


@pytest.mark.interpreter
def test_every_launched_variant_has_a_compiled_counterpart(monkeypatch):
    # What CI compiles for GPUs (kernels.registry) covers every (kernel, dtype, alignment)
    # that the public functions launch.
    launched = set()

    def family(kernel, meta):
        dtype = meta.get("DTYPE", meta.get("ACC"))
        return kernel.fn.__name__, str(dtype), meta.get("ALIGNED")

    monkeypatch.setattr(kernels.launch, "observers",
                        [lambda kernel, meta: launched.add(family(kernel, meta))])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        flat = random_grads([5000], dtype)[0]
        params = params_with([flat[:1024], flat[1025:2000], flat[2004:5000]])
        tritonclip.clip_grad_norm_(params, 1e-3, backend="triton")
        tritonclip.clip_grad_norm_(params, 1e-3, 3.0, backend="triton")
        tritonclip.clip_grad_value_(params, 1e-3, backend="triton")
        tritonclip.clip_grad_norm_per_tensor_(params, 1e-3, backend="triton")
        x = torch.zeros(4, 300, dtype=dtype, requires_grad=True)
        tritonclip.error_clip(x, max_norm=1e-3, dim=-1, backend="triton").backward(
            torch.ones_like(x))
        tritonclip.error_clip(x, 1e-3, backend="triton").backward(torch.ones_like(x))
    compiled = {family(v.kernel, v.meta) for v in registry.variants()}
    assert launched and launched <= compiled, launched - compiled
