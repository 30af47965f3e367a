"""Every experiment config composes and runs (issue 7): one cheap run of each
``conf/experiment/*.yaml``, found by glob, so a new experiment file is picked up automatically
and fails here until it runs.

Each experiment runs in process through the CLI's :func:`~qcflow.cli.run_task` (so
``metrics.json`` is written and later stages find it by experiment name) with ``debug=smoke``
-- one training and one validation batch, checkpoints kept: ``fast_dev_run`` writes no
checkpoint, so a later stage could not run after it -- on the small embedded data, with
``logger=[csv,wandb]`` (W&B disabled in tests: every task's W&B calls must be harmless).
Stages that need earlier ones (:data:`NEEDS`) run them first, once per module, in one shared
runs folder; the *_paper variants compose their own config and are shrunk by overrides only
(4 mm data, 16^3 patches, a 4-level U-Net).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from qcflow.cli import run_task
from tests.helpers import EXPERIMENTS, compose_cfg
from tests.test_iqc_pipeline import TINY, TINY_ENCODER, TINY_FLOW
from tests.test_uncertainty_cli import TINY as TINY_UNET

#: experiments whose outputs another experiment reads (found by name in the runs folder)
NEEDS: dict[str, tuple[str, ...]] = {
    "flow_density": ("encoder_contrastive",),
    "iqc_evaluate": ("flow_density",),
    "score": ("flow_density", "uncertainty_student"),
    "uncertainty_teacher": ("uncertainty_task",),
    "uncertainty_student": ("uncertainty_task", "uncertainty_teacher", "kind_classifier"),
    "uncertainty_evaluate": ("uncertainty_student",),
    "flow_density_paper": ("encoder_contrastive_paper",),
    "iqc_evaluate_paper": ("flow_density_paper",),
    "uncertainty_teacher_paper": ("uncertainty_task_paper",),
    "uncertainty_student_paper": ("uncertainty_task_paper", "uncertainty_teacher_paper"),
    "uncertainty_evaluate_paper": ("uncertainty_student_paper",),
}

#: shrinking overrides by task (so a new experiment of a known task gets them too)
BY_TASK: dict[str, list[str]] = {
    "synth": TINY,
    "validate": TINY,
    "encoder_contrastive": [*TINY, *TINY_ENCODER],
    "flow_density": [*TINY, *TINY_FLOW],
    "iqc_evaluate": TINY,
    "score": [*TINY, "score.density=true", "score.uncertainty=true", "score.max_scans=2"],
    # one artifact kind: the student needs one teacher (the paper student has all five)
    "uncertainty_train": [*TINY_UNET, "artifact=noise", "uncertainty.kinds=[noise]"],
    "uncertainty_evaluate": [*TINY_UNET, "evaluate.max_scans=1"],
    "kind_classifier": [
        *TINY_UNET,
        *[
            f"classifier.{k}={v}"
            for k, v in {
                "steps": 2,
                "batch": 2,
                "volumes": 3,
                "holdout": 1,
                "eval_volumes": 1,
            }.items()
        ],
    ],  # fmt: skip
}
#: uncertainty_*_paper: the paper U-Net keeps its deep supervision, which needs 4 levels at least
PAPER = ["model.filters=[4,8,16,32]"]


class Chain:
    """Runs experiments once each, dependencies first, in one runs folder."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.done: dict[str, tuple[DictConfig, dict[str, Any]] | BaseException] = {}

    def compose(self, name: str) -> DictConfig:
        """``experiment=name`` shrunk for its task, its output folder under the runs folder."""
        base = [f"experiment={name}", "debug=smoke", "logger=[csv,wandb]"]
        probe = compose_cfg(base, self.runs / "_probe")
        paper = PAPER if name.endswith("_paper") and probe.task.startswith("uncertainty") else []
        overrides = [*base, f"paths.runs_dir={self.runs}", *BY_TASK.get(probe.task, []), *paper]
        out = self.runs / str(probe.experiment_name) / "2026-01-01_00-00-00_smoke"
        return compose_cfg(overrides, out)

    def run(self, name: str) -> tuple[DictConfig, dict[str, Any]]:
        if name not in self.done:
            try:
                for need in NEEDS.get(name, ()):
                    self.run(need)
                cfg = self.compose(name)
                self.done[name] = (cfg, run_task(cfg))
            except BaseException as exc:  # a failed stage fails its dependents without rerun
                self.done[name] = exc
                raise
        result = self.done[name]
        if isinstance(result, BaseException):
            raise RuntimeError(f"experiment {name} failed earlier in this module") from result
        return result


@pytest.fixture(scope="module")
def chain(small_embedded: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    return Chain(tmp_path_factory.mktemp("experiment_runs"))


def test_every_experiment_is_covered() -> None:
    """The glob found the configs; the dependency table names only real experiments (a
    renamed file must update it)."""
    assert {"encoder_contrastive", "uncertainty_task", "score"} <= set(EXPERIMENTS)
    assert set(NEEDS) | {d for deps in NEEDS.values() for d in deps} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs(name: str, chain: Chain) -> None:
    cfg, results = chain.run(name)
    out = Path(cfg.paths.output_dir)
    assert (out / "metrics.json").is_file()
    if cfg.task in ("encoder_contrastive", "uncertainty_train"):
        assert (out / "checkpoints" / "last.ckpt").is_file()
        assert (out / "csv" / "metrics.csv").is_file()
        assert math.isfinite(results["train/loss"])
    if cfg.task == "flow_density":
        assert (out / "flow.pt").is_file()
    if cfg.task == "iqc_evaluate":
        assert 0.0 <= results["auroc"] <= 1.0
        assert (out / "figures" / "roc.png").is_file()
    if cfg.task == "uncertainty_evaluate":
        assert results["n_images"] >= 2 and (out / "scans.tsv").is_file()
    if cfg.task == "score":
        assert results["n_ok"] == results["n_scans"] == 2
    if name.endswith("_paper"):  # its own config, shrunk only by overrides
        assert cfg.experiment_name == name
        if cfg.task.startswith("uncertainty"):
            assert cfg.model.deep_supervision is True
