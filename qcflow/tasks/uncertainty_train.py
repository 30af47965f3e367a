"""Train one stage of method B: ``uncertainty.role = task | teacher | student``.

* task: clean patches (no augmentation);
* teacher: ``artifact`` only (``augment.<artifact>`` ranges, probability ``uncertainty.kind_p``),
  or with ``uncertainty.teacher_negatives > 0`` also the other ``uncertainty.negative_kinds``
  (one kind per corrupted volume),
  with the latest ``uncertainty_task`` run frozen (or ``uncertainty.task_ckpt``);
* student: all ``uncertainty.kinds``, with the frozen task network and the latest teacher run per
  kind (experiments ``uncertainty_teacher_<kind>``, or ``uncertainty.teacher_ckpts.<kind>``).

Corruption happens per whole volume before patch sampling (``PairedPatchDataModule``).
``resume=true|auto|PATH`` continues a stage's run from its checkpoint
(:func:`qcflow.runs.resume.resume_plan`; the patch queue is rebuilt, see
:mod:`qcflow.lit.resume`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qcflow.errors import BadFileError, ConfigError
from qcflow.lit.callbacks import EpsilonSchedule
from qcflow.lit.uncertainty import PairedPatchDataModule, UncertaintySeg, sources_for
from qcflow.runs.resume import fit, prepare_resume, resume_results
from qcflow.runs.stages import load_stage, task_checkpoint, teacher_checkpoints
from qcflow.tasks.common import build_trainer, seed_all, trainer_metrics
from qcflow.utils.bundles import load_tensors

__all__ = ["run", "build_sampler", "build_module"]

log = logging.getLogger(__name__)


def build_sampler(cfg: DictConfig, kinds: list[str], negatives: list[str] | None = None) -> Any:
    """A ``RandomArtifacts`` with only ``kinds`` enabled (ranges from ``cfg.augment``).

    ``negatives``: other kinds a teacher also sees; then a corrupted volume gets exactly one
    kind, its own with probability ``1 - uncertainty.teacher_negatives`` and each negative kind
    with an equal share of the rest.
    """
    if not kinds:
        return None
    if cfg.get("augment") is None:
        raise ConfigError("method B needs an 'augment' config group (e.g. augment=all)")
    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    assert isinstance(aug, dict)
    ucfg = cfg.uncertainty
    negatives = [k for k in negatives or [] if k not in kinds]
    frac = float(ucfg.get("teacher_negatives", 0.0)) if negatives else 0.0
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"uncertainty.teacher_negatives must be in [0, 1), got {frac}")
    for kind in ("spike", "noise", "blur", "wrap", "motion", "bias"):
        if kind not in kinds and (kind not in negatives or frac == 0.0):
            aug[kind] = None
        elif not aug.get(kind):
            raise ConfigError(f"augment.{kind}: no ranges configured for artifact kind '{kind}'")
        elif kind in kinds:
            aug[kind]["p"] = float(ucfg.kind_p) * (1.0 - frac)
        else:
            aug[kind]["p"] = frac / len(negatives)
    aug["rate"] = float(ucfg.artifact_rate)
    aug["exclusive"] = bool(ucfg.get("exclusive_kinds", False)) or frac > 0.0
    aug["device"] = "loader"
    aug["spacing"] = [float(cfg.data.spacing)] * 3
    return instantiate(aug)


def build_module(cfg: DictConfig) -> UncertaintySeg:
    """The module for ``cfg.uncertainty.role`` with its frozen earlier stages loaded."""
    ucfg = cfg.uncertainty
    role = str(ucfg.role)
    kinds = [str(k) for k in ucfg.kinds] if role != "task" else []
    task_net, teachers = None, None
    if role in ("teacher", "student"):
        path = task_checkpoint(
            cfg, ucfg.get("task_ckpt"), str(ucfg.get("task_experiment", "uncertainty_task"))
        )
        log.info("frozen task network: %s", path)
        task_net = load_stage(path).net
    if role == "student":
        paths = teacher_checkpoints(
            cfg, kinds, ucfg.get("teacher_ckpts"), str(ucfg.teacher_experiment)
        )
        teachers = {}
        for kind, path in paths.items():
            stage = load_stage(path)
            if stage.sources != sources_for("teacher", [kind]):
                raise ConfigError(f"{path}: not a '{kind}' teacher (sources {stage.sources})")
            teachers[kind] = stage.net
            log.info("frozen %s teacher: %s", kind, path)
    module = UncertaintySeg(
        role=role,
        kinds=kinds,
        net=OmegaConf.to_container(cfg.model, resolve=True),  # type: ignore[arg-type]
        lr=float(ucfg.lr),
        eps=float(ucfg.eps),
        consistency_weight=float(ucfg.consistency_weight),
        ssim_weight=float(ucfg.ssim_weight),
        task_net=task_net,
        teacher_nets=teachers,
        init_from_task=bool(ucfg.get("init_from_task", True)),
        init_log_var=float(ucfg.get("init_log_var", -2.0)),
        task_var_lr_mult=float(ucfg.get("task_var_lr_mult", 1.0)),
        artifact_lr_mult=float(ucfg.get("artifact_lr_mult", 1.0)),
        hce_task_var=str(ucfg.get("hce_task_var", "own")),
        student_targets=str(ucfg.get("student_targets", "corrupted")),
        absent_kind_var=str(ucfg.get("absent_kind_var", "free")),
        kind_aux_weight=float(ucfg.get("kind_aux_weight", 0.0)),
        context_lr_mult=float(ucfg.get("context_lr_mult", 1.0)),
    )
    if ucfg.get("context_init"):
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
    ucfg = cfg.uncertainty
    module = build_module(cfg)
    negatives = None
    if module.role == "teacher":
        negatives = [str(k) for k in ucfg.get("negative_kinds") or []]
    sampler = build_sampler(cfg, module.kinds, negatives)
    datamodule = PairedPatchDataModule(cfg.data, sampler=sampler)
    schedule = EpsilonSchedule(**OmegaConf.to_container(ucfg.schedule, resolve=True))  # type: ignore[arg-type]
    trainer = build_trainer(cfg, callbacks=[schedule], samplers=lambda: {"augment": sampler})
    t0 = time.perf_counter()
    fit(trainer, module, datamodule, resume)
    out: dict[str, Any] = {
        "role": module.role,
        "kinds": module.kinds,
        "sources": module.sources,
        "artifact": cfg.get("artifact"),
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
