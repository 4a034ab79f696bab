"""Plain float64 references of the per-tensor and adaptive clipping formulas (the published
ones), imported by tests and benchmarks. One tensor, one step at a time; no fusion."""

from __future__ import annotations

import math

import numpy as np
import torch


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().to(torch.float64)


def clip_grad_norm_per_tensor(grads: list[torch.Tensor], max_norm: float,
                              norm_type: float = 2.0, eps: float = 1e-6):
    """(norms, clipped float64 copies): each g scaled by min(max_norm / (|g|_p + eps), 1)."""
    norms, out = [], []
    for g in grads:
        x = _f64(g)
        # an empty tensor's norm is 0 (for every order; it has nothing to clip)
        norm = torch.linalg.vector_norm(x, norm_type) if x.numel() else torch.tensor(0.0).double()
        norms.append(norm)
        out.append(x * torch.clamp(max_norm / (norm + eps), max=1.0))
    return torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64), out


def unitwise_norm(x: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """timm's unitwise_norm: over all dims but the first (keepdim) for 2+ dims, else whole."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x, norm_type)
    return torch.linalg.vector_norm(x, norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def agc(params: list[torch.Tensor], grads: list[torch.Tensor], clip_factor: float = 0.01,
        eps: float = 1e-3, norm_type: float = 2.0) -> list[torch.Tensor]:
    """timm.utils.agc.adaptive_clip_grad's formula in float64: clipped copies of ``grads``."""
    out = []
    for p, g in zip(params, grads):
        w, x = _f64(p), _f64(g)
        max_norm = unitwise_norm(w, norm_type).clamp(min=eps) * clip_factor
        grad_norm = unitwise_norm(x, norm_type)
        clipped = x * (max_norm / grad_norm.clamp(min=1e-6))
        out.append(torch.where(grad_norm < max_norm, x, clipped))
    return out


def autoclip_threshold(norms: list[float], percentile: float, history: int | None) -> float:
    """AutoClip's threshold after ``norms`` (this step's included): numpy's percentile of the
    history (the last ``history`` norms, or all)."""
    window = norms if history is None else norms[-history:]
    return float(np.percentile(np.asarray(window, dtype=np.float64), percentile))


class ZClipReference:
    """ZClip's published algorithm on host floats (float64), one norm per :meth:`step`,
    which returns the clip coefficient applied to the gradients."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25,
                 mode="zscore", clip_option="adaptive_scaling", clip_factor=1.0,
                 skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.eps, self.warmup_steps, self.mode = eps, warmup_steps, mode
        self.clip_option, self.clip_factor = clip_option, clip_factor
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, norm: float) -> float:
        if self.mean is None:  # warm-up: collect, clip to max_grad_norm like torch
            self.buffer.append(norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            if self.max_grad_norm is None:
                return 1.0
            return min(self.max_grad_norm / (norm + 1e-6), 1.0)
        std = math.sqrt(self.var)
        clip = None
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            if norm > threshold:
                clip = threshold
        else:
            z = (norm - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    clip = (self.mean + self.z_thresh * std / (z / self.z_thresh)) \
                        * self.clip_factor
                else:
                    clip = self.mean
        effective = norm if clip is None else clip
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        coef = effective / (norm + 1e-6) if norm > effective else 1.0
        if not (clip is not None and self.skip_update_on_spike):
            value = norm if clip is None else clip
            self.mean = self.alpha * self.mean + (1 - self.alpha) * value
            self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2
        return coef
