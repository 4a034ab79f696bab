"""Compile every kernel variant of the registry (tritonclip.kernels.registry) for a GPU target,
on a machine without a GPU, and report what the SASS and resource usage say.

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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonclip.kernels.registry import variants

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name, *args):
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout


def compile_report(arch: int, variant) -> dict:
    signature = variant.signature()
    # As launched: the error-clip kernels' buffers are 16-byte aligned where the launcher
    # routes them to an aligned variant; the streaming kernels' per-call buffers are never
    # specialized on alignment, and the plan tables lie at any 8-byte offset.
    aligned = variant.aligned_pointers()
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature)
             if arg in aligned}
    source = ASTSource(fn=variant.kernel, signature=signature, constexprs=variant.constexprs,
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": variant.meta["num_warps"]})
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
        # (float64 for float64 gradients: PTX's f64 division and sqrt are always IEEE)
        "ieee_sqrt_div": (bool(re.search(r"sqrt\.rn\.f(32|64)", compiled.asm["ptx"])),
                          bool(re.search(r"div\.rn\.f(32|64)", compiled.asm["ptx"]))),
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
        for variant in variants():
            report[f"sm{arch}/{variant.name}"] = compile_report(arch, variant)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
