"""Method B built from config: every argument from the YAML (a deleted key is a config error),
one class per role, and checkpoints of this layout and the previous one loading as their class."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from qcflow.api import compose_config
from qcflow.errors import BadFileError, ConfigError
from qcflow.kspace import SHAW2021_KINDS
from qcflow.lit.uncertainty import (
    EpsilonSchedule,
    StudentSeg,
    TaskSeg,
    TeacherSeg,
    UncertaintySeg,
)
from qcflow.lit.uncertainty.legacy import PREVIOUS_DEFAULTS
from qcflow.tasks.uncertainty_train import build_schedule, instantiate_module, module_class
from qcflow.utils.bundles import load_checkpoint

OLD = Path(__file__).parent / "data" / "uncertainty_v0"
SMALL = ["model.filters=[4,8,16]"]
ROLES = {"task": TaskSeg, "teacher": TeacherSeg, "student": StudentSeg}


def _cfg(experiment: str, *overrides: str) -> Any:
    return compose_config([f"experiment={experiment}", "artifact=noise", *SMALL, *overrides])


def _save(module: UncertaintySeg, path: Path, hparams: dict[str, Any] | None = None) -> Path:
    """A checkpoint with the keys Lightning writes (without a Trainer)."""
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams) if hparams is None else hparams,
        "hparams_name": "kwargs",
        "pytorch-lightning_version": pl.__version__,
        "eps": 0.0125,
    }
    torch.save(ckpt, path)
    return path


def _outputs(module: UncertaintySeg, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return module.eval()(x)


@pytest.mark.parametrize(
    "experiment",
    [
        f"uncertainty_{role}{size}"
        for role in ("task", "teacher", "student")
        for size in ("", "_paper")
    ],
)
def test_each_stage_is_its_yaml(experiment: str) -> None:
    """The module is built from ``uncertainty.module`` alone: its hyper-parameters are the YAML's
    values, and no constructor argument has a default in the code."""
    cfg = _cfg(experiment, "model.deep_supr_num=1")
    cls = module_class(cfg)
    assert cls is ROLES[experiment.split("_")[1]]
    for name, p in inspect.signature(cls).parameters.items():
        if name not in ("task_net", "teacher_nets"):
            assert p.default is inspect.Parameter.empty, name
    module = instantiate_module(cfg)
    node = OmegaConf.to_container(cfg.uncertainty.module, resolve=True)
    assert isinstance(node, dict)
    want = {k: v for k, v in node.items() if not k.startswith("_")}
    assert dict(module.hparams) == {**want, "role": cls.role}
    assert module.hparams["net"]["deep_supervision"] == experiment.endswith("_paper")


def test_kinds_are_the_named_subset() -> None:
    cfg = _cfg("uncertainty_student")
    assert list(cfg.uncertainty.kinds) == list(SHAW2021_KINDS)
    assert instantiate_module(cfg).kinds == list(SHAW2021_KINDS)
    assert instantiate_module(_cfg("uncertainty_teacher")).kinds == ["noise"]


@pytest.mark.parametrize(
    ("experiment", "override", "message"),
    [
        ("uncertainty_teacher", "~uncertainty.module.hce_task_var", "module: missing hce_task_var"),
        ("uncertainty_student", "~uncertainty.module.absent_kind_var", "missing absent_kind_var"),
        ("uncertainty_task", "~uncertainty.module.lr", "uncertainty.module: missing lr"),
        ("uncertainty_student", "~model.attribution", "model: missing attribution"),
        # retired switches (README of experiments/shaw2021_uncertainty, Switches)
        ("uncertainty_teacher", "+uncertainty.module.absent_kind_var=zero", "unknown absent_k"),
        ("uncertainty_student", "+uncertainty.module.student_targets=own_kind", "unknown stud"),
        ("uncertainty_student", "+uncertainty.module.kind_aux_weight=1", "unknown kind_aux_w"),
        ("uncertainty_student", "+uncertainty.module.context_lr_mult=1", "unknown context_lr"),
        ("uncertainty_student", "+model.context_max_offset=3", "model: unknown context_max"),
        ("uncertainty_task", "+uncertainty.module.kind=noise", "uncertainty.module: unknown kind"),
        ("uncertainty_teacher", "uncertainty.module.hce_task_var=mine", "hce_task_var must be"),
        (
            "uncertainty_teacher",
            "uncertainty.module._target_=qcflow.lit.uncertainty.ArtifactSeg",
            "not a method-B stage",
        ),
    ],
)
def test_a_deleted_or_unknown_key_is_a_one_line_config_error(
    experiment: str, override: str, message: str
) -> None:
    """Deleting a YAML line changes nothing silently: there is no default to fall back to."""
    with pytest.raises(ConfigError, match=message) as err:
        instantiate_module(_cfg(experiment, override))
    assert "\n" not in str(err.value)


def test_the_schedule_is_built_from_its_yaml_only() -> None:
    schedule = build_schedule(_cfg("uncertainty_task"))
    assert isinstance(schedule, EpsilonSchedule)
    assert (schedule.patience, schedule.min_delta, schedule.floor) == (2, 0.01, 1e-3)
    with pytest.raises(ConfigError, match="uncertainty.schedule: missing patience"):
        build_schedule(_cfg("uncertainty_task", "~uncertainty.schedule.patience"))


@pytest.mark.parametrize("name", ["task", "teacher_noise", "student"])
def test_checkpoints_of_the_previous_layout_load_as_their_role(name: str) -> None:
    """Files written by the single ``UncertaintySeg(role, ...)`` class (tests/data/uncertainty_v0,
    see its README) load through every entry point and give the same outputs bit for bit."""
    from qcflow.runs.stages import load_stage

    expected = torch.load(OLD / "expected.pt", weights_only=True)
    want = expected[name]
    path = OLD / f"{name}.ckpt"
    for module in (
        UncertaintySeg.load_from_checkpoint(path, map_location="cpu"),
        load_checkpoint(UncertaintySeg, path, "uncertainty checkpoint"),
        load_stage(path),
    ):
        assert type(module) is ROLES[want["role"]] and module.role == want["role"]
        assert module.sources == want["sources"] and module.eps == 0.025
        logits, log_var = _outputs(module, expected["input"])
        assert torch.equal(logits, want["logits"]) and torch.equal(log_var, want["log_var"])
    module = UncertaintySeg.load_from_checkpoint(path)
    if want["role"] != "task":  # the previous YAML's values came along
        assert (module.hce_task_var, module.artifact_lr_mult) == ("reference", 20.0)
    # new checkpoints of the loaded module are in this layout and load the same
    again = UncertaintySeg.load_from_checkpoint(_save(module, OLD.parent / f"_{name}.ckpt"))
    try:
        assert dict(again.hparams) == dict(module.hparams) and "_target_" in module.hparams["net"]
        assert torch.equal(_outputs(again, expected["input"])[1], want["log_var"])
    finally:
        (OLD.parent / f"_{name}.ckpt").unlink()


def _previous_hparams(role: str, kinds: list[str], net: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as the previous constructor saved them (every option, every role)."""
    return {"role": role, "kinds": kinds, "net": net, **PREVIOUS_DEFAULTS, "lr": 3e-3}


