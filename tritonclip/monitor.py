"""Gradient-norm monitoring kept on the device: read only when logged."""

from __future__ import annotations

import math

import torch

from . import _core, _normmath
from .clip_grad import get_total_norm

__all__ = ["GradNormMonitor"]


class GradNormMonitor:
    r"""Record, every step, the total gradient norm, the clip threshold and coefficient,
    whether the step was clipped, the number of gradients with a NaN/inf norm, and the
    ``top_k`` largest per-tensor norms with their parameter names.

    :meth:`record` costs one read of the gradients (total and per-tensor norms come from
    the same launch, see :func:`tritonclip.get_total_norm`) and a few tiny device ops; the
    values stay device tensors until :meth:`to_dict` or :meth:`plot` copies the steps
    recorded since the last copy to the host at once (the only synchronisation) and drops
    them from the device: logging every N steps costs O(N), and device memory holds at most
    the steps since the last log. The host keeps a few numbers a step.

    Args:
        named_parameters (Module or iterable of (str, Tensor)): the parameters to watch,
            e.g. ``model`` or ``model.named_parameters()``.
        top_k (int): how many of the largest per-tensor norms to keep per step. Default: 5
        norm_type (float or str): order of the norms. Default: 2.0
        eps (float): in the coefficient :math:`\min(threshold / (norm + eps), 1)`. Default: 1e-6
        backend (str, optional): as in :func:`tritonclip.clip_grad_norm_`.

    Example::

        monitor = tritonclip.GradNormMonitor(model, top_k=3)
        loss.backward()
        monitor.record(threshold=1.0)           # before clipping
        tritonclip.clip_grad_norm_(model.parameters(), 1.0)
        ...
        logger.log(monitor.to_dict()["summary"]); monitor.plot("grad_norms.png")
    """

    def __init__(self, named_parameters, top_k: int = 5, norm_type: float | str = 2.0,
                 eps: float = 1e-6, backend: str | None = None):
        if isinstance(named_parameters, torch.nn.Module):
            named_parameters = named_parameters.named_parameters()
        try:
            pairs = list(named_parameters)
        except TypeError:
            raise TypeError(f"named_parameters must be a Module or an iterable of (name, Tensor) "
                            f"pairs, got {type(named_parameters).__name__}: "
                            f"{_core._short(named_parameters)}") from None
        for index, pair in enumerate(pairs):
            if isinstance(pair, torch.Tensor):
                raise TypeError(
                    f"named_parameters[{index}] is a Tensor of shape {tuple(pair.shape)}, not a "
                    "(name, Tensor) pair: pass the module itself or model.named_parameters(), "
                    "not model.parameters()")
            if (not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[0], str)
                    or not isinstance(pair[1], torch.Tensor)):
                raise TypeError(f"named_parameters[{index}] must be a (name, Tensor) pair, got "
                                f"{type(pair).__name__}: {_core._short(pair)}")
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be an int, got {type(top_k).__name__}: {top_k!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.names = [name for name, _ in pairs]
        self.params = [p for _, p in pairs]
        self.top_k = top_k
        self.norm_type = _core.norm_type_value(norm_type)
        self.eps = _core.nonnegative(eps, "eps", allow_inf=False)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget every recorded step."""
        self._steps: list[int] = []
        self._norms: list[torch.Tensor] = []
        self._thresholds: list[torch.Tensor] = []
        self._coefs: list[torch.Tensor] = []
        self._nonfinite: list[torch.Tensor] = []
        self._top_values: list[torch.Tensor] = []
        self._top_names: list[tuple[list[int], torch.Tensor]] = []
        self._step = 0
        # steps already copied to the host by to_dict()
        self._host: dict[str, list] = {"step": [], "total_norm": [], "threshold": [],
                                       "clip_coef": [], "nonfinite": [], "top_k": []}

    @torch.no_grad()
    def record(self, threshold: float | torch.Tensor | None = None,
               step: int | None = None) -> torch.Tensor:
        """Record the current gradients (call after ``backward()``, before clipping).

        Args:
            threshold (float or Tensor, optional): the clip threshold of this step; its
                coefficient is derived from it. ``None``: no clipping (coefficient 1), or
                set later with :meth:`annotate`.
            step (int, optional): the step number to file it under (default: a counter).

        Returns:
            The total norm (0-dim device tensor; float32, float64 for float64 gradients).
        """
        positions = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in positions]
        total, norms = get_total_norm(grads, self.norm_type, backend=self.backend,
                                      per_tensor=True)
        self._steps.append(self._step if step is None else int(step))
        self._step += 1
        self._norms.append(total)
        self._nonfinite.append((~torch.isfinite(norms)).sum())
        k = min(self.top_k, norms.numel())
        values, indices = torch.topk(norms.nan_to_num(nan=math.inf), k) if k else (
            norms[:0], norms[:0].long())
        self._top_values.append(values)
        self._top_names.append((positions, indices))
        self._thresholds.append(None)
        self._coefs.append(None)
        if threshold is not None:
            self.annotate(threshold=threshold)
        return total

    def annotate(self, threshold: float | torch.Tensor | None = None,
                 coef: torch.Tensor | None = None) -> None:
        """Set the threshold and/or the applied coefficient of the last recorded step (for
        clippers that decide them after the norm is known: AutoClip, ZClip)."""
        if not self._norms:
            raise RuntimeError("annotate() before any record(), or after to_dict() copied "
                               "the last recorded step to the host")
        total = self._norms[-1]
        if threshold is not None:
            if not isinstance(threshold, torch.Tensor):  # a fill, not a host-to-device copy
                threshold = torch.full((), _core.nonnegative(threshold, "threshold"),
                                       dtype=torch.float32, device=total.device)
            self._thresholds[-1] = threshold.to(total.device, torch.float32,
                                                non_blocking=True)
        if coef is None and self._thresholds[-1] is not None:
            coef = _normmath.clip_coefficient(total, self._thresholds[-1], self.eps,
                                              skip_nonfinite=False)
        if coef is not None:
            self._coefs[-1] = coef.to(total.device, torch.float32, non_blocking=True)

    def to_dict(self) -> dict:
        """Every recorded step as host lists, and a summary. The steps recorded since the
        last call are copied to the host at once (one synchronisation) and leave the device.

        Returns:
            ``{"step", "total_norm", "threshold", "clip_coef", "clipped", "nonfinite",
            "top_k": [[(name, norm), ...] per step], "summary": {"steps", "clip_fraction",
            "max_norm", "nonfinite_steps"}}``; thresholds are ``None`` where unknown and
            coefficients 1.0.
        """
        self._flush()
        host = self._host
        n = len(host["step"])
        clipped = [c < 1.0 for c in host["clip_coef"]]
        finite = [x for x in host["total_norm"] if math.isfinite(x)]
        result = {key: list(values) for key, values in host.items()}
        result["clipped"] = clipped
        result["summary"] = {"steps": n, "clip_fraction": sum(clipped) / n if n else 0.0,
                             "max_norm": max(finite) if finite else None,
                             "nonfinite_steps": sum(1 for c in host["nonfinite"] if c > 0)}
        return result

    def _flush(self) -> None:
        """Move the device records to the host lists."""
        if not self._norms:
            return
        device = self._norms[0].device
        nan = torch.full((), math.nan, device=device)
        one = torch.ones((), device=device)
        norms, thresholds, coefs, nonfinite = torch.stack([
            torch.stack([x.to(device).float() for x in self._norms]),
            torch.stack([(t if t is not None else nan).to(device) for t in self._thresholds]),
            torch.stack([(c if c is not None else one).to(device) for c in self._coefs]),
            torch.stack([c.to(device).float() for c in self._nonfinite]),
        ]).cpu().tolist()
        tops = [(values.cpu().tolist(), positions, indices.cpu().tolist())
                for values, (positions, indices) in zip(self._top_values, self._top_names)]
        host = self._host
        host["step"] += self._steps
        host["total_norm"] += norms
        host["threshold"] += [None if math.isnan(t) else t for t in thresholds]
        host["clip_coef"] += coefs
        host["nonfinite"] += [int(c) for c in nonfinite]
        host["top_k"] += [[(self.names[positions[i]], v) for v, i in zip(values, idx)]
                          for values, positions, idx in tops]
        for pending in (self._steps, self._norms, self._thresholds, self._coefs,
                        self._nonfinite, self._top_values, self._top_names):
            pending.clear()

    def plot(self, path: str, title: str | None = None) -> None:
        """Write a PNG of the total norm and the threshold over the steps (log scale)."""
        # A Figure with its own Agg canvas: no pyplot, so the process's backend (a
        # notebook's inline one) is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        data = self.to_dict()
        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        steps = data["step"]
        ax.plot(steps, data["total_norm"], label="gradient norm", lw=1)
        if any(t is not None for t in data["threshold"]):
            ax.plot(steps, [math.nan if t is None else t for t in data["threshold"]],
                    label="threshold", lw=1, ls="--")
        clipped = [s for s, c in zip(steps, data["clipped"]) if c]
        if clipped:
            ax.scatter(clipped, [n for n, c in zip(data["total_norm"], data["clipped"]) if c],
                       s=8, c="red", label="clipped", zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"L{self.norm_type:g} norm")
        ax.set_title(title or "gradient norm")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
