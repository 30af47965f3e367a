"""Resuming a training run (``resume=``): where it continues from, and fitting from there.

A training task continues a run from its checkpoint with the optimizer, the loops' progress,
every callback's state and the random state (:class:`qcflow.lit.resume.ResumeState`). An
unfinished run (a checkpoint, no ``metrics.json``) is continued *in its own folder*: Hydra has
already made a new folder for this invocation before the task runs, so :func:`prepare_resume`
points ``paths.output_dir`` at the resumed run (checkpoints, loggers, figures and -- written by
the CLI after the task returns -- ``metrics.json`` all follow it) and leaves only a
``resume.json`` pointer and this attempt's log in the new folder. The resumed run then ends as
one finished run that later stages find. A finished run is never modified: resuming from it (or
from a loose ``.ckpt`` file) continues training in the new folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from qcflow.errors import ConfigError
from qcflow.runs.folders import (
    is_finished,
    resume_checkpoint,
    run_artifact,
    run_of_checkpoint,
    unfinished_runs,
)

__all__ = [
    "Resume",
    "resume_plan",
    "prepare_resume",
    "fit",
    "check_checkpoint",
    "resume_results",
    "LIGHTNING_CHECKPOINT_KEYS",
]

log = logging.getLogger(__name__)

#: what a Lightning checkpoint needs to continue a fit (a ``save_weights_only`` file lacks them)
LIGHTNING_CHECKPOINT_KEYS = ("state_dict", "loops", "optimizer_states")


@dataclass(frozen=True)
class Resume:
    """Where a training run continues from.

    Attributes:
        checkpoint: the checkpoint file.
        run_dir: the run folder the checkpoint belongs to (``None``: a loose file).
        in_place: continue writing into ``run_dir`` (it did not finish); else into this
            invocation's own (new) folder.
    """

    checkpoint: Path
    run_dir: Path | None
    in_place: bool


def _resume_value(cfg: DictConfig) -> str | None:
    value = cfg.get("resume")
    if value is None or value is False:
        return None
    text = str(value).strip()
    if text.lower() in ("", "false", "null", "none", "no", "0"):
        return None
    if value is True or text.lower() in ("true", "yes", "1", "latest"):
        return "latest"
    if text.lower() == "auto":
        return "auto"
    return text


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def check_checkpoint(path: Path, keys: Sequence[str] = LIGHTNING_CHECKPOINT_KEYS) -> None:
    """Refuse a file that cannot be loaded with ``weights_only=True`` or lacks ``keys``."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(
            f"resume: {path} is not a loadable checkpoint ({_first_line(err)})"
        ) from err
    missing = [k for k in keys if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise ConfigError(
            f"resume: {path} cannot continue a training run (no {', '.join(missing)} in it; "
            "a weights-only checkpoint cannot be resumed)"
        )


def _same_artifact(cfg: DictConfig) -> Callable[[Path], bool] | None:
    """For experiments that share a name across artifact kinds (teachers): match the kind."""
    if cfg.get("artifact") is None:
        return None
    kind = str(cfg.artifact)
    return lambda run: run_artifact(run) == kind


def resume_plan(cfg: DictConfig, keys: Sequence[str] = LIGHTNING_CHECKPOINT_KEYS) -> Resume | None:
    """What ``cfg.resume`` asks for, checked; ``None`` for a fresh run.

    ``cfg.resume``:

    * ``null`` / ``false``: start fresh;
    * ``true`` (or ``latest``): the latest *unfinished* run of ``experiment_name`` (a
      checkpoint, no ``metrics.json``; for experiments with an ``artifact``, one of the same
      artifact), continued in its folder;
    * ``auto``: this run's own folder if it already holds an unfinished run, else a fresh start
      -- for jobs that are re-run in the same folder (a SLURM requeue via submitit, or a pinned
      ``hydra.run.dir``);
    * a run folder or a checkpoint file: continued in place when its run did not finish, else
      (a finished run, a loose file) in this invocation's new folder.

    In a run folder the checkpoint is the newer of ``checkpoints/last.ckpt`` and Lightning's
    SLURM requeue checkpoint ``hpc_ckpt_<n>.ckpt``.

    Args:
        cfg: the composed config.
        keys: what the checkpoint must contain (a Lightning fit's state by default).

    Raises:
        ConfigError: a missing or unusable path, or no unfinished run to resume.
    """
    value = _resume_value(cfg)
    if value is None:
        return None
    name = str(cfg.get("experiment_name") or cfg.get("task"))
    if value == "auto":
        own = Path(str(cfg.paths.output_dir))
        ckpt = resume_checkpoint(own) if not is_finished(own) else None
        if ckpt is None:
            return None
        check_checkpoint(ckpt, keys)
        return Resume(ckpt, own, True)
    if value == "latest":
        runs = unfinished_runs(cfg.paths.runs_dir, name, _same_artifact(cfg))
        if not runs:
            kind = f" for artifact '{cfg.artifact}'" if cfg.get("artifact") is not None else ""
            raise ConfigError(
                f"resume=true: no unfinished '{name}' run{kind} under "
                f"{Path(str(cfg.paths.runs_dir)) / name} (unfinished: a checkpoint but no "
                "metrics.json); give resume=PATH (a run folder or a .ckpt file) or leave "
                "resume unset"
            )
        run = runs[0]
        ckpt = resume_checkpoint(run)
        assert ckpt is not None  # unfinished runs have a checkpoint
        check_checkpoint(ckpt, keys)
        return Resume(ckpt, run, True)
    path = Path(value).expanduser()
    if path.is_dir():
        ckpt = resume_checkpoint(path)
        if ckpt is None:
            raise ConfigError(
                f"resume={value}: no checkpoint in {path} (looked for checkpoints/last.ckpt, "
                "checkpoints/*.ckpt and hpc_ckpt_*.ckpt)"
            )
        run: Path | None = path
    elif path.is_file():
        ckpt, run = path, run_of_checkpoint(path)
    else:
        raise ConfigError(f"resume={value}: {path} not found (give a run folder or a .ckpt file)")
    check_checkpoint(ckpt, keys)
    return Resume(ckpt, run, run is not None and not is_finished(run))


def _config_differences(saved: Path, cfg: DictConfig, limit: int = 6) -> list[str]:
    """``key: saved -> now`` for the settings that differ from the resumed run's own."""
    try:
        before = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except Exception:
        return []
    now = OmegaConf.to_container(cfg, resolve=False)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    def interpolated(v: Any) -> bool:  # one side resolved, the other not: not comparable
        return isinstance(v, str) and "${" in v

    a, b = flat(before), flat(now)
    skip = ("resume", "paths.")
    keys = sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k)
        and not k.startswith(skip)
        and not (interpolated(a.get(k)) or interpolated(b.get(k)))
    )
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit]] + (
        [f"... {len(keys) - limit} more"] if len(keys) > limit else []
    )


