"""Wiring shared by the tasks: seeding, threads, trainer/logger/callback construction.

Tasks stay plain ``run(cfg) -> dict`` functions; this module turns config groups into
Lightning objects. Finding earlier runs and resuming live in :mod:`qcflow.runs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

__all__ = [
    "seed_all",
    "set_threads",
    "skipped_report",
    "build_loggers",
    "build_callbacks",
    "build_trainer",
    "trainer_metrics",
    "required",
]

log = logging.getLogger(__name__)


def required(node: Mapping[str, Any], key: str, where: str) -> Any:
    """``node[key]``, whose value the YAML gives (the only source of it: no default here).

    Raises:
        ConfigError: one line naming ``where.key`` when the key is missing.
    """
    from qcflow.errors import ConfigError

    if key not in node:
        raise ConfigError(f"{where}.{key}: missing from the config (conf/ gives it)")
    return node[key]


def seed_all(cfg: DictConfig) -> int:
    """Seed Python, NumPy and torch (and DataLoader workers) from ``cfg.seed``."""
    seed = int(cfg.get("seed", 0))
    pl.seed_everything(seed, workers=True, verbose=False)
    return seed


def set_threads(cfg: DictConfig) -> None:
    """``torch.set_num_threads(cfg.threads)`` when set (with 2 threads a step gets 15-100x
    slower whenever another process uses the CPU: fewer is safer on shared CPUs)."""
    threads = cfg.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def skipped_report(dm: Any) -> list[dict[str, str]]:
    """The scans a data module skipped, as ``[{"scan": path, "reason": ...}]``."""
    return [{"scan": str(scan.path), "reason": reason} for scan, reason in dm.errors]


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
    cfg: DictConfig,
    callbacks: Iterable[pl.Callback] = (),
    samplers: Callable[[], Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> pl.Trainer:
    """A ``pl.Trainer`` from ``cfg.trainer`` with the configured loggers and callbacks.

    :class:`~qcflow.lit.resume.ResumeState` is always added: every checkpoint carries the random
    state, so a resumed fit continues like an uninterrupted one. With a W&B logger,
    :class:`~qcflow.lit.wandb_media.WandbMedia` is added: the run gets the resolved config, the
    figures the module writes to ``<run>/figures`` and artifact examples.

    Args:
        cfg: the composed config.
        callbacks: extra callbacks (e.g. a method's schedule) added after the configured ones.
        samplers: the task's k-space samplers by name, for ``ResumeState`` (a seeded sampler's
            generator is saved with the checkpoint).
        **overrides: Trainer arguments that win over the config.
    """
    from qcflow.lit.resume import ResumeState

    loggers = build_loggers(cfg)
    all_callbacks = [*build_callbacks(cfg), *callbacks, ResumeState(samplers)]
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        from omegaconf import OmegaConf

        from qcflow.lit.wandb_media import WandbMedia

        # the dashboard: resolved config, figures of <run>/figures, artifact examples
        config = OmegaConf.to_container(cfg, resolve=True)
        figures = Path(str(cfg.paths.output_dir)) / "figures"
        all_callbacks.append(WandbMedia(figures, config))  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {"logger": loggers or False, "callbacks": all_callbacks}
    kwargs.update(overrides)
    return instantiate(cfg.trainer, **kwargs)


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
