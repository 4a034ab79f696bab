"""Compile the kernel variants of the registry (tritonclip.kernels.registry) for GPU targets, on a
machine without a GPU, and report what the PTX, the SASS and the resource usage say (for AMD
targets: the LLVM IR and the AMDGCN assembly with its metadata).

Run as a script (``python tests/codegen.py [TARGET ...]``, names from TARGETS, all by default)
with TRITON_INTERPRET unset: it prints one JSON object, {"variants": {"TARGET/VARIANT": {...}},
"disassembly": {TARGET: {...}}}. tests/test_codegen.py runs it in a subprocess, because kernels
that the interpreter has wrapped cannot be compiled.

Where the time goes (2 cores, triton 3.9): a compile takes about 0.5 s on a cold Triton cache and
0.02 s on a warm one (TRITON_CACHE_DIR, default ~/.triton/cache; the cache key covers the kernel
source, constexprs, options, target, triton and ptxas versions). nvdisasm spends about 0.3 s of
CPU starting, whatever the input: run once per kernel it took longer than the compiles, so each
target's kernels are disassembled in one run.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tritonclip.kernels.registry import variants


def _every_variant(name: str) -> bool:
    return True


def _sixteen_bit(name: str) -> bool:
    return re.search(r"-(fp16|bf16)-", name) is not None


# The targets, in one place: name -> (Triton target, which variants it compiles, by name).
# sm_90 (Hopper, the target of DESIGN.md's performance goals) compiles every variant. sm_80
# (Ampere) compiles the float16 and bfloat16 ones: measured with triton 3.9, every field the
# tests read was equal on the two archs for all 239 variants; what differs is ptxas's register
# allocation (spills are per arch), which peaks on sm_80 in the 16-bit variants (128 registers;
# float32 and float64 at most 80 of the 255 a thread can use). AMD's gfx942 (MI300, 64-lane
# wavefronts) compiles every variant and gfx90a (MI200) the 16-bit ones, by the same rule; their
# AMDGCN is read by amd_facts, CUDA's PTX and SASS by the functions below it.
TARGETS = {
    "sm90": (GPUTarget("cuda", 90, 32), _every_variant),
    "sm80": (GPUTarget("cuda", 80, 32), _sixteen_bit),
    "gfx942": (GPUTarget("hip", "gfx942", 64), _every_variant),
    "gfx90a": (GPUTarget("hip", "gfx90a", 64), _sixteen_bit),
}


def selection() -> dict[str, list[str]]:
    """Target name -> the names of the variants compiled for it."""
    names = [variant.name for variant in variants()]
    return {target: [name for name in names if compiles(name)]
            for target, (_, compiles) in TARGETS.items()}


_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# One SASS instruction: "/*0040*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;" -> offset, text
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", re.M)
_OPCODE = re.compile(r"^(?:@!?U?P\w+\s+)?(\S+)")


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(_BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout


def compile_variant(variant, target: GPUTarget):
    # As launched: the error-clip kernels' buffers are 16-byte aligned where the launcher
    # routes them to an aligned variant; the streaming kernels' per-call buffers are never
    # specialized on alignment, and the plan tables lie at any 8-byte offset.
    signature = variant.signature()
    aligned = variant.aligned_pointers()
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature)
             if arg in aligned}
    source = ASTSource(fn=variant.kernel, signature=signature, constexprs=variant.constexprs,
                       attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": variant.meta["num_warps"]})


def amd_facts(llir: str, amdgcn: str) -> dict:
    """What the tests read, from a HIP kernel's LLVM IR and AMDGCN assembly, under the keys
    of the CUDA reading (ptx_facts, sass_facts, local_memory_bytes)."""
    metadata = {key: int(value) for key, value in re.findall(
        r"^\s*\.(private_segment_fixed_size|vgpr_spill_count|sgpr_spill_count):\s*(\d+)",
        amdgcn, re.M)}
    return {
        # IEEE float division and sqrt: no fast-math flag or !fpmath accuracy on them
        "ieee_sqrt_div": (
            bool(re.search(r"call (?:<\d+ x )?(?:float|double)>? @llvm\.sqrt\.(?:v\d+)?"
                           r"f(?:32|64)\([^\n]*\)(?![^\n]*!fpmath)", llir)),
            bool(re.search(r"= fdiv (?:float|double) ", llir))
            and not re.search(r"= fdiv [^\n]*!fpmath", llir)),
        # the last-program handshake: an acquire-release agent-scope atomic after a barrier;
        # the acquire invalidates the compute unit's cache (L1), so the partials that follow
        # are read from L2
        "acq_rel_atomics": len(re.findall(r'atomicrmw [^\n]*syncscope\("agent"\) acq_rel',
                                          llir)),
        "barriers": len(re.findall(r"^\s*s_barrier\b", amdgcn, re.M)),
        "cg_loads": len(re.findall(r"^\s*(?:buffer_inv\b|buffer_wbinvl1)", amdgcn, re.M)),
        # 128-bit global accesses (plain or buffer)
        "ldg128": len(re.findall(r"^\s*(?:global|buffer)_load_dwordx4\b", amdgcn, re.M)),
        "stg128": len(re.findall(r"^\s*(?:global|buffer)_store_dwordx4\b", amdgcn, re.M)),
        # scratch (private segment) bytes, and spills (4 bytes a register)
        "local": metadata["private_segment_fixed_size"]
        + 4 * (metadata["vgpr_spill_count"] + metadata["sgpr_spill_count"]),
    }


def ptx_facts(ptx: str) -> dict:
    return {
        # IEEE-rounded float32 sqrt and division (the finalize epilogue's coefficient)
        # (float64 for float64 gradients: PTX's f64 division and sqrt are always IEEE)
        "ieee_sqrt_div": (bool(re.search(r"sqrt\.rn\.f(32|64)", ptx)),
                          bool(re.search(r"div\.rn\.f(32|64)", ptx))),
        # the last-program handshake: an acquire-release GPU-scope atomic after a barrier, and
        # partials read through L2
        "acq_rel_atomics": len(re.findall(
            r"atom\.[\w.]*acq_rel[\w.]*gpu|atom\.[\w.]*gpu[\w.]*acq_rel", ptx)),
        "barriers": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx)),
        "cg_loads": len(re.findall(r"ld\.global\.cg", ptx)),
        # float32 -> bfloat16 conversions, by rounding mode (rn: to nearest even)
        "bf16_cvt_modes": sorted(set(re.findall(r"cvt\.(\w+)\.bf16(?:x2)?\.f32", ptx))),
    }


def local_memory_bytes(cubin: bytes) -> int:
    """Per-thread local memory (spills and stack) as cuobjdump reads it (a few ms a call)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
    return int(re.search(r"LOCAL:(\d+)", usage).group(1))


