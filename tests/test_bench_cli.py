"""The benchmark CLI end to end on a small case (the CPU path), and its bookkeeping."""

import json
import math
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import torch

from tritonclip import kernels
from tritonclip.bench import cases, cli, report, shapes, timing

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def short_timing(monkeypatch):
    """Exactly --reps timed rounds per case (no minimum of sampled time): these tests check
    bookkeeping, not timing quality, and must stay fast."""
    monkeypatch.setattr(timing, "CPU_MIN_SAMPLED_MS", 0.0)


@pytest.fixture
def never_unstable(monkeypatch):
    """No time counts as unstable, so that every ratio is written whatever the machine's
    load (for tests of the ratios' bookkeeping)."""
    monkeypatch.setattr(report, "UNSTABLE_SPREAD", math.inf)


def _needs_bench_extra():
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")


def test_cli_writes_results_table_and_plots(tmp_path, capsys, short_timing):
    _needs_bench_extra()
    cli.main(["--cases", "lstm-2layer,many-small", "--ops", "active,value,amp,step", "--quick",
              "--reps", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "The Triton kernels need a GPU for speed" in out
    assert "lstm-2layer" in out and "speedup" in out
    assert "nanx" not in out and " nan" not in out.lower() and "0.00x" not in out
    result = json.loads((tmp_path / "results.json").read_text())
    machine = result["machine"]
    for key in ("device", "torch", "triton", "cuda", "commit", "load_average_1min", "cpu_count",
                "busy"):
        assert key in machine
    assert result["copy_bandwidth_gbps"] > 0
    assert result["tritonclip_backend"] == {"fp32": "torch backend"}
    records = result["results"]
    assert {r["impl"] for r in records} == {"tritonclip", "torch-foreach", "torch-loop",
                                            "optimizer-only"}
    assert {r["set"] for r in records} == {"lstm-2layer", "10x4K", "100x4K", "1000x4K"}
    for r in records:
        assert r["time_ms"] == r["p20_ms"] > 0  # the CPU's statistic
        assert r["min_ms"] <= r["p20_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["reps"] == 3 and r["gbps"] > 0 and r["copy_fraction"] > 0
        assert r["unstable"] == (r["spread"] > report.UNSTABLE_SPREAD) or "unstable_reason" in r
        if not (r["impl"] == "tritonclip" and r["op"] == "value"):
            assert r["bytes_moved"] == cases.PASSES[r["impl"]][r["op"]] * r["grad_bytes"]
        elif r["family"] == "many-small":  # CPU path: 4K-element tensors clamp in two passes
            assert r["bytes_moved"] == 4 * r["grad_bytes"]
        assert "speedup_vs_torch" in r or r["unstable"] or r["impl"] == "optimizer-only"
        assert "wall_ms_per_call" not in r  # on the CPU every time already is a wall time
    assert {r["op"] for r in records} == {"active", "value", "amp", "step"}
    step = [r for r in records if r["op"] == "step" and r["impl"] == "tritonclip"]
    assert len(step) == 4
    torch_step = {r["set"]: r for r in records if r["op"] == "step"
                  and r["impl"] == "torch-foreach"}
    for r in step:
        assert "clip_overhead_ms" in r
        theirs = torch_step[r["set"]]
        assert ("overhead_vs_torch" in r) == (r["clip_overhead_resolved"] and not r["unstable"]
                                              and theirs["clip_overhead_resolved"])
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert pngs == ["many-small-fp32.png", "model-fp32.png"]


@pytest.mark.parametrize("argv, names", [
    pytest.param(["--cases", "resnet9000"], ["resnet9000", "gpt2-small", "one-tensor",
                                             "many-small"], id="case"),
    pytest.param(["--cases", "lstm-2layer,nosuch"], ["nosuch", "lstm-2layer"], id="case-list"),
    pytest.param(["--ops", "bogus"], ["bogus", "active", "error_clip"], id="op"),
    pytest.param(["--dtype", "fp8"], ["fp8", "bf16", "mixed"], id="dtype"),
    pytest.param(["--reps", "0"], ["positive integer"], id="reps-0"),
    pytest.param(["--reps", "-3"], ["positive integer"], id="reps-negative"),
    pytest.param(["--reps", "2.5"], ["positive integer"], id="reps-float"),
    pytest.param(["--reps", "many"], ["positive integer"], id="reps-word"),
    pytest.param(["--threads", "0"], ["positive integer"], id="threads-0"),
])
def test_invalid_arguments_are_argparse_errors_naming_the_choices(argv, names, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert argv[0] in err
    for name in names:
        assert name in err


def test_valid_arguments_parse():
    """(The negative control of the test above: the same options with good values.)"""
    args = cli.parse_args(["--cases", "lstm-2layer,many-small", "--ops", "active,value",
                           "--dtype", "fp32,bf16", "--reps", "3", "--threads", "2"])
    assert args.cases == ["lstm-2layer", "many-small"] and args.ops == ["active", "value"]
    assert args.dtype == ["fp32", "bf16"] and args.reps == 3 and args.threads == 2
    args = cli.parse_args([])
    assert args.cases == ["all"] and args.reps == cli.DEFAULT_REPS and args.threads == 1
    assert cli._selection(cli.parse_args(["--ops", "all", "--dtype", "all"]),
                          torch.device("cpu"))[3:] == (list(cases.DTYPES), list(cases.OPS))


@pytest.mark.parametrize("module", ["tqdm", "matplotlib"])
def test_missing_bench_extra_exits_with_the_install_line(module, monkeypatch, tmp_path):
    assert cli.require_bench_extra() is None  # negative control: both are installed here
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without it does
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--quick", "--out", str(tmp_path)])
    message = exit_info.value.code
    assert isinstance(message, str)  # printed to stderr, exit status 1
    assert module in message and "'bench' extra" in message
    assert 'pip install "tritonclip[bench]"' in message
    assert 'pip install -e ".[bench]"' in message
    assert not os.listdir(tmp_path)  # it stopped before timing anything


def test_missing_bench_extra_exits_without_a_traceback(tmp_path):
    code = ("import sys; sys.modules['tqdm'] = None; from tritonclip.bench.cli import main; "
            f"main(['--quick', '--out', {str(tmp_path)!r}])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert 'pip install "tritonclip[bench]"' in done.stderr


def test_install_line_names_the_extra_that_holds_tqdm_and_matplotlib():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    bench = {requirement.split(">")[0].split("=")[0].split("[")[0].strip()
             for requirement in extras["bench"]}
    assert {"tqdm", "matplotlib"} <= bench
    assert "tritonclip[bench]" in cli.INSTALL_HINT


def _record(impl, time_ms, spread=0.1, op="norm", name="s", family="model"):
    """A timed record as the CLI writes it, with the given statistic and spread."""
    return {"set": name, "family": family, "tensors": 4 if family == "many-small" else 1,
            "dtype": "fp32", "op": op, "impl": impl, "grad_bytes": 2**20,
            "min_ms": time_ms, "p20_ms": time_ms, "median_ms": time_ms * (1 + spread / 2),
            "p75_ms": time_ms * (1 + spread), "p80_ms": time_ms * (1 + spread),
            "time_ms": time_ms, "spread": spread, "reps": 5, "bytes_moved": 2**20,
            "gbps": 2**20 / time_ms / 1e6, "copy_fraction": 0.5}


def _result(records, backend="torch backend", device="AMD EPYC (2 cores)"):
    return {"machine": {"device": device, "device_type": "cpu", "torch": "2.x", "triton": "3.x",
                        "cuda": None, "commit": "0123456789abcdef", "cpu_count": 2,
                        "load_average_1min": 0.5, "busy": False, "cpu_threads": 1},
            "method": {"threads": 1, "statistic": "20th percentile", "time_ms_field": "p20_ms"},
            "tritonclip_backend": {"fp32": backend}, "copy_bandwidth_gbps": 10.0,
            "warnings": [], "results": report.with_ratios(records)}


def _row(table: str, name: str, op: str) -> str:
    return next(line for line in table.splitlines() if line.split()[:3] == [name, "fp32", op])


def _speedup_cell(table: str, name: str) -> str:
    """The speedup cell of a synthetic row: the one after tritonclip's time (1.500 ms)."""
    cells = _row(table, name, "norm").split()
    return cells[cells.index("1.500") + 1]


def test_speedup_is_torch_foreach_time_over_ours():
    records = [_record("torch-foreach", 3.0), _record("tritonclip", 1.5),
               {"set": "s", "dtype": "fp32", "op": "norm", "impl": "torch-loop", "skipped": "x"}]
    report.with_ratios(records)
    assert records[1]["speedup_vs_torch"] == 2.0 and records[0]["speedup_vs_torch"] == 1.0
    assert "speedup_vs_torch" not in records[2]
    assert not records[1]["unstable"] and not records[0]["unstable"]


def test_unstable_times_get_no_speedup_and_are_marked():
    threshold = report.UNSTABLE_SPREAD
    records = [
        _record("torch-foreach", 3.0, name="stable"),
        _record("tritonclip", 1.5, spread=threshold, name="stable"),  # at the limit: stable
        _record("torch-foreach", 3.0, name="ours-noisy"),
        _record("tritonclip", 1.5, spread=threshold * 1.5, name="ours-noisy"),
        _record("torch-foreach", 3.0, spread=threshold * 20, name="torch-noisy"),
        _record("tritonclip", 1.5, name="torch-noisy"),
    ]
    table = report.format_table(_result(records))
    by_set = {(r["set"], r["impl"]): r for r in records}
    assert by_set[("stable", "tritonclip")]["speedup_vs_torch"] == 2.0  # negative control
    assert not by_set[("stable", "tritonclip")]["unstable"]
    assert _speedup_cell(table, "stable") == "2.00x"
    assert "unstable" not in _row(table, "stable", "norm")
    for name in ("ours-noisy", "torch-noisy"):
        ours = by_set[(name, "tritonclip")]
        assert ours["unstable"] is True and "speedup_vs_torch" not in ours
        assert _speedup_cell(table, name) == "unstable"
        assert f"spread > {threshold}: " in _row(table, name, "norm")  # the note says whose
    assert "torch-foreach" in by_set[("torch-noisy", "tritonclip")]["unstable_reason"]
    assert by_set[("torch-noisy", "torch-foreach")]["unstable"] is True
    json.dumps([r for r in records], allow_nan=False)  # no NaN or inf in the JSON


@pytest.mark.parametrize("value, text", [(2.0, "2.00x"), (0.5, "0.50x"), (0.001, "<0.01x"),
                                         (float("nan"), "-"), (float("inf"), "-"), (0.0, "-"),
                                         (-1.3, "-"), (None, "-")])
def test_ratios_never_print_nan_or_zero(value, text):
    assert report.format_ratio(value) == text


@pytest.mark.parametrize("ours_ms, torch_ms, cell, ratio", [
    pytest.param(12.0, 15.0, "0.40x", 0.4, id="both-resolved"),
    pytest.param(9.9, 15.0, "~0", None, id="ours-negative"),
    pytest.param(10.01, 15.0, "~0", None, id="ours-within-noise"),
    pytest.param(12.0, 10.01, "torch ~0", None, id="torch-within-noise"),
])
def test_step_overhead_within_noise_is_shown_as_zero(ours_ms, torch_ms, cell, ratio):
    records = [_record("optimizer-only", 10.0, spread=0.02, op="step"),
               _record("torch-foreach", torch_ms, spread=0.02, op="step"),
               _record("tritonclip", ours_ms, spread=0.02, op="step")]
    table = report.format_table(_result(records))
    ours = records[2]
    assert ours["clip_overhead_ms"] == pytest.approx(ours_ms - 10.0)
    assert ours.get("overhead_vs_torch") == (pytest.approx(ratio) if ratio else None)
    assert _row(table, "s", "step").endswith(f" {cell:>9}")  # the last column, clip ovh
    assert " nan" not in table.lower() and "-0." not in table


def test_interleaved_timing_alternates_implementations(monkeypatch):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    monkeypatch.setattr(timing, "CPU_MIN_SAMPLED_MS", 0.0)
    stats = timing.time_each(fns, torch.device("cpu"), 3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert stats["a"]["reps"] == stats["b"]["reps"] == 3
    assert stats["a"]["time_ms"] == stats["a"]["p20_ms"]
    calls.clear()  # short calls continue until the sampled time is reached, up to the cap
    monkeypatch.setattr(timing, "CPU_MIN_SAMPLED_MS", 1e9)
    monkeypatch.setattr(timing, "CPU_MAX_REPS", 7)
    assert timing.time_each(fns, torch.device("cpu"), 3)["b"]["reps"] == 7


def test_summary_statistics():
    stats = timing.summarize([float(x) for x in range(10, 0, -1)])
    assert stats["min_ms"] == 1 and stats["median_ms"] == 5.5 and stats["reps"] == 10
    assert stats["p20_ms"] == pytest.approx(2.8) and stats["p75_ms"] == pytest.approx(7.75)
    assert timing.summarize([4.0])["p75_ms"] == 4.0


def test_machine_load_and_busy_warning(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 4.0, 3.0))
    load = timing.machine_load()
    assert load == {"load_average_1min": 5.0, "cpu_count": 2, "busy": True}
    assert "5.00" in cli.busy_warning(load) and "2 cores" in cli.busy_warning(load)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 4.0, 3.0))
    assert cli.busy_warning(timing.machine_load()) is None  # negative control

    def no_load_average():
        raise OSError("no load average here")
    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert timing.machine_load()["busy"] is False


@pytest.mark.parametrize("threads, load, busy", [(2, 5.0, True), (None, 0.5, False)])
def test_threads_and_busy_machine_are_stated_in_table_and_json(
        threads, load, busy, tmp_path, capsys, monkeypatch, short_timing):
    _needs_bench_extra()
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    seen = []
    time_each = timing.time_each

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return time_each(*args, **kwargs)
    monkeypatch.setattr(timing, "time_each", spy)
    before = torch.get_num_threads()
    argv = ["--cases", "many-small", "--ops", "norm", "--quick", "--reps", "2",
            "--out", str(tmp_path)]
    cli.main(argv + (["--threads", str(threads)] if threads else []))
    expected = threads or 1
    assert set(seen) == {expected}  # every measurement ran with the pinned count
    assert torch.get_num_threads() == before  # and it is restored afterwards
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["method"]["threads"] == result["machine"]["cpu_threads"] == expected
    assert f"threads: {expected} (torch intra-op)" in out
    assert result["machine"]["busy"] is busy
    assert result["machine"]["load_average_1min"] == load
    assert ("WARNING: this machine is busy" in out) is busy
    assert len(result["warnings"]) == (1 if busy else 0)


def test_plots_name_the_backend_and_read_cleanly(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from tritonclip.bench import plot

    figures = []
    close = plot.plt.close
    monkeypatch.setattr(plot.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    records = []
    for impl, scale in (("tritonclip", 1.0), ("torch-foreach", 2.0), ("torch-loop", 3.0)):
        for count in (100, 200, 500):  # under a decade: matplotlib labels minor ticks there
            records.append(_record(impl, scale * count / 100, name=f"{count}x4K",
                                   family="many-small", op="value"))
            records[-1]["tensors"] = count
        for nbytes, name in ((2**16, "1x64KB"), (2**22, "1x4MB")):
            records.append(dict(_record(impl, scale * nbytes / 2**20, name=name,
                                        family="one-tensor", op="value"), grad_bytes=nbytes))
        for model in ("lstm-2layer", "gpt2-small"):
            records.append(_record(impl, scale, name=model, op="value"))
    long_device = "A very long processor name, as some clouds report them (16 cores)"
    result = _result(records, device=long_device)
    paths = plot.plot_results(result, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == [
        "many-small-fp32.png", "model-fp32.png", "one-tensor-fp32.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    by_name = dict(zip((os.path.basename(p) for p in paths), figures))
    for fig in figures:
        fig.canvas.draw()  # tick labels are made at drawing time
    many = by_name["many-small-fp32.png"]
    for ax in many.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "200", "500"]
        assert all(not t.get_text() for t in ax.xaxis.get_minorticklabels())
    models = by_name["model-fp32.png"]
    for ax in models.axes:  # bars, and no line but the copy bandwidth
        assert [t.get_text() for t in ax.get_xticklabels()] == ["lstm-2layer", "gpt2-small"]
        assert [line.get_label() for line in ax.get_lines()] in ([], ["measured copy bandwidth"])
        assert len(ax.patches) == 2 * 3
    for fig in figures:
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "tritonclip (torch backend)" in legend and "torch-foreach" in legend
        title = fig._suptitle.get_window_extent()
        assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # not cut at either edge
    assert plot.impl_label("tritonclip", _result([], backend="Triton"), "fp32") == \
        "tritonclip (Triton)"
    assert plot.impl_label("tritonclip-compile", _result([], backend="Triton"), "fp32") == \
        "tritonclip-compile (Triton)"
    assert plot.impl_label("torch-foreach", result, "fp32") == "torch-foreach"


def test_backend_label_names_what_runs_on_the_cpu():
    assert cli.backend_label(torch.device("cpu"), "fp32") == "torch backend"


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
    assert shapes.numel(shapes.resnet18()) == 11_689_512 and len(shapes.resnet18()) == 62


def test_quick_runs_the_core_ops_and_full_runs_every_op():
    quick = cli.parse_args(["--quick"])
    full = cli.parse_args([])
    device = torch.device("cpu")
    assert cli._selection(quick, device)[4] == list(cases.QUICK_OPS)
    assert cli._selection(full, device)[4] == list(cases.OPS)
    assert set(cases.OPS) - set(cases.QUICK_OPS) == {"per_tensor", "agc", "error_clip"}
    # --quick on the CPU: small sets (a minute on 2 cores); on a GPU: the README's sets
    models, one, many = cli._selection(quick, device)[:3]
    assert models == ["resnet18", "lstm-2layer"] and max(one) <= 64 * 2**20
    assert max(many) <= 1000
    assert cli._selection(quick, torch.device("cuda"))[0] == ["gpt2-small", "lstm-2layer"]


def test_error_clip_case_clips_rows_like_the_hook_recipe(tmp_path, capsys, short_timing,
                                                        never_unstable):
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
    _needs_bench_extra()
    cli.main(["--cases", "lstm-2layer", "--ops", "error_clip", "--quick", "--reps", "2",
              "--no-compile", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    timed = {r["impl"]: r for r in records if "time_ms" in r}
    assert set(timed) == {"tritonclip", "torch-loop"}
    assert timed["tritonclip"]["bytes_moved"] == 3 * timed["tritonclip"]["grad_bytes"]  # CPU
    assert timed["torch-loop"]["bytes_moved"] == 3 * timed["torch-loop"]["grad_bytes"]
    assert "speedup_vs_torch" in timed["tritonclip"]  # against the loop: no foreach recipe


def test_tuning_sweep_launches_every_candidate_and_restores_the_default(tmp_path, monkeypatch,
                                                                       short_timing):
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


def test_compile_compares_compiled_clips_in_the_same_run(tmp_path, capsys, short_timing,
                                                         never_unstable):
    """--compile times torch's and tritonclip's clips under torch.compile, side by side."""
    _needs_bench_extra()
    cli.main(["--cases", "lstm-2layer", "--ops", "active,step", "--quick", "--compile",
              "--reps", "2", "--out", str(tmp_path)])
    assert "compiled x" in capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    by_key = {(r["op"], r["impl"]): r for r in records}
    for op in ("active", "step"):
        ours, theirs = by_key[(op, "tritonclip-compile")], by_key[(op, "torch-compile")]
        assert ours["time_ms"] > 0 and theirs["time_ms"] > 0
        assert ours["speedup_vs_torch_compile"] == theirs["time_ms"] / ours["time_ms"]
    step = by_key[("step", "tritonclip-compile")]
    assert "clip_overhead_ms" in step
    assert ("overhead_vs_torch" in step) == (
        step["clip_overhead_resolved"]
        and by_key[("step", "torch-compile")]["clip_overhead_resolved"])


def test_train_step_runs_every_clip_and_their_norms_agree(tmp_path, capsys):
    """The training-step benchmark on the tiny decoder: every implementation timed, the
    norms of one step from the same weights agree, results written."""
    import json

    from tritonclip.bench import train_step

    assert train_step.main(["--model", "tiny", "--reps", "2", "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "train-step.json").read_text())
    assert [r["implementation"] for r in result["records"]] == list(train_step.IMPLEMENTATIONS)
    assert result["norms_agree"] and len(result["norms"]) == 4
    assert "tritonclip-overlap" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_step.main(["--model", "gpt3"])
