"""The benchmark CLI end to end on a small case (the CPU path), and its bookkeeping."""

import json
import os

import pytest
import torch

from tritonclip import kernels
from tritonclip.bench import cases, cli, report, shapes


def test_cli_writes_results_table_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    cli.main(["--cases", "lstm-2layer,many-small", "--ops", "active,value,amp,step", "--quick",
              "--reps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "The Triton kernels need a GPU for speed" in out
    assert "lstm-2layer" in out and "speedup" in out
    result = json.loads((tmp_path / "results.json").read_text())
    machine = result["machine"]
    for key in ("device", "torch", "triton", "cuda", "commit"):
        assert key in machine
    assert result["copy_bandwidth_gbps"] > 0
    records = result["results"]
    assert {r["impl"] for r in records} == {"tritonclip", "torch-foreach", "torch-loop",
                                            "optimizer-only"}
    assert {r["set"] for r in records} == {"lstm-2layer", "100x4K", "1000x4K", "5000x4K"}
    for r in records:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_fraction"] > 0
        if not (r["impl"] == "tritonclip" and r["op"] == "value"):
            assert r["bytes_moved"] == cases.PASSES[r["impl"]][r["op"]] * r["grad_bytes"]
        elif r["family"] == "many-small":  # CPU path: 4K-element tensors clamp in two passes
            assert r["bytes_moved"] == 4 * r["grad_bytes"]
        assert "speedup_vs_torch" in r or r["impl"] == "optimizer-only"
        if r["family"] == "many-small" and r["op"] in ("value", "active", "amp"):
            assert r["wall_ms_per_call"] > 0  # with a restore between calls (active, amp) too
    assert {r["op"] for r in records} == {"active", "value", "amp", "step"}
    step = [r for r in records if r["op"] == "step" and r["impl"] == "tritonclip"]
    assert len(step) == 4 and all("overhead_vs_torch" in r for r in step)
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert pngs == ["many-small-fp32.png", "model-fp32.png"]


def test_unknown_case_is_rejected():
    with pytest.raises(SystemExit, match="unknown case"):
        cli.main(["--cases", "resnet9000", "--out", "unused"])


def test_speedup_is_torch_foreach_time_over_ours():
    records = [
        {"set": "s", "dtype": "fp32", "op": "norm", "impl": "torch-foreach", "median_ms": 3.0},
        {"set": "s", "dtype": "fp32", "op": "norm", "impl": "tritonclip", "median_ms": 1.5},
        {"set": "s", "dtype": "fp32", "op": "norm", "impl": "torch-loop", "skipped": "x"},
    ]
    report.with_ratios(records)
    assert records[1]["speedup_vs_torch"] == 2.0 and records[0]["speedup_vs_torch"] == 1.0
    assert "speedup_vs_torch" not in records[2]


def test_active_case_really_clips_on_every_call():
    grads = shapes.make_grads(shapes.many_small(3, 64), torch.float32, "cpu")
    params = cases.make_params(grads)
    cases.normalize_(grads)
    restore = cases.restorer("active", grads)
    fn = cases.callable_for("tritonclip", "active", params, grads)
    for _ in range(3):
        restore()
        assert float(fn()) == pytest.approx(cases.TOTAL_NORM, rel=1e-5)
    # Without the restore the clip would settle where the coefficient rounds to 1.
    assert cases.restorer("norm", grads) is None


def test_model_shape_sets_have_the_published_sizes():
    assert shapes.numel(shapes.gpt2_small()) == 124_439_808
    assert shapes.numel(shapes.vit_b16()) == 86_567_656
    assert shapes.numel(shapes.llama_7b()) == 6_738_415_616


def test_quick_runs_the_core_ops_and_full_runs_every_op():
    quick = cli.parse_args(["--quick"])
    full = cli.parse_args([])
    device = torch.device("cpu")
    assert cli._selection(quick, device)[4] == list(cases.QUICK_OPS)
    assert cli._selection(full, device)[4] == list(cases.OPS)
    assert set(cases.OPS) - set(cases.QUICK_OPS) == {"per_tensor", "agc", "error_clip"}


def test_error_clip_case_clips_rows_like_the_hook_recipe(tmp_path, capsys):
    grads = shapes.make_grads([(8, 300), (5000,), (3, 7)], torch.float32, "cpu")
    cases.normalize_(grads)
    before = [g.clone() for g in grads]
    ours = cases.callable_for("tritonclip", "error_clip", None, grads)()
    recipe = cases.callable_for("torch-loop", "error_clip", None, grads)()
    assert all(torch.equal(g, b) for g, b in zip(grads, before))  # out of place
    for a, b, g in zip(ours, recipe, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
        norms = torch.linalg.vector_norm(a.double(), dim=-1)
        assert (norms <= cases.ERROR_CLIP_MAX_NORM * (1 + 1e-5)).all()
        assert not torch.equal(a, g)  # negative control: the rows were really scaled
    with pytest.raises(KeyError):
        cases.callable_for("torch-foreach", "error_clip", None, grads)
    pytest.importorskip("tqdm")
    cli.main(["--cases", "lstm-2layer", "--ops", "error_clip", "--quick", "--reps", "2",
              "--no-compile", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    timed = {r["impl"]: r for r in records if "median_ms" in r}
    assert set(timed) == {"tritonclip", "torch-loop"}
    assert timed["tritonclip"]["bytes_moved"] == 3 * timed["tritonclip"]["grad_bytes"]  # CPU
    assert timed["torch-loop"]["bytes_moved"] == 3 * timed["torch-loop"]["grad_bytes"]
    assert "speedup_vs_torch" in timed["tritonclip"]  # against the loop: no foreach recipe


def test_tuning_sweep_launches_every_candidate_and_restores_the_default(tmp_path, monkeypatch):
    from tritonclip.bench import tune
    from tritonclip.kernels import config, scale

    blocks = []

    def record(kernel, meta):
        if kernel is scale._scale_kernel:
            blocks.append((meta["BLOCK"], meta["num_warps"]))
    monkeypatch.setattr(kernels.launch, "observers", [record])
    default = config.stream_config(torch.bfloat16)
    tune.main(["--allow-cpu", "--sizes-mb", "0.0625", "--dtype", "bf16", "--reps", "1",
               "--out", str(tmp_path)])
    assert config.stream_config(torch.bfloat16) == default
    result = json.loads((tmp_path / "tune.json").read_text())
    assert len(result["records"]) == len(tune.CANDIDATES) * len(tune.PASSES)
    assert len(result["best"]) == len(tune.PASSES)
    assert all(r["default_ms"] is not None for r in result["best"])
    # the scale pass really ran with each candidate's block and warps
    assert set(blocks) == {(b // 2, w) for b, w in tune.CANDIDATES}


def test_stream_tuning_refuses_blocks_too_small_for_the_warps():
    from tritonclip.kernels import config

    with pytest.raises(ValueError, match="bytes_per_iteration"):
        with config.stream_tuning(2048, 8):
            pass
    with pytest.raises(ValueError, match="num_warps"):
        with config.stream_tuning(8192, 3):
            pass


def test_compile_compares_compiled_clips_in_the_same_run(tmp_path, capsys):
    """--compile times torch's and tritonclip's clips under torch.compile, side by side."""
    pytest.importorskip("tqdm")
    cli.main(["--cases", "lstm-2layer", "--ops", "active,step", "--quick", "--compile",
              "--reps", "2", "--out", str(tmp_path)])
    assert "compiled x" in capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    by_key = {(r["op"], r["impl"]): r for r in records}
    for op in ("active", "step"):
        ours, theirs = by_key[(op, "tritonclip-compile")], by_key[(op, "torch-compile")]
        assert ours["median_ms"] > 0 and theirs["median_ms"] > 0
        assert ours["speedup_vs_torch_compile"] == theirs["median_ms"] / ours["median_ms"]
    assert "overhead_vs_torch" in by_key[("step", "tritonclip-compile")]
