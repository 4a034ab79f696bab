"""GPU code generation, checked without a GPU: every kernel specialization the dispatcher can
launch is compiled for the targets of tests/codegen.py (sm_90 every one, sm_80 the 16-bit ones);
the SASS must show 128-bit global accesses in the streaming loops of the aligned variants, and no
kernel may use local memory (spills).

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
    assert chosen["sm90"] == names and chosen["sm80"]
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
            assert info["ldg128"] > 0, f"{name}: no LDG.E.128 in the SASS"
            if kind != "norm" and not kind.endswith("partials"):  # reductions store one value
                assert info["stg128"] > 0, f"{name}: no STG.E.128 in the SASS"


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
    for name, info in report.items():
        if "bf16" in name and any(f"/{kind}-" in name for kind in (
                "scale", "scale_each", "clamp", "ec_clamp_out", "ec_row_fused", "ec_row_scale")):
            assert info["bf16_cvt_modes"] == ["rn"], (name, info["bf16_cvt_modes"])


def test_last_program_handshake_is_ordered(report):
    # The fused norm's last program may read the partials only after every program's store:
    # a barrier before an acquire-release GPU-scope atomic, and loads that bypass L1.
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
