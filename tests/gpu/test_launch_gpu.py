"""Relaunches of compiled kernels by their plans (kernels/launch.py) on a GPU: the same results
as Triton's own launch path, bit for bit, and no JITFunction.run once a plan is warm."""

import contextlib
import math

import pytest
import torch

import tritonclip
from helpers import DTYPE_IDS, DTYPES, params_with, random_grads
from tritonclip.amp import unscale_and_clip_grads_
from tritonclip.error_clip import error_clip
from triton.runtime.jit import JITFunction

pytestmark = pytest.mark.gpu


@pytest.fixture
def triton_runs(monkeypatch):
    """Counts launches that go through JITFunction.run."""
    count = [0]
    original = JITFunction.run

    def counting(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(JITFunction, "run", counting)
    return count


def _operations(dtype):
    def norm_clip(grads):
        return tritonclip.clip_grad_norm_(params_with(grads), 1e-3, 2.0)

    def norm_inf_skip(grads):
        return tritonclip.clip_grad_norm_(params_with(grads), 1e-3, math.inf, nonfinite="skip")

    def value(grads):
        tritonclip.clip_grad_value_(params_with(grads), 0.01)

    def amp(grads):
        return unscale_and_clip_grads_(grads, torch.full((1,), 0.5, device="cuda"), 1e-3)

    def per_tensor(grads):
        return tritonclip.get_total_norm(grads, 3.0, per_tensor=True)

    def error_clips(grads):
        upstream = grads[2].view(256, 256)
        x = torch.zeros(256, 256, dtype=dtype, device="cuda", requires_grad=True)
        error_clip(x, max_norm=0.1, dim=-1).backward(upstream)
        y = torch.zeros(256, 256, dtype=dtype, device="cuda", requires_grad=True)
        error_clip(y, 0.01).backward(upstream)
        return x.grad, y.grad

    return {"norm_clip": norm_clip, "norm_inf_skip": norm_inf_skip, "value": value,
            "amp": amp, "per_tensor": per_tensor, "error_clips": error_clips}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_direct_launches_equal_triton_launches(triton_runs, dtype):
    source = random_grads([4097, 70001, 1 << 16, 3], dtype, device="cuda", seed=5)
    source.append(random_grads([5000], dtype, device="cuda", seed=6)[0][3:4003])
    for name, op in _operations(dtype).items():
        # One set of buffers, refilled before each call: the same addresses, so the same plans
        # and summation order (results depend on the gradients' address order, see README).
        grads = [g.clone() for g in source]
        results = {}
        for direct in (False, True):
            tritonclip._core.clear_cache()  # plans made under through_triton keep nothing
            with contextlib.ExitStack() as stack:
                if not direct:
                    stack.enter_context(tritonclip.kernels.launch.through_triton())
                for call in range(3):  # a plan's first launch of a variant goes through Triton
                    for g, s in zip(grads, source):
                        g.copy_(s)
                    triton_runs[0] = 0
                    out = op(grads)
                    torch.cuda.synchronize()
            if direct and name != "error_clips":  # error clipping has no plan: Triton's path
                assert triton_runs[0] == 0, name  # the third call only relaunched
            results[direct] = (out, [g.clone() for g in grads])
        (out_t, grads_t), (out_d, grads_d) = results[False], results[True]
        flat = lambda value: [v for v in (value if isinstance(value, (tuple, list)) else [value])
                              if isinstance(v, torch.Tensor)]
        for a, b in zip(flat(out_t), flat(out_d)):
            assert torch.equal(a, b), name
        for a, b in zip(grads_t, grads_d):
            assert torch.equal(a, b), name