@pytest.mark.parametrize(
    ("role", "kinds", "net"),
    [
        ("teacher", ["noise"], {}),
        ("student", ["noise", "blur"], {"context": True, "attribution": True}),
        ("student", ["blur"], {"deep_supervision": True}),
    ],
)
def test_previous_layout_hyper_parameters_by_hand(
    role: str, kinds: list[str], net: dict[str, Any], tmp_path: Path
) -> None:
    """Every option of the previous layout lands on the right argument; an old file that lacks
    the newer options gets what the old constructor used for them."""
    exp = f"uncertainty_{role}"
    over = [f"uncertainty.kinds=[{','.join(kinds)}]", "model.deep_supr_num=1"]
    over += [f"model.{k}={str(v).lower()}" for k, v in net.items()]
    cfg = _cfg(exp, *over, f"artifact={kinds[0]}")
    fresh = instantiate_module(cfg)
    net_args = {k: v for k, v in fresh.hparams["net"].items() if k != "_target_"}
    old = _previous_hparams(role, kinds, net_args)
    old.update(hce_task_var="reference")
    old["net"] = {**old["net"], "context_max_offset": 3.0}  # retired, no effect here
    if role == "student":  # retired switches at values without effect
        old.update(student_targets="own_kind", absent_kind_var="zero", context_lr_mult=0.0)
    loaded = UncertaintySeg.load_from_checkpoint(_save(fresh, tmp_path / "old.ckpt", old))
    assert type(loaded) is ROLES[role] and loaded.kinds == kinds
    assert loaded.hce_task_var == "reference" and loaded.lr == 3e-3
    assert loaded.absent_kind_var == ("zero" if role == "student" else "free")
    x = torch.rand(1, 1, 16, 16, 16)
    for a, b in zip(_outputs(fresh, x), _outputs(loaded, x), strict=True):
        assert torch.equal(a, b)
    # a checkpoint from before some options existed: the old constructor's values for them
    older = {k: v for k, v in old.items() if k not in ("context_lr_mult", "absent_kind_var")}
    older["student_targets"] = "corrupted"
    path = _save(fresh, tmp_path / "older.ckpt", older)
    if fresh.net.context is not None:  # the old context_lr_mult=1: a context fine-tuned there
        with pytest.raises(ValueError, match="context_lr_mult=1.0.*retired"):
            UncertaintySeg.load_from_checkpoint(path)
    else:
        assert UncertaintySeg.load_from_checkpoint(path).absent_kind_var == "free"


