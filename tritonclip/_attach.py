"""Clipping attached to an optimizer: ``optimizer.step()`` clips first (Keras ``clipnorm`` /
``clipvalue`` / ``global_clipnorm``, configured once)."""

from __future__ import annotations

import math
import numbers

import torch

from . import _core, _normmath, amp
from .adaptive import clip_grad_agc_
from .clip_grad import clip_grad_norm_, clip_grad_value_, get_total_norm
from .optim import MARKER, can_fold, clear_stale, clip_into_, fold_, folds_into
from .overlap import OverlapNorm, overlap_norm
from .per_tensor import clip_grad_norm_per_tensor_

__all__ = ["ClipHandle", "attach"]

_ATTACHED = "_tritonclip_attached"
_GROUP_KEYS = ("max_norm", "clip_value", "per_tensor_norm")
_AGC_KEYS = ("clip_factor", "eps")


def _optional(value, name: str) -> float | None:
    return None if value is None else _core.nonnegative(value, name)


def _agc_arguments(agc) -> dict | None:
    if agc is None:
        return None
    if isinstance(agc, dict):
        unknown = set(agc) - set(_AGC_KEYS)
        if unknown:
            raise ValueError(f"agc takes the keys {_AGC_KEYS}, got {sorted(unknown)}")
        return {k: _core.nonnegative(v, f"agc[{k!r}]", allow_inf=False)
                for k, v in agc.items()}
    if isinstance(agc, bool) or not isinstance(agc, numbers.Real):
        raise TypeError(f"agc must be None, a clip factor or a dict of clip_factor/eps, got {agc!r}")
    return {"clip_factor": _core.nonnegative(agc, "agc", allow_inf=False)}


def _check_groups(optimizer: torch.optim.Optimizer) -> None:
    for index, group in enumerate(optimizer.param_groups):
        for key in _GROUP_KEYS:
            if key in group:
                _optional(group[key], f"param_groups[{index}][{key!r}]")


