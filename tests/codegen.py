"""Compile every kernel specialization the dispatcher can launch for a GPU target, on a
machine without a GPU, and report what the SASS and resource usage say.

Run as a script (``python tests/codegen.py 80 90``) with TRITON_INTERPRET unset: it prints
one JSON object, {name: {"ldg128": ..., "stg128": ..., "local": ..., "registers": ...,
"bf16_cvt_modes": [...]}}. tests/test_codegen.py runs it in a subprocess, because kernels that the
interpreter has wrapped cannot be compiled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonclip.kernels import clamp, norm, scale
from tritonclip.kernels import error_clip as ec
from tritonclip.kernels.config import finalize_config, stream_config, stream_meta

_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_NORMS = {"sumsq": 2.0, "sumabs": 1.0, "sumpow": 3.5, "max": float("inf"), "min": float("-inf"),
          "count": 0.0}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _stream_pointers():
    """The leading arguments every streaming kernel takes: the plan's two streams."""
    return {"first_table": "*i64", "first_spans": "i32", "first_chunks": "i32",
            "second_table": "*i64", "second_spans": "i32", "second_chunks": "i32"}


# The norm kernel's modes: partials only (then a per-span finalize), the group's value by the
# last program (FUSED), and that plus the clip epilogue (with or without SKIP_NONFINITE).
_NORM_MODES = {"partials": (False, False, False, False), "fused": (True, False, False, False),
               "clip": (True, True, False, False), "clip-skip": (True, True, True, False),
               "amp": (True, True, False, True), "amp-skip": (True, True, True, True)}


def specializations():
    """(name, kernel, signature, constexprs, num_warps) for every launchable variant."""
    for dtype in _TYPE:
        meta = dict(stream_meta(dtype))
        warps = meta.pop("num_warps")
        for aligned in (True, False):
            common = dict(meta, ALIGNED=aligned)
            tag = f"{_TYPE[dtype]}-{'aligned' if aligned else 'unaligned'}"
            for norm_name, norm_type in _NORMS.items():
                acc = _TYPE[norm.accumulation_dtype(dtype, norm_type)]
                for mode, (fused, epilogue, skip, unscale) in _NORM_MODES.items():
                    if epilogue and not norm.fuses_coefficient(norm_type):
                        continue
                    if skip and not (dtype == torch.float32 and aligned):
                        continue  # SKIP_NONFINITE changes one select: compiled once per norm
                    if unscale and not (aligned and norm_name == "sumsq"):
                        continue  # the AMP epilogue: a few more scalar ops, once per dtype
                    yield (f"norm-{mode}-{norm_name}-{tag}", norm._norm_kernel,
                           dict(_stream_pointers(), partials_ptr=f"*{acc}", counter_ptr="*i64",
                                out_ptr=f"*{acc}", norm_ptr="*fp32", coef_ptr="*fp32",
                                inv_scale_ptr="*fp32", found_ptr="*fp32",
                                p_bits="i64", max_norm="fp32", eps="fp32"),
                           dict(common, NORM=norm.norm_mode(norm_type), FUSED=fused,
                                EPILOGUE=epilogue, SKIP_NONFINITE=skip, UNSCALE=unscale,
                                FINALIZE_BLOCK=finalize_config()[0]), warps)
            for suffix, skip in (("", True), ("-noskip", False)):
                # one coefficient (scale_; the unused order pointer is the coefficient's)
                yield (f"scale-{tag}{suffix}", scale._scale_kernel,
                       dict(_stream_pointers(), coef_ptr="*fp32", order_ptr="*fp32"),
                       dict(common, SOFT_BF16=False, SKIP_AT_LEAST_ONE=skip, PER_SPAN=False),
                       warps)
            coef = "fp64" if dtype == torch.float64 else "fp32"
            for suffix, skip in (("", True), ("-noskip", False)):
                # a coefficient per row (scale_each_)
                yield (f"scale_each-{tag}{suffix}", scale._scale_kernel,
                       dict(_stream_pointers(), coef_ptr=f"*{coef}", order_ptr="*i64"),
                       dict(common, SOFT_BF16=False, SKIP_AT_LEAST_ONE=skip, PER_SPAN=True),
                       warps)
            yield (f"clamp-{tag}", clamp._clamp_kernel,
                   dict(_stream_pointers(), lo_bits="i64", hi_bits="i64"),
                   dict(common, SOFT_BF16=False), warps)
            if dtype == torch.float32:
                # A bound of 0.0 has bits 0, which Triton passes as i32.
                yield (f"clamp-{tag}-zero-bound", clamp._clamp_kernel,
                       dict(_stream_pointers(), lo_bits="i32", hi_bits="i64"),
                       dict(common, SOFT_BF16=False), warps)
    block, warps = finalize_config()
    for norm_name, norm_type in _NORMS.items():
        for partials in ("fp32", "fp64"):
            if norm_name == "count" and partials == "fp32":
                continue
            yield (f"finalize-{norm_name}-{partials}", norm._finalize_kernel,
                   {"partials_ptr": f"*{partials}", "segments_ptr": "*i64",
                    "out_ptr": f"*{partials}"},
                   dict(NORM=norm.norm_mode(norm_type), BLOCK=block), warps)
    yield from error_clip_specializations()


