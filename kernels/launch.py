"""Launching compiled Triton kernels without Triton's per-call argument binding.

``kernel[grid](*args)`` (``JITFunction.run``) binds and specializes every argument, builds a
cache-key string, re-checks every global constant the kernel reads and reads runtime knobs
before it reaches the compiled kernel's launcher, on every call. That host work is the same
for every call of one *variant* (the same constexprs, launch options and argument kinds), and
it is much of what made a small clip slower than torch: on the H100 machine's host the norm
kernel's launch took about 0.1 ms of host time through ``JITFunction.run`` (README, "Known
limits"). On this project's 2-core CI CPU, with the CUDA launcher replaced by a no-op
(tritonclip.bench.null_driver), one launch of the norm kernel costs 18.6 µs through
``JITFunction.run`` and 8.5 µs through :class:`Launcher` (of which 3.5 µs is the key below).

:class:`Launcher` goes through ``JITFunction.run`` once per variant (which compiles, caches and
launches as usual, and returns the compiled kernel), keeps the compiled kernel under a key of
what Triton specializes on, and afterwards makes the call ``JITFunction.run`` ends with: the
compiled launcher with the grid, the current stream, the launch metadata and hooks (so
profilers such as proton still see every launch) and every argument in declared order,
constexprs included. Triton 3.6 to 3.9 end ``JITFunction.run`` with that call; each was
checked (tests/launch_check.py, which CI runs on the installed release). Other releases, and
``TRITONCLIP_DIRECT_LAUNCH=0`` in the environment, keep Triton's path for every launch.

The key is at least as fine as Triton's own specialization: for each argument its constexpr
value, or the dtype of a tensor and whether its address is 16-byte aligned (unless the
parameter is ``do_not_specialize_on_alignment``), or an integer's width class (i32, i64,
u64) and, unless ``do_not_specialize``, whether it equals 1 and whether it is a multiple of 16;
plus the launch options and the current device. Calls of any other shape (a callable grid,
an argument of another type, a constexpr that cannot be hashed) go through Triton.

Not seen by the direct path, once a variant has been launched: Triton's runtime and
compilation knobs changed afterwards (``TRITON_DEBUG``, instrumentation modes, triton 3.9's
``add_stages_inspection_hook`` and ``fpsan_homomorphic_casts``: set them before, by
environment variable), a cleared ``JITFunction.device_caches``,
``JITFunction.pre_run_hooks`` (a kernel with hooks always goes through ``JITFunction.run``),
and the check that the kernel's global constants have not been reassigned (this package's
kernels read module constants only). Under ``TRITON_INTERPRET=1`` kernels are not compiled,
and every launch goes through Triton.
"""

from __future__ import annotations

import os
import re

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .config import interpreted

try:
    from triton import knobs
except ImportError:  # Triton < 3.4
    knobs = None


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# The releases whose JITFunction.run ends with the call Launcher makes (checked one by one).
_CHECKED_RELEASES = ((3, 6), (3, 9))
COMPATIBLE = (knobs is not None
              and _CHECKED_RELEASES[0] <= _version(triton.__version__) <= _CHECKED_RELEASES[1])
_SWITCHED_ON = os.environ.get("TRITONCLIP_DIRECT_LAUNCH", "1") != "0"

_I32_LIMIT = 2 ** 31  # Triton passes ints in [-2**31, 2**31) as i32, then i64, then u64
_I64_LIMIT = 2 ** 63
# What the direct call uses of a compiled kernel; a Triton without it keeps the usual path.
_COMPILED_API = ("run", "function", "packed_metadata", "launch_metadata")


def direct_launch_enabled() -> bool:
    """Whether compiled kernels are launched directly after their first launch (see above)."""
    return COMPATIBLE and _SWITCHED_ON and not interpreted()


class Launcher:
    """``Launcher(kernel)(grid, *args, **kwargs)`` launches ``kernel[grid](*args, **kwargs)``.

    The direct path takes the leading (non-constexpr) parameters by position and the rest
    (constexprs, which may be left to their defaults) and launch options such as
    ``num_warps`` by keyword; any other call goes through Triton every time.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        # Compiled kernels only: under TRITON_INTERPRET they are InterpretedFunctions.
        compiled = isinstance(kernel, JITFunction)
        self._direct = COMPATIBLE and _SWITCHED_ON and compiled
        # (number of positional arguments, keyword items) -> (tail, {(device, kinds): kernel})
        self._variants: dict = {}
        if compiled:
            # per parameter: None for a constexpr, else (specialize ints, specialize alignment)
            self._rules = tuple(None if p.is_constexpr
                                else (not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                                for p in kernel.params)

    def __call__(self, grid: tuple, *args, **kwargs) -> None:
        if not self._direct or self.kernel.pre_run_hooks or callable(grid):
            self.kernel[grid](*args, **kwargs)
            return
        options = (len(args), tuple(kwargs.items()))  # keyword constexprs and launch options
        try:
            variant = self._variants.get(options)
        except TypeError:  # a value that cannot be hashed
            self.kernel[grid](*args, **kwargs)
            return
        if variant is None:
            variant = self._variants[options] = (self._tail(len(args), kwargs), {})
        tail, compiled_by_kinds = variant
        device = driver.active.get_current_device()
        kinds = None if tail is None else self._kinds(args)
        key = None if kinds is None else (device, kinds)
        try:
            compiled = None if key is None else compiled_by_kinds.get(key)
        except TypeError:  # a constexpr given by position that cannot be hashed
            key = compiled = None
        if compiled is None:
            # compiles (or finds) and launches the variant; afterwards launch it directly
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None and all(hasattr(compiled, name) for name in _COMPILED_API):
                compiled_by_kinds[key] = compiled
            return
        bound = args + tail
        grid_x, grid_y, grid_z = (tuple(grid) + (1, 1))[:3]
        stream = driver.active.get_current_stream(device)
        hooks = knobs.runtime
        compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *bound),
                     hooks.launch_enter_hook, hooks.launch_exit_hook, *bound)

    def _tail(self, n_positional: int, kwargs: dict) -> tuple | None:
        """The values of the parameters after the first ``n_positional``, in declared order
        (keyword or default): constexprs only, so they are fixed by ``kwargs`` and the key
        need not look at them again. None where the call does not bind that way (Triton
        then binds it, or reports the error)."""
        params = self.kernel.params
        if n_positional > len(params) or any(p.name in kwargs for p in params[:n_positional]):
            return None
        tail = []
        for param in params[n_positional:]:
            if not param.is_constexpr:
                return None
            if param.name in kwargs:
                tail.append(kwargs[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                return None
        return tuple(tail)

    def _kinds(self, args: tuple) -> tuple | None:
        """What Triton specializes on in the positional arguments (see the module docstring),
        or None for a kind not handled here (the launch then goes through Triton)."""
        kinds = []
        for value, rule in zip(args, self._rules):
            cls = type(value)  # exact types first: this loop runs for every launch
            if rule is None:  # a constexpr given by position
                kinds.append(value)
            elif cls is torch.Tensor or (cls is not int and isinstance(value, torch.Tensor)):
                kinds.append((value.dtype, rule[1] and value.data_ptr() % 16 == 0))
            elif cls is int:
                width = 0 if -_I32_LIMIT <= value < _I32_LIMIT else (
                    1 if -_I64_LIMIT <= value < _I64_LIMIT else 2)
                kinds.append((width, value == 1, value % 16 == 0) if rule[0] else width)
            elif cls is float or cls is bool:
                kinds.append(cls)
            else:  # int and float subclasses (numpy scalars, enums) and anything else
                return None
        return tuple(kinds)
