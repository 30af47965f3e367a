"""Find and load the earlier stages of method B (task -> teachers -> student).

Teachers are one run per artifact kind, all under the experiment name ``uncertainty_teacher``
(typically one multirun, ``artifact=spike,noise,blur,wrap,motion``); each run's ``metrics.json``
records its ``artifact``. "The teacher for kind k" is the newest finished teacher run (single
runs and multirun jobs) whose ``metrics.json`` says ``artifact: k`` and that has a checkpoint.
Explicit checkpoint paths always win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qcflow.errors import ConfigError
from qcflow.tasks.common import resolve_checkpoint

__all__ = ["latest_teacher_run", "task_checkpoint", "teacher_checkpoints", "load_stage"]


def latest_teacher_run(runs_dir: str | Path, experiment: str, kind: str) -> Path:
    """Newest finished run of ``experiment`` whose ``metrics.json`` has ``artifact == kind``."""
    import json

    base = Path(runs_dir) / experiment
    found = []
    for metrics in [*base.glob("*/metrics.json"), *base.glob("multirun_*/*/metrics.json")]:
        try:
            artifact = json.loads(metrics.read_text()).get("artifact")
        except (OSError, ValueError):
            continue
        if artifact == kind and any((metrics.parent / "checkpoints").glob("*.ckpt")):
            found.append(metrics)
    if not found:
        raise ConfigError(
            f"{base}: no finished '{experiment}' run for artifact '{kind}'; run `python -m "
            f"qcflow experiment={experiment} artifact={kind}` first or give "
            f"uncertainty.teacher_ckpts.{kind}"
        )
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))).parent


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

    module = UncertaintySeg.load_from_checkpoint(str(path), map_location=map_location)
    module.eval()
    module.requires_grad_(False)
    return module
