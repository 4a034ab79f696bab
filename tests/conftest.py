"""Run the Triton kernels on CPU tensors: the interpreter must be chosen before triton is
imported, so this runs first. An explicit TRITON_INTERPRET=0 (the GPU suite) is respected."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tritonclip import kernels  # noqa: E402
from tritonclip._groups import clear_layout_cache, interpreter_enabled  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """CPU kernel tests need the interpreter; GPU tests need CUDA and real kernels."""
    skip_cpu = pytest.mark.skip(reason="TRITON_INTERPRET is off: Triton cannot run on CPU")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device and TRITON_INTERPRET=0")
    has_gpu = torch.cuda.is_available() and not interpreter_enabled()
    for item in items:
        if "gpu" in item.keywords:
            if not has_gpu:
                item.add_marker(skip_gpu)
        elif "interpreter" in item.keywords and not interpreter_enabled():
            item.add_marker(skip_cpu)


@pytest.fixture(autouse=True)
def _fresh_caches():
    kernels.plan_cache.clear()
    clear_layout_cache()
    yield