def error_clip_specializations():
    """The error-clip kernels (``ec_`` names): every dtype and alignment of the streaming
    ones at the p = 2 norm, and the other norms, narrow tiles and counting once (float32),
    which share the same code paths."""
    for dtype, t in _TYPE.items():
        block, warps = stream_config(dtype)
        acc = "fp64" if dtype == torch.float64 else "fp32"
        base = dict(DTYPE=ec.TL_DTYPES[dtype], ACC=ec.TL_DTYPES[ec.compute_dtype(dtype)],
                    VEC=16 // dtype.itemsize)
        for aligned in (True, False):
            tag = f"{t}-{'aligned' if aligned else 'unaligned'}"
            common = dict(base, ALIGNED=aligned)
            for count in (False, True) if (dtype == torch.float32 and aligned) else (False,):
                yield (f"ec_clamp_out-{tag}{'-count' if count else ''}", ec._clamp_out_kernel,
                       {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "counts_ptr": "*i64",
                        "numel": "i32", "lo_bits": "i64", "hi_bits": "i64"},
                       dict(common, CHUNK=ec.CLAMP_CHUNK_BYTES // dtype.itemsize, BLOCK=block,
                            SOFT_BF16=False, COUNT=count),
                       warps)
            fused = [("sumsq", 2.0, block, False)]
            if aligned and dtype in (torch.float32, torch.bfloat16):
                fused.append(("sumsq", 2.0, 64, False))  # short rows: 64 wide, many tall
            if aligned and dtype == torch.float32:
                fused += [("sumabs", 1.0, block, False), ("max", float("inf"), block, False),
                          ("sumpow", 3.5, block, False), ("sumsq", 2.0, block, True)]
            for norm_name, norm_type, width, count in fused:
                rows, width = ec.fused_tile(width, dtype)
                yield (f"ec_row_fused-{norm_name}-{tag}-w{width}{'-count' if count else ''}",
                       ec._row_clip_fused_kernel,
                       {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "counts_ptr": "*i64",
                        "n_rows": "i32", "row_len": "i32", "p": "fp32", "max_norm": "fp32",
                        "eps": "fp32"},
                       dict(common, NORM=ec.norm_mode(norm_type), BLOCK_R=rows, BLOCK_C=width,
                            SOFT_BF16=False, COUNT=count), 4)
            partial_norms = [("sumsq", 2.0)] if dtype in (torch.float32, torch.bfloat16) else []
            if aligned and dtype == torch.float32:
                partial_norms.append(("max", float("inf")))
            for norm_name, norm_type in partial_norms:
                yield (f"ec_row_partials-{norm_name}-{tag}", ec._row_partials_kernel,
                       {"x_ptr": f"*{t}", "partials_ptr": f"*{acc}", "row_len": "i32",
                        "chunks_per_row": "i32", "p": "fp32"},
                       dict(ACC=base["ACC"], VEC=base["VEC"], ALIGNED=aligned,
                            NORM=ec.norm_mode(norm_type), CHUNK=ec.SPLIT_CHUNK, BLOCK=block),
                       warps)
            yield (f"ec_row_scale-{tag}", ec._row_scale_kernel,
                   {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "coef_ptr": "*fp32", "row_len": "i32",
                    "chunks_per_row": "i32"},
                   dict(common, CHUNK=ec.SPLIT_CHUNK, BLOCK=block, SOFT_BF16=False), warps)
    fin_block, fin_warps = finalize_config()
    for norm_name, norm_type, partials, count in (
            ("sumsq", 2.0, "fp32", False), ("sumsq", 2.0, "fp64", False),
            ("max", float("inf"), "fp32", False), ("sumpow", 3.5, "fp32", False),
            ("sumsq", 2.0, "fp32", True)):
        yield (f"ec_row_finalize-{norm_name}-{partials}{'-count' if count else ''}",
               ec._row_finalize_kernel,
               {"partials_ptr": f"*{partials}", "coef_ptr": "*fp32", "counts_ptr": "*i64",
                "chunks_per_row": "i32", "p": "fp32", "max_norm": "fp32", "eps": "fp32"},
               dict(NORM=ec.norm_mode(norm_type), BLOCK=fin_block, COUNT=count), fin_warps)


def _tool(name, *args):
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout


def compile_report(arch: int, name, kernel, signature, constexprs, num_warps) -> dict:
    signature = dict(signature, **{key: "constexpr" for key in constexprs})
    # As launched: sizes (spans, chunks, offsets: all < 2**31) arrive as i32; fresh buffers
    # (partials, coefficient, outputs) are 16-byte aligned, which Triton specializes on; the
    # plan tables (and the counter at their end) are views at any 8-byte offset, so they get
    # no alignment.
    attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, kind) in enumerate(signature.items())
             if kind.startswith("*")
             and not arg.endswith(("table", "segments_ptr", "counter_ptr", "order_ptr"))}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = _tool("cuobjdump", "-sass", f.name)
        usage = _tool("cuobjdump", "-res-usage", f.name)
    return {
        "ldg128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
        "stg128": len(re.findall(r"\bSTG\.E\.128\b", sass)),
        "local": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        # IEEE-rounded float32 sqrt and division (the finalize epilogue's coefficient)
        "ieee_sqrt_div": ("sqrt.rn.f32" in compiled.asm["ptx"], "div.rn.f32" in compiled.asm["ptx"]),
        # float32 -> bfloat16 conversions, by rounding mode (rn: to nearest even)
        # the last-program handshake: an acquire-release GPU-scope atomic after a barrier, and
        # partials read through L2
        "acq_rel_atomics": len(re.findall(r"atom\.[\w.]*acq_rel[\w.]*gpu|atom\.[\w.]*gpu[\w.]*acq_rel", compiled.asm["ptx"])),
        "barriers": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", compiled.asm["ptx"])),
        "cg_loads": len(re.findall(r"ld\.global\.cg", compiled.asm["ptx"])),
        "bf16_cvt_modes": sorted(set(re.findall(r"cvt\.(\w+)\.bf16(?:x2)?\.f32", compiled.asm["ptx"]))),
    }


def main(archs: list[int]) -> None:
    report = {}
    for arch in archs:
        for name, kernel, signature, constexprs, num_warps in specializations():
            report[f"sm{arch}/{name}"] = compile_report(arch, name, kernel, signature,
                                                        constexprs, num_warps)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
