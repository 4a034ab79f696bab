"""examples/lstm_clipping.py runs end to end with tiny settings (torch ops on CPU)."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "lstm_clipping.py")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.delenv("TRITONCLIP_BACKEND", raising=False)
    spec = importlib.util.spec_from_file_location("lstm_clipping", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_and_writes_table_and_png(example, tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    try:
        results = example.main(["--steps", "12", "--hidden", "8", "--batch", "4",
                                "--length", "10", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "final loss" in out and "spike steps" in out and "wall time" in out
    for name in example.RECIPES:
        assert name in out
        assert len(results[name]["losses"]) == len(results[name]["norms"]) == 12
    png = tmp_path / "lstm_clipping.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_spike_counter(example):
    assert example.count_spikes([1.0, 1.0, 1.0, 5.0, 1.0, float("nan")]) == 2
    assert example.count_spikes([1.0, 0.9, 0.8, 0.7]) == 0
