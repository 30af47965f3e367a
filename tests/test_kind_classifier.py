"""The self-supervised kind classifier (experiment=kind_classifier) and how a student finds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qcflow.errors import ConfigError
from qcflow.kspace import SHAW2021_KINDS
from tests.conftest import SMALL_EMBEDDED
from tests.helpers import compose_cfg, run_cli

TINY = [
    "data.spacing=4",
    *[f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()],
    "classifier.patch=16",
    "classifier.steps=4",
    "classifier.batch=3",
    "classifier.volumes=4",
    "classifier.holdout=1",
    "classifier.redraw=2",
    "classifier.log_every=2",
    "classifier.eval_volumes=1",
]


def test_kind_classifier_trains_saves_and_a_student_starts_from_the_latest(
    small_embedded: Path, tmp_path: Path
) -> None:
    from qcflow.cli import run_task
    from qcflow.models.unet import PatchContext
    from qcflow.tasks.kind_classifier import classifier_path
    from qcflow.tasks.uncertainty_train import _init_context, instantiate_module

    runs = Path(os.environ["QCFLOW_HOME"]) / "runs"
    out = runs / "kind_classifier" / "2026-01-01_00-00-00_test"
    cfg = compose_cfg(["experiment=kind_classifier", *TINY], out)
    results = run_task(cfg)
    assert (out / "metrics.json").is_file()
    saved = torch.load(out / "classifier.pt", weights_only=True)
    kinds = list(SHAW2021_KINDS)
    assert saved["classes"] == ["none", *kinds] and results["classes"] == saved["classes"]
    assert 0.0 <= results["heldout_patch_accuracy"] <= 1.0 and results["steps"] == 4
    # whole-volume decisions: one per (volume, row); shares are softmax averages (sum to 1)
    counts, share = results["volume_counts"], results["volume_share"]
    assert list(counts) == ["none", *kinds] and all(sum(r.values()) == 1 for r in counts.values())
    assert all(abs(sum(r.values()) - 1.0) < 1e-5 for r in share.values())
    assert 0 <= results["volume_own_kind"] <= 5 and results["volume_n"] == 1

    # a student with context_init=latest starts from it: its logits are log-odds against clean
    student = compose_cfg(
        ["experiment=uncertainty_student", "data.spacing=4", "model.filters=[4,8,16]"], tmp_path
    )
    assert classifier_path(student, "latest") == out / "classifier.pt"
    assert classifier_path(student, str(out)) == out / "classifier.pt"
    clf = PatchContext(1, 6, widths=saved["widths"])
    clf.load_state_dict(saved["state_dict"])
    module = instantiate_module(student)  # the YAML's student: context + attribution
    assert module.kinds == kinds and module.net.attribution
    _init_context(module, classifier_path(student, str(student.uncertainty.context_init)))
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        full = clf.logits(x)
        torch.testing.assert_close(module.net.context.logits(x), full[:, 1:] - full[:, :1])


def test_kind_classifier_bad_settings_fail_with_one_line(
    small_embedded: Path, tmp_path: Path
) -> None:
    from qcflow.tasks.kind_classifier import classifier_path, run

    with pytest.raises(ConfigError, match="holdout"):
        run(compose_cfg(["experiment=kind_classifier", *TINY, "classifier.holdout=8"], tmp_path))
    with pytest.raises(ConfigError, match="classifier.patch=64"):
        run(compose_cfg(["experiment=kind_classifier", *TINY, "classifier.patch=64"], tmp_path))
    with pytest.raises(ConfigError, match="steps >= 1"):
        run(compose_cfg(["experiment=kind_classifier", *TINY, "classifier.steps=0"], tmp_path))
    # no classifier run yet under another experiment name: names the folder and the command
    cfg = compose_cfg(
        ["experiment=uncertainty_student", "uncertainty.classifier_experiment=nothing_here"],
        tmp_path,
    )
    with pytest.raises(ConfigError, match="experiment=nothing_here"):
        classifier_path(cfg, "latest")


def test_kind_classifier_cli(small_embedded: Path, tmp_path: Path) -> None:
    res = run_cli(
        "experiment=kind_classifier", *TINY, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "classifier.pt").is_file()
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_patch_and_window_starts_cover_the_volume() -> None:
    from qcflow.tasks.kind_classifier import _patch_starts, _window_starts

    # margin 0: a patch may start anywhere (0..s-patch), as the student's uniform sampler
    assert _patch_starts((96, 112), 32, "v") == [(0, 65), (0, 81)]
    # a margin keeps patches off the faces, at most a quarter of the free space
    assert _patch_starts((96, 40), 32, "v", margin=16) == [(16, 49), (2, 7)]
    # sliding windows at the evaluation's stride reach the last voxel
    assert _window_starts(0, 65, 24) == [0, 24, 48, 64]
    assert _window_starts(0, 1, 24) == [0]
    with pytest.raises(ConfigError, match="smaller than classifier.patch=32"):
        _patch_starts((96, 20), 32, "sub-01")
