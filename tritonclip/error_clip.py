r"""Error clipping: clip the gradient that flows backward through chosen activations.

Clipping parameter gradients after ``backward()`` cannot stop an explosion inside it: by then
the gradient of every early time step of an RNN has already been multiplied through hundreds
of Jacobians. Error clipping (PaddlePaddle's ``ErrorClipByValue`` for static graphs) clips the
gradient of an activation *as it propagates*, so the next Jacobian sees a bounded input.

- :func:`error_clip` marks one tensor: identity in forward, clip of its gradient in backward.
- :class:`ErrorClip` wraps a module: every floating-point tensor it returns is marked.
- :func:`register_error_clip` marks the outputs of every submodule that matches a filter, by
  forward hooks, and returns a handle whose ``remove()`` takes them all away.
- :class:`ClipCounter` counts, on the device and without host synchronisation, how many
  elements (value clipping) or slices (norm clipping) were clipped.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import _compile, _core

__all__ = ["ClipCounter", "ErrorClip", "ErrorClipHandle", "error_clip", "register_error_clip"]


class ClipCounter:
    r"""On-device counts of what error clipping did, for monitoring.

    Every backward through an :func:`error_clip` given this counter adds, to ``clipped``, the
    number of elements outside ``[lo, hi]`` (value clipping) or of slices whose coefficient
    was below 1 (norm clipping; a NaN coefficient is not counted), and to ``seen`` the number
    of elements (slices) it looked at. The additions are device ops (integer atomics in the
    Triton kernels): nothing waits for the device until you read a value, e.g.
    ``int(counter.clipped)`` once per logging interval.

    Args:
        device (torch.device or str, optional): where the counts live; must be the device of
            the activations it counts. Default: the CPU
    """

    def __init__(self, device: torch.device | str | None = None):
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)

    @property
    def clipped(self) -> torch.Tensor:
        """int64 0-dim tensor: elements (slices) clipped so far."""
        return self.counts[0]

    @property
    def seen(self) -> torch.Tensor:
        """int64 0-dim tensor: elements (slices) looked at so far."""
        return self.counts[1]

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def reset(self) -> None:
        """Set both counts to zero (a device op)."""
        self.counts.zero_()

    def __repr__(self) -> str:  # no values: reading them would wait for the device
        return f"ClipCounter(device={self.device})"


class _Options:
    """Validated arguments of an error clip, checked once and applied to many tensors."""

    __slots__ = ("lo", "hi", "max_norm", "dim", "norm_type", "eps", "backend", "counter")

    def __init__(self, clip_value, lo, hi, max_norm, dim, norm_type, eps, backend, counter):
        if max_norm is not None:
            if clip_value is not None or lo is not None or hi is not None:
                raise ValueError(
                    f"give either clip_value/lo/hi (value clipping) or max_norm (norm "
                    f"clipping), not both: clip_value={clip_value!r}, lo={lo!r}, hi={hi!r}, "
                    f"max_norm={max_norm!r}"
                )
            self.max_norm = _core.nonnegative(max_norm, "max_norm")
            self.lo, self.hi = -math.inf, math.inf
            self.norm_type = _core.norm_type_value(norm_type)
            if not self.norm_type > 0:
                raise ValueError(
                    f"norm_type must be a positive number or inf for error clipping, got "
                    f"{norm_type!r}"
                )
        else:
            if clip_value is None and lo is None and hi is None:
                raise ValueError("error_clip needs clip_value, lo and/or hi, or max_norm")
            if dim is not None:
                raise ValueError(f"dim={dim!r} applies to norm clipping (max_norm) only")
            self.max_norm = None
            self.lo, self.hi = _core.value_bounds(clip_value, lo, hi)
            self.norm_type = 2.0
        self.dim = _dim_items(dim)
        self.eps = _core.nonnegative(eps, "eps", allow_inf=False)
        self.backend = _core.backend_name(backend)
        if counter is not None and not isinstance(counter, ClipCounter):
            raise TypeError(f"counter must be a tritonclip.ClipCounter, got "
                            f"{type(counter).__name__}: {counter!r}")
        self.counter = counter

    def spec(self, x: torch.Tensor) -> _core.ErrorClipSpec:
        """The backward's contract for activation ``x``; raises here, in forward, on what
        ``x`` cannot take (a dim out of range, a backend that cannot run on its device)."""
        if not x.is_floating_point():
            raise TypeError(f"error_clip takes floating-point tensors, got {x.dtype}")
        if self.counter is not None and self.counter.device != x.device:
            raise ValueError(f"the counter is on {self.counter.device}, the activation on "
                             f"{x.device}: create the ClipCounter on the activation's device")
        dims = _normalized_dims(self.dim, x.dim())
        backend = _core.activation_backend(self.backend, x)
        counts = self.counter.counts if self.counter is not None else None
        return _core.ErrorClipSpec(self.lo, self.hi, self.max_norm, dims, self.norm_type,
                                   self.eps, backend, counts)

    def describe(self) -> str:
        if self.max_norm is None:
            return f"lo={self.lo}, hi={self.hi}"
        return f"max_norm={self.max_norm}, dim={self.dim}, norm_type={self.norm_type}"


def _dim_items(dim) -> tuple[int, ...] | None:
    if dim is None:
        return None
    items = (dim,) if not isinstance(dim, (tuple, list)) else tuple(dim)
    for d in items:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"dim must be None, an int or a tuple of ints, got {dim!r}")
    if not items:
        raise ValueError("dim=() is empty: pass dim=None to clip by the whole tensor's norm")
    return items


def _normalized_dims(dims: tuple[int, ...] | None, ndim: int) -> tuple[int, ...] | None:
    """Sorted non-negative dims, or None when they cover the whole tensor (one slice)."""
    if dims is None:
        return None
    rank = max(ndim, 1)  # as torch: a 0-dim tensor takes dim 0 or -1
    result = []
    for d in dims:
        if not -rank <= d < rank:
            raise ValueError(f"dim {d} is out of range for an activation with {ndim} "
                             f"dimensions (valid: {-rank} to {rank - 1})")
        result.append(d % rank)
    if len(set(result)) != len(result):
        raise ValueError(f"dim {dims} names a dimension twice")
    if ndim == 0 or len(result) == ndim:
        return None
    return tuple(sorted(result))


class _ErrorClipFunction(torch.autograd.Function):
    """Identity forward (a view of the input, no copy); the clip of the gradient backward.

    Written in the ``setup_context`` style with a generated vmap rule, so that it works under
    ``torch.func.grad``, ``vmap`` and ``jacrev``; the gradients of those transforms have no
    memory of their own, and are clipped with torch ops (``_core.clip_activation_grad``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, spec: _core.ErrorClipSpec) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        spec = ctx.spec
        if _compile.compiling():  # one opaque op in the compiled backward
            dims = list(spec.dims) if spec.dims is not None else None
            return _clip_grad_op(grad, spec.lo, spec.hi, spec.max_norm, dims, spec.norm_type,
                                 spec.eps, spec.backend.name, spec.counts), None
        return _core.clip_activation_grad(grad, spec), None


