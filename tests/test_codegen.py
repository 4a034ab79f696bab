"""GPU code generation, checked without a GPU: every kernel specialization the dispatcher can
launch is compiled for the targets of tests/codegen.py (NVIDIA sm_90 and AMD gfx942 every one,
sm_80 and gfx90a the 16-bit ones); the SASS (AMDGCN) must show 128-bit global accesses in the
streaming loops of the aligned variants, and no kernel may use local memory (scratch, spills).

The compile runs in a background process that tests/conftest.py starts after collection, and
these tests run last, so that it overlaps the rest of the suite."""

import pytest


@pytest.fixture(scope="module")
def report(codegen_output):
    return codegen_output["variants"]


def _variants(report, kind):
    return {name: info for name, info in report.items() if f"/{kind}-" in name}


def test_every_registry_variant_compiled(report):
    # The variants come from kernels.registry, which builds their constexprs with the
    # launchers' own functions (tests/test_launch.py checks that it covers every kernel,
    # dtype and alignment the public functions launch).
    from codegen import selection
    from tritonclip.kernels.registry import variants

    names = [variant.name for variant in variants()]
    assert len(set(names)) == len(names)
    chosen = selection()
    assert chosen["sm90"] == names and chosen["gfx942"] == names
    assert chosen["sm80"] and chosen["gfx90a"] == chosen["sm80"]
    assert set(report) == {f"{target}/{name}" for target, some in chosen.items()
                           for name in some}


def test_batched_disassembly_reads_what_each_cubin_holds(codegen_output):
    # Each target's kernels are disassembled in one nvdisasm run over their code laid end to
    # end; the kernel in the middle of the run, disassembled from its own cubin as well, must
    # come out the same, so the listing was split where the kernels meet.
    for target, check in codegen_output["disassembly"].items():
        assert check["same_opcodes"] and check["instructions"] > 0, (target, check)


@pytest.mark.parametrize("kind", ["norm", "scale", "scale_each", "clamp", "ec_clamp_out",
                                  "ec_row_fused", "ec_row_partials", "ec_row_scale"])
def test_aligned_streaming_loops_use_128_bit_accesses(report, kind):
    variants = _variants(report, kind)
    assert variants
    for name, info in variants.items():
        if "-aligned" in name:
            # (LDG.E.128 in the SASS; global_load_dwordx4 in the AMDGCN)
            assert info["ldg128"] > 0, f"{name}: no 128-bit load"
            if kind != "norm" and not kind.endswith("partials"):  # reductions store one value
                assert info["stg128"] > 0, f"{name}: no 128-bit store"


def test_negative_control_unaligned_variants_cannot_vectorize(report):
    # Proves the check above reads the SASS: without the alignment hints there is no 128-bit
    # access, so a passing aligned check is the hints' doing. (An aligned variant also holds
    # the unaligned loop of its second stream; an unaligned variant holds only that loop.)
    for name, info in report.items():
        if "-unaligned" in name:
            assert info["ldg128"] == 0 and info["stg128"] == 0, name


def test_no_kernel_uses_local_memory(report):
    spilled = {name: info["local"] for name, info in report.items() if info["local"]}
    assert not spilled


def test_bf16_stores_round_to_nearest_even(report):
    # (PTX's cvt names its rounding; AMD targets convert in integer code, not read here)
    for name, info in report.items():
        if name.startswith("sm") and "bf16" in name and any(f"/{kind}-" in name for kind in (
                "scale", "scale_each", "clamp", "ec_clamp_out", "ec_row_fused", "ec_row_scale")):
            assert info["bf16_cvt_modes"] == ["rn"], (name, info["bf16_cvt_modes"])


def test_last_program_handshake_is_ordered(report):
    # The fused norm's last program may read the partials only after every program's store:
    # a barrier before an acquire-release GPU-scope (AMD: agent-scope) atomic, and loads that
    # bypass L1 (AMD: the acquire's L1 invalidation before them).
    for name, info in report.items():
        fused = "/norm-fused-" in name or "/norm-clip" in name or "/norm-amp" in name
        if fused:
            assert info["acq_rel_atomics"] == 1 and info["barriers"] > 0, (name, info)
            assert info["cg_loads"] > 0, (name, info)
        elif "/norm-partials-" in name:  # negative control: no handshake without FUSED
            assert info["acq_rel_atomics"] == 0 and info["cg_loads"] == 0, (name, info)


def test_clip_epilogue_uses_ieee_division_and_sqrt(report):
    # The coefficient must match torch's bit for bit: approximate div/sqrt would not.
    for name, info in report.items():
        if "/norm-clip" in name or "/norm-amp" in name:
            sqrt_rn, div_rn = info["ieee_sqrt_div"]
            assert div_rn, name
            if "-sumsq-" in name:
                assert sqrt_rn, name


def test_error_clip_coefficient_uses_ieee_division_and_sqrt(report):
    # The row coefficient follows clip_grad_norm_'s formula: IEEE reciprocal, and for float32
    # accumulation an IEEE sqrt (tl.sqrt of float32 is an approximation).
    checked = 0
    for name, info in report.items():
        if "/ec_row_fused-" in name or "/ec_row_finalize-" in name:
            sqrt_rn, div_rn = info["ieee_sqrt_div"]
            assert div_rn, name
            if "-sumsq-" in name and "fp64" not in name:
                assert sqrt_rn, name
            checked += 1
    assert checked


def test_amd_reader_negative_controls():
    """amd_facts can say no: fast-math sqrt and division, scratch and spills, a
    workgroup-scope atomic and 64-bit accesses are all read as such."""
    from codegen import amd_facts

    clean = "    .private_segment_fixed_size: 0\n    .sgpr_spill_count: 0\n    .vgpr_spill_count: 0\n"
    ieee = amd_facts("  %1 = tail call <2 x float> @llvm.sqrt.v2f32(<2 x float> %0)\n"
                     "  %2 = fdiv float 1.0, %1\n", clean)
    assert ieee["ieee_sqrt_div"] == (True, True) and ieee["local"] == 0
    fast = amd_facts("  %1 = tail call afn float @llvm.sqrt.f32(float %0)\n"
                     "  %2 = fdiv arcp float 1.0, %1\n", clean)
    assert fast["ieee_sqrt_div"] == (False, False)
    spilled = clean.replace("private_segment_fixed_size: 0", "private_segment_fixed_size: 16")
    assert amd_facts("", spilled)["local"] == 16
    assert amd_facts("", clean.replace("vgpr_spill_count: 0", "vgpr_spill_count: 3"))["local"] == 12
    narrow = amd_facts('  %3 = atomicrmw add ptr addrspace(1) %7, i64 1 syncscope("workgroup") '
                       "acq_rel\n", clean + "    global_load_dwordx2 v[0:1], v[2:3], off\n")
    assert narrow["acq_rel_atomics"] == 0 and narrow["ldg128"] == 0
