"""tritonclip under ``torch.compile``: its operations as ``torch.library`` custom ops.

Every public operation is, under compilation, one opaque custom op in the ``tritonclip``
namespace (``torch.ops.tritonclip.*``), registered with a fake implementation and the
gradients it writes (``mutates_args``). Dynamo traces only the public function's argument
checks (constants, folded at trace time) and the collection of ``.grad``s; the op's
implementation is the eager code, so host-side planning (layouts, launch plans, the cache)
runs behind the op boundary, at run time, as in eager mode, and the results are the eager
results (bit for bit on gradients at the same addresses; inductor runs the op in place).

Registered as ``custom_op`` rather than ``triton_op``: the kernels' launch plans are built
and cached on the host from the tensors' addresses, which the compiler must not see through.

What cannot be an op falls back to eager through ``torch.compiler.disable`` with its reason:
a graph break without ``fullgraph`` (the eager call then runs as usual), a clear
``torch._dynamo.exc.Unsupported`` naming the reason with ``fullgraph=True``. That is the case
for norms reduced over process groups (``process_group``, DTensor gradients): a process group
cannot cross the op boundary.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from . import _normmath

NAMESPACE = "tritonclip"

compiling = torch.compiler.is_compiling


def op(name: str, mutates: tuple[str, ...] = (), fake: Callable | None = None):
    """Register the decorated function as the custom op ``tritonclip::name`` writing the
    arguments named in ``mutates``, with ``fake`` (same arguments) as its fake (meta)
    implementation; returns the op, called like the function."""
    def register(fn):
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(fn)
        custom.register_fake(fake if fake is not None else _returns_none)
        return custom
    return register


def _returns_none(*args, **kwargs) -> None:
    return None


def norm_like(tensors: list[torch.Tensor], *shape: int) -> torch.Tensor:
    """An empty norm of ``shape`` as the eager code returns it over ``tensors``: on the first
    tensor's device (the CPU for none), float32, float64 where a float64 tensor takes part."""
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = _normmath.result_dtype(t.dtype for t in tensors)
    return torch.empty(shape, dtype=dtype, device=device)


def counted(items: list[torch.Tensor], norm_filter) -> list[bool] | None:
    """``norm_filter`` evaluated on each item where the compiler traces it (the filter is user
    code, and cannot cross the op boundary); None without a filter."""
    if norm_filter is None:
        return None
    if not callable(norm_filter):
        raise TypeError(f"norm_filter must be a callable taking a tensor, got {norm_filter!r}")
    return [bool(norm_filter(item)) for item in items]


def grads_of(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The non-None ``.grad`` of each parameter, in code the compiler traces (the core's
    faster ``map`` over an ``attrgetter`` is opaque to it)."""
    return [p.grad for p in parameters if p.grad is not None]


def grads_counted(parameters: list[torch.Tensor], norm_filter
                  ) -> tuple[list[torch.Tensor], list[bool] | None]:
    """The gradients of ``parameters`` (None skipped) and, with a filter, whether each is
    counted in the norm."""
    keep = counted(parameters, norm_filter)
    grads = grads_of(parameters)
    if keep is not None:
        keep = [k for p, k in zip(parameters, keep) if p.grad is not None]
    return grads, keep


def filter_of(tensors: list[torch.Tensor], counted: list[bool] | None):
    """Inside an op: the norm filter over ``tensors`` that ``counted`` (from :func:`counted`)
    describes, or None."""
    if counted is None:
        return None
    chosen = {id(t) for t, keep in zip(tensors, counted) if keep}
    return lambda t: id(t) in chosen


_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def _call(fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def eager(reason: str) -> Callable:
    """A caller ``run(fn, *args, **kwargs)`` that runs ``fn`` eagerly from compiled code: a
    graph break, or with ``fullgraph=True`` an error that gives ``reason``. (Made at import:
    dynamo does not trace ``torch.compiler.disable`` itself.)"""
    if _DISABLE_TAKES_REASON:
        return torch.compiler.disable(_call, reason=reason)
    return torch.compiler.disable(_call)  # pragma: no cover - torch without the reason


distributed = eager(
    "tritonclip: a norm reduced over process groups (process_group=, DTensor gradients) "
    "cannot be a custom op, which cannot take a process group or a DTensor: under "
    "torch.compile this call runs eagerly (a graph break); call it outside the compiled "
    "region, or compile without fullgraph=True")

stateful = eager(
    "tritonclip: optim.clip_into_ and AutoClip/ZClip.step keep Python-side state between "
    "steps (the optimizer's grad_scale and its step hook, the norm history) and are not "
    "custom ops: under torch.compile they run eagerly (a graph break); call them outside "
    "the compiled region, or compile without fullgraph=True")