def _retarget(cfg: DictConfig, old: str, new: str) -> None:
    """Point ``paths.output_dir`` -- and every setting already resolved from it (a config from
    :func:`qcflow.api.compose_config` is resolved; the CLI's still holds interpolations, which
    follow by themselves) -- from ``old`` to ``new``."""
    old = old.rstrip("/")
    updates: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            where = f"{prefix}{key}"
            if isinstance(value, (dict, list)):
                walk(value, where + ".")
            elif isinstance(value, str) and (value == old or value.startswith(old + "/")):
                updates[where] = new + value[len(old) :]

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    with open_dict(cfg):
        cfg.paths.output_dir = new
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, merge=False)


def _is_rank_zero() -> bool:
    from pytorch_lightning.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def prepare_resume(
    cfg: DictConfig, keys: Sequence[str] = LIGHTNING_CHECKPOINT_KEYS
) -> Resume | None:
    """Resolve ``cfg.resume`` (:func:`resume_plan`) and, for an in-place resume, point
    ``cfg.paths.output_dir`` at the resumed run's folder (before anything is built from it).

    This invocation's own folder keeps a ``resume.json`` (which run it continued, from which
    checkpoint); settings that differ from the resumed run's saved config are logged.
    """
    plan = resume_plan(cfg, keys)
    if plan is None:
        return None
    own = Path(str(cfg.paths.output_dir))
    run = plan.run_dir
    if run is not None and (run / ".hydra" / "config.yaml").is_file():
        diff = _config_differences(run / ".hydra" / "config.yaml", cfg)
        if diff:
            log.warning("resume: settings differ from run %s's own: %s", run, "; ".join(diff))
    if plan.in_place and run is not None and run.resolve() != own.resolve():
        _retarget(cfg, str(own), str(run))
        if _is_rank_zero():
            from qcflow.utils.io import atomic_write_json

            own.mkdir(parents=True, exist_ok=True)
            record = {"resumed_run": str(run), "checkpoint": str(plan.checkpoint)}
            atomic_write_json(own / "resume.json", record)
        log.info("resume: continuing run %s from %s (outputs go there)", run, plan.checkpoint)
    elif plan.in_place:
        log.info("resume: continuing this run from %s", plan.checkpoint)
    else:
        why = "a finished run is never modified" if run is not None else "a loose checkpoint"
        log.info(
            "resume: training continues from %s in this new run folder %s (%s)",
            plan.checkpoint,
            own,
            why,
        )
    return plan