@pytest.mark.parametrize(
    ("role", "change", "message"),
    [
        ("student", {"kind_aux_weight": 0.5}, "kind_aux_weight=0.5"),
        ("student", {"context_lr_mult": 1.0}, "context_lr_mult=1.0"),
        ("student", {"student_targets": "own_kind", "absent_kind_var": "free"}, "own_kind"),
        ("teacher", {"absent_kind_var": "zero"}, "absent_kind_var='zero' in a teacher"),
        ("student", {"net": {"context": True, "attribution": False}}, "without model.attri"),
    ],
)
def test_a_checkpoint_trained_with_a_retired_switch_is_refused_in_one_line(
    role: str, change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Switches that measured no gain are gone; a file trained with one switched on must not
    load as something it is not (Lightning would drop the unknown keys silently)."""
    kinds = ["noise", "blur"] if role == "student" else ["noise"]
    over = [f"uncertainty.kinds=[{','.join(kinds)}]", f"artifact={kinds[0]}"]
    module = instantiate_module(_cfg(f"uncertainty_{role}", *over))
    hparams = {**dict(module.hparams), "kind_aux_weight": 0.0, "context_lr_mult": 0.0}
    hparams["net"] = {**hparams["net"], "context_max_offset": 3.0}
    if role == "student":
        hparams["student_targets"] = "corrupted"
    assert UncertaintySeg.load_from_checkpoint(_save(module, tmp_path / "ok.ckpt", hparams))
    hparams.update({k: v for k, v in change.items() if k != "net"})
    hparams["net"] = {**hparams["net"], **change.get("net", {})}
    path = _save(module, tmp_path / "on.ckpt", hparams)
    with pytest.raises(BadFileError, match=f"{message}.*retired switch") as err:
        load_checkpoint(UncertaintySeg, path, "uncertainty checkpoint")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_the_loader_checks_roles_and_refuses_foreign_files(tmp_path: Path) -> None:
    student = instantiate_module(_cfg("uncertainty_student", "uncertainty.kinds=[noise]"))
    path = _save(student, tmp_path / "student.ckpt")
    assert type(StudentSeg.load_from_checkpoint(path)) is StudentSeg
    with pytest.raises(ValueError, match="'student' checkpoint is not a TeacherSeg"):
        TeacherSeg.load_from_checkpoint(path)
    old_teacher = _previous_hparams("teacher", ["noise", "blur"], {})
    with pytest.raises(ValueError, match="exactly one"):
        UncertaintySeg.load_from_checkpoint(_save(student, tmp_path / "t.ckpt", old_teacher))
    with pytest.raises(BadFileError, match="not a method-B stage"):  # one line, names the file
        load_checkpoint(UncertaintySeg, _save(student, tmp_path / "x.ckpt", {"lr": 1.0}))
    # a network _target_ from a file is never imported unless it is a qcflow TwoHeadUNet
    bad = {**dict(student.hparams), "net": {**student.hparams["net"], "_target_": "os.system"}}
    with pytest.raises(ValueError, match="qcflow.models TwoHeadUNet"):
        UncertaintySeg.load_from_checkpoint(_save(student, tmp_path / "n.ckpt", bad))


def test_the_classifier_experiment_comes_from_the_yaml_only() -> None:
    from qcflow.tasks.kind_classifier import classifier_path

    cfg = _cfg("kind_classifier", "~uncertainty.classifier_experiment")
    with pytest.raises(ConfigError, match="uncertainty.classifier_experiment: missing") as err:
        classifier_path(cfg, "latest")
    assert "\n" not in str(err.value)
