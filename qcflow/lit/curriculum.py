"""The severity curriculum of the contrastive encoder's negatives (an extension of method A)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["SeverityCurriculum"]

log = logging.getLogger(__name__)


class SeverityCurriculum(pl.Callback):
    """Move the contrastive negatives' artifact ranges from the configured ones to milder ones.

    Extension of Zuo et al. 2023, a study setting (``contrastive.curriculum`` in
    ``conf/experiment/zuo_study_curriculum.yaml``; the main job trains without it). With the
    paper's ranges the training loss is ~0 after a few epochs and mild artifacts stay inside
    the clean codes; mild negatives from the start spread the clean codes instead. The
    curriculum starts at the configured ranges (level 0) and moves every strength range to
    ``mild`` (level 1) with :func:`qcflow.kspace.sampler.interpolate_ranges`, never milder than
    ``floor`` (e.g. noise SNR below the clean scans' lowest):

    * ``schedule='linear'``: level ``clip((epoch - warmup_epochs + 1) / ramp_epochs, 0, 1)``
      -- epochs ``0 .. warmup_epochs - 1`` at the configured ranges, then ``ramp_epochs``
      equal steps;
    * ``schedule='loss'``: the level rises by ``step`` (up to 1) after every training epoch
      whose mean loss is below ``loss_threshold`` (the current negatives are solved).

    A new level takes effect at the start of the next training epoch: the training data
    module's sampler is replaced (:meth:`ContrastiveDataModule.set_train_corrupt`, which
    redraws the banked 3-D negatives); validation keeps the configured negatives. The level is
    logged as ``train/curriculum_level``.

    Args:
        mild: kind -> {field: ``[low, high]``}, the ranges at level 1.
        floor: kind -> {field: value}, the mildest value a bound may reach.
        schedule: ``'linear'`` or ``'loss'``.
        warmup_epochs: linear: epochs at the configured ranges (>= 1: the first epoch's
            first batch is fetched before any epoch hook runs).
        ramp_epochs: linear: epochs from level 0 to 1.
        loss_threshold: loss: an epoch mean below it raises the level.
        step: loss: level increment.
    """

    def __init__(
        self,
        mild: Mapping[str, Mapping[str, Any]],
        floor: Mapping[str, Mapping[str, float]] | None = None,
        schedule: str = "linear",
        warmup_epochs: int = 3,
        ramp_epochs: int = 4,
        loss_threshold: float = 0.01,
        step: float = 0.25,
    ) -> None:
        from qcflow.kspace.sampler import interpolate_ranges

        if schedule not in ("linear", "loss"):
            raise ValueError(f"schedule must be 'linear' or 'loss', got {schedule!r}")
        if warmup_epochs < 1 or ramp_epochs < 1 or not 0.0 < step <= 1.0:
            raise ValueError(
                "need warmup_epochs >= 1, ramp_epochs >= 1 and 0 < step <= 1, got "
                f"{warmup_epochs}, {ramp_epochs}, {step}"
            )
        self.mild = {k: dict(v) for k, v in mild.items()}
        self.floor = {k: dict(v) for k, v in (floor or {}).items()}
        interpolate_ranges({}, self.mild, 1.0, self.floor)  # unknown fields fail here
        self.schedule = schedule
        self.warmup_epochs = int(warmup_epochs)
        self.ramp_epochs = int(ramp_epochs)
        self.loss_threshold = float(loss_threshold)
        self.step = float(step)
        self.level = 0.0  # level of the next epoch (loss schedule)
        self.applied = 0.0  # level the training negatives are drawn at
        self.base: Any = None  # the configured sampler (level 0)
        self.history: list[tuple[int, float]] = []  # (epoch, level) at every change
        self._losses: list[float] = []

    def level_at(self, epoch: int) -> float:
        """Level of training epoch ``epoch`` (0-based)."""
        if self.schedule == "loss":
            return self.level
        return min(max((epoch - self.warmup_epochs + 1) / self.ramp_epochs, 0.0), 1.0)

    def update(self, epoch_loss: float) -> bool:
        """Loss schedule: feed one epoch's mean loss; returns whether the level rose."""
        if self.schedule != "loss" or not math.isfinite(epoch_loss) or self.level >= 1.0:
            return False
        if epoch_loss >= self.loss_threshold:
            return False
        self.level = min(1.0, self.level + self.step)
        return True

    def ranges_at(self, level: float) -> dict[str, Any]:
        """The base sampler's ranges at ``level``."""
        from qcflow.kspace.sampler import interpolate_ranges

        return interpolate_ranges(self.base.ranges, self.mild, level, self.floor)

    def apply(self, datamodule: Any, level: float, epoch: int = -1) -> None:
        """Draw the training negatives at ``level`` from now on."""
        if not hasattr(datamodule, "set_train_corrupt"):
            raise TypeError(
                "SeverityCurriculum needs a ContrastiveDataModule (set_train_corrupt), got "
                f"{type(datamodule).__name__}"
            )
        if self.base is None:
            self.base = datamodule.train_corrupt
            if self.base is None:
                raise ValueError("SeverityCurriculum: the training data have no negatives sampler")
        ranges = self.ranges_at(level)
        datamodule.set_train_corrupt(self.base.with_ranges(ranges))
        self.applied = level
        self.history.append((epoch, level))
        log.info("severity curriculum: epoch %d, level %.3f: %s", epoch, level, ranges)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        target = self.level_at(epoch)
        if target != self.applied:
            self.apply(trainer.datamodule, target, epoch)
        self._losses = []
        pl_module.log("train/curriculum_level", float(self.applied), on_step=False, on_epoch=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            self._losses.append(float(torch.as_tensor(loss).detach()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule != "loss" or not self._losses:
            return
        # DDP: every rank must step at the same epoch
        value = torch.tensor(float(np.mean(self._losses)), device=pl_module.device)
        value = trainer.strategy.reduce(value, reduce_op="mean")
        if self.update(float(value)):
            log.info("severity curriculum: epoch loss %.4g -> level %.3f", value, self.level)

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.level = state_dict["level"]
        self.history = [tuple(h) for h in state_dict["history"]]