def _csv_files(trainer: pl.Trainer) -> list[Path]:
    from pytorch_lightning.loggers import CSVLogger

    return [Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)]


def _read_csv_rows(paths: Iterable[Path], below_step: int | None = None) -> Any:
    import pandas as pd

    frames = []
    for p in paths:
        if p.is_file() and p.stat().st_size > 0:
            try:
                frames.append(pd.read_csv(p))
            except (ValueError, OSError):  # an empty or half-written file
                continue
    if not frames:
        return None
    rows = pd.concat(frames, ignore_index=True, sort=False)
    if below_step is not None and "step" in rows:
        rows = rows[rows["step"] < below_step]
    return rows


def _hold_csv(trainer: pl.Trainer, global_step: int) -> list[tuple[Path, Path]]:
    """Lightning's CSVLogger deletes an existing ``metrics.csv``: keep the resumed run's rows
    logged before the checkpoint (later ones are logged again) in ``metrics.before_resume.csv``."""
    held = []
    for cur in _csv_files(trainer):
        keep = cur.with_name("metrics.before_resume.csv")
        rows = _read_csv_rows([keep, cur], below_step=global_step)
        if rows is not None:
            from qcflow.utils.io import atomic_write_text

            atomic_write_text(keep, rows.to_csv(index=False))
        cur.unlink(missing_ok=True)
        if keep.is_file():
            held.append((cur, keep))
    return held


def _merge_csv(held: list[tuple[Path, Path]]) -> None:
    from qcflow.utils.io import atomic_write_text

    for cur, keep in held:
        rows = _read_csv_rows([keep, cur])
        if rows is not None:
            atomic_write_text(cur, rows.to_csv(index=False))
        keep.unlink(missing_ok=True)


def _checkpoint_step(path: Path) -> int:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", 0))


def fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    resume: Resume | None = None,
) -> None:
    """``trainer.fit``, from ``resume.checkpoint`` when given (``weights_only=True``).

    An in-place resume appends this attempt's log to the resumed run's log file and keeps the
    CSV rows the run logged before its checkpoint.
    """
    if resume is None:
        trainer.fit(module, datamodule=datamodule)
        return
    handler = None
    held: list[tuple[Path, Path]] = []
    if resume.in_place and resume.run_dir is not None and _is_rank_zero():
        handler = _attach_run_log(resume.run_dir)
        held = _hold_csv(trainer, _checkpoint_step(resume.checkpoint))
    log.info("resume: fitting from %s", resume.checkpoint)
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=str(resume.checkpoint), weights_only=True
        )
    finally:
        if held and _is_rank_zero():
            _merge_csv(held)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _attach_run_log(run: Path) -> logging.Handler | None:
    """A file handler that appends to ``run``'s own log (the name of this run's log file)."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return None
    name = Path(files[0].baseFilename).name
    target = run / name
    if Path(files[0].baseFilename).resolve() == target.resolve():
        return None
    handler = logging.FileHandler(target, mode="a")
    handler.setFormatter(files[0].formatter)
    handler.setLevel(files[0].level)
    root.addHandler(handler)
    return handler


def resume_results(resume: Resume | None) -> dict[str, Any]:
    """What a task adds to its results about a resume (empty for a fresh run)."""
    if resume is None:
        return {}
    return {"resumed_from": str(resume.checkpoint)}
