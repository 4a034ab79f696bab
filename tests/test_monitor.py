"""GradNormMonitor: device-side records, read once by to_dict(); the PNG plot."""

import math

import pytest
import torch

import tritonclip
from tritonclip import reference

BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter, id="triton"),
            pytest.param("torch", id="torch")]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def _backward(model, scale=1.0, seed=0):
    torch.manual_seed(seed)
    model.zero_grad()
    x = torch.randn(4, 8) * scale
    model(x).pow(2).mean().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_match_reference(backend):
    model = _model()
    monitor = tritonclip.GradNormMonitor(model, top_k=2, backend=backend)
    expected = []
    for step, scale in enumerate([0.1, 1.0, 30.0]):
        _backward(model, scale, seed=step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        total = monitor.record(threshold=1.0)
        assert isinstance(total, torch.Tensor)
        ref_total = float(reference.total_norm(list(grads.values()), 2.0))
        per_tensor = sorted(((float(g.double().norm()), n) for n, g in grads.items()),
                            reverse=True)
        expected.append((ref_total, per_tensor[:2]))
        tritonclip.clip_grad_norm_(model.parameters(), 1.0)
    # kept on the device until read
    assert all(isinstance(x, torch.Tensor) for x in monitor._norms + monitor._coefs)
    data = monitor.to_dict()
    assert data["step"] == [0, 1, 2]
    for i, (ref_total, top) in enumerate(expected):
        assert data["total_norm"][i] == pytest.approx(ref_total, rel=1e-6)
        assert data["threshold"][i] == 1.0
        assert data["clip_coef"][i] == pytest.approx(min(1.0 / (ref_total + 1e-6), 1.0),
                                                     rel=1e-6)
        assert [n for n, _ in data["top_k"][i]] == [n for _, n in top]
        for (_, value), (ref_value, _) in zip(data["top_k"][i], top):
            assert value == pytest.approx(ref_value, rel=1e-6)
    assert data["clipped"] == [t > 1.0 for t, _ in expected]
    summary = data["summary"]
    assert summary["steps"] == 3
    assert summary["clip_fraction"] == pytest.approx(sum(data["clipped"]) / 3)
    assert summary["nonfinite_steps"] == 0


def test_nonfinite_counts_and_annotate():
    model = _model()
    monitor = tritonclip.GradNormMonitor(model.named_parameters(), top_k=1)
    _backward(model)
    model[0].weight.grad[0, 0] = math.nan
    model[2].bias.grad[0] = math.inf
    monitor.record()
    monitor.annotate(threshold=torch.tensor(2.0), coef=torch.tensor(0.25))
    _backward(model, seed=1)
    monitor.record()  # no threshold: coefficient 1, not clipped
    data = monitor.to_dict()
    assert data["nonfinite"] == [2, 0]
    assert data["top_k"][0][0][0] in ("0.weight", "2.bias")  # a non-finite norm ranks first
    assert data["clip_coef"] == [0.25, 1.0] and data["clipped"] == [True, False]
    assert data["threshold"] == [2.0, None]
    assert data["summary"]["nonfinite_steps"] == 1


def test_plot_writes_a_png(tmp_path):
    model = _model()
    monitor = tritonclip.GradNormMonitor(model)
    for step in range(5):
        _backward(model, scale=10.0 ** (step - 2), seed=step)
        monitor.record(threshold=0.5)
    path = tmp_path / "norms.png"
    monitor.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_attach_feeds_the_monitor():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = tritonclip.GradNormMonitor(model)
    handle = tritonclip.attach(optimizer, adaptive=tritonclip.ZClip(warmup_steps=2),
                               monitor=monitor)
    for step in range(4):
        _backward(model, scale=float(step + 1), seed=step)
        optimizer.step()
    data = monitor.to_dict()
    assert data["step"] == [0, 1, 2, 3]
    assert data["total_norm"][-1] == pytest.approx(float(handle.last_norm), rel=1e-6)
    assert all(t is not None for t in data["threshold"])


def test_empty_and_bad_arguments(tmp_path):
    monitor = tritonclip.GradNormMonitor([])
    assert monitor.to_dict()["summary"]["steps"] == 0
    with pytest.raises(RuntimeError, match="record"):
        monitor.annotate(threshold=1.0)
    with pytest.raises(TypeError, match="pair"):
        tritonclip.GradNormMonitor([torch.zeros(2)])
    with pytest.raises(ValueError, match="top_k"):
        tritonclip.GradNormMonitor([], top_k=-1)
    monitor.record()
    assert monitor.to_dict()["total_norm"] == [0.0]


def test_to_dict_moves_the_records_to_the_host_once():
    model = _model()
    monitor = tritonclip.GradNormMonitor(model, top_k=2)
    norms = []
    for step in range(3):
        _backward(model, seed=step)
        norms.append(float(monitor.record(threshold=1.0)))
    first = monitor.to_dict()
    assert not monitor._norms  # the device records are released
    _backward(model, seed=3)
    norms.append(float(monitor.record()))
    second = monitor.to_dict()
    assert second["total_norm"] == pytest.approx(norms, rel=0, abs=0)
    assert second["step"] == [0, 1, 2, 3] and second["threshold"][3] is None
    assert second["top_k"][:3] == first["top_k"] and second["summary"]["steps"] == 4
    with pytest.raises(RuntimeError, match="to_dict"):
        monitor.annotate(threshold=2.0)  # the last step is already on the host


def test_wrong_argument_types_get_short_clear_errors():
    model = torch.nn.Linear(300, 300)
    with pytest.raises(TypeError, match=r"not model.parameters\(\)") as error:
        tritonclip.GradNormMonitor(model.parameters())
    assert len(str(error.value)) < 300  # not the tensor's values
    with pytest.raises(TypeError, match="Module or an iterable"):
        tritonclip.GradNormMonitor(5)
    with pytest.raises(TypeError, match=r"\(name, Tensor\) pair, got str"):
        tritonclip.GradNormMonitor(["weight"])
    with pytest.raises(TypeError, match="top_k must be an int"):
        tritonclip.GradNormMonitor(model, top_k="3")
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        tritonclip.GradNormMonitor(model, top_k=-1)
    tritonclip.GradNormMonitor(model.named_parameters(), top_k=0)  # control: accepted