def code_section(cubin: bytes) -> bytes:
    """The instructions of the cubin's one kernel: its ELF64 section ``.text.<kernel>``."""
    (section_headers,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, section_headers + i * entry_size)
               for i in range(count)]
    names_at = headers[names_index][4]

    def name(header) -> bytes:
        start = names_at + header[0]
        return cubin[start:cubin.index(b"\0", start)]

    (code,) = [cubin[h[4]:h[4] + h[5]] for h in headers if name(h).startswith(b".text.")]
    assert len(code) % 16 == 0, "SASS instructions are 16 bytes from sm_70 on"
    return code


def instructions(listing: str) -> list[tuple[int, str]]:
    """(byte offset, instruction text) of each instruction of an nvdisasm listing."""
    return [(int(offset, 16), text.strip()) for offset, text in _INSTRUCTION.findall(listing)]


def opcodes(listing: str) -> list[str]:
    return [_OPCODE.match(text).group(1) for _, text in instructions(listing)]


def disassemble_together(codes: list[bytes], sass_arch: str) -> list[list[str]]:
    """The instructions of each kernel, from one nvdisasm run over their code laid end to end
    (raw mode: nvdisasm decodes the same instructions as from each cubin; the run's check in
    ``disassembly_check`` compares one kernel both ways)."""
    starts, offset = [], 0
    for code in codes:
        starts.append(offset)
        offset += len(code)
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        listing = _tool("nvdisasm", "--binary", sass_arch, f.name)
    per_kernel = [[] for _ in codes]
    kernel = 0
    for offset, text in instructions(listing):
        while kernel + 1 < len(starts) and offset >= starts[kernel + 1]:
            kernel += 1
        per_kernel[kernel].append(text)
    return per_kernel


def sass_arch(ptx: str) -> str:
    """nvdisasm's name of the architecture the PTX targets: sm_90a -> SM90a."""
    return "SM" + re.search(r"^\.target\s+sm_(\w+)", ptx, re.M).group(1)


def sass_facts(sass: list[str]) -> dict:
    return {"ldg128": sum(bool(re.search(r"\bLDG\.E\.128\b", i)) for i in sass),
            "stg128": sum(bool(re.search(r"\bSTG\.E\.128\b", i)) for i in sass)}


def disassembly_check(cubin: bytes, batched: list[str]) -> dict:
    """One kernel disassembled from its own cubin (ELF mode, as cuobjdump -sass does) against
    its share of the batched run: the batched reading is only as good as this agreement."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        own = opcodes(_tool("nvdisasm", "--print-code", f.name))
    return {"same_opcodes": own == [_OPCODE.match(i).group(1) for i in batched],
            "instructions": len(own), **sass_facts(batched)}


def target_report(name: str, chosen: list) -> tuple[dict, dict]:
    """Reports of the ``chosen`` variants compiled for target ``name``, and the disassembly
    check of the one in the middle (the split of the batched listing matters there)."""
    target = TARGETS[name][0]
    compiled = [compile_variant(variant, target) for variant in chosen]
    if target.backend == "hip":  # (Triton hands the assembly over: nothing to disassemble)
        return {f"{name}/{variant.name}": amd_facts(c.asm["llir"], c.asm["amdgcn"])
                for variant, c in zip(chosen, compiled)}, None
    sass = disassemble_together([code_section(c.asm["cubin"]) for c in compiled],
                                sass_arch(compiled[0].asm["ptx"]))
    reports = {f"{name}/{variant.name}": {**ptx_facts(c.asm["ptx"]), **sass_facts(s),
                                          "local": local_memory_bytes(c.asm["cubin"])}
               for variant, c, s in zip(chosen, compiled, sass)}
    middle = len(chosen) // 2
    check = dict(disassembly_check(compiled[middle].asm["cubin"], sass[middle]),
                 variant=chosen[middle].name)
    return reports, check


def main(targets: list[str]) -> None:
    by_name = {variant.name: variant for variant in variants()}
    chosen = selection()
    result = {"variants": {}, "disassembly": {}}
    for name in targets:
        reports, check = target_report(name, [by_name[v] for v in chosen[name]])
        result["variants"].update(reports)
        if check is not None:
            result["disassembly"][name] = check
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:] or list(TARGETS))
