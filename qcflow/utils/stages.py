"""Find and load the earlier stages of method B (task -> teachers -> student).

Teachers are one run per artifact kind, all under the experiment name ``uncertainty_teacher``
(typically one multirun, ``artifact=spike,noise,blur,wrap,motion``); each run's ``metrics.json``
records its ``artifact``. "The teacher for kind k" is the newest finished teacher run (single
runs and multirun jobs) whose ``metrics.json`` says ``artifact: k`` and that has a checkpoint;
an unfinished teacher run for k (its saved config says ``artifact: k``) that is newer is not
skipped silently but refused with the command that resumes it. Explicit checkpoint paths always
win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qcflow.errors import ConfigError
from qcflow.tasks.common import resolve_checkpoint
from qcflow.utils.runs import check_no_newer_unfinished, is_finished, run_folders

__all__ = [
    "latest_teacher_run",
    "run_artifact",
    "task_checkpoint",
    "teacher_checkpoints",
    "load_stage",
]


def run_artifact(run: Path) -> str | None:
    """The ``artifact`` a run was configured with: from its ``metrics.json`` when finished,
    else from its saved config (``.hydra/config.yaml``); ``None`` when unknown."""
    import json

    try:
        if (run / "metrics.json").is_file():
            value = json.loads((run / "metrics.json").read_text()).get("artifact")
        else:
            from omegaconf import OmegaConf

            value = OmegaConf.load(run / ".hydra" / "config.yaml").get("artifact")  # type: ignore[union-attr]
    except Exception:  # missing or damaged file: the run cannot be attributed to a kind
        return None
    return None if value is None else str(value)


def latest_teacher_run(runs_dir: str | Path, experiment: str, kind: str) -> Path:
    """Newest finished run of ``experiment`` whose ``metrics.json`` has ``artifact == kind``.

    Raises:
        ConfigError: no such run, or an unfinished run for ``kind`` is newer than it (see
            :func:`qcflow.utils.runs.check_no_newer_unfinished`).
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
        max(found, key=lambda r: ((r / "metrics.json").stat().st_mtime, str(r))) if found else None
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
    """The task network's checkpoint: ``explicit`` or the latest ``experiment`` run's."""
    return resolve_checkpoint(cfg, explicit, experiment)


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
            out[k] = resolve_checkpoint(cfg, explicit[k], experiment)
        else:
            run = latest_teacher_run(cfg.paths.runs_dir, experiment, k)
            last = run / "checkpoints" / "last.ckpt"
            out[k] = last if last.is_file() else sorted((run / "checkpoints").glob("*.ckpt"))[-1]
    return out


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
