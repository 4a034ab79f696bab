"""tritonclip: Triton multi-tensor gradient clipping for PyTorch.

A drop-in for ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_``: same arguments and meaning, a float32 norm, fewer passes over memory.
``error_clip`` clips the gradient flowing back through chosen activations (RNN steps).
Submodules: ``amp`` (GradScaler unscale fused with the clip), ``optim`` (the clip folded into
a fused optimizer step), ``distributed`` (norms over process groups), ``reference`` (float64
formulas), ``bench`` (the benchmark CLI).
"""

from . import amp, distributed, optim, reference
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .error_clip import ClipCounter, ErrorClip, ErrorClipHandle, error_clip, register_error_clip

__version__ = "0.1.0"

__all__ = [
    "ClipCounter",
    "ErrorClip",
    "ErrorClipHandle",
    "amp",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "distributed",
    "error_clip",
    "get_total_norm",
    "optim",
    "register_error_clip",
    "reference",
]
