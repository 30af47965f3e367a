"""Method B's epsilon schedule: epsilon and the learning rate halve together on loss plateaus.

Shaw et al., MIDL 2020 / MELBA 2021. Its settings are ``uncertainty.schedule`` in
``conf/experiment/uncertainty_task.yaml`` (built with ``hydra.utils.instantiate``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["EpsilonSchedule"]

log = logging.getLogger(__name__)


class EpsilonSchedule(pl.Callback):
    """Halve the loss's epsilon and the learning rate together when the loss plateaus.

    Shaw et al. (MELBA 2021): epsilon in ``CE / (sigma^2 + eps) + 1/2 log(sigma^2 + eps)`` starts
    at 0.05 and is halved on every loss plateau until it is below 1e-3; the learning rate is
    halved at the same steps. The module holds the current value in ``pl_module.eps``.

    Plateau rule: at the end of every training epoch the monitored value is compared with the
    best so far; an improvement is a drop by more than ``min_delta`` (relative). After
    ``patience`` epochs without improvement epsilon and every optimizer's learning rate are
    multiplied by ``factor`` and the best value is reset (the loss scale changes with epsilon).
    Once epsilon is below ``floor`` nothing changes any more (optionally training stops).
    Under DDP the monitored value is first averaged over the ranks, so every rank halves at the
    same epoch and the replicas stay identical.

    Args:
        monitor: logged metric (``train/loss_epoch``).
        patience: epochs without improvement that make a plateau.
        min_delta: relative improvement that counts.
        factor: multiplier of epsilon and the learning rate (0.5).
        floor: no halving once epsilon is below it (1e-3).
        halve_lr: also scale the learning rate.
        stop_at_floor: stop training once epsilon is below the floor.
    """

    def __init__(
        self,
        *,
        monitor: str,
        patience: int,
        min_delta: float,
        factor: float,
        floor: float,
        halve_lr: bool,
        stop_at_floor: bool,
    ) -> None:
        if not 0 < factor < 1 or patience < 1:
            raise ValueError(f"need 0 < factor < 1 and patience >= 1, got {factor}, {patience}")
        self.monitor = monitor
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.factor = float(factor)
        self.floor = float(floor)
        self.halve_lr = bool(halve_lr)
        self.stop_at_floor = bool(stop_at_floor)
        self.best = math.inf
        self.wait = 0
        self.n_halvings = 0

    def update(self, value: float, pl_module: Any, optimizers: Iterable[Any] = ()) -> bool:
        """Feed one epoch's value; halve epsilon (and lr) on a plateau. Returns whether it did."""
        if not math.isfinite(value):
            return False
        if math.isinf(self.best) or value < self.best - abs(self.best) * self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait < self.patience or float(pl_module.eps) < self.floor:
            return False
        pl_module.eps = float(pl_module.eps) * self.factor
        if self.halve_lr:
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * self.factor
        self.best, self.wait = math.inf, 0
        self.n_halvings += 1
        log.info("loss plateau: eps -> %.3g (halving %d)", pl_module.eps, self.n_halvings)
        return True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        # DDP: each rank's epoch loss is its own; all must halve eps and lr at the same epoch
        value = torch.as_tensor(value, dtype=torch.float32).to(pl_module.device)
        value = trainer.strategy.reduce(value, reduce_op="mean")
        self.update(float(value), pl_module, trainer.optimizers)
        if self.stop_at_floor and float(pl_module.eps) < self.floor:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "n_halvings": self.n_halvings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]
        self.wait = state_dict["wait"]
        self.n_halvings = state_dict["n_halvings"]
