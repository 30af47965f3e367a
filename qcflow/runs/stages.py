"""Method B's trained runs: find and load the stages (task -> teachers -> student).

Teachers are one run per artifact kind, all under the experiment name ``uncertainty_teacher``
(typically one multirun, ``artifact=spike,noise,blur,wrap,motion``); each run's ``metrics.json``
records its ``artifact``. "The teacher for kind k" is the newest finished teacher run (single
runs and multirun jobs) whose ``metrics.json`` says ``artifact: k`` and that has a checkpoint;
an unfinished teacher run for k (its saved config says ``artifact: k``) that is newer is not
skipped silently but refused with the command that resumes it. Explicit checkpoint paths always
win.

:func:`load_student_model` gives the loaded :class:`~qcflow.qc.scorers.StudentModel` that an
:class:`~qcflow.qc.scorers.UncertaintyScorer` scores with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from qcflow.data.preprocess import PreprocessConfig, file_digest
from qcflow.errors import BadFileError, ConfigError
from qcflow.qc.scorers import StudentModel
from qcflow.runs.folders import (
    METRICS_FILE,
    check_no_newer_unfinished,
    checkpoint_data_config,
    is_finished,
    newest_checkpoint,
    resolve_checkpoint,
    run_artifact,
    run_folders,
)

__all__ = [
    "latest_teacher_run",
    "task_checkpoint",
    "teacher_checkpoints",
    "find_student_checkpoint",
    "load_stage",
    "load_student_model",
]


def latest_teacher_run(runs_dir: str | Path, experiment: str, kind: str) -> Path:
    """Newest finished run of ``experiment`` whose ``metrics.json`` has ``artifact == kind``.

    Raises:
        ConfigError: no such run, or an unfinished run for ``kind`` is newer than it (see
            :func:`qcflow.runs.folders.check_no_newer_unfinished`).
    """
    base = Path(runs_dir) / experiment
    found = [
        run
        for run in run_folders(runs_dir, experiment)
        if is_finished(run)
        and run_artifact(run) == kind
        and any((run / "checkpoints").glob("*.ckpt"))
    ]
    picked = (
        max(found, key=lambda r: ((r / METRICS_FILE).stat().st_mtime, str(r))) if found else None
    )
    check_no_newer_unfinished(picked, runs_dir, experiment, lambda r: run_artifact(r) == kind)
    if picked is None:
        raise ConfigError(
            f"{base}: no finished '{experiment}' run for artifact '{kind}'; run `python -m "
            f"qcflow experiment={experiment} artifact={kind}` first or give "
            f"uncertainty.teacher_ckpts.{kind}"
        )
    return picked


def task_checkpoint(
    cfg: Any, explicit: str | Path | None = None, experiment: str = "uncertainty_task"
) -> Path:
    """The task network's checkpoint: ``explicit`` or the latest ``experiment`` run's
    (``cfg``: the composed config, for its ``paths.runs_dir``)."""
    return resolve_checkpoint(cfg.paths.runs_dir, explicit, experiment)


def teacher_checkpoints(
    cfg: Any,
    kinds: Sequence[str],
    explicit: Mapping[str, Any] | None = None,
    experiment: str = "uncertainty_teacher",
) -> dict[str, Path]:
    """One checkpoint per kind: ``explicit[kind]`` when given, else its latest teacher run's."""
    explicit = explicit or {}
    out = {}
    for k in kinds:
        if explicit.get(k):
            out[k] = resolve_checkpoint(cfg.paths.runs_dir, explicit[k], experiment)
        else:
            out[k] = newest_checkpoint(latest_teacher_run(cfg.paths.runs_dir, experiment, k))
    return out


def find_student_checkpoint(
    runs_dir: str | Path, given: str | Path | None = None, experiment: str = "uncertainty_student"
) -> Path:
    """``given`` (a checkpoint or run folder), else the latest ``experiment`` run's checkpoint.

    Raises:
        ConfigError: see :func:`~qcflow.runs.folders.resolve_checkpoint`.
    """
    return resolve_checkpoint(runs_dir, given, experiment)


def load_stage(path: str | Path, map_location: str = "cpu") -> Any:
    """An :class:`~qcflow.lit.uncertainty.UncertaintySeg` from a checkpoint, in eval mode."""
    from qcflow.lit.uncertainty import UncertaintySeg
    from qcflow.utils.bundles import load_checkpoint

    # weights_only=True, a regular file of bounded size, one-line BadFileError otherwise
    module = load_checkpoint(
        UncertaintySeg, path, "uncertainty checkpoint", map_location=map_location
    )
    module.eval()
    module.requires_grad_(False)
    return module


def load_student_model(checkpoint: str | Path) -> StudentModel:
    """A student (or teacher) checkpoint, loaded for scoring: its network and sources, the
    preprocessing and patch size of its run (``<run>/.hydra/config.yaml``) and its digest.

    Raises:
        ConfigError: the file is missing, not a qcflow uncertainty checkpoint, or a task
            network (no artifact channels).
        BadFileError: the file is damaged or not a plain checkpoint (one line naming it).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"{path}: uncertainty checkpoint not found")
    try:
        module = load_stage(path)
    except BadFileError:  # one line naming the file already
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not a qcflow uncertainty checkpoint ({exc})") from exc
    if module.role == "task":
        raise ConfigError(
            f"{path}: a task network has no artifact channels; give an uncertainty_student "
            "checkpoint (score.student_ckpt)"
        )
    data = checkpoint_data_config(path) or {}
    return StudentModel(
        net=module.net,
        sources=list(module.sources),
        preprocess=PreprocessConfig.from_data_cfg(OmegaConf.create(data)) if data else None,
        patch_size=list(data["patch_size"]) if data.get("patch_size") else None,
        digest=file_digest(path),
    )
