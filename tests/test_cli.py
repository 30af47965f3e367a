"""The command line: help, config printing, task dispatch, errors, run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMALL_EMBEDDED
from tests.helpers import EXPERIMENTS, compose_cfg, run_cli


def test_help_lists_groups_and_experiments(tmp_path: Path) -> None:
    res = run_cli("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "== Experiments" in res.stdout and "== Config groups" in res.stdout
    for name in EXPERIMENTS:
        assert name in res.stdout
    for group in ("data:", "trainer:", "logger:", "paths:"):
        assert group in res.stdout


def test_cfg_job_prints_resolved_experiment(tmp_path: Path) -> None:
    res = run_cli("experiment=validate", "data.spacing=1", "--cfg", "job", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "task: validate" in res.stdout
    assert "spacing: 1" in res.stdout


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    assert cfg.task, name
    assert cfg.experiment_name == name
    # experiment files must start with '# @package _global_' or their keys nest silently
    assert "experiment" not in cfg


def test_unknown_task_is_one_line_error(tmp_path: Path) -> None:
    res = run_cli("task=nope", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("qcflow: error: unknown task 'nope'"), res.stderr
    assert "Traceback" not in res.stderr


def test_synth_cli_builds_dataset_and_writes_metrics(tmp_path: Path, small_embedded: Path) -> None:
    """The CLI reuses the dataset the fixture built (same config -> same folder)."""
    overrides = [f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()]
    run_dir = tmp_path / "run"
    res = run_cli("experiment=synth", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert Path(metrics["root"]) == small_embedded
    assert metrics["reused"] is True
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists(), "nothing depends on the current directory"


def test_default_run_folders_are_unique(tmp_path: Path, qcflow_home: Path) -> None:
    """Two runs in the same second get different folders under $QCFLOW_HOME/runs/<experiment>."""
    for _ in range(2):
        res = run_cli("task=nope", cwd=tmp_path)
        assert res.returncode == 1
    runs = list((qcflow_home / "runs" / "nope").iterdir())
    assert len(runs) == 2, runs


def test_renamed_method_b_overrides_fail_with_one_line_naming_the_new_form() -> None:
    """`uncertainty.<stage argument>=` moved to `uncertainty.module.<key>=`; pipeline keys stay."""
    from qcflow.cli import renamed_override

    assert renamed_override(["uncertainty.hce_task_var=own"]) == (
        "uncertainty.hce_task_var=own: method B's stage arguments moved; "
        "use uncertainty.module.hce_task_var=own"
    )
    assert "uncertainty.role is gone" in renamed_override(["uncertainty.role=student"])
    for fine in (["uncertainty.kinds=[noise]"], ["uncertainty.module.lr=1e-3"], ["seed=1"]):
        assert renamed_override(fine) is None, fine
    proc = run_cli("experiment=uncertainty_student", "uncertainty.artifact_lr_mult=5")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "qcflow: error: uncertainty.artifact_lr_mult=5: method B's stage arguments moved; "
        "use uncertainty.module.artifact_lr_mult=5"
    ]


def test_retired_method_b_switches_fail_with_one_line() -> None:
    """Switches that measured no gain (README of experiments/shaw2021_uncertainty, Switches)."""
    from qcflow.cli import renamed_override

    for arg, path in (
        ("uncertainty.module.kind_aux_weight=1", "uncertainty.module.kind_aux_weight"),
        ("uncertainty.context_lr_mult=1", "uncertainty.module.context_lr_mult"),
        ("+uncertainty.module.student_targets=own_kind", "uncertainty.module.student_targets"),
        ("model.context_max_offset=2", "model.context_max_offset"),
        ("uncertainty.teacher_negatives=0.5", "uncertainty.teacher_negatives"),
    ):
        message = renamed_override([arg])
        assert message is not None and f"{path} was retired" in message, arg
    assert renamed_override(["uncertainty.module.absent_kind_var=zero"]) is None  # the student's
    proc = run_cli("experiment=uncertainty_student", "uncertainty.module.kind_aux_weight=1")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "kind_aux_weight was retired" in proc.stderr
