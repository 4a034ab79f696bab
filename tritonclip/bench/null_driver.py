"""A Triton driver that compiles kernels for a CUDA target and launches nothing.

With it active, ``kernel[grid](...)`` on CPU tensors runs all of Triton's host work (binding,
specialization, the kernel cache, a real compilation to PTX and cubin on the first call) and
then calls a launcher that only counts, or records, its calls. That measures the host side of
a launch on a machine without a GPU (``python -m tritonclip.bench.host``) and lets the tests
check which compiled kernel each launch would run (tests/launch_check.py).

The kernels must be compiled ones: import triton and tritonclip without ``TRITON_INTERPRET``.
Use it in a process of its own: the kernels compiled under it keep their null launchers in
Triton's kernel cache (and in tritonclip's launchers) after the block, so a real launch later
in the same process would do nothing.
"""

from __future__ import annotations

import contextlib

from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class NullLauncher:
    """Stands in for the compiled launcher of one kernel (Triton makes one per compiled
    kernel, once): appends ``(self, call arguments)`` to the active null driver's ``record``
    (when it has one) for each launch."""

    def __init__(self, src, metadata):
        self.name = getattr(src, "name", "kernel")

    def __call__(self, *args):
        record = getattr(driver.active, "record", None)
        if record is not None:
            record.append((self, args))


class _NullUtils:
    def load_binary(self, name, kernel, shared, device):
        # module, function, registers, spills, max threads per block
        return object(), object(), 0, 0, 1024

    def unload_module(self, module):  # triton 3.9's CompiledKernel.__del__
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}


class NullDriver:
    """Compiles for ``GPUTarget("cuda", arch, 32)``. The current device and stream are the
    attributes ``device`` and ``stream`` (0, 0), which a test may change between launches."""

    def __init__(self, arch: int = 90, record: list | None = None):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _NullUtils()
        self.record = record
        self.device = 0
        self.stream = 0

    launcher_cls = NullLauncher

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        self.device = device

    def get_current_stream(self, device=None):
        return self.stream

    def get_device_capability(self, device=None):
        return divmod(self.target.arch, 10)

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty


@contextlib.contextmanager
def null_driver(arch: int = 90, record: list | None = None):
    """Make a :class:`NullDriver` Triton's active driver for the duration of the block."""
    previous = driver._active  # None until a driver is first needed: do not create one here
    driver.set_active(NullDriver(arch, record))
    try:
        yield driver.active
    finally:
        driver.set_active(previous)