def attach(
    optimizer: torch.optim.Optimizer,
    *,
    max_norm: float | None = None,
    clip_value: float | None = None,
    per_tensor_norm: float | None = None,
    agc: float | dict | None = None,
    adaptive=None,
    norm_type: float | str = 2.0,
    eps: float = 1e-6,
    skip_nonfinite: bool = False,
    skip_above: float | None = None,
    monitor=None,
    fold: bool = True,
    foreach: bool | None = None,
    backend: str | None = None,
    overlap: torch.nn.Module | OverlapNorm | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> "ClipHandle":
    r"""Clip the gradients of ``optimizer``'s parameters at the start of every
    ``optimizer.step()`` (a step pre-hook), so that training code calls nothing else.

    What runs, in this order (each optional):

    1. the global norm clip: ``max_norm`` (:func:`tritonclip.clip_grad_norm_`) or
       ``adaptive`` (an :class:`~tritonclip.AutoClip` or :class:`~tritonclip.ZClip`);
    2. ``per_tensor_norm`` (:func:`tritonclip.clip_grad_norm_per_tensor_`);
    3. ``agc`` (:func:`tritonclip.clip_grad_agc_`; a clip factor, or a dict with
       ``clip_factor`` and ``eps``);
    4. ``clip_value`` (:func:`tritonclip.clip_grad_value_`).

    A parameter group's own ``max_norm``, ``clip_value`` or ``per_tensor_norm`` entry
    overrides the default for its parameters (``None`` turns it off for that group). A group
    with its own ``max_norm`` is clipped by its own norm; the groups without one are clipped
    together by the default (one global norm over all of them).

    ``last_norm`` on the returned handle is the total norm of all gradients *before*
    clipping, a device tensor (no synchronisation to read it lazily). When no global norm
    clip covers every gradient, it costs one more read of the gradients.

    Skipping a step: ``skip_nonfinite=True`` skips it when ``last_norm`` is NaN or inf,
    ``skip_above=x`` when it is above ``x``. Optimizers that take ``found_inf`` (torch's
    ``fused=True`` Adam, AdamW, SGD, Adagrad) get the decision as ``optimizer.found_inf``
    and skip on the device: no synchronisation. Other optimizers cost **one host
    synchronisation** per step (reading the decision); a skipped step then hides every
    gradient (``p.grad = None``) for the duration of the step, which every torch optimizer
    treats as "no update" (parameters, moments and step counts untouched), and puts them back
    afterwards.

    With ``fold=True`` (default), a fused optimizer whose only clipping is a plain
    ``max_norm`` gets it folded into its step (:func:`tritonclip.optim.clip_into_`): the
    gradients are read once for the norm and never written by the clip.

    With a ``torch.amp.GradScaler``, call ``scaler.unscale_(optimizer)`` before
    ``scaler.step(optimizer)`` (as for any clipping); for a fused optimizer the hook raises
    ``RuntimeError`` if the gradients are still scaled when the step starts.

    With ``overlap=model`` (or an :func:`tritonclip.overlap_norm` handle, for process
    groups and filters), the ``max_norm`` clip takes its norm from partial norms computed
    while backward runs (see :func:`tritonclip.overlap_norm`): the step pays a tiny finalize,
    and the scale is folded into a fused optimizer or done in one pass. It takes ``max_norm``
    and the skip options only, orders > 0, and the model's trainable parameters must be the
    optimizer's. With a GradScaler pass it as ``scaler=`` (the hooks see scaled gradients),
    and call ``scaler.step(optimizer)`` as usual.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer to attach to (once).
        max_norm (float, optional): global norm threshold.
        clip_value (float, optional): value clipping bound.
        per_tensor_norm (float, optional): per-tensor norm threshold.
        agc (float or dict, optional): AGC clip factor, or ``{"clip_factor": ..., "eps": ...}``.
        adaptive (AutoClip or ZClip, optional): an adaptive global clipper (not with
            ``max_norm``).
        norm_type (float or str): order of the norms. Default: 2.0
        eps (float): as in :func:`tritonclip.clip_grad_norm_`. Default: 1e-6
        skip_nonfinite (bool): skip steps whose norm is NaN/inf. Default: False
        skip_above (float, optional): skip steps whose norm is above it.
        monitor (GradNormMonitor, optional): records every step's norms before clipping,
            and its threshold and coefficient.
        fold (bool): fold a plain ``max_norm`` into fused optimizers. Default: True
        foreach, backend: as in :func:`tritonclip.clip_grad_norm_`.
        overlap (nn.Module or OverlapNorm, optional): take the norm during backward.
        scaler (torch.amp.GradScaler, optional): with ``overlap``, the scaler of the
            gradients.

    Returns:
        A :class:`ClipHandle` (``last_norm``, ``last_skipped``, ``state_dict()``,
        ``load_state_dict()``, ``remove()``).

    Raises:
        TypeError, ValueError: for bad arguments (including param group entries), before
        anything is registered.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, _ATTACHED, None) is not None:
        raise RuntimeError("clipping is already attached to this optimizer; remove() the "
                           "handle first")
    if adaptive is not None and not callable(getattr(adaptive, "step", None)):
        raise TypeError(f"adaptive must be an AutoClip or ZClip (an object with step()), got "
                        f"{type(adaptive).__name__}")
    if adaptive is not None and max_norm is not None:
        raise ValueError(f"give max_norm ({max_norm!r}) or adaptive, not both")
    adaptive_order = getattr(adaptive, "norm_type", None)
    if adaptive_order is not None and adaptive_order != _core.norm_type_value(norm_type):
        raise ValueError(
            f"adaptive clips with norm_type {adaptive_order!r} but attach has norm_type "
            f"{norm_type!r}: last_norm, skip_above and the monitor combine norms of one order"
        )
    for flag, name in ((skip_nonfinite, "skip_nonfinite"), (fold, "fold")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    config = dict(
        max_norm=_optional(max_norm, "max_norm"),
        clip_value=_optional(clip_value, "clip_value"),
        per_tensor_norm=_optional(per_tensor_norm, "per_tensor_norm"),
        agc=_agc_arguments(agc),
        norm_type=_core.norm_type_value(norm_type),
        eps=_core.nonnegative(eps, "eps", allow_inf=False),
        skip_nonfinite=skip_nonfinite,
        skip_above=_optional(skip_above, "skip_above"),
        fold=fold,
        foreach=_core.foreach_value(foreach),
        backend=_core.backend_name(backend),
    )
    _check_groups(optimizer)
    if not (any(config[k] is not None for k in ("max_norm", "clip_value", "per_tensor_norm",
                                                 "agc", "skip_above"))
            or adaptive is not None or skip_nonfinite
            or any(k in g for g in optimizer.param_groups for k in _GROUP_KEYS)):
        raise ValueError("attach needs something to do: max_norm, clip_value, "
                         "per_tensor_norm, agc, adaptive, skip_nonfinite or skip_above")
    owns = overlap is not None and not isinstance(overlap, OverlapNorm)
    if overlap is not None:
        overlap = _overlap_handle(optimizer, overlap, config, adaptive, monitor, scaler)
    elif scaler is not None:
        raise ValueError("scaler= is for overlap=; without it, call scaler.unscale_(optimizer) "
                         "before scaler.step(optimizer)")
    return ClipHandle(optimizer, config, adaptive, monitor, overlap, scaler, owns)


def _overlap_handle(optimizer, overlap, config, adaptive, monitor, scaler) -> OverlapNorm:
    """The OverlapNorm of ``attach(overlap=...)``, after checking what it cannot do."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError("overlap takes the norm during backward, but LBFGS recomputes the "
                        "gradients inside its step (a closure)")
    if config["max_norm"] is None:
        raise ValueError("overlap computes the norm of a max_norm clip: give max_norm")
    others = [k for k in ("clip_value", "per_tensor_norm", "agc") if config[k] is not None]
    others += [f"param_groups[..][{k!r}]" for k in _GROUP_KEYS
               if any(k in g for g in optimizer.param_groups)]
    if adaptive is not None or monitor is not None or others:
        names = others + ["adaptive"] * (adaptive is not None) + ["monitor"] * (monitor is not None)
        raise ValueError(f"overlap does one global max_norm clip; it does not take "
                         f"{', '.join(names)}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if scaler is not None and not amp.fuses(scaler):
        raise ValueError(f"overlap reads the state of torch.amp.GradScaler; "
                         f"{type(scaler).__name__} overrides unscale_")
    if isinstance(overlap, OverlapNorm):
        if overlap.norm_type != config["norm_type"]:
            raise ValueError(f"the overlap handle takes norm_type {overlap.norm_type!r}, "
                             f"attach {config['norm_type']!r}")
        handle = overlap
    elif isinstance(overlap, torch.nn.Module):
        handle = overlap_norm(overlap, config["norm_type"], foreach=config["foreach"],
                              backend=config["backend"])
    else:
        raise TypeError(f"overlap must be an nn.Module or an OverlapNorm, got "
                        f"{type(overlap).__name__}")
    try:
        handle.check_optimizer(optimizer)
    except ValueError:
        if handle is not overlap:
            handle.remove()  # (registered just above)
        raise
    return handle


class ClipHandle:
    """What :func:`attach` returns: the clipping state of one optimizer.

    Attributes:
        last_norm (Tensor or None): total norm of the gradients before clipping at the last
            step (0-dim, on the first gradient's device; float32, float64 for float64
            gradients).
        last_skipped (Tensor or None): whether the last step was skipped (bool, 0-dim, on
            the device), when ``skip_nonfinite`` or ``skip_above`` is set.
        steps (int): steps seen.
    """

    def __init__(self, optimizer, config, adaptive, monitor, overlap=None, scaler=None,
                 owns_overlap=False):
        self.optimizer = optimizer
        self.overlap = overlap
        self.scaler = scaler
        # (a handle attach made is removed with it; one the caller passed is the caller's)
        self._owns_overlap = owns_overlap
        self.config = config
        self.adaptive = adaptive
        self.monitor = monitor
        self.last_norm: torch.Tensor | None = None
        self.last_skipped: torch.Tensor | None = None
        self.steps = 0
        self._set_found_inf = False
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)
        setattr(optimizer, _ATTACHED, self)

    # -- public ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Unregister the hooks; the optimizer steps as if nothing had been attached."""
        self._pre.remove()
        self._post.remove()
        self._restore()
        if self._owns_overlap:
            self.overlap.remove()
        if getattr(self.optimizer, _ATTACHED, None) is self:
            delattr(self.optimizer, _ATTACHED)

    def state_dict(self) -> dict:
        """The step count and the adaptive clipper's state (copies)."""
        state = {"steps": self.steps}
        if self.adaptive is not None and hasattr(self.adaptive, "state_dict"):
            state["adaptive"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if "adaptive" in state and self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])

    # -- hooks ----------------------------------------------------------------------------
    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs):
        # torch's step wrapper passes the optimizer itself as args[0]
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError(
                "attach() clips before optimizer.step() runs, but this step was given a "
                "closure, which recomputes the gradients inside the step (LBFGS): clip "
                "inside the closure instead (e.g. tritonclip.clip_grad_norm_ after backward)"
            )
        if self.overlap is not None:
            self.steps += 1
            self.last_norm = total = self._overlap_clip(optimizer)
            self._skip(optimizer, total)
            return None
        self._check_unscaled(optimizer)
        _check_groups(optimizer)
        cfg = self.config
        groups = optimizer.param_groups
        with_grad = [[p for p in g["params"] if p.grad is not None] for g in groups]
        everything = [p for ps in with_grad for p in ps]
        self.steps += 1
        if not everything:
            self.last_norm = None
            return None
        if self.monitor is not None:
            self.monitor.record()

        # 1. global norm: the default set, and each group with its own max_norm
        default = [p for g, ps in zip(groups, with_grad) if "max_norm" not in g for p in ps]
        own = [(ps, g["max_norm"]) for g, ps in zip(groups, with_grad)
               if "max_norm" in g and g["max_norm"] is not None and ps]
        norm_sets = []
        if self.adaptive is not None or cfg["max_norm"] is not None:
            covered = len(default) + sum(len(ps) for ps, _ in own)
        else:
            covered = sum(len(ps) for ps, _ in own)
        total = None
        if covered < len(everything):  # some gradients are in no norm clip: one more read
            total = get_total_norm([p.grad for p in everything], cfg["norm_type"],
                                   foreach=cfg["foreach"], backend=cfg["backend"])
        extras = dict(foreach=cfg["foreach"], backend=cfg["backend"], eps=cfg["eps"])
        threshold = coef = None
        if default and self.adaptive is not None:
            norm_sets.append(self.adaptive.step(default))
            threshold = getattr(self.adaptive, "last_threshold", None)
            coef = getattr(self.adaptive, "last_coef", None)
        elif default and cfg["max_norm"] is not None:
            threshold = cfg["max_norm"]
            norm_sets.append(self._global_clip(optimizer, default, everything, own))
        for ps, group_max in own:
            norm_sets.append(clip_grad_norm_(ps, group_max, cfg["norm_type"], **extras))
        if total is None:
            total = self._combine(norm_sets)

        # 2-4. per tensor, unit-wise, value
        for value, ps in _by_group_value(groups, with_grad, "per_tensor_norm",
                                         cfg["per_tensor_norm"]):
            self._per_tensor(ps, value)
        if cfg["agc"] is not None:
            clip_grad_agc_(everything, norm_type=cfg["norm_type"], foreach=cfg["foreach"],
                           backend=cfg["backend"], **cfg["agc"])
        for value, ps in _by_group_value(groups, with_grad, "clip_value", cfg["clip_value"]):
            self._value(ps, value)

        self.last_norm = total
        if self.monitor is not None:
            self.monitor.annotate(threshold=threshold, coef=coef)
        self._skip(optimizer, total)
        return None

    def _after_step(self, optimizer, args, kwargs):
        self._restore()
        if self._set_found_inf:
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
            self._set_found_inf = False

    # -- pieces ---------------------------------------------------------------------------
    def _global_clip(self, optimizer, default, everything, own) -> torch.Tensor:
        cfg = self.config
        # Under a GradScaler's step (grad_scale/found_inf already set) the scaler deletes
        # both attributes after the step itself: no folding there.
        driven = hasattr(optimizer, "grad_scale") or hasattr(optimizer, "found_inf")
        plain = (cfg["fold"] and folds_into(optimizer) and not own and not driven
                 and len(default) == len(everything)
                 and all(cfg[k] is None for k in ("clip_value", "per_tensor_norm", "agc"))
                 and not any(k in g for g in optimizer.param_groups
                             for k in ("clip_value", "per_tensor_norm")))
        if plain:
            return clip_into_(optimizer, cfg["max_norm"], cfg["norm_type"], eps=cfg["eps"],
                              foreach=cfg["foreach"], backend=cfg["backend"])
        return clip_grad_norm_(default, cfg["max_norm"], cfg["norm_type"], eps=cfg["eps"],
                               foreach=cfg["foreach"], backend=cfg["backend"])

    def _overlap_clip(self, optimizer) -> torch.Tensor:
        cfg = self.config
        clear_stale(optimizer)
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        fold = cfg["fold"] and can_fold(optimizer, scaler)
        if scaler is None:
            if hasattr(optimizer, "grad_scale") or hasattr(optimizer, "found_inf"):
                raise RuntimeError("a GradScaler drives this step, but attach(overlap=...) "
                                   "was not given it: pass scaler= to attach (the norm taken "
                                   "during backward is of the scaled gradients)")
            return self.overlap.clip_(cfg["max_norm"], optimizer if fold else None,
                                      eps=cfg["eps"])
        # Inside scaler.step: a fused step gets grad_scale (and found_inf) from the scaler,
        # the gradients still scaled; any other step runs after scaler.unscale_.
        scaled = getattr(optimizer, "grad_scale", None)
        total = self.overlap._unscaled_total(scaler, unscaled_since=scaled is None)
        coef = _normmath.clip_coefficient(total, cfg["max_norm"], cfg["eps"], False)
        if fold:
            fold_(optimizer, coef, scaled if scaled is not None else coef.new_ones(()))
        else:
            self.overlap._scale_(coef)
        return total

    def _per_tensor(self, params, value):
        cfg = self.config
        clip_grad_norm_per_tensor_(params, value, cfg["norm_type"], eps=cfg["eps"],
                                   foreach=cfg["foreach"], backend=cfg["backend"])

    def _value(self, params, value):
        clip_grad_value_(params, value, foreach=self.config["foreach"],
                         backend=self.config["backend"])

    def _combine(self, norms: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the union of disjoint sets, from each set's norm."""
        if len(norms) == 1:
            return norms[0]
        p = self.config["norm_type"]
        device = norms[0].device
        stacked = torch.stack([_core.move(n, device) for n in norms]).double()
        power = _normmath.reduce_power(_normmath.power_form(stacked, p), p)
        dtype = _normmath.result_dtype(n.dtype for n in norms)
        return _normmath.root(power, p).to(dtype)

    def _skip(self, optimizer, total: torch.Tensor) -> None:
        cfg = self.config
        if not cfg["skip_nonfinite"] and cfg["skip_above"] is None:
            self.last_skipped = None
            return
        bad = torch.zeros((), dtype=torch.bool, device=total.device)
        if cfg["skip_nonfinite"]:
            bad = bad | ~torch.isfinite(total)
        if cfg["skip_above"] is not None:
            bad = bad | (total > cfg["skip_above"])
        self.last_skipped = bad
        if folds_into(optimizer):  # the fused step reads found_inf on the device
            flag = bad.float()
            existing = getattr(optimizer, "found_inf", None)
            if existing is not None:  # a GradScaler's: it deletes it after the step
                optimizer.found_inf = torch.maximum(existing, _core.move(flag, existing.device))
            else:
                optimizer.found_inf = flag
                self._set_found_inf = True
        elif bool(bad):  # the one documented host synchronisation
            self._hidden = [(p, p.grad) for g in optimizer.param_groups for p in g["params"]
                            if p.grad is not None]
            for p, _ in self._hidden:
                p.grad = None

    def _restore(self) -> None:
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []

    def _check_unscaled(self, optimizer) -> None:
        scale = getattr(optimizer, "grad_scale", None)
        if scale is not None and not getattr(optimizer, MARKER, False):
            raise RuntimeError(
                "the gradients are still scaled by a GradScaler when the step starts: call "
                "scaler.unscale_(optimizer) before scaler.step(optimizer) when clipping is "
                "attached"
            )


def _by_group_value(groups, with_grad, key, default):
    """[(value, params)] for one per-group option: each group's own entry, else the default;
    groups with the same value are merged; None means off."""
    by_value: dict[float, list] = {}
    for group, params in zip(groups, with_grad):
        value = group[key] if key in group else default
        if value is not None and params:
            by_value.setdefault(float(value), []).extend(params)
    return [(value, params) for value, params in by_value.items() if not math.isnan(value)]
