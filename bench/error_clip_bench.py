"""Error clipping's backward on CUDA: tritonclip's kernels against the torch recipe that users
hand-roll in a tensor hook, on the same gradient in the same process.

    python bench/error_clip_bench.py            # needs a CUDA device

The activation shapes of the README's error-clipping table; ``tritonclip-bench --ops
error_clip`` times the same kernels on the benchmark's gradient sets (rows along the last
dimension), beside the same recipe.

Bytes that must move for an out-of-place clip of N gradient bytes: N read + N written (2N);
the fused row kernel reads each row twice, the second time mostly from L2; the split path
(rows longer than 16 Ki elements, and the whole-tensor clip) reads 2N and writes N. GB/s below
are 2N / time, next to a device-to-device copy (also 2N) measured in the same run.
"""

from __future__ import annotations

import torch
import triton
import triton.testing

from tritonclip import _core
from tritonclip.bench.cases import hook_recipe
from tritonclip.error_clip import _Options


def _ms(fn):
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    cases = [  # (name, shape, kwargs)
        ("token 8192x4096", (8192, 4096), dict(max_norm=1.0, dim=-1)),
        ("token 65536x1024", (65536, 1024), dict(max_norm=1.0, dim=-1)),
        ("token 262144x128", (262144, 128), dict(max_norm=1.0, dim=-1)),
        ("sample 64x1M", (64, 1 << 20), dict(max_norm=1.0, dim=-1)),
        ("whole 32M", (1 << 25,), dict(max_norm=1.0)),
        ("value 32M", (1 << 25,), dict(lo=-0.01, hi=0.01)),
    ]
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__}")
    print(f"{'case':<24}{'dtype':<7}{'MiB':>7}{'copy ms':>9}{'torch ms':>10}{'tclip ms':>10}"
          f"{'speedup':>9}{'GB/s':>8}{'% copy':>8}")
    for dtype in (torch.bfloat16, torch.float32):
        for name, shape, kwargs in cases:
            g = torch.randn(shape, device="cuda", dtype=dtype)
            options = _Options(None, kwargs.get("lo"), kwargs.get("hi"), kwargs.get("max_norm"),
                               kwargs.get("dim"), 2.0, 1e-6, "triton", None)
            spec = options.spec(g)
            if "max_norm" in kwargs:
                recipe = lambda: hook_recipe(g, kwargs["max_norm"], kwargs.get("dim"))  # noqa: E731
            else:
                recipe = lambda: g.clamp(kwargs["lo"], kwargs["hi"])  # noqa: E731
            ours = lambda: _core.clip_activation_grad(g, spec)  # noqa: E731
            copy_ms = _ms(lambda: torch.empty_like(g).copy_(g))
            torch_ms, ours_ms = _ms(recipe), _ms(ours)
            nbytes = 2 * g.numel() * g.element_size()
            print(f"{name:<24}{str(dtype)[6:]:<7}{g.numel() * g.element_size() / 2**20:>7.0f}"
                  f"{copy_ms:>9.3f}{torch_ms:>10.3f}{ours_ms:>10.3f}{torch_ms / ours_ms:>8.2f}x"
                  f"{nbytes / ours_ms / 1e6:>8.0f}{100 * copy_ms / ours_ms:>7.0f}%")


if __name__ == "__main__":
    main()
