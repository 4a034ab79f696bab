"""Run the Triton kernels on CPU tensors: the interpreter must be chosen before triton is
imported, so this runs first. An explicit TRITON_INTERPRET=0 (the GPU suite) is respected.

Also starts the codegen compile (tests/codegen.py) in the background, see _Codegen."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from spawn import HANG_GUARD_S  # noqa: E402
from tritonclip import _core  # noqa: E402

CODEGEN_TESTS = "test_codegen.py"


def pytest_collection_modifyitems(config, items):
    """CPU kernel tests need the interpreter; GPU tests need CUDA and real kernels; the codegen
    tests run last (see _Codegen)."""
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
    items.sort(key=lambda item: item.path.name == CODEGEN_TESTS)  # last; otherwise in order


def pytest_collection_finish(session):
    if not session.config.option.collectonly and any(
            item.path.name == CODEGEN_TESTS for item in session.items):
        _codegen.start()


def pytest_sessionfinish(session):
    _codegen.stop()


@pytest.fixture(scope="session")
def codegen_output():
    """What tests/codegen.py printed: compiled-kernel reports, for tests/test_codegen.py."""
    pytest.importorskip("triton.backends.nvidia")
    return _codegen.result()


class _Codegen:
    """tests/codegen.py in a subprocess (kernels the interpreter has wrapped cannot be
    compiled), started once collection is done. It takes about 2 minutes of one core on a
    cold Triton cache (15 s warm), while most of the suite runs on one core of CI's two; the
    codegen tests run last, so the two overlap and the tests rarely wait."""

    def __init__(self):
        self.process = None

    def start(self):
        if self.process is not None or not importlib.util.find_spec("triton.backends.nvidia"):
            return
        self.stdout, self.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        script = os.path.join(os.path.dirname(__file__), "codegen.py")
        self.process = subprocess.Popen(  # interpreted kernels cannot be compiled
            [sys.executable, script], env=dict(os.environ, TRITON_INTERPRET="0"),
            stdout=self.stdout, stderr=self.stderr)

    def result(self) -> dict:
        self.start()
        try:
            returncode = self.process.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"tests/codegen.py still running after the {HANG_GUARD_S} s hang guard")
        self.stderr.seek(0)
        assert returncode == 0, self.stderr.read().decode(errors="replace")[-4000:]
        self.stdout.seek(0)
        return json.load(self.stdout)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_codegen = _Codegen()


@pytest.fixture(autouse=True)
def _fresh_caches():
    _core.clear_cache()
    yield
