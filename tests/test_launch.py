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
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["compatible"]:
        pytest.skip(f"triton {result['triton']}: not a release the direct launch was checked "
                    f"on, so every launch goes through Triton")
    return result


def test_direct_launches_run_the_kernel_triton_would(report):
    keys = report["keys"]
    assert keys["wrong"] == []
    assert keys["compiled"] >= 8  # the probe's calls did cross specialization boundaries
    assert keys["callable_grid"]


def test_every_package_launch_matches_triton_and_skips_its_binding(report):
    package = report["package"]
    assert len(package) >= 40  # every scenario on two (device, stream) pairs
    for name, result in package.items():
        assert result["launches"] > 0, name
        assert result["same_calls"], name
        assert result["passed_through"], name
        assert result["through_triton"] == 0, name


def test_negative_controls_are_caught(report):
    controls = report["controls"]
    assert controls["coarse_key_wrong"] > 0  # a key blind to alignment and integer values
    assert controls["shuffled"] is False  # constexprs in the wrong order
    assert controls["stale"] is False  # the first call's tensors passed again


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


def test_direct_launch_is_on_for_checked_releases_and_can_be_switched_off():
    pytest.importorskip("triton.backends.nvidia")
    from tritonclip.kernels import launch

    code = ("from tritonclip.kernels import launch, norm;"
            "print(norm._launch_norm_kernel._direct, launch.direct_launch_enabled())")
    expected = "True True" if launch.COMPATIBLE else "False False"
    assert _run_compiled(["-c", code], TRITONCLIP_DIRECT_LAUNCH="1").strip() == expected
    assert _run_compiled(["-c", code], TRITONCLIP_DIRECT_LAUNCH="0").strip() == "False False"


def test_only_checked_releases_are_compatible():
    from tritonclip.kernels import launch

    for version, compatible in (("3.5.1", False), ("3.6.0", True), ("3.9.0", True),
                                ("3.10.0", False), ("4.0.0", False)):
        low, high = launch._CHECKED_RELEASES
        assert (low <= launch._version(version) <= high) is compatible, version


def test_host_benchmark_runs_and_reports_every_operation():
    pytest.importorskip("triton.backends.nvidia")
    out = _run_compiled(["-m", "tritonclip.bench.host", "--calls", "3", "--repeat", "1"])
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 * 4, out  # header, then 3 tensor sets x 4 operations
    for row in rows[1:]:
        direct, through_triton = float(row[2]), float(row[3])
        assert 0 < direct and 0 < through_triton, row
