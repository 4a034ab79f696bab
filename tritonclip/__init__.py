"""tritonclip: Triton multi-tensor gradient clipping for PyTorch.

A drop-in for ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_``: same arguments and meaning, a float32 norm, fewer passes over memory.
"""

from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

__version__ = "0.1.0"

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]
