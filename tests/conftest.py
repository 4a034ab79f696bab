"""Run the Triton kernels on CPU tensors: the interpreter must be chosen before triton is
imported, so this runs first. An explicit TRITON_INTERPRET=0 (the GPU suite) is respected."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tritonclip import _core  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """CPU kernel tests need the interpreter; GPU tests need CUDA and real kernels."""
    from tritonclip.kernels import config as kernel_config

    skip_cpu = pytest.mark.skip(reason="TRITON_INTERPRET is off: Triton cannot run on CPU")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and TRITON_INTERPRET=0")
    has_gpu = torch.cuda.is_available() and not kernel_config.interpreted()
    for item in items:
        if "gpu" in item.keywords:
            if not has_gpu:
                item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not kernel_config.interpreted():
            item.add_marker(skip_cpu)


@pytest.fixture(autouse=True)
def _fresh_caches():
    _core.clear_cache()
    yield
