"""The built wheel carries conf/ and works from any directory without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest.importorskip("hatchling")


@pytest.fixture(scope="module")
def wheel_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel (no isolation: hatchling is a dev dependency) and install it, no deps."""
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target = tmp / "dist", tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO),
        ],
        check=True,
    )
    wheels = list(dist.glob("qcflow-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheels[0]),
        ],
        check=True,
    )
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_wheel_contains_configs(wheel_target: Path) -> None:
    conf = wheel_target / "qcflow" / "conf"
    assert (conf / "config.yaml").is_file()
    assert (conf / "experiment" / "synth.yaml").is_file()
    assert (conf / "hydra" / "default.yaml").is_file()


def test_installed_wheel_runs_from_other_directory(wheel_target: Path, tmp_path: Path) -> None:
    where = _run_installed(wheel_target, tmp_path, "-c", "import qcflow; print(qcflow.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(wheel_target), where.stdout

    res = _run_installed(
        wheel_target, tmp_path, "-m", "qcflow", "experiment=validate", "--cfg", "job"
    )
    assert res.returncode == 0, res.stderr
    assert "task: validate" in res.stdout
    assert "spacing: 2.0" in res.stdout

    helped = _run_installed(wheel_target, tmp_path, "-m", "qcflow", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "synth" in helped.stdout and "validate" in helped.stdout
    assert not any(tmp_path.iterdir()), "nothing may be written into the working directory"
