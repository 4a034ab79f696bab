"""The kernel variants that CI compiles for GPU targets (``tests/codegen.py``).

A variant is a kernel with the constexprs and launch options that its launcher passes, made
by the launchers' own functions (``norm_meta``, ``scale_meta``, ``clamp_meta``, ...), so that
what CI compiles is what the package launches. Every (dtype, alignment) of every streaming
kernel is here; the axes that change a select or a few scalar ops (skipping non-finite
norms, the AMP epilogue, counting, narrow tiles, other norm orders of the error-clip rows)
are here once or twice, where they meet the loops they could disturb, so that the set
compiles within the suite's time budget.
"""

from __future__ import annotations

import dataclasses

import torch

from . import clamp, error_clip, norm, scale

_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.float64: "fp64"}
NORMS = {"sumsq": 2.0, "sumabs": 1.0, "sumpow": 3.5, "max": float("inf"), "min": float("-inf"),
         "count": 0.0}
# The norm kernel's modes: partials only (then a finalize), the group's value by the last
# program (FUSED), and that plus the clip epilogue (with or without SKIP_NONFINITE, with or
# without the AMP unscale): (fused, epilogue, skip, unscale).
NORM_MODES = {"partials": (False, False, False, False), "fused": (True, False, False, False),
              "clip": (True, True, False, False), "clip-skip": (True, True, True, False),
              "amp": (True, True, False, True), "amp-skip": (True, True, True, True)}
# Pointer arguments that are a plan's own tables (any 8-byte offset into one allocation).
TABLES = ("first_table", "second_table", "segments_ptr", "order_ptr")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    pointers: dict  # pointer argument -> element type ("fp32", "i64", ...)
    meta: dict  # constexprs and launch options, as the launcher passes them

    def signature(self) -> dict:
        """Triton's signature of the launch: pointers, typed scalars (annotated), untyped
        Python ints (i32, the width of every size passed) and floats (fp32), constexprs."""
        signature = {}
        for param in self.kernel.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
            elif param.name in self.pointers:
                signature[param.name] = "*" + self.pointers[param.name]
            elif param.annotation_type:
                signature[param.name] = param.annotation_type
            else:
                signature[param.name] = "fp32" if param.name in ("p", "max_norm", "eps") else "i32"
        return signature

    def aligned_pointers(self) -> list[str]:
        """Pointers Triton marks 16-byte divisible at a launch of an aligned buffer: those not
        listed in ``do_not_specialize_on_alignment`` and not plan tables (which lie at any
        8-byte offset, so no divisibility is assumed)."""
        return [p.name for p in self.kernel.params
                if p.name in self.pointers and not p.do_not_specialize_on_alignment
                and p.name not in TABLES]

    @property
    def constexprs(self) -> dict:
        return {k: v for k, v in self.meta.items() if k != "num_warps"}


def _streams() -> dict:
    return {"first_table": "i64", "second_table": "i64"}


def variants(soft_bf16: bool = False):
    """Every :class:`Variant` CI compiles (``soft_bf16``: as the interpreter would launch)."""
    for dtype, t in _TYPE.items():
        result = "fp64" if dtype == torch.float64 else "fp32"
        for aligned in (True, False):
            tag = f"{t}-{'aligned' if aligned else 'unaligned'}"
            for norm_name, norm_type in NORMS.items():
                acc = _TYPE[norm.accumulation_dtype(dtype, norm_type)]
                for mode, (fused, epilogue, skip, unscale) in NORM_MODES.items():
                    if epilogue and not norm.fuses_coefficient(norm_type):
                        continue
                    if skip and not (dtype == torch.float32 and aligned):
                        continue  # SKIP_NONFINITE changes one select: compiled once per norm
                    if unscale and not (aligned and norm_name == "sumsq"):
                        continue  # the AMP epilogue: a few more scalar ops, once per dtype
                    yield Variant(
                        f"norm-{mode}-{norm_name}-{tag}", norm._norm_kernel,
                        dict(_streams(), partials_ptr=acc, counter_ptr="i64",
                             out_ptr=acc, norm_ptr=result, coef_ptr=result,
                             inv_scale_ptr="fp32" if unscale else result,
                             found_ptr="fp32" if unscale else result),
                        norm.norm_meta(dtype, aligned, norm_type, fused, epilogue, skip,
                                       unscale))
            coef = "fp64" if dtype == torch.float64 else "fp32"
            for per_span in (False, True):
                for skip in (True, False):
                    kind = "scale_each" if per_span else "scale"
                    yield Variant(f"{kind}-{tag}{'' if skip else '-noskip'}",
                                  scale._scale_kernel,
                                  dict(_streams(), coef_ptr=coef, order_ptr="i64"),
                                  _soft(scale.scale_meta(dtype, aligned, skip, per_span),
                                        soft_bf16))
            if dtype == torch.float32 and aligned:  # a list with float64 gradients elsewhere
                yield Variant(f"scale-{tag}-coef64", scale._scale_kernel,
                              dict(_streams(), coef_ptr="fp64", order_ptr="i64"),
                              _soft(scale.scale_meta(dtype, aligned, True, False), soft_bf16))
            yield Variant(f"clamp-{tag}", clamp._clamp_kernel, _streams(),
                          _soft(clamp.clamp_meta(dtype, aligned), soft_bf16))
    for norm_name, norm_type in NORMS.items():
        for partials in ("fp32", "fp64"):
            if norm_name == "count" and partials == "fp32":
                continue
            yield Variant(f"finalize-{norm_name}-{partials}", norm._finalize_kernel,
                          {"partials_ptr": partials, "segments_ptr": "i64",
                           "out_ptr": partials}, norm.finalize_meta(norm_type))
    yield from _error_clip_variants(soft_bf16)


