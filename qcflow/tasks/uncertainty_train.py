"""Train one stage of method B, the LightningModule ``uncertainty.module`` (``_target_``:
:class:`~qcflow.lit.uncertainty.TaskSeg` | ``TeacherSeg`` | ``StudentSeg``, from
``conf/uncertainty_module/``; Shaw et al., MIDL 2020 / MELBA 2021).

* task: clean patches (no augmentation);
* teacher: ``artifact`` only (``augment.<artifact>`` ranges, probability ``uncertainty.kind_p``),
  with the latest ``uncertainty_task`` run frozen (or ``uncertainty.task_ckpt``);
* student: all ``uncertainty.kinds``, with the frozen task network and the latest teacher run per
  kind (experiments ``uncertainty_teacher_<kind>``, or ``uncertainty.teacher_ckpts.<kind>``).

Corruption happens per whole volume before patch sampling
(:class:`~qcflow.data.paired.PairedPatchDataModule`). The module, its network (``model``) and the
epsilon schedule (``uncertainty.schedule``) are built with ``hydra.utils.instantiate``; every
argument comes from the YAML, and a missing or unknown key is a :class:`ConfigError` naming it.
``resume=true|auto|PATH`` continues a stage's run from its checkpoint
(:func:`qcflow.runs.resume.resume_plan`; the patch queue is rebuilt, see
:mod:`qcflow.lit.resume`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from qcflow.data.paired import PairedPatchDataModule
from qcflow.errors import BadFileError, ConfigError
from qcflow.kspace import KINDS
from qcflow.lit.uncertainty import (
    ArtifactSeg,
    EpsilonSchedule,
    StudentSeg,
    TeacherSeg,
    UncertaintySeg,
)
from qcflow.runs.resume import fit, prepare_resume, resume_results
from qcflow.runs.stages import load_stage, task_checkpoint, teacher_checkpoints
from qcflow.tasks.common import build_trainer, seed_all, trainer_metrics
from qcflow.utils.bundles import load_tensors

__all__ = [
    "run",
    "build_sampler",
    "build_module",
    "build_schedule",
    "instantiate_module",
    "module_class",
    "check_arguments",
]

log = logging.getLogger(__name__)


def build_sampler(cfg: DictConfig, kinds: list[str]) -> Any:
    """A ``RandomArtifacts`` with only ``kinds`` enabled (ranges from ``cfg.augment``), each
    with probability ``uncertainty.kind_p``; ``uncertainty.exclusive_kinds``: one per volume."""
    if not kinds:
        return None
    if cfg.get("augment") is None:
        raise ConfigError("method B needs an 'augment' config group (e.g. augment=all)")
    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    assert isinstance(aug, dict)
    ucfg = cfg.uncertainty
    for kind in KINDS:
        if kind not in kinds:
            aug[kind] = None
        elif not aug.get(kind):
            raise ConfigError(f"augment.{kind}: no ranges configured for artifact kind '{kind}'")
        else:
            aug[kind]["p"] = float(ucfg.kind_p)
    aug["rate"] = float(ucfg.artifact_rate)
    aug["exclusive"] = bool(ucfg.exclusive_kinds)
    aug["device"] = "loader"
    aug["spacing"] = [float(cfg.data.spacing)] * 3
    return instantiate(aug)


def check_arguments(
    target: Any, node: Mapping[str, Any], where: str, given: Iterable[str] = ()
) -> None:
    """``node`` sets every argument of ``target`` (but ``given``, passed at run time) and no
    other: the YAML is the only source of their values, so a deleted key cannot fall back to a
    default in the code.

    Raises:
        ConfigError: one line naming the missing or unknown keys of ``where``.
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [n for n, p in inspect.signature(target).parameters.items() if p.kind in kinds]
    keys = [str(k) for k in node if not str(k).startswith("_")]
    missing = [n for n in names if n not in keys and n not in given]
    unknown = [k for k in keys if k not in names]
    if missing or unknown:
        what = [f"missing {', '.join(missing)}"] if missing else []
        what += [f"unknown {', '.join(unknown)}"] if unknown else []
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"{where}: {'; '.join(what)} (arguments of {name})")


