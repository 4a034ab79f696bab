"""tritonclip: Triton multi-tensor gradient clipping for PyTorch.

A drop-in for ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_``: same arguments and meaning, a float32 norm (float64 for float64
gradients), fewer passes over memory.
``error_clip`` clips the gradient flowing back through chosen activations (RNN steps).
Submodules: ``amp`` (GradScaler unscale fused with the clip), ``optim`` (the clip folded into
a fused optimizer step), ``attach`` (clipping attached to an optimizer), ``adaptive`` (AGC,
AutoClip, ZClip), ``per_tensor`` (each tensor clipped on its own), ``monitor``
(gradient-norm history), ``overlap`` (the norm taken during backward), ``distributed``
(norms over process groups), ``reference`` and ``reference_adaptive`` (float64 formulas),
``bench`` (the benchmark CLI).
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _kernels_from_checkout() -> None:
    """Import ``kernels/`` as ``tritonclip.kernels`` where the install's package mapping is
    missing: a source checkout on ``sys.path`` (``python -m pytest`` in the repository puts
    it first), or an editable install that only added the checkout to the path."""
    root = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))),
                         "kernels")
    spec = _importlib_util.spec_from_file_location(
        f"{__name__}.kernels", _os.path.join(root, "__init__.py"),
        submodule_search_locations=[root])
    if spec is None:
        raise ImportError(f"tritonclip.kernels is neither installed nor at {root}")
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


if _importlib_util.find_spec(f"{__name__}.kernels") is None:
    _kernels_from_checkout()

from . import adaptive, amp, distributed, monitor, optim, overlap, reference  # noqa: E402
from .adaptive import AutoClip, ZClip, clip_grad_agc_  # noqa: E402
from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm  # noqa: E402
from .error_clip import ClipCounter, ErrorClip, ErrorClipHandle, error_clip, register_error_clip  # noqa: E402
from .monitor import GradNormMonitor  # noqa: E402
from ._attach import ClipHandle, attach  # noqa: E402
from .overlap import OverlapNorm, overlap_norm  # noqa: E402
from .per_tensor import clip_grad_norm_per_tensor_  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AutoClip",
    "ClipCounter",
    "ClipHandle",
    "ErrorClip",
    "ErrorClipHandle",
    "GradNormMonitor",
    "OverlapNorm",
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
    "overlap",
    "overlap_norm",
    "reference",
    "register_error_clip",
]
