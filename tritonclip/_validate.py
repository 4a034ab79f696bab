"""Argument checks. Every check runs before any gradient is read or written, and raises a
``TypeError`` / ``ValueError`` that names the offending value."""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import os
import types
import warnings
from typing import Iterable

import torch

BACKENDS = ("auto", "triton", "torch")
NONFINITE_MODES = ("propagate", "error", "skip")
BACKEND_ENV = "TRITONCLIP_BACKEND"


def tensor_list(items: torch.Tensor | Iterable[torch.Tensor], name: str,
                warn_empty_generator: bool = False) -> list[torch.Tensor]:
    """A list of the tensors in ``items`` (a tensor, list or generator), type-checked."""
    if isinstance(items, torch.Tensor):
        return [items]
    is_generator = isinstance(items, types.GeneratorType)
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{name} must be a Tensor or an iterable of Tensors, got {type(items).__name__}"
        ) from None
    if not all(map(isinstance, items, itertools.repeat(torch.Tensor))):  # C loop: ~30 ns each
        index, item = next((i, x) for i, x in enumerate(items)
                           if not isinstance(x, torch.Tensor))
        raise TypeError(
            f"{name}[{index}] must be a Tensor, got {type(item).__name__}: {item!r}"
        )
    if warn_empty_generator and is_generator and not items:
        warnings.warn(
            f"`{name}` is an empty generator, no gradient clipping will occur.", stacklevel=4
        )
    return items


def grads_of(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The non-None ``.grad`` of each parameter (checked later, per group, by check_group)."""
    return [g for g in map(_GRAD, parameters) if g is not None]


_GRAD = operator.attrgetter("grad")


def check_group(device: torch.device, dtype: torch.dtype, layout: torch.layout,
                members: list[torch.Tensor], positions: list[int], name: str,
                purpose: str) -> None:
    """Checks of one (device, dtype, layout) group of ``name``, run before anything is
    launched. ``purpose`` is "read" (a norm), "scale" or "clamp" (modified in place)."""
    first = f"{name}[{positions[0]}]"
    if device.type == "meta":
        raise ValueError(
            f"{first} is on the meta device (shape {tuple(members[0].shape)}): it has no "
            "values to clip"
        )
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"{first} has dtype {dtype}; gradients are floating point")
    if purpose == "clamp" and dtype.is_complex:
        raise TypeError(f"{first} is {dtype}: complex values cannot be clamped")
    if purpose == "read":
        return
    has_overlap = getattr(torch, "_debug_has_internal_overlap", None)
    for position, t in zip(positions, members):
        if layout == torch.strided:
            # Only a non-contiguous tensor can map two elements to one address.
            if has_overlap is not None and not t.is_contiguous() and has_overlap(t) == 1:
                raise ValueError(
                    f"{name}[{position}] (shape {tuple(t.shape)}, stride {t.stride()}) has "
                    "elements that share memory (an expanded view): it cannot be modified "
                    "in place"
                )
        elif purpose == "clamp" and t.is_sparse and not t.is_coalesced():
            raise ValueError(
                f"{name}[{position}] is an uncoalesced sparse tensor: clamping its duplicate "
                "entries one by one would not bound their sum; call .coalesce() first"
            )


def _real(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
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
        value = _real(norm_type, "norm_type")
    if math.isnan(value):
        raise ValueError(f"norm_type must not be NaN, got {norm_type!r}")
    return value


def nonnegative(value, name: str, allow_inf: bool = True) -> float:
    """A float that is >= 0 and not NaN (``max_norm``, ``clip_value``, ``eps``)."""
    result = _real(value, name)
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
    low = -math.inf if lo is None else _real(lo, "lo")
    high = math.inf if hi is None else _real(hi, "hi")
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