def _soft(meta: dict, soft_bf16: bool) -> dict:
    return dict(meta, SOFT_BF16=soft_bf16) if "SOFT_BF16" in meta else meta


def _error_clip_variants(soft_bf16: bool):
    """The error-clip kernels (``ec_`` names): every dtype and alignment of the streaming
    ones at the p = 2 norm, and the other norms, narrow tiles and counting once (float32),
    which share the same code paths."""
    for dtype, t in _TYPE.items():
        acc = "fp64" if dtype == torch.float64 else "fp32"
        io = {"x_ptr": t, "out_ptr": t, "counts_ptr": "i64"}
        for aligned in (True, False):
            tag = f"{t}-{'aligned' if aligned else 'unaligned'}"
            for count in (False, True) if (dtype == torch.float32 and aligned) else (False,):
                yield Variant(f"ec_clamp_out-{tag}{'-count' if count else ''}",
                              error_clip._clamp_out_kernel, io,
                              _soft(error_clip.clamp_out_meta(dtype, aligned, count),
                                    soft_bf16))
            block = error_clip.stream_config(dtype)[0]
            fused = [("sumsq", 2.0, block, False)]
            if aligned and dtype in (torch.float32, torch.bfloat16):
                fused.append(("sumsq", 2.0, 64, False))  # short rows: 64 wide, many tall
            if aligned and dtype == torch.float32:
                fused += [("sumabs", 1.0, block, False), ("max", float("inf"), block, False),
                          ("sumpow", 3.5, block, False), ("sumsq", 2.0, block, True)]
            for norm_name, norm_type, row_len, count in fused:
                meta = error_clip.row_metas(dtype, aligned, norm_type, row_len, count)["fused"]
                yield Variant(f"ec_row_fused-{norm_name}-{tag}-w{meta['BLOCK_C']}"
                              f"{'-count' if count else ''}", error_clip._row_clip_fused_kernel,
                              io, _soft(meta, soft_bf16))
            long_row = error_clip.FUSED_ROW_MAX + 1
            split = error_clip.row_metas(dtype, aligned, 2.0, long_row, False)
            partial_norms = [("sumsq", 2.0)] if dtype in (torch.float32, torch.bfloat16) else []
            if aligned and dtype == torch.float32:
                partial_norms.append(("max", float("inf")))
            for norm_name, norm_type in partial_norms:
                meta = error_clip.row_metas(dtype, aligned, norm_type, long_row,
                                            False)["partials"]
                yield Variant(f"ec_row_partials-{norm_name}-{tag}",
                              error_clip._row_partials_kernel,
                              {"x_ptr": t, "partials_ptr": acc}, meta)
            yield Variant(f"ec_row_scale-{tag}", error_clip._row_scale_kernel,
                          {"x_ptr": t, "out_ptr": t, "coef_ptr": "fp32"},
                          _soft(split["scale"], soft_bf16))
    for norm_name, norm_type, partials, count in (
            ("sumsq", 2.0, "fp32", False), ("sumsq", 2.0, "fp64", False),
            ("max", float("inf"), "fp32", False), ("sumpow", 3.5, "fp32", False),
            ("sumsq", 2.0, "fp32", True)):
        meta = error_clip.row_metas(torch.float32, True, norm_type,
                                    error_clip.FUSED_ROW_MAX + 1, count)["finalize"]
        yield Variant(f"ec_row_finalize-{norm_name}-{partials}{'-count' if count else ''}",
                      error_clip._row_finalize_kernel,
                      {"partials_ptr": partials, "coef_ptr": "fp32", "counts_ptr": "i64"},
                      meta)