def module_class(cfg: DictConfig) -> type[UncertaintySeg]:
    """The stage class named by ``uncertainty.module._target_``, after checking that the
    module's and its network's config (``model``) give exactly their arguments."""
    node = cfg.uncertainty.get("module")
    if node is None or "_target_" not in node:
        raise ConfigError("uncertainty.module: no stage configured (uncertainty_module=task|...)")
    try:
        cls = get_class(str(node._target_))
    except Exception as exc:  # an import error, a misspelt name
        raise ConfigError(f"uncertainty.module._target_: {node._target_} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, UncertaintySeg) and cls.role):
        raise ConfigError(
            f"uncertainty.module._target_: {node._target_} is not a method-B stage "
            "(TaskSeg, TeacherSeg or StudentSeg of qcflow.lit.uncertainty)"
        )
    check_arguments(cls, node, "uncertainty.module", given=("task_net", "teacher_nets"))
    net = node.get("net")
    if net is None or "_target_" not in net:
        raise ConfigError("uncertainty.module.net: no network (_target_) configured")
    check_arguments(get_class(str(net._target_)), net, "model", given=("num_sources",))
    return cls


def instantiate_module(cfg: DictConfig, **frozen: Any) -> UncertaintySeg:
    """``uncertainty.module`` as configured (checked by :func:`module_class`), given its frozen
    networks (``task_net=``, ``teacher_nets=``); without them an untrained stage for inference
    or a stand-in (fitting it refuses, :meth:`UncertaintySeg.on_fit_start`).

    Raises:
        ConfigError: a missing or unknown key, or a value the module refuses (one line).
    """
    module_class(cfg)
    try:
        return instantiate(cfg.uncertainty.module, **frozen)
    except InstantiationException as exc:  # the module refused a value: say which, one line
        reason = " ".join(str(exc.__cause__ or exc).split())
        raise ConfigError(f"uncertainty.module: {reason}") from exc


def build_schedule(cfg: DictConfig) -> EpsilonSchedule:
    """The epsilon/lr schedule ``uncertainty.schedule`` (every argument from the YAML)."""
    node = cfg.uncertainty.schedule
    check_arguments(get_class(str(node._target_)), node, "uncertainty.schedule")
    return instantiate(node)


def build_module(cfg: DictConfig) -> UncertaintySeg:
    """The stage ``uncertainty.module`` with its frozen earlier stages loaded (the task network
    for a teacher or the student, the teachers of its kinds for the student)."""
    ucfg = cfg.uncertainty
    cls = module_class(cfg)
    frozen: dict[str, Any] = {}
    if issubclass(cls, ArtifactSeg):
        path = task_checkpoint(cfg, ucfg.task_ckpt, str(ucfg.task_experiment))
        log.info("frozen task network: %s", path)
        frozen["task_net"] = load_stage(path).net
    if issubclass(cls, StudentSeg):
        kinds = [str(k) for k in ucfg.module.kinds]
        paths = teacher_checkpoints(cfg, kinds, ucfg.teacher_ckpts, str(ucfg.teacher_experiment))
        teachers = {}
        for kind, path in paths.items():
            stage = load_stage(path)
            if not isinstance(stage, TeacherSeg) or stage.kinds != [kind]:
                raise ConfigError(f"{path}: not a '{kind}' teacher (sources {stage.sources})")
            teachers[kind] = stage.net
            log.info("frozen %s teacher: %s", kind, path)
        frozen["teacher_nets"] = teachers
    module = instantiate_module(cfg, **frozen)
    if module.net.context is not None and not ucfg.context_init:
        raise ConfigError(
            "model.context=true needs uncertainty.context_init (a kind classifier: the context "
            "branch is frozen)"
        )
    if ucfg.context_init:
        from qcflow.tasks.kind_classifier import classifier_path

        path = classifier_path(cfg, str(ucfg.context_init))
        _init_context(module, path)
        module.context_source = str(path)
    return module


def _init_context(module: UncertaintySeg, path: Path) -> None:
    """Start the context branch from a kind classifier (``experiment=kind_classifier``)."""
    from qcflow.models.unet import PatchContext

    if module.net.context is None:
        raise ConfigError(f"{path}: uncertainty.context_init needs model.context=true")
    if not path.is_file():
        raise ConfigError(f"{path}: context classifier not found")
    try:
        saved = load_tensors(path, "kind classifier")
        classes = [str(c) for c in saved["classes"]]
        clf = PatchContext(1, len(classes), widths=saved["widths"])
        clf.load_state_dict(saved["state_dict"])
        module.net.context.init_from_classifier(clf, classes, module.kinds)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        if isinstance(err, BadFileError):
            raise
        raise ConfigError(f"{path}: not a usable kind classifier ({err})") from err
    log.info("context branch initialised from %s", path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit one stage; returns the trainer's last metrics, role, kinds and checkpoint path."""
    resume = prepare_resume(cfg)  # first: may point paths.output_dir at the resumed run
    seed_all(cfg)
    module = build_module(cfg)
    sampler = build_sampler(cfg, module.kinds)
    datamodule = PairedPatchDataModule(cfg.data, sampler=sampler)
    schedule = build_schedule(cfg)
    trainer = build_trainer(cfg, callbacks=[schedule], samplers=lambda: {"augment": sampler})
    t0 = time.perf_counter()
    fit(trainer, module, datamodule, resume)
    out: dict[str, Any] = {
        "role": module.role,
        "kinds": module.kinds,
        "sources": module.sources,
        "artifact": cfg.artifact,
        "eps": module.eps,
        "n_eps_halvings": schedule.n_halvings,
        "lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None,
        "global_step": int(trainer.global_step),
        "fit_seconds": round(time.perf_counter() - t0, 2),
        "checkpoint": str(cfg.paths.output_dir) + "/checkpoints/last.ckpt",
        "context_init": getattr(module, "context_source", None),
        **resume_results(resume),
    }
    out.update(trainer_metrics(trainer))
    return out
