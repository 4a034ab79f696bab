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
