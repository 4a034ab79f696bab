"""tritonclip: Triton multi-tensor gradient clipping for PyTorch.

A drop-in for ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_``: same arguments and meaning, a float32 norm, fewer passes over memory.
``error_clip`` clips the gradient flowing back through chosen activations (RNN steps).
Submodules: ``amp`` (GradScaler unscale fused with the clip), ``optim`` (the clip folded into
a fused optimizer step; ``attach`` clipping to an optimizer), ``adaptive`` (AGC, AutoClip,
ZClip), ``per_tensor`` (each tensor clipped on its own), ``monitor`` (gradient-norm history),
``distributed`` (norms over process groups), ``reference`` and ``reference_adaptive`` (float64
formulas), ``bench`` (the benchmark CLI).
"""

from . import adaptive, amp, distributed, monitor, optim, reference
from .adaptive import AutoClip, ZClip, clip_grad_agc_
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .error_clip import ClipCounter, ErrorClip, ErrorClipHandle, error_clip, register_error_clip
from .monitor import GradNormMonitor
from .optim import ClipHandle, attach
from .per_tensor import clip_grad_norm_per_tensor_

__version__ = "0.1.0"

__all__ = [
    "AutoClip",
    "ClipCounter",
    "ClipHandle",
    "ErrorClip",
    "ErrorClipHandle",
    "GradNormMonitor",
    "ZClip",
    "adaptive",
    "amp",
    "attach",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "distributed",
    "error_clip",
    "get_total_norm",
    "monitor",
    "optim",
    "reference",
    "register_error_clip",
]
