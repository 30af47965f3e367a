"""Wiring shared by training tasks: seeding, trainer/logger/callback construction, checkpoints.

Tasks stay plain ``run(cfg) -> dict`` functions; this module turns config groups into
Lightning objects and finds earlier stages' checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from qcflow.errors import ConfigError
from qcflow.utils.runs import find_latest_run

__all__ = [
    "seed_all",
    "build_loggers",
    "build_callbacks",
    "build_trainer",
    "resolve_checkpoint",
    "trainer_metrics",
]

log = logging.getLogger(__name__)


def seed_all(cfg: DictConfig) -> int:
    """Seed Python, NumPy and torch (and DataLoader workers) from ``cfg.seed``."""
    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True, verbose=False)
    return seed


def _instantiate_group(group: Any) -> list[Any]:
    """Instantiate every entry of a ``name -> {_target_: ...}`` config mapping."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Loggers from ``cfg.logger`` (``csv`` by default)."""
    return _instantiate_group(cfg.get("logger"))


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """Callbacks from ``cfg.callbacks`` (checkpointing by default)."""
    return _instantiate_group(cfg.get("callbacks"))


def build_trainer(
    cfg: DictConfig, callbacks: Iterable[pl.Callback] = (), **overrides: Any
) -> pl.Trainer:
    """A ``pl.Trainer`` from ``cfg.trainer`` with the configured loggers and callbacks.

    With a W&B logger, :class:`~qcflow.lit.callbacks.WandbMedia` is added: the run gets the
    resolved config, the figures the module writes to ``<run>/figures`` and artifact examples.

    Args:
        cfg: the composed config.
        callbacks: extra callbacks (e.g. a method's schedule) added after the configured ones.
        **overrides: Trainer arguments that win over the config.
    """
    loggers = build_loggers(cfg)
    all_callbacks = [*build_callbacks(cfg), *callbacks]
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        from omegaconf import OmegaConf

        from qcflow.lit.callbacks import WandbMedia

        # the dashboard: resolved config, figures of <run>/figures, artifact examples
        config = OmegaConf.to_container(cfg, resolve=True)
        figures = Path(str(cfg.paths.output_dir)) / "figures"
        all_callbacks.append(WandbMedia(figures, config))  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"logger": loggers or False, "callbacks": all_callbacks}
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


def resolve_checkpoint(cfg: DictConfig, explicit: str | Path | None, experiment_name: str) -> Path:
    """An explicit checkpoint path, else ``last.ckpt`` of the latest run of ``experiment_name``.

    Raises:
        ConfigError: the explicit file does not exist, or no finished run has a checkpoint.
    """
    if explicit:
        path = Path(str(explicit)).expanduser()
        if path.is_dir():  # a run folder was given
            path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"{path}: checkpoint not found")
        return path
    run = find_latest_run(cfg.paths.runs_dir, experiment_name, require="checkpoints/*.ckpt")
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    return sorted((run / "checkpoints").glob("*.ckpt"))[-1]


def trainer_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's last logged scalar metrics as plain floats (NaN/inf dropped)."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[key] = v
    return out
