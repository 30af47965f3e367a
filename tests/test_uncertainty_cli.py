"""Method B experiments: fast_dev_run of each (composed real configs), and the CLI chain
task -> teachers (multirun) -> student -> evaluate in subprocesses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from qcflow.api import compose_config
from qcflow.models.unet import PatchContext
from qcflow.runs.stages import latest_teacher_run
from qcflow.tasks.uncertainty_train import instantiate_module
from tests.conftest import SMALL_EMBEDDED
from tests.helpers import compose_cfg, run_cli

TINY = [
    "data.spacing=4",
    *[f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()],
    "data.patch_size=[16,16,16]",
    "data.samples_per_volume=2",
    "data.queue_length=4",
    "data.batch_size=2",
    "model.filters=[4,8,16]",
]
#: saved stand-in stages: no context branch unless a test asks for one
PLAIN = {"context": False, "attribution": False}


def _save_stage(path: Path, role: str, kinds: list[str], **net: object) -> Path:
    """A checkpoint of an untrained stage as configured (a plain 4/8/16 network, ``net`` on
    top), as Lightning writes it (without a Trainer)."""
    over = [f"experiment=uncertainty_{role}", "model.filters=[4,8,16]"]
    over += [f"model.{k}={str(v).lower()}" for k, v in {**PLAIN, **net}.items()]
    if role != "task":
        over += [f"artifact={kinds[0]}", f"uncertainty.kinds=[{','.join(kinds)}]"]
    m = instantiate_module(compose_config(over))
    ckpt = {
        "state_dict": m.state_dict(),
        "hyper_parameters": dict(m.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def _save_classifier(path: Path, classes: list[str]) -> PatchContext:
    """A kind classifier file as ``experiment=kind_classifier`` writes it (random outputs)."""
    clf = PatchContext(1, len(classes))
    torch.nn.init.normal_(clf.out.weight)
    torch.save({"state_dict": clf.state_dict(), "classes": classes, "widths": [16, 32, 32]}, path)
    return clf


@pytest.fixture(scope="module")
def stage_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    out = {"task": _save_stage(root / "task.ckpt", "task", [])}
    for kind in ("noise", "blur"):
        out[kind] = _save_stage(root / f"{kind}.ckpt", "teacher", [kind])
    out["student"] = _save_stage(root / "student.ckpt", "student", ["noise", "blur"])
    out["classifier"] = root / "classifier.pt"
    _save_classifier(out["classifier"], ["none", "spike", "noise", "blur", "wrap", "motion"])
    return out


@pytest.mark.parametrize(
    "experiment",
    ["uncertainty_task", "uncertainty_teacher", "uncertainty_student", "uncertainty_evaluate"],
)
def test_fast_dev_run(
    experiment: str, small_embedded: Path, stage_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    extra = {
        "uncertainty_task": [],
        "uncertainty_teacher": ["artifact=noise", f"uncertainty.task_ckpt={stage_ckpts['task']}"],
        "uncertainty_student": [
            "uncertainty.kinds=[noise,blur]",
            f"uncertainty.task_ckpt={stage_ckpts['task']}",
            f"+uncertainty.teacher_ckpts.noise={stage_ckpts['noise']}",
            f"+uncertainty.teacher_ckpts.blur={stage_ckpts['blur']}",
            f"uncertainty.context_init={stage_ckpts['classifier']}",
        ],
        "uncertainty_evaluate": [
            f"evaluate.student_ckpt={stage_ckpts['student']}",
            "evaluate.max_scans=1",
            "evaluate.kinds=[noise]",
            "evaluate.figures=false",
        ],
    }[experiment]
    cfg = compose_cfg([f"experiment={experiment}", "debug=fast", *TINY, *extra], tmp_path)
    from importlib import import_module

    results = import_module(f"qcflow.tasks.{cfg.task}").run(cfg)
    if experiment == "uncertainty_evaluate":
        assert results["n_images"] == 2  # one clean scan + its noise copy
        assert set(results["decoupling"]["columns"]) == {"task", "noise", "blur"}
        assert (tmp_path / "scans.tsv").is_file()
        assert list((tmp_path / "maps").rglob("*_desc-noise_uncertainty.nii.gz"))
    else:
        role = experiment.removeprefix("uncertainty_")
        assert results["role"] == role and results["global_step"] == 1


def test_a_student_context_needs_a_classifier_and_attribution(
    stage_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """The context branch is frozen: it must start from a kind classifier, and it only splits
    the artifact variance (per-kind offsets were retired)."""
    from qcflow.errors import ConfigError
    from qcflow.tasks.uncertainty_train import build_module

    over = [
        "experiment=uncertainty_student",
        *TINY,
        "uncertainty.kinds=[noise,blur]",
        f"uncertainty.task_ckpt={stage_ckpts['task']}",
        f"+uncertainty.teacher_ckpts.noise={stage_ckpts['noise']}",
        f"+uncertainty.teacher_ckpts.blur={stage_ckpts['blur']}",
    ]
    for extra, message in (
        (["uncertainty.context_init=null"], "needs uncertainty.context_init"),
        ([f"uncertainty.context_init={tmp_path / 'nope.pt'}"], "nope.pt: context classifier not"),
        (["model.attribution=false"], "needs attribution=True: per-kind context offsets were"),
    ):
        with pytest.raises(ConfigError, match=message) as err:
            build_module(compose_cfg([*over, *extra], tmp_path))
        assert "\n" not in str(err.value)


def test_student_with_attribution_trains_and_evaluates(
    small_embedded: Path, stage_ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """The attribution head (one total artifact variance split by the kind logits) through
    the student's fast_dev_run (classifier start, zero targets, exclusive kinds)
    and the evaluation of a checkpoint with it."""
    from qcflow.tasks import uncertainty_evaluate
    from qcflow.tasks.uncertainty_train import build_module, run

    clf = _save_classifier(tmp_path / "clf.pt", ["none", "noise", "blur"])
    over = [
        "experiment=uncertainty_student",
        "debug=fast",
        *TINY,
        "uncertainty.kinds=[noise,blur]",
        f"uncertainty.task_ckpt={stage_ckpts['task']}",
        f"+uncertainty.teacher_ckpts.noise={stage_ckpts['noise']}",
        f"+uncertainty.teacher_ckpts.blur={stage_ckpts['blur']}",
        "model.context=true",
        "model.attribution=true",
        f"uncertainty.context_init={tmp_path / 'clf.pt'}",
        "uncertainty.module.absent_kind_var=zero",
        "uncertainty.exclusive_kinds=true",
    ]
    cfg = compose_cfg(over, tmp_path)
    module = build_module(cfg)
    assert module.net.attribution and module.net.head_sources == 2
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():  # the channels' shares are the classifier's noise/blur softmax
        share = module(x)[1][:, 1:].exp()
        full = clf.logits(x)[:, 1:]
    torch.testing.assert_close(
        (share / share.sum(1, keepdim=True))[:, :, 0, 0, 0], full.softmax(1), atol=1e-5, rtol=1e-4
    )
    results = run(cfg)
    assert results["global_step"] == 1
    # a saved attribution student evaluates like any other
    _save_stage(
        tmp_path / "attr.ckpt", "student", ["noise", "blur"], context=True, attribution=True
    )
    ev = [
        "experiment=uncertainty_evaluate",
        "debug=fast",
        *TINY,
        f"evaluate.student_ckpt={tmp_path / 'attr.ckpt'}",
        "evaluate.max_scans=1",
        "evaluate.kinds=[noise]",
        "evaluate.figures=false",
    ]
    res = uncertainty_evaluate.run(compose_cfg(ev, tmp_path / "ev"))
    assert res["n_images"] == 2 and res["decoupling"]["columns"] == ["task", "noise", "blur"]


def test_chain_task_teachers_student_evaluate(small_embedded: Path, tmp_path: Path) -> None:
    runs = Path(os.environ["QCFLOW_HOME"]) / "runs"
    short = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        *TINY,
    ]

    def cli(*args: str) -> None:
        res = run_cli(*args, *short, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]

    cli("experiment=uncertainty_task", f"hydra.run.dir={runs}/uncertainty_task/chain")
    cli("-m", "experiment=uncertainty_teacher", "artifact=noise,blur")
    for kind in ("noise", "blur"):  # the latest teacher per kind, found via metrics.json
        assert latest_teacher_run(runs, "uncertainty_teacher", kind).is_dir()
    # the student's context starts from the latest kind classifier (uncertainty.context_init)
    cli(
        "experiment=kind_classifier",
        "classifier.kinds=[noise,blur]",
        "classifier.patch=16",
        "classifier.steps=2",
        "classifier.batch=2",
        "classifier.volumes=3",
        "classifier.holdout=1",
        "classifier.eval_volumes=0",
        f"hydra.run.dir={runs}/kind_classifier/chain",
    )
    cli(
        "experiment=uncertainty_student",
        "uncertainty.kinds=[noise,blur]",
        f"hydra.run.dir={runs}/uncertainty_student/chain",
    )
    cli(
        "experiment=uncertainty_evaluate",
        "evaluate.max_scans=1",
        f"hydra.run.dir={runs}/uncertainty_evaluate/chain",
    )
    metrics = json.loads((runs / "uncertainty_evaluate" / "chain" / "metrics.json").read_text())
    assert metrics["sources"] == ["task", "noise", "blur"]
    assert metrics["n_images"] == 3
    for key in ("spearman_artifact_variance_dice", "spearman_snr_dice", "spearman_cnr_dice"):
        assert key in metrics and f"{key}_p" in metrics
    assert (runs / "uncertainty_evaluate" / "chain" / "figures" / "dice_vs_measures.png").is_file()
    student = json.loads((runs / "uncertainty_student" / "chain" / "metrics.json").read_text())
    assert student["role"] == "student" and student["global_step"] == 2
    assert student["context_init"] == str(runs / "kind_classifier" / "chain" / "classifier.pt")


def test_teacher_sampler_has_its_kind_only(tmp_path: Path) -> None:
    from qcflow.tasks.uncertainty_train import build_sampler

    over = ["experiment=uncertainty_teacher", "artifact=noise", "uncertainty.artifact_rate=1.0"]
    sampler = build_sampler(compose_cfg(over, tmp_path), ["noise"])
    assert sampler.kinds == ("noise",) and not sampler.exclusive
