"""kernels.launch.Launcher, checked without a GPU: compiled kernels launched into a null driver
(tests/launch_check.py, in a subprocess because the suite's kernels are interpreted)."""

import json
import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, os.path.join(_HERE, "launch_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_direct_launches_run_the_kernel_triton_would(report):
    keys = report["keys"]
    assert keys["wrong"] == []
    assert keys["compiled"] >= 8  # the probe's calls did cross specialization boundaries


def test_every_package_launch_matches_triton_and_skips_its_binding(report):
    package = report["package"]
    assert len(package) >= 20
    for name, result in package.items():
        assert result["launches"] > 0, name
        assert result["same_calls"], name
        assert result["through_triton"] == 0, name


def test_negative_controls_are_caught(report):
    # a key blind to alignment and integer values runs the wrong kernels; constexprs passed
    # in the wrong order change the launcher call
    assert report["controls"]["coarse_key_wrong"] > 0
    assert report["controls"]["shuffled_same_calls"] is False


def test_interpreted_kernels_go_through_triton():
    from tritonclip.kernels import launch, scale

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("the suite's kernels are compiled here")
    assert isinstance(scale._launch_scale_kernel, launch.Launcher)
    assert not scale._launch_scale_kernel._direct


def _run_compiled(args, **env):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="0", **env))
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_direct_launch_can_be_switched_off():
    pytest.importorskip("triton.backends.nvidia")
    code = ("from tritonclip.kernels import norm;"
            "print(norm._launch_norm_kernel._direct)")
    assert _run_compiled(["-c", code]).strip() == "True"
    assert _run_compiled(["-c", code], TRITONCLIP_DIRECT_LAUNCH="0").strip() == "False"


def test_host_benchmark_runs_and_reports_every_operation():
    pytest.importorskip("triton.backends.nvidia")
    out = _run_compiled(["-m", "tritonclip.bench.host", "--calls", "3", "--repeat", "1"])
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 * 4, out  # header, then 3 tensor sets x 4 operations
    for row in rows[1:]:
        direct, through_triton = float(row[2]), float(row[3])
        assert 0 < direct and 0 < through_triton, row
