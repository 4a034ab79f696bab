"""The core every public operation runs through: arguments checked, gradients prepared, the
operations run group by group on each group's backend.

1. **Arguments** (``tensor_list``, ``norm_clip_args``, ...): every check raises a
   ``TypeError`` / ``ValueError`` naming the value, before any gradient is read or written.
2. **Prepare** (:func:`prepare`, :func:`prepare_rows`): the gradients of the parameters
   (``None`` skipped), DTensors replaced by their local shards, laid out by ``_layout`` into
   groups of one (device, dtype) with their backend (spans, or rows for per-tensor norms), and
   the *norm sets* a norm is taken over: each a list of groups and the process groups its
   value is all-reduced over (DTensor meshes, ``process_group``, ``(parameters, group)``
   pairs).
3. **Operate** (:class:`PreparedGrads`, :class:`PreparedRows`): norms, coefficients, scaling
   and clamping, as backend calls per group; groups and sets combine in power form
   (``_normmath``), with one all-reduce per chain of process groups.

**The cache.** Layouts are cached in one bounded, thread-safe LRU cache, :data:`CACHE`
(:class:`Cache`), with the launch plans built for them: a steady-state call builds nothing and
copies nothing to the device. Its keys:

- ``("spans", requested backend, signature)`` -> ``_layout.SpanLayout``. The signature holds
  what a span layout depends on: every tensor's address, size, storage offset, dtype, device
  and contiguity, and the shape and strides of the non-contiguous ones (a list with a sparse
  tensor has none and is never cached);
- ``("rows", requested backend, unitwise, whether there are parameters, signature and shapes
  of gradients and parameters)`` -> ``_layout.RowLayout``;
- ``("ids", requested backend, ids of the tensors)`` -> :class:`_Recent`: the very tensor
  objects of a recent call (gradients kept between steps: DDP bucket views, flat buffers,
  ``zero_grad(set_to_none=False)``), checked by weak reference, address and size (about 0.15
  µs per tensor, against 0.5 µs for the signature).

Eviction is least-recently-used beyond :data:`CACHE_SIZE` entries; an evicted layout's plans
are freed when no call uses them any more (their tables were recorded on every stream that
launched over them, ``kernels.plan``). Layouts used while a CUDA graph is captured are pinned
for the life of the process (the graph holds their tables' addresses).

Nothing else in the package caches state, but the launch plans' own per-stream buffers and
compiled kernels (``kernels.plan``) and ``kernels.config.stream_meta`` (a pure function of
the dtype).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import numbers
import operator
import os
import threading
import types
import warnings
import weakref
from typing import Iterable, NamedTuple

import torch

from . import _layout, _normmath, _sharding, distributed
from ._backend import Backend, GroupLayout
from ._torch_backend import TORCH

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------

BACKENDS = ("auto", "triton", "torch")
NONFINITE_MODES = ("propagate", "error", "skip")
BACKEND_ENV = "TRITONCLIP_BACKEND"


def tensor_list(items: torch.Tensor | Iterable[torch.Tensor], name: str,
                warn_empty_generator: bool = False, check_items: bool = True
                ) -> list[torch.Tensor]:
    """A list of the tensors in ``items`` (a tensor, list or generator), type-checked (with
    ``check_items=False`` the items are left to :func:`prepare`, which checks them in the pass
    it makes over their types anyway)."""
    if isinstance(items, torch.Tensor):
        return [items]
    is_generator = isinstance(items, types.GeneratorType)
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{name} must be a Tensor or an iterable of Tensors, got {type(items).__name__}"
        ) from None
    if check_items and not all(map(isinstance, items, itertools.repeat(torch.Tensor))):
        _not_a_tensor(items, name)  # (the C loop above: ~15 ns an item)
    if warn_empty_generator and is_generator and not items:
        warnings.warn(
            f"`{name}` is an empty generator, no gradient clipping will occur.", stacklevel=4
        )
    return items


def _not_a_tensor(items, name: str):
    index, item = next((i, x) for i, x in enumerate(items) if not isinstance(x, torch.Tensor))
    raise TypeError(f"{name}[{index}] must be a Tensor, got {type(item).__name__}: "
                    f"{_short(item)}")


def _short(value) -> str:
    """``repr(value)``, cut to 80 characters (a tensor's repr can be the whole tensor)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_GRAD = operator.attrgetter("grad")


def grads_of(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The non-None ``.grad`` of each parameter (checked when laid out)."""
    return [g for g in map(_GRAD, parameters) if g is not None]


def real(value, name: str) -> float:
    """``value`` as a float: a real number, or a real one-element tensor."""
    if type(value) is float:  # the usual case, first
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: "
                        f"{_short(value)}")
    return float(value)


def norm_type_value(norm_type) -> float:
    """norm_type as a float: a number, or a string such as 'inf', '-inf', '2'."""
    if isinstance(norm_type, str):
        try:
            value = float(norm_type)
        except ValueError:
            raise ValueError(
                f"norm_type must be a number or 'inf'/'-inf', got {norm_type!r}"
            ) from None
    else:
        value = real(norm_type, "norm_type")
    if math.isnan(value):
        raise ValueError(f"norm_type must not be NaN, got {norm_type!r}")
    return value


def positive_norm_type(norm_type) -> float:
    """A norm order > 0 (``inf`` allowed): per-tensor and unit-wise thresholds compare a
    magnitude, which orders 0 (a count) and -inf (a minimum) are not."""
    value = norm_type_value(norm_type)
    if not value > 0:
        raise ValueError(f"norm_type must be > 0 for a per-tensor or unit-wise clip, got "
                         f"{norm_type!r}")
    return value


def nonnegative(value, name: str, allow_inf: bool = True) -> float:
    """A float that is >= 0 and not NaN (``max_norm``, ``clip_value``, ``eps``)."""
    result = real(value, name)
    if math.isnan(result) or result < 0 or (not allow_inf and math.isinf(result)):
        bound = "a non-negative number" if allow_inf else "a finite non-negative number"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return result


def value_bounds(clip_value, lo, hi) -> tuple[float, float]:
    """(lo, hi) from either a symmetric ``clip_value`` or explicit ``lo``/``hi`` bounds."""
    if clip_value is not None:
        if lo is not None or hi is not None:
            raise ValueError(
                f"give either clip_value ({clip_value!r}) or lo/hi ({lo!r}, {hi!r}), not both"
            )
        c = nonnegative(clip_value, "clip_value")
        return -c, c
    if lo is None and hi is None:
        raise ValueError("clip_grad_value_ needs clip_value, or at least one of lo and hi")
    low = -math.inf if lo is None else real(lo, "lo")
    high = math.inf if hi is None else real(hi, "hi")
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"lo and hi must not be NaN, got lo={lo!r}, hi={hi!r}")
    if low > high:
        raise ValueError(f"lo must be <= hi, got lo={lo!r} > hi={hi!r}")
    return low, high


def nonfinite_mode(nonfinite: str, error_if_nonfinite: bool) -> str:
    """The effective ``nonfinite`` mode; ``error_if_nonfinite=True`` means ``"error"``."""
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    if not isinstance(error_if_nonfinite, bool):
        raise TypeError(f"error_if_nonfinite must be a bool, got {error_if_nonfinite!r}")
    if error_if_nonfinite:
        if nonfinite not in ("propagate", "error"):
            raise ValueError(
                f"error_if_nonfinite=True contradicts nonfinite={nonfinite!r}; give one of them"
            )
        return "error"
    return nonfinite


def foreach_value(foreach) -> bool | None:
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"foreach must be None, True or False, got {foreach!r}")
    return foreach


def backend_name(backend: str | None) -> str:
    """The requested backend: the argument, else env TRITONCLIP_BACKEND, else 'auto'."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        source = f"env {BACKEND_ENV}"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def norm_clip_args(max_norm, norm_type, eps, nonfinite, error_if_nonfinite, foreach):
    """The checked arguments every global-norm clip takes: (max_norm, norm_type, eps, mode,
    foreach)."""
    return (nonnegative(max_norm, "max_norm"), norm_type_value(norm_type),
            nonnegative(eps, "eps", allow_inf=False),
            nonfinite_mode(nonfinite, error_if_nonfinite), foreach_value(foreach))


def norm_tensor(total_norm, device: torch.device) -> torch.Tensor:
    """A given total norm (``clip_grads_with_norm_``) as a 0-dim tensor on ``device``: a
    non-negative number, or a real one-element tensor (a DTensor's full value). A tensor on
    the CPU is checked for a negative or NaN value at no cost; on a GPU that would wait for
    it, so there a negative norm gives a NaN coefficient instead (see
    :func:`tritonclip.clip_grads_with_norm_`)."""
    if not isinstance(total_norm, torch.Tensor):
        return torch.tensor(nonnegative(total_norm, "total_norm"), device=device)
    if _sharding.is_dtensor(total_norm):  # torch's get_total_norm of DTensor gradients
        total_norm = total_norm.full_tensor()
    if (total_norm.numel() != 1 or total_norm.is_complex()
            or not total_norm.dtype.is_floating_point):
        raise ValueError(f"total_norm must be a real floating-point tensor of one element, got "
                         f"{total_norm.dtype} of shape {tuple(total_norm.shape)}")
    if total_norm.device.type == "cpu":
        nonnegative(total_norm, "total_norm")
    else:
        total_norm = torch.where(total_norm < 0, torch.full_like(total_norm, math.nan),
                                 total_norm)
    # the coefficient in float32 at least (torch's get_total_norm of bfloat16 gradients is
    # bfloat16: 8 bits for a coefficient, and eps=1e-6 lost in the sum)
    return move(total_norm.reshape(()), device, torch.promote_types(total_norm.dtype,
                                                                    torch.float32))


_NONFINITE_ERROR = (
    "The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
    "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
    "anyway, set `error_if_nonfinite=False` (or nonfinite='skip' to leave them untouched)"
)


_CAPTURE_ERROR = (
    "nonfinite='error' (error_if_nonfinite=True) reads the norm on the host, which a CUDA graph "
    "being captured cannot do (torch.compile mode='reduce-overhead' captures one): use "
    "nonfinite='propagate' or 'skip' there, and read the returned norm after replay")


def check_nonfinite(total: torch.Tensor, mode: str, norm_type: float) -> None:
    """``RuntimeError`` for a non-finite norm (any, for several) in mode "error": the
    library's only host synchronisation, and only when asked for (a clear error instead
    while a CUDA graph is captured)."""
    if mode != "error" or not total.numel():
        return
    if total.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(_CAPTURE_ERROR)
    if not bool(torch.isfinite(total).all()):
        raise RuntimeError(_NONFINITE_ERROR.format(norm_type=norm_type))


def move(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` without a host synchronisation where one can be avoided: copies to a
    CUDA device are asynchronous; a copy to the CPU blocks, since the CPU reads it next (only
    lists that mix CPU and CUDA gradients make one)."""
    return t.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# 2. The cache
# ---------------------------------------------------------------------------------------------

CACHE_SIZE = 64


class Cache:
    """A bounded LRU cache safe to use from several threads, with hit and build counters.

    ``get_or_build`` builds outside the lock (two threads may build the same entry; the first
    one stored wins), so a slow build never blocks other lookups.
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.hits = 0
        self.builds = 0
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._pinned: list = []
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return value

    def put(self, key, value):
        """Store ``value`` (unless ``key`` is already there: then return the stored one)."""
        with self._lock:
            stored = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
            return stored

    def get_or_build(self, key, build):
        value = self.get(key)
        if value is None:
            value = build()
            with self._lock:
                self.builds += 1
            value = self.put(key, value)
        return value

    def pin(self, value) -> None:
        """Keep ``value`` for the life of the process, whatever is evicted."""
        with self._lock:
            if not any(kept is value for kept in self._pinned):
                self._pinned.append(value)

    def clear(self) -> None:
        """Forget every entry (pinned ones stay) and reset the counters."""
        with self._lock:
            self._items.clear()
            self.hits = self.builds = 0

    def __len__(self) -> int:
        return len(self._items)


CACHE = Cache(CACHE_SIZE)

_DEREF = weakref.ref.__call__
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


class _Recent(NamedTuple):
    """The tensors of a recent call, by weak reference, with their addresses and sizes."""

    refs: tuple
    pointers: tuple
    numels: tuple
    layout: object

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` are those very objects, at the same addresses and sizes (a
        tensor object whose memory moved, ``.data =`` or ``set_``, or was resized, shows a new
        address or size)."""
        return (all(map(operator.is_, map(_DEREF, self.refs), tensors))
                and tuple(map(torch.Tensor.data_ptr, tensors)) == self.pointers
                and tuple(map(torch.Tensor.numel, tensors)) == self.numels)


def _signature(tensors: list[torch.Tensor]):
    """What a layout of ``tensors`` depends on (see the module docstring), or None for a list
    that is not cached (sparse tensors have no address)."""
    try:
        pointers = tuple(map(torch.Tensor.data_ptr, tensors))
    except RuntimeError:
        return None
    contiguous = tuple(map(torch.Tensor.is_contiguous, tensors))
    strided = tuple((i, tensors[i].shape, tensors[i].stride())
                    for i, c in enumerate(contiguous) if not c)
    return (pointers, tuple(map(torch.Tensor.numel, tensors)),
            tuple(map(torch.Tensor.storage_offset, tensors)), tuple(map(_DTYPE, tensors)),
            tuple(map(_DEVICE, tensors)), contiguous, strided)


def _span_layout(tensors: list[torch.Tensor], requested: str) -> _layout.SpanLayout:
    ids = ("ids", requested, tuple(map(id, tensors)))
    recent = CACHE.get(ids)
    if recent is not None and recent.holds(tensors):
        return recent.layout
    signature = _signature(tensors)
    if signature is None:
        return _layout.spans(tensors, requested)
    layout = CACHE.get_or_build(("spans", requested, signature),
                                lambda: _layout.spans(tensors, requested))
    CACHE.put(ids, _Recent(tuple(map(weakref.ref, tensors)), signature[0], signature[1],
                           layout))
    return layout


def clear_cache() -> None:
    """Forget every cached layout and plan (tests, benchmarks)."""
    CACHE.clear()


# ---------------------------------------------------------------------------------------------
# 3. Prepared gradients: spans
# ---------------------------------------------------------------------------------------------


class NormSet(NamedTuple):
    """Groups of ``tensors`` whose local power-form value is all-reduced over
    ``reductions``, in order."""

    groups: list[GroupLayout]
    tensors: list[torch.Tensor]
    reductions: tuple


def check(layout, purpose: str, name: str) -> None:
    """Raise the first problem the layout found that concerns ``purpose``."""
    for problem in layout.problems:
        if purpose in problem.purposes:
            raise problem.error(problem.message.format(name=name))


def _checked_layout(tensors: list[torch.Tensor], requested: str, purpose: str, name: str):
    """The span layout of ``tensors``, checked for ``purpose``."""
    layout = _span_layout(tensors, requested)
    if layout.problems:
        check(layout, purpose, name)
    groups = layout.groups
    if groups and groups[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        CACHE.pin(layout)
    return layout


def has_dtensor(tensors: list[torch.Tensor]) -> bool:
    return local_tensors(tensors, "tensors") is not tensors


def local_tensors(tensors: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Each DTensor replaced by its local tensor (the same memory: scaling it in place scales
    the DTensor); without any DTensor, ``tensors`` itself, so ``local_tensors(ts) is not ts``
    says whether there are DTensors. ``TypeError`` for an item that is not a tensor. (The distinct
    types are tested, then a subclass test on each: ~20 ns a tensor.)"""
    kinds = set(map(type, tensors))
    if not all(issubclass(kind, torch.Tensor) for kind in kinds):
        _not_a_tensor(tensors, name)
    dtensor = _sharding.DTensor
    if dtensor is None or not any(issubclass(kind, dtensor) for kind in kinds):
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def _counted(items: list[torch.Tensor], norm_filter) -> list[torch.Tensor]:
    if norm_filter is None:
        return items
    return [t for t in items if norm_filter(t)]


def prepare(items: list[torch.Tensor], requested: str, purpose: str, *, parameters: bool,
            process_group=None, norm_filter=None, name: str | None = None) -> "PreparedGrads":
    """The prepared gradients of ``items`` (parameters whose ``.grad`` is used, or the
    gradient tensors themselves), checked for ``purpose`` ("read", "scale" or "clamp")
    before anything is launched. ``process_group`` and ``norm_filter`` are those of
    :func:`tritonclip.clip_grad_norm_`; ``name`` is the tensors' name in error messages."""
    name = name or ("gradients" if parameters else "tensors")
    pairs = distributed.pairs_of(process_group, name) if process_group is not None else None
    if norm_filter is not None and not callable(norm_filter):
        raise TypeError(f"norm_filter must be a callable taking a tensor, got {norm_filter!r}")
    grads = grads_of(items) if parameters else items
    local = local_tensors(grads, name)
    layout = _checked_layout(local, requested, purpose, name)
    groups = layout.groups
    if purpose == "clamp" and local is not grads:
        _sharding.check_no_partial(grads, name)
    if pairs is not None:
        distributed.same_members(items, pairs, "parameters" if parameters else "tensors")
    device = local[0].device if local else CPU
    if pairs is None and local is grads and norm_filter is None:
        sets = [NormSet(groups, local, () if process_group is None else (process_group,))]
        return PreparedGrads(groups, local, sets, device, layout.float64)
    sets, float64 = [], layout.float64
    for members, group in pairs if pairs is not None else [(items, process_group)]:
        counted = _counted(members, norm_filter)
        for tensors, reductions in _sharding.norm_sets(
                grads_of(counted) if parameters else counted, group):
            set_layout = _checked_layout(tensors, requested, "read", name)
            sets.append(NormSet(set_layout.groups, tensors, reductions))
            float64 = float64 or set_layout.float64
    return PreparedGrads(groups, local, sets, device, float64)


class PreparedGrads:
    """Gradients laid out for one call: ``groups`` of ``tensors`` (every distinct region, for
    scaling and clamping), ``sets`` (what the norm is taken over), ``device`` (where the norm
    lives: the first gradient's, the CPU for none)."""

    __slots__ = ("groups", "tensors", "sets", "device", "dtype")

    def __init__(self, groups: list[GroupLayout], tensors: list[torch.Tensor],
                 sets: list[NormSet], device: torch.device, float64: bool):
        self.groups = groups
        self.tensors = tensors
        self.sets = sets
        self.device = device
        self.dtype = torch.float64 if float64 else torch.float32  # of norms and coefficients

    def norm(self, norm_type: float, foreach: bool | None) -> torch.Tensor:
        """The norm of the gradients viewed as one vector, each storage region counted once,
        over every rank the norm sets name: a 0-dim tensor on ``device`` (float32; float64
        when a float64 gradient takes part)."""
        return self._norm(norm_type, foreach, 1.0, 0.0, False, None)[0]

    def norm_and_coefficient(self, norm_type: float, foreach: bool | None, max_norm: float,
                             eps: float, skip_nonfinite: bool,
                             inv_scale: torch.Tensor | None = None):
        """(norm, coefficient, found) of a clip: ``coef = min(max_norm / (norm + eps), 1)``
        (1 where the norm is not finite and ``skip_nonfinite``). With ``inv_scale`` (a
        GradScaler's) the gradients are scaled ones: the norm is of the unscaled gradients,
        the coefficient is the factor to apply (``coef * inv_scale``), and ``found`` is 1.0
        where the scaled norm is not finite, else 0.0 (float32); else ``found`` is None."""
        return self._norm(norm_type, foreach, max_norm, eps, skip_nonfinite, inv_scale)

    def _norm(self, norm_type, foreach, max_norm, eps, skip_nonfinite, inv_scale):
        sets = self.sets
        if len(sets) == 1 and not sets[0].reductions and len(sets[0].groups) == 1:
            group = sets[0].groups[0]
            # (p > 0: the norm shows a NaN or inf gradient by itself, see _local_power; the
            # fused norm is float64 for float64 gradients, float32 for the others, which
            # must be the norm's dtype: a filter may have left the float64 ones out)
            if (norm_type > 0 and group.device == self.device
                    and (group.dtype == torch.float64) == (self.dtype == torch.float64)):
                fused = group.backend.norm_clip(group, sets[0].tensors, norm_type, max_norm,
                                                eps, skip_nonfinite, inv_scale)
                if fused is not None:
                    return fused
        items = []
        for norm_set in sets:
            dtype = torch.float64 if norm_set.reductions else None  # exact across ranks
            items.append((norm_set.reductions,
                          *self._local_power(norm_set, norm_type, foreach, dtype)))
        if len(items) == 1 and not items[0][0]:
            power, nan, inf = items[0][1:]
        else:
            power, nan, inf = reduce_sets(items, norm_type, self.device)
        total = _normmath.finish(power, nan, inf, norm_type, self.dtype)
        if inv_scale is None:
            return total, _normmath.clip_coefficient(total, max_norm, eps, skip_nonfinite), None
        inv_scale = move(inv_scale.reshape(()), self.device, self.dtype)
        return _normmath.unscaled_clip(total, inv_scale, max_norm, eps, skip_nonfinite)

    def _local_power(self, norm_set, norm_type, foreach, dtype):
        """(power form, any NaN, any inf) of this rank's part of ``norm_set``, in ``dtype``
        (None: float32, or float64 when a group accumulates in float64)."""
        groups, tensors = norm_set.groups, norm_set.tensors
        values = [group.backend.power(group, tensors, norm_type, foreach) for group in groups]
        if dtype is None:
            dtype = (torch.float64 if any(v.dtype == torch.float64 for v in values)
                     else torch.float32)
        power = _normmath.combine(values, norm_type, self.device, dtype)
        if _normmath.shows_nonfinite(norm_type):
            probe = power
        else:  # a count or a min hides inf and NaN: max |g| shows them (one more read)
            probe = _normmath.combine([g.backend.power(g, tensors, math.inf, foreach)
                                       for g in groups], math.inf, self.device, dtype)
        return power, torch.isnan(probe), torch.isinf(probe)

    def local_power(self, norm_type: float, foreach: bool | None) -> torch.Tensor:
        """The power form of this rank's gradients, nothing reduced across ranks: a 0-dim
        tensor on ``device`` (float32; float64 when a group accumulates in float64). For
        orders p > 0, which show a NaN or inf gradient by themselves."""
        return self._local_power(self.sets[0], norm_type, foreach, None)[0]

    def coefficient(self, total: torch.Tensor, max_norm, eps: float,
                    skip_nonfinite: bool = False) -> torch.Tensor:
        """The clip coefficient of a given ``total`` (``_normmath.clip_coefficient``)."""
        return _normmath.clip_coefficient(total, max_norm, eps, skip_nonfinite)

    def scale_(self, coef: torch.Tensor, foreach: bool | None,
               skip_at_least_one: bool = True) -> None:
        """Multiply every distinct region in place by ``coef`` (a clip coefficient, skipped
        where >= 1 with ``skip_at_least_one``)."""
        for group in self.groups:
            c = coef if coef.device == group.device else move(coef, group.device)
            group.backend.scale_(group, self.tensors, c, foreach, skip_at_least_one)

    def clamp_(self, lo: float, hi: float, foreach: bool | None) -> None:
        """Clamp every distinct region in place to [lo, hi]."""
        for group in self.groups:
            group.backend.clamp_(group, self.tensors, lo, hi, foreach)


def reduce_sets(items, norm_type, device):
    """Combine ``(groups, power, nan, inf)`` items, all-reducing each over its groups in order.

    Items with the same remaining groups are combined before reducing, and the item with the
    most groups left is reduced first, so that e.g. FSDP x TP weights (tp, then dp) and
    FSDP-only parameters (dp) take two all-reduces, not three. Every rank holds sets of the
    same structure, so every rank issues the same collectives in the same order.
    """
    # Each item as [groups, their keys (computed once), power, nan, inf].
    items = [[groups, tuple(tuple(distributed.ranks_of(g)) for g in groups), power, nan, inf]
             for groups, power, nan, inf in items]
    while True:
        merged: dict[tuple, list] = {}
        for item in items:
            entry = merged.get(item[1])
            if entry is None:
                merged[item[1]] = item
            else:
                entry[2] = _normmath.combine([entry[2], item[2]], norm_type, device,
                                             torch.promote_types(entry[2].dtype, item[2].dtype))
                entry[3] = entry[3] | item[3]
                entry[4] = entry[4] | item[4]
        items = list(merged.values())
        pending = [entry for entry in items if entry[0]]
        if not pending:
            break
        entry = max(pending, key=lambda e: len(e[0]))  # the first of the longest
        group = entry[0][0]
        entry[0], entry[1] = entry[0][1:], entry[1][1:]
        entry[2], entry[3], entry[4] = distributed.all_reduce_power(entry[2], entry[3],
                                                                    entry[4], norm_type, group)
    if not items:
        identity = torch.full((), _normmath.identity(norm_type), dtype=torch.float64,
                              device=device)
        false = torch.zeros((), dtype=torch.bool, device=device)
        return identity, false, false
    (_, _, power, nan, inf), = items
    return power, nan, inf


# ---------------------------------------------------------------------------------------------
# 4. Prepared gradients: rows (per-tensor and unit-wise norms)
# ---------------------------------------------------------------------------------------------


def prepare_rows(grads: list[torch.Tensor], params: list[torch.Tensor] | None,
                 unitwise: bool, requested: str, purpose: str,
                 name: str = "gradients") -> "PreparedRows":
    """``grads`` as rows (see ``_layout.rows``), with their ``params`` for AGC, checked for
    ``purpose`` ("read" or "scale")."""
    tensors = grads + (params or [])
    signature = _signature(tensors) if all(t.layout == torch.strided for t in tensors) else None
    if signature is None:  # a sparse tensor has no address to key a cache by
        layout = _layout.rows(grads, params, unitwise, requested)
    else:
        # (rows also follow the shapes: first dimensions, and whether two views are one)
        layout = CACHE.get_or_build(
            ("rows", requested, unitwise, params is None, signature,
             tuple(t.shape for t in tensors)),
            lambda: _layout.rows(grads, params, unitwise, requested))
    check(layout, purpose, name)
    return PreparedRows(layout, grads, params)


class PreparedRows:
    """Gradients (and parameters) laid out as rows for one call."""

    __slots__ = ("layout", "grads", "params")

    def __init__(self, layout, grads, params):
        self.layout = layout
        self.grads = grads
        self.params = params

    @property
    def groups(self):
        return self.layout.groups

    def norms(self, group, norm_type: float, foreach: bool | None, role: str = "grads"):
        """(row norms, 1-D in the group's row dtype, NaN (inf) for a row with a NaN (inf)
        element whatever the order; power form of all rows, 0-dim, or None)."""
        tensors = self.grads if role == "grads" else self.params
        norms, power = group.backend.row_norms(group, tensors, role, norm_type, foreach)
        if not _normmath.shows_nonfinite(norm_type):  # counts and mins hide NaN and inf
            probe, _ = group.backend.row_norms(group, tensors, role, math.inf, foreach)
            flagged = _normmath.with_flags(norms, torch.isnan(probe), torch.isinf(probe))
            return flagged, power if power is not None else _row_power(norms, norm_type)
        return norms, power

    def gather(self, values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Per-input values (one per input tensor; 0 for an empty one) from per-group row
        values of whole-tensor rows: float32, float64 where a float64 gradient takes part."""
        groups, where = self.layout.groups, self.layout.where
        dtype = _normmath.result_dtype(t.dtype for t in self.grads)
        n = len(where)
        if len(groups) == 1 and groups[0].items == list(range(n)):
            return move(values[0], device, dtype)
        out = torch.zeros(n, dtype=dtype, device=device)
        for index, (group, value) in enumerate(zip(groups, values)):
            key = ("gather", device)
            targets_sources = group.indexes.get(key)
            if targets_sources is None:
                targets = [i for i, w in enumerate(where) if w is not None and w[0] == index]
                sources = [where[i][1] for i in targets]
                targets_sources = group.indexes.setdefault(key, (
                    torch.tensor(targets, device=device),
                    torch.tensor(sources, device=value.device)))
            out[targets_sources[0]] = move(value[targets_sources[1]], device, dtype)
        return out

    def scale_(self, coefs: list[torch.Tensor]) -> None:
        """Multiply each row by its coefficient (one tensor per group, in row order)."""
        for group, coef in zip(self.layout.groups, coefs):
            group.backend.scale_rows_(group, self.grads, coef)


def _row_power(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    return _normmath.reduce_power(_normmath.power_form(norms.double(), norm_type), norm_type)


def tensor_norms(tensors: list[torch.Tensor], requested: str, norm_type: float,
                 foreach: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, each tensor's norm) in one read where the tensors share no memory: the
    per-tensor norms of ``get_total_norm(..., per_tensor=True)``."""
    if not all(map(isinstance, tensors, itertools.repeat(torch.Tensor))):
        _not_a_tensor(tensors, "tensors")
    device = tensors[0].device if tensors else CPU
    rows = prepare_rows(tensors, None, False, requested, "read", "tensors")
    per_group = [rows.norms(group, norm_type, foreach) for group in rows.groups]
    norms = rows.gather([n for n, _ in per_group], device)
    if not rows.layout.disjoint:  # overlapping tensors: count each region once
        return prepare(tensors, requested, "read", parameters=False).norm(norm_type,
                                                                           foreach), norms
    powers = [p if p is not None else _row_power(n, norm_type) for n, p in per_group]
    power = _normmath.combine(powers, norm_type, device, torch.float64)
    total = _normmath.finish(power, torch.isnan(norms).any(), torch.isinf(norms).any(),
                             norm_type, norms.dtype)
    return total, norms


# ---------------------------------------------------------------------------------------------
# 5. The gradient of one activation (error clipping)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErrorClipSpec:
    """A checked error clip: by value (``max_norm is None``: clamp to [lo, hi]) or by norm
    (each slice over ``dims``; ``None``: the whole tensor). ``counts``: int64 [clipped, seen]
    on the activation's device, or None."""

    lo: float
    hi: float
    max_norm: float | None
    dims: tuple[int, ...] | None
    norm_type: float
    eps: float
    backend: Backend  # chosen at the forward call
    counts: torch.Tensor | None


def activation_backend(requested: str, x: torch.Tensor) -> Backend:
    """The backend for the gradient of activation ``x`` (``ValueError`` now, in forward, for
    ``backend='triton'`` where it cannot run)."""
    return _layout.choose_backend(requested, x.device, x.dtype, x.layout)[0]


_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None),
                                "is_functorch_wrapped_tensor", None)


def _transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` is a tensor of a torch.func transform (grad, vmap, jacrev): it has no
    memory of its own for a kernel to read; torch ops take it. (Read through a private torch
    function where it exists; otherwise by its missing data pointer.)"""
    if _is_functorch_wrapped is not None:
        return _is_functorch_wrapped(t)
    try:
        t.data_ptr()
    except RuntimeError:
        return True
    return False


def clip_activation_grad(grad: torch.Tensor, spec: ErrorClipSpec) -> torch.Tensor:
    """The clipped copy of ``grad`` (never written: autograd may hand the same tensor to other
    consumers) by the backend ``spec`` chose; torch ops for double backward, torch.func
    transforms and sparse gradients."""
    if (torch.is_grad_enabled() and grad.requires_grad) or _transformed(grad):
        return TORCH.clip_activation(grad, spec)
    if grad.numel() == 0:
        if spec.counts is not None and spec.max_norm is not None:
            n_rows = 1
            for d, size in enumerate(grad.shape):
                if spec.dims is not None and d not in spec.dims:
                    n_rows *= size
            spec.counts[1].add_(n_rows)
        return grad
    backend = spec.backend if grad.layout == torch.strided else TORCH
    return backend.clip_activation(grad, spec)
