"""tritonclip on a ROCm build of torch, simulated on the CPU: the device type is "cuda" there
too, and the Triton kernels, compile-checked for gfx90a and gfx942 (tests/codegen.py) but never
run on AMD hardware, are not chosen by backend="auto"; backend="triton" opts in. The launch
configuration must give every lane of a 64-lane wavefront whole 16-byte accesses."""

import pytest
import torch

from tritonclip import _layout
from tritonclip._torch_backend import TORCH
from tritonclip._triton_backend import TRITON
from tritonclip.kernels import config
from tritonclip.kernels.plan import VECTOR_BYTES

CUDA = torch.device("cuda", 0)


@pytest.fixture
def rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_auto_keeps_to_torch_ops_on_rocm(rocm, dtype):
    backend, reason = _layout.choose_backend("auto", CUDA, dtype, torch.strided)
    assert backend is TORCH and "ROCm" in reason and "backend='triton'" in reason


def test_triton_is_the_opt_in_on_rocm(rocm):
    backend, _ = _layout.choose_backend("triton", CUDA, torch.bfloat16, torch.strided)
    assert backend is TRITON
    assert _layout.choose_backend("torch", CUDA, torch.bfloat16, torch.strided)[0] is TORCH


def test_negative_control_cuda_build_runs_the_kernels(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    backend, reason = _layout.choose_backend("auto", CUDA, torch.float32, torch.strided)
    assert backend is TRITON and "ROCm" not in reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("lanes", [32, 64])
def test_every_lane_gets_whole_16_byte_vectors(dtype, lanes):
    """The streaming block (elements per loop iteration) spread over num_warps warps of 32
    (NVIDIA) or wavefronts of 64 (AMD) lanes: a whole number of 16-byte vectors per lane, at
    least one, so that the loads can be 128-bit (tests/codegen.py reads dwordx4 on gfx942)."""
    block, num_warps = config.stream_config(dtype)
    per_lane = block * dtype.itemsize / (num_warps * lanes)
    assert per_lane >= VECTOR_BYTES and per_lane % VECTOR_BYTES == 0
