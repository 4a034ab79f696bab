"""Adaptive clipping: thresholds from the weights (AGC) or from the history of gradient norms
(AutoClip, ZClip). Everything runs on the gradients' device without host synchronisation:
thresholds, statistics and decisions are device tensors combined with ``torch.where``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _compile, _core, _normmath
from .clip_grad import TensorOrTensors

__all__ = ["AutoClip", "ZClip", "clip_grad_agc_"]

# The epsilon of torch.nn.utils.clip_grad_norm_, which AutoClip's and ZClip's reference
# implementations clip with: coef = threshold / (norm + 1e-6).
_CLIP_EPS = 1e-6


@torch.no_grad()
def clip_grad_agc_(
    parameters: TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float | str = 2.0,
    *,
    foreach: bool | None = None,
    backend: str | None = None,
) -> None:
    r"""Adaptive gradient clipping (AGC, Brock et al. 2021, "High-Performance Large-Scale
    Image Recognition Without Normalization"), with the semantics of timm's
    ``timm.utils.agc.adaptive_clip_grad``.

    For every *unit* (row) of a parameter :math:`W` and its gradient :math:`G`, rows being the
    slices along the first dimension of a tensor of two or more dimensions (the output
    channels of ``Linear``/``ConvNd`` weights, the rows of an ``Embedding``), and the whole
    tensor for one of at most one dimension:

    .. math::
        m = clip\_factor \cdot \max(\lVert W_i \rVert_p, eps), \quad
        G_i \leftarrow \begin{cases} G_i & \lVert G_i \rVert_p < m \\
        G_i \cdot \dfrac{m}{\max(\lVert G_i \rVert_p, 10^{-6})} & \text{otherwise}\end{cases}

    With the Triton backend, the row norms of all weights and all gradients of one (device,
    dtype) take two launches each (partials and finalize, over a plan whose spans are the
    rows), and the gradients are scaled by one launch that reads each row's coefficient;
    rows that are not clipped are not written. Norms are accumulated in float32 (float64 for
    float64 tensors), where timm computes them in the parameters' dtype.

    Args:
        parameters (Iterable[Tensor] or Tensor): parameters whose ``.grad`` is clipped;
            ``None`` gradients are skipped.
        clip_factor (float): the ratio :math:`\lambda` of gradient to weight norm. Default: 0.01
        eps (float): floor of the weight norms (so zero-initialised units can move).
            Default: 1e-3
        norm_type (float or str): order of the unit-wise norms, > 0. Default: 2.0
        foreach, backend: as in :func:`tritonclip.clip_grad_norm_`.
    """
    parameters = _core.tensor_list(parameters, "parameters")
    clip_factor = _core.nonnegative(clip_factor, "clip_factor", allow_inf=False)
    eps = _core.nonnegative(eps, "eps", allow_inf=False)
    norm_type = _core.positive_norm_type(norm_type)
    foreach = _core.foreach_value(foreach)
    backend = _core.backend_name(backend)
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    if not _compile.compiling():
        return _agc(grads, params, clip_factor, eps, norm_type, foreach, backend)
    if _core.has_dtensor(grads + params):  # (DTensors cannot enter a custom op)
        return _compile.distributed(clip_grad_agc_, params, clip_factor, eps, norm_type,
                                    foreach=foreach, backend=backend)
    _agc_op(grads, params, clip_factor, eps, norm_type, foreach, backend)


def _agc(grads, params, clip_factor, eps, norm_type, foreach, backend) -> None:
    rows = _core.prepare_rows(grads, params, True, backend, "scale")
    coefs = []
    for group in rows.groups:
        weight_norms = rows.norms(group, norm_type, foreach, "params")[0]
        grad_norms = rows.norms(group, norm_type, foreach)[0]
        max_norm = weight_norms.clamp(min=eps) * clip_factor
        coef = max_norm / grad_norms.clamp(min=1e-6)
        coefs.append(torch.where(grad_norms < max_norm, torch.ones_like(coef), coef))
    rows.scale_(coefs)


@_compile.op("clip_grad_agc_", mutates=("grads",))
def _agc_op(grads: list[torch.Tensor], params: list[torch.Tensor], clip_factor: float,
            eps: float, norm_type: float, foreach: Optional[bool], backend: str) -> None:
    _agc(grads, params, clip_factor, eps, norm_type, foreach, backend)


class _HistoryClipper:
    """What AutoClip and ZClip share: a step takes the global norm, asks the subclass for a
    coefficient from it (``_coefficient``; None: leave the gradients alone) and scales."""

    def __init__(self, norm_type, eps, foreach, backend):
        """The arguments every such clipper takes, checked; no threshold or coefficient yet."""
        self.norm_type = _core.norm_type_value(norm_type)
        self.eps = _core.nonnegative(eps, "eps", allow_inf=False)
        self.foreach = _core.foreach_value(foreach)
        self.backend = _core.backend_name(backend)
        self.last_threshold: torch.Tensor | None = None
        self.last_coef: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, parameters: TensorOrTensors) -> torch.Tensor:
        """Clip the gradients of ``parameters`` by the current threshold and update the
        history.

        Returns:
            The total norm before clipping (0-dim, on the first gradient's device;
            float32, float64 for float64 gradients).
        """
        if _compile.compiling():
            return _compile.stateful(type(self).step, self, parameters)
        grads = _core.prepare(_core.tensor_list(parameters, "parameters"), self.backend,
                              "scale", parameters=True)
        norm = grads.norm(self.norm_type, self.foreach)
        coef = self._coefficient(norm)
        if coef is not None:
            grads.scale_(coef, self.foreach)
        self.last_coef = coef if coef is not None else torch.ones_like(norm)
        return norm

    __call__ = step


class AutoClip(_HistoryClipper):
    r"""AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks"): clip the global norm to a percentile of the norms seen so far.

    At every :meth:`step` the total norm :math:`n_t` of the gradients is appended to the
    history, the threshold is the ``percentile``-th percentile of the history (linear
    interpolation, as ``numpy.percentile``), and the gradients are scaled by
    :math:`\min(threshold / (n_t + eps), 1)` (what the reference's
    ``torch.nn.utils.clip_grad_norm_(params, threshold)`` does).

    The history lives on the gradients' device; the percentile is a sort of it and an
    interpolation at a position the host knows (the number of steps), so no step reads a
    device value. A NaN or inf norm enters the history as ``+inf`` (a large observation),
    so that one bad step cannot make every later threshold NaN.

    Args:
        percentile (float): in [0, 100]. Default: 10
        history (int, optional): keep only the last ``history`` norms; ``None`` keeps all
            (the paper's rule; memory grows by 4 bytes a step, and each step sorts it).
        norm_type (float): order of the global norm. Default: 2.0
        eps (float): added to the norm before dividing. Default: 1e-6
        foreach, backend: as in :func:`tritonclip.clip_grad_norm_`.

    Example::

        autoclip = tritonclip.AutoClip(percentile=10)
        loss.backward()
        norm = autoclip(model.parameters())     # or autoclip.step(...)
        optimizer.step()
    """

    _INITIAL_CAPACITY = 256

    def __init__(self, percentile: float = 10.0, history: int | None = None, *,
                 norm_type: float | str = 2.0, eps: float = _CLIP_EPS,
                 foreach: bool | None = None, backend: str | None = None):
        percentile = _core.nonnegative(percentile, "percentile", allow_inf=False)
        if percentile > 100:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                    or history < 1):
            raise ValueError(f"history must be None or a positive int, got {history!r}")
        super().__init__(norm_type, eps, foreach, backend)
        self.percentile = percentile
        self.history = history
        self._count = 0
        self._norms: torch.Tensor | None = None

    def _coefficient(self, norm: torch.Tensor) -> torch.Tensor:
        """Record the norm, then the coefficient for the percentile of the history."""
        self.last_threshold = self._record(norm)
        return _normmath.clip_coefficient(norm, self.last_threshold, self.eps,
                                          skip_nonfinite=False)

    def _record(self, norm: torch.Tensor) -> torch.Tensor:
        """Append ``norm`` to the history and return the percentile (a device tensor)."""
        value = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.inf))
        capacity = self.history or self._INITIAL_CAPACITY
        if self._norms is None:
            self._norms = torch.zeros(capacity, dtype=torch.float32, device=norm.device)
        elif self._norms.device != norm.device:
            self._norms = _core.move(self._norms, norm.device)
        if self.history is None and self._count == self._norms.numel():
            self._norms = torch.cat([self._norms, torch.zeros_like(self._norms)])
        slot = self._count % self._norms.numel() if self.history else self._count
        self._norms[slot] = value
        self._count += 1
        n = min(self._count, self._norms.numel())
        return percentile_of(self._norms[:n], self.percentile)

    def state_dict(self) -> dict:
        """The history (a copy) and the step count: loading it resumes identically."""
        n = self._count if self.history is None else min(self._count, self.history)
        norms = None if self._norms is None else self._norms[:self._norms.numel()
                                                              if self.history else n].clone()
        return {"count": self._count, "norms": norms, "percentile": self.percentile,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        if state.get("history") != self.history:
            raise ValueError(f"the state was saved with history={state.get('history')!r}, "
                             f"this AutoClip has history={self.history!r}")
        self._count = int(state["count"])
        norms = state["norms"]
        self._norms = None if norms is None else norms.detach().clone().float()


def percentile_of(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """``numpy.percentile(values, percentile)`` (method "linear") of a 1-D device tensor of
    norms (>= 0, maybe +inf), with the position computed on the host: sort, two reads,
    numpy's two-sided lerp. At a whole-number position the value is the order statistic
    itself, and a lerp towards +inf is +inf: an inf in the history never makes the threshold
    NaN (``inf * 0`` or ``inf - inf`` in the lerp would)."""
    n = values.numel()
    ordered = torch.sort(values).values
    position = percentile / 100.0 * (n - 1)
    below = math.floor(position)
    t = position - below
    a = ordered[below]
    if t == 0:
        return a
    b = ordered[min(below + 1, n - 1)]
    diff = b - a
    value = b - diff * (1 - t) if t >= 0.5 else a + diff * t
    return torch.where(torch.isinf(b), b, value)


class ZClip(_HistoryClipper):
    r"""ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"):
    z-score spike detection on EMA statistics of the gradient norm.

    Semantics of the authors' reference implementation (``zclip`` 1.0.0):

    * Warm-up (``warmup_steps`` steps): norms are collected; gradients are clipped to
      ``max_grad_norm`` (if not None) as ``torch.nn.utils.clip_grad_norm_`` would. At the
      end, :math:`\mu` and :math:`\sigma^2` are the mean and population variance of the
      collected norms.
    * Then, with :math:`\sigma = \sqrt{\sigma^2}` and :math:`z = (n - \mu) / (\sigma + eps)`:

      - ``mode="zscore"``: a spike is :math:`z > z_{thresh}`; its clip value is, for
        ``clip_option="adaptive_scaling"``,
        :math:`(\mu + z_{thresh}\sigma / (z / z_{thresh})) \cdot clip\_factor`
        (the further the outlier, the lower the threshold), or :math:`\mu` for
        ``clip_option="mean"``;
      - ``mode="percentile"``: a spike is :math:`n > \mu + z_{thresh}\sigma`, clipped to
        that value.

      The effective threshold is the clip value on a spike and :math:`n` otherwise,
      capped by ``max_grad_norm`` (if not None); gradients are scaled by
      :math:`thr / (n + 10^{-6})` where :math:`n > thr`.
    * The statistics are updated with the clip value on a spike and :math:`n` otherwise
      (not on a spike with ``skip_update_on_spike``):
      :math:`\mu \leftarrow \alpha\mu + (1-\alpha)v`, then
      :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(v - \mu)^2` with the new mean.

    All of it is device arithmetic with ``torch.where``: no ``.item()``, no branch on a device
    value. One deliberate difference: a NaN or inf norm is left out of the statistics (and
    of the warm-up mean), where the reference would make every later threshold NaN; its
    gradients are left as the formula leaves them (a NaN norm is not above any threshold).
    If *every* warm-up norm is NaN or inf there are no statistics to start from: they stay
    NaN, and ZClip then only applies ``max_grad_norm`` (if set). Check the loss scale or
    the warm-up length if that happens.

    Args:
        alpha (float): EMA smoothing factor, in (0, 1). Default: 0.97
        z_thresh (float): z-score threshold (> 0). Default: 2.5
        max_grad_norm (float, optional): an absolute cap as well; ``None`` for none. Default: 1.0
        eps (float): added to :math:`\sigma` in the z-score. Default: 1e-6
        warmup_steps (int): steps before the statistics exist (>= 1). Default: 25
        mode (str): ``"zscore"`` or ``"percentile"``. Default: ``"zscore"``
        clip_option (str): ``"adaptive_scaling"`` or ``"mean"`` (zscore mode). Default:
            ``"adaptive_scaling"``
        clip_factor (float): multiplies the adaptive threshold. Default: 1.0
        skip_update_on_spike (bool): keep the statistics unchanged on a spike. Default: False
        norm_type, foreach, backend: as in :func:`tritonclip.clip_grad_norm_` (the paper uses
            the L2 norm).
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5,
                 max_grad_norm: float | None = 1.0, eps: float = 1e-6, warmup_steps: int = 25,
                 mode: str = "zscore", clip_option: str = "adaptive_scaling",
                 clip_factor: float = 1.0, skip_update_on_spike: bool = False, *,
                 norm_type: float | str = 2.0, foreach: bool | None = None,
                 backend: str | None = None):
        alpha = _core.nonnegative(alpha, "alpha", allow_inf=False)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        z_thresh = _core.nonnegative(z_thresh, "z_thresh", allow_inf=False)
        if z_thresh == 0:
            raise ValueError("z_thresh must be > 0, got 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
                or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        if mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got "
                             f"{clip_option!r}")
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        super().__init__(norm_type, eps, foreach, backend)
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.max_grad_norm = (None if max_grad_norm is None
                              else _core.nonnegative(max_grad_norm, "max_grad_norm"))
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.clip_option = clip_option
        self.clip_factor = _core.nonnegative(clip_factor, "clip_factor", allow_inf=False)
        self.skip_update_on_spike = skip_update_on_spike
        self._step = 0
        self._warmup: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.last_spike: torch.Tensor | None = None

    @property
    def initialized(self) -> bool:
        """Whether the warm-up is over (a host-side count: reading it never synchronises)."""
        return self._step >= self.warmup_steps

    def _coefficient(self, norm: torch.Tensor) -> torch.Tensor | None:
        """The warm-up (no clip until it ends), then the z-score clip and the update of the
        statistics."""
        coef = self._clip_and_update(norm) if self.initialized else self._warm_up(norm)
        self._step += 1
        return coef

    def _warm_up(self, norm: torch.Tensor) -> torch.Tensor | None:
        if self._warmup is None:
            self._warmup = torch.zeros(self.warmup_steps, dtype=torch.float32,
                                       device=norm.device)
        self._warmup = _core.move(self._warmup, norm.device)
        self._warmup[self._step] = norm
        if self._step == self.warmup_steps - 1:
            values = self._warmup
            finite = torch.isfinite(values)
            count = finite.sum()
            self.mean = torch.where(finite, values, 0).sum() / count
            self.var = torch.where(finite, (values - self.mean) ** 2, 0).sum() / count
            self._warmup = None
        self.last_spike = torch.zeros((), dtype=torch.bool, device=norm.device)
        if self.max_grad_norm is None:
            self.last_threshold = torch.full_like(norm, math.inf)
            return None
        self.last_threshold = torch.full_like(norm, self.max_grad_norm)
        return _normmath.clip_coefficient(norm, self.max_grad_norm, _CLIP_EPS,
                                          skip_nonfinite=False)

    def _clip_and_update(self, norm: torch.Tensor) -> torch.Tensor:
        mean = _core.move(self.mean, norm.device)
        var = _core.move(self.var, norm.device)
        std = var.sqrt()
        if self.mode == "percentile":
            level = mean + self.z_thresh * std
            spike = norm > level
            clip_value = level
        else:
            z = (norm - mean) / (std + self.eps)
            level = mean + self.z_thresh * (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh  # > 1 on a spike; elsewhere the value is not used
                clip_value = (mean + self.z_thresh * std / eta) * self.clip_factor
            else:
                clip_value = mean
        threshold = torch.where(spike, clip_value, norm)
        if self.max_grad_norm is not None:
            threshold = torch.clamp(threshold, max=self.max_grad_norm)
            level = torch.clamp(level, max=self.max_grad_norm)
        coef = torch.where(norm > threshold, threshold / (norm + _CLIP_EPS),
                           torch.ones_like(norm))

        value = torch.where(spike, clip_value, norm)
        update = torch.isfinite(norm)
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * value
        new_var = self.alpha * var + (1 - self.alpha) * (value - new_mean) ** 2
        self.mean = torch.where(update, new_mean, mean)
        self.var = torch.where(update, new_var, var)
        self.last_threshold, self.last_spike = level, spike
        return coef

    def state_dict(self) -> dict:
        """Step count, warm-up norms and EMA statistics (copies): loading them into a ZClip
        with the same arguments resumes identically."""
        copy = (lambda t: None if t is None else t.clone())
        return {"step": self._step, "warmup": copy(self._warmup), "mean": copy(self.mean),
                "var": copy(self.var)}

    def load_state_dict(self, state: dict) -> None:
        step = state["step"]
        warmup = state["warmup"]
        if warmup is not None and warmup.numel() != self.warmup_steps:
            raise ValueError(f"the state holds {warmup.numel()} warm-up norms, this ZClip has "
                             f"warmup_steps={self.warmup_steps}")
        copy = (lambda t: None if t is None else t.detach().clone())
        self._step = int(step)
        self._warmup = copy(warmup)
        self.mean = copy(state["mean"])
        self.var = copy(state["var"])
