"""Every kernel launch of the package goes through :func:`launch`, on Triton's supported APIs.

The first launch of a variant is Triton's own ``kernel[grid](*args, **meta)``
(``JITFunction.run``): it binds and specializes the arguments, compiles or finds the kernel,
launches it and returns the compiled kernel. A caller that fixes the arguments of its
launches (a :class:`~.plan.LaunchPlan`: its tables, sizes and per-stream buffers) passes a
dict, ``kept``, in which that compiled kernel is kept; its later launches call it directly,
``compiled[grid](*args, *constexprs)`` (``CompiledKernel.__getitem__``, the API of a kernel
from ``triton.compile``), without ``JITFunction.run``'s per-call binding and cache-key string.

That is only right if Triton would pick the same compiled kernel for the later arguments. The
caller's key fixes the constexprs and the dtypes of the tensors; the kernels launched this way
are written so that nothing else can change the specialization:

- integer and float scalars are annotated (``n: tl.int64``, ``p: tl.float64``) and listed in
  ``do_not_specialize``: their type is fixed and their value never specializes;
- pointers to per-call buffers (outputs, coefficients, partials) are listed in
  ``do_not_specialize_on_alignment``;
- the remaining pointers are the plan's own tables, the same tensors at every launch.

``tests/test_launch.py`` checks that rule for each such kernel, and, with compiled kernels
launched into a null driver, that a relaunch runs the very kernel Triton's path would.

The grids are one-dimensional. Under ``TRITON_INTERPRET=1`` nothing is compiled (``kernel[grid]`` returns None) and every
launch goes through Triton's interpreter, one at a time: the interpreter patches
``triton.language`` while it runs a kernel, and two threads interpreting at once fail.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

from .config import interpreted

# Interpreted launches, one at a time (see the module docstring).
_INTERPRETER_LOCK = threading.Lock()

# Callables that see every launch as (kernel, meta): the tests count launches and check that
# each variant launched is one the codegen registry compiles (kernels.registry).
observers: list = []

_relaunch = True


@contextlib.contextmanager
def through_triton():
    """Within the block, every launch goes through ``JITFunction.run`` and nothing is kept:
    what the relaunch saves, or a comparison with Triton's own path (the host benchmark,
    tests/launch_check.py, tests/gpu). Not for concurrent use."""
    global _relaunch
    saved, _relaunch = _relaunch, False
    try:
        yield
    finally:
        _relaunch = saved


def launch(kernel, grid: tuple, args: tuple, meta, kept: dict | None = None,
           key=None) -> None:
    """``kernel[grid](*args, **meta)``; with ``kept`` and ``key``, later launches with the same
    key reuse the compiled kernel kept there (see the module docstring).

    ``meta`` holds the constexprs not given in ``args`` and launch options (``num_warps``),
    or is a function that returns them (called only when they are needed). ``key`` must
    determine ``meta`` and the dtypes of the tensors in ``args`` (the caller's launch
    configuration, with ``config.generation`` where it reads ``config.stream_meta``).
    """
    if observers:
        meta = meta() if callable(meta) else meta
        for observer in observers:
            observer(kernel, meta)
    if not _relaunch:
        kept = None
    if kept is not None:
        entry = kept.get(key)
        if entry is not None:
            compiled, constexprs = entry
            compiled[(grid[0], 1, 1)](*args, *constexprs)  # it takes x, y and z
            return
    meta = meta() if callable(meta) else meta
    if interpreted():
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **meta)
        return
    compiled = kernel[grid](*args, **meta)
    if kept is not None and compiled is not None:
        kept[key] = (compiled, _constexpr_values(kernel, len(args), meta))


def _constexpr_values(kernel, n_args: int, meta: dict) -> tuple:
    """The values of the parameters after the first ``n_args``, in declared order: what a
    compiled kernel takes after the arguments (constexprs given in ``meta`` or defaulted)."""
    values = []
    for param in list(inspect.signature(kernel.fn).parameters.values())[n_args:]:
        values.append(meta[param.name] if param.name in meta else param.default)
    return tuple(values)