@_compile.op("error_clip_backward", mutates=("counts",),
             fake=lambda grad, *args: torch.empty_like(grad))
def _clip_grad_op(grad: torch.Tensor, lo: float, hi: float, max_norm: Optional[float],
                  dims: Optional[list[int]], norm_type: float, eps: float, backend: str,
                  counts: Optional[torch.Tensor]) -> torch.Tensor:
    """The clipped copy of an activation's gradient (what ``_ErrorClipFunction.backward``
    computes), as one op."""
    spec = _core.ErrorClipSpec(lo, hi, max_norm, tuple(dims) if dims is not None else None,
                               norm_type, eps, _core.activation_backend(backend, grad), counts)
    clipped = _core.clip_activation_grad(grad, spec)
    return clipped.clone() if clipped is grad else clipped  # (an op's output is its own)


def error_clip(
    x: torch.Tensor,
    clip_value: float | None = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    max_norm: float | None = None,
    dim: int | tuple[int, ...] | None = None,
    norm_type: float | str = 2.0,
    eps: float = 1e-6,
    backend: str | None = None,
    counter: ClipCounter | None = None,
) -> torch.Tensor:
    r"""Return ``x`` unchanged, and clip the gradient that flows back through it.

    Forward is the identity: the result is a view of ``x`` (same storage, no copy; as for
    any view made in a custom autograd Function, it cannot be modified in place). In
    backward, the incoming gradient ``g`` is replaced, out of place, by its clip:

    - by value (``clip_value``, or ``lo``/``hi``): ``clamp(g, lo, hi)``, with
      ``[lo, hi] = [-clip_value, clip_value]``; NaN stays NaN;
    - by norm (``max_norm``): each slice ``s`` of ``g`` is scaled by

      .. math::
          \min\left(\frac{max\_norm}{\lVert s \rVert_{norm\_type} + eps}, 1\right)

      where the slices are the whole tensor (``dim=None``), or, as in
      :func:`torch.linalg.vector_norm`, the vectors over the dimensions ``dim`` *reduced*,
      one per index of the other dimensions: ``dim=-1`` on a ``[B, T, H]`` activation clips
      each token's ``H``-vector, ``dim=(1, 2)`` each sample's ``[T, H]`` block.

    The norm accumulates in float32 (float64 for float64 gradients), the coefficient is
    float32 and is applied once, before one rounding to the gradient's dtype (as
    :func:`tritonclip.clip_grad_norm_`). A NaN or inf in a slice makes its coefficient NaN or
    0, as in ``clip_grad_norm_``.

    Double backward (``create_graph=True``) is supported: the clip is then built from
    differentiable torch ops (the kernels are not), whose derivative is 1 inside the value
    bounds and 0 outside, and goes through the norm for norm clipping.

    Args:
        x (Tensor): the activation, floating point.
        clip_value (float, optional): symmetric bound for value clipping (>= 0).
        lo (float, optional): lower bound for value clipping (``-inf`` if only ``hi``).
        hi (float, optional): upper bound for value clipping (``inf`` if only ``lo``).
        max_norm (float, optional): max norm of each slice, for norm clipping (>= 0).
        dim (int or tuple of ints, optional): dimensions reduced by the norm; ``None``: the
            whole tensor. Norm clipping only. Default: None
        norm_type (float or str): order of the norm: ``p > 0`` or ``'inf'``. Default: 2.0
        eps (float): added to the norm before dividing. Default: 1e-6
        backend (str, optional): ``"auto"`` (default; env ``TRITONCLIP_BACKEND``
            overrides), ``"triton"`` or ``"torch"``, with the policy of
            :func:`tritonclip.clip_grad_norm_`: ``"auto"`` runs the Triton kernels on CUDA
            and torch ops elsewhere; ``"triton"`` on CPU tensors needs
            ``TRITON_INTERPRET=1``. Non-contiguous gradients are copied to rows where the
            norm's dimensions are not already last in memory.
        counter (ClipCounter, optional): adds the number of clipped elements (value) or
            slices (norm) to ``counter`` on the device, without synchronising.

    Returns:
        A view of ``x``.

    Bad arguments raise ``TypeError``/``ValueError`` here, not in backward.

    Example::

        >>> h, c = cell(x_t, (h, c))
        >>> h = tritonclip.error_clip(h, max_norm=1.0, dim=-1)   # per-sample clip of dL/dh
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}: {x!r}")
    options = _Options(clip_value, lo, hi, max_norm, dim, norm_type, eps, backend, counter)
    return _ErrorClipFunction.apply(x, options.spec(x))


# ---------------------------------------------------------------------------------------
# modules and hooks
# ---------------------------------------------------------------------------------------


def _clip_outputs(output: Any, options: _Options, seen: set | None = None) -> Any:
    """Hook a clip of the gradient onto every floating-point tensor of ``output`` that
    requires grad (tensors, and tensors inside tuples, named tuples such as PackedSequence,
    lists and dicts, e.g. LSTM's ``(out, (h, c))``), each tensor once; return ``output``.

    A tensor hook, not :func:`error_clip`'s Function: the outputs stay the module's own
    tensors (not views made by a Function), so the model may still modify them in place
    (``ReLU(inplace=True)``, ``out += identity``); a hook registered before such a change
    receives the gradient of the value it was registered on.
    """
    seen = set() if seen is None else seen
    if isinstance(output, torch.Tensor):
        if output.is_floating_point() and output.requires_grad and id(output) not in seen:
            seen.add(id(output))
            spec = options.spec(output)
            output.register_hook(lambda grad: _core.clip_activation_grad(grad, spec))
    elif isinstance(output, (tuple, list)):
        for item in output:
            _clip_outputs(item, options, seen)
    elif isinstance(output, dict):
        for item in output.values():
            _clip_outputs(item, options, seen)
    return output


class ErrorClip(nn.Module):
    r"""Wrap ``module`` so that the gradient flowing back into each of its outputs is clipped.

    ``ErrorClip(module, ...)(*args)`` returns ``module(*args)`` itself, with the clip of
    :func:`error_clip` hooked onto the gradient of every floating-point output tensor that
    requires grad (tuples, lists and dicts of tensors are walked, so ``nn.LSTMCell``'s
    ``(h, c)`` both get clipped; the outputs may still be modified in place). Arguments are
    those of :func:`error_clip`, checked here.

    Example::

        >>> cell = tritonclip.ErrorClip(nn.LSTMCell(32, 64), max_norm=1.0, dim=-1)
        >>> h, c = cell(x_t, (h, c))
    """

    def __init__(self, module: nn.Module, clip_value: float | None = None, *,
                 lo: float | None = None, hi: float | None = None,
                 max_norm: float | None = None, dim: int | tuple[int, ...] | None = None,
                 norm_type: float | str = 2.0, eps: float = 1e-6, backend: str | None = None,
                 counter: ClipCounter | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.options = _Options(clip_value, lo, hi, max_norm, dim, norm_type, eps, backend,
                                counter)

    @property
    def counter(self) -> ClipCounter | None:
        return self.options.counter

    def forward(self, *args, **kwargs):
        return _clip_outputs(self.module(*args, **kwargs), self.options)

    def extra_repr(self) -> str:
        return self.options.describe()


class ErrorClipHandle:
    """The hooks of one :func:`register_error_clip` call. ``remove()`` detaches them all
    (also on leaving a ``with`` block); ``names`` are the qualified names of the modules."""

    def __init__(self, handles: list, names: tuple[str, ...]):
        self._handles = handles
        self.names = names

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ErrorClipHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"ErrorClipHandle({len(self._handles)} hooks on {list(self.names)})"


def _matcher(filter) -> Callable[[str, nn.Module], bool]:
    if isinstance(filter, type) or (
            isinstance(filter, tuple) and filter and all(isinstance(f, type) for f in filter)):
        return lambda name, module: isinstance(module, filter)
    if isinstance(filter, str):
        return lambda name, module: fnmatch.fnmatchcase(name, filter)
    if isinstance(filter, re.Pattern):
        return lambda name, module: filter.fullmatch(name) is not None
    if callable(filter):
        return lambda name, module: bool(filter(name, module))
    raise TypeError(
        f"filter must be a module type, a tuple of types, a glob string, a compiled regex or "
        f"a callable (name, module) -> bool; got {type(filter).__name__}: {filter!r}"
    )


def register_error_clip(model: nn.Module, clip_value: float | None = None, *,
                        filter, lo: float | None = None, hi: float | None = None,
                        max_norm: float | None = None, dim: int | tuple[int, ...] | None = None,
                        norm_type: float | str = 2.0, eps: float = 1e-6,
                        backend: str | None = None,
                        counter: ClipCounter | None = None) -> ErrorClipHandle:
    r"""Clip the output gradients of every submodule of ``model`` that ``filter`` matches.

    A forward hook on each matching module passes its outputs through :func:`error_clip`
    (as :class:`ErrorClip` does): every forward after this call marks them, and backward
    clips the gradient flowing into them. Modules that match inside a matching module are
    hooked too (their outputs are clipped, then the outer module's).

    Args:
        model (nn.Module): the model; ``model.named_modules()`` (``model`` itself included,
            under the name ``""``) is searched.
        clip_value, lo, hi, max_norm, dim, norm_type, eps, backend, counter: as in
            :func:`error_clip`; checked here, once.
        filter: which modules: a module type or tuple of types (``isinstance``, e.g.
            ``nn.LSTMCell``); a string, a glob on qualified names (``fnmatch``; its ``*``
            crosses dots, so ``"encoder.layers.*"`` also matches ``"encoder.layers.0.mlp"``);
            a compiled ``re.Pattern``, matched in full against the name (e.g.
            ``re.compile(r"encoder\.layers\.\d+")`` for the layers alone); or a callable
            ``(name, module) -> bool``.

    Returns:
        An :class:`ErrorClipHandle`; ``handle.remove()`` detaches every hook (a ``with``
        block does it on exit), after which gradients are the unclipped ones again.

    Raises ``ValueError`` if ``filter`` matches no module (a mistyped name would otherwise
    silently clip nothing).

    Example::

        >>> handle = tritonclip.register_error_clip(model, max_norm=1.0, dim=-1,
        ...                                         filter=nn.LSTMCell)
        >>> ...  # train
        >>> handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    matches = _matcher(filter)
    options = _Options(clip_value, lo, hi, max_norm, dim, norm_type, eps, backend, counter)
    names = [name for name, module in model.named_modules() if matches(name, module)]
    if not names:
        raise ValueError(f"filter {filter!r} matched no module of {type(model).__name__}")

    def hook(module, args, output):
        return _clip_outputs(output, options)

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name in names]
    return ErrorClipHandle(handles, tuple(names))
