"""Training callbacks: the uncertainty networks' epsilon schedule, the contrastive encoder's
severity curriculum, W&B dashboard media, a DDP probe."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = [
    "EpsilonSchedule",
    "SeverityCurriculum",
    "WandbMedia",
    "DDPProbe",
    "artifact_examples",
]

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
        monitor: str = "train/loss_epoch",
        patience: int = 2,
        min_delta: float = 1e-3,
        factor: float = 0.5,
        floor: float = 1e-3,
        halve_lr: bool = True,
        stop_at_floor: bool = False,
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


class SeverityCurriculum(pl.Callback):
    """Move the contrastive negatives' artifact ranges from the configured ones to milder ones.

    Extension of Zuo et al. 2023 (off by default; ``contrastive.curriculum`` in
    ``conf/experiment/encoder_contrastive.yaml``). With the paper's ranges the training loss is
    ~0 after a few epochs and mild artifacts stay inside the clean codes; mild negatives from
    the start spread the clean codes instead (README of ``experiments/zuo2023_iqc``). The
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


#: corruption codes of the contrastive batches (``qcflow.data.contrastive.KIND_CODES``)
_KIND_NAMES = {0: "clean", 1: "noise", 2: "motion", 3: "motion+noise", 4: "other"}


def _tile(x: torch.Tensor) -> np.ndarray:
    """``(1, H, W)`` or ``(1, H, W, D)`` (mid slice of the last axis) -> ``(H, W)`` float."""
    x = x.detach().float().cpu()[0]
    if x.ndim == 3:
        x = x[..., x.shape[-1] // 2]
    return np.rot90(x.numpy())


def _scale(tile: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((tile - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def artifact_examples(
    batch: Mapping[str, Any], max_items: int = 4
) -> tuple[np.ndarray, str] | None:
    """A grid of what the network trains on: clean inputs beside their simulated artifacts.

    Understands the two training batches of qcflow: contrastive slices (``query`` ``(B, 1, S,
    S)``, ``corrupted`` ``(B, K, 1, S, S)``, ``corrupt_kind`` ``(B, K)``: a row is the query
    then its K corrupted negatives) and paired 3-D patches (``image_clean``, ``image`` ``(B, 1,
    p, p, p)``: a row is the clean and the corrupted mid slice and their absolute difference,
    for items that were corrupted). Each row shares the intensity window of its clean tile.

    Args:
        batch: one training batch.
        max_items: rows at most.

    Returns:
        ``(grid, caption)`` with ``grid`` ``(H, W)`` in [0, 1], or ``None`` when the batch has
        no artifact examples (clean training, unknown batch).
    """
    rows: list[list[np.ndarray]] = []
    if "query" in batch and "corrupted" in batch:
        q, c = batch["query"], batch["corrupted"]  # (B, 1, S, S), (B, K, 1, S, S)
        kinds = batch.get("corrupt_kind")
        names = []
        for b in range(min(len(q), max_items)):
            clean = _tile(q[b])
            lo, hi = np.percentile(clean, [1, 99])
            rows.append([_scale(clean, lo, hi), *[_scale(_tile(x), lo, hi) for x in c[b]]])
            if kinds is not None:
                names.append("/".join(_KIND_NAMES.get(int(k), "?") for k in kinds[b]))
        caption = "query, then its k-space-corrupted negatives" + (
            f" (rows: {'; '.join(names)})" if names else ""
        )
    elif "image" in batch and "image_clean" in batch:
        y, x = batch["image"], batch["image_clean"]  # (B, 1, p, p, p)
        changed = [b for b in range(len(y)) if not torch.equal(y[b], x[b])][:max_items]
        for b in changed:
            clean, corrupt = _tile(x[b]), _tile(y[b])
            lo, hi = np.percentile(clean, [1, 99])
            diff = np.abs(corrupt - clean)
            rows.append(
                [_scale(clean, lo, hi), _scale(corrupt, lo, hi), _scale(diff, 0, diff.max())]
            )
        caption = "clean patch, corrupted patch, |difference| (mid slice)"
    if not rows:
        return None
    h, w = rows[0][0].shape
    n_cols = max(len(r) for r in rows)
    pad = 2
    grid = np.ones((len(rows) * (h + pad) - pad, n_cols * (w + pad) - pad), np.float32)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = tile
    return grid, caption


class WandbMedia(pl.Callback):
    """What a W&B dashboard shows besides Lightning's scalars.

    * the resolved Hydra config (``config``), at the start of training;
    * a grid of artifact examples from the first training batch (:func:`artifact_examples`),
      under ``examples/artifacts``;
    * every new PNG written to ``figure_dir`` (e.g. the encoder's validation embedding
      scatter ``embedding_epochNNN.png``), after each validation and at the end of training,
      under ``figures/<name>`` with the epoch suffix dropped, so W&B shows one panel per figure
      with a step slider.

    Added by :func:`qcflow.tasks.common.build_trainer` when a W&B logger is configured; a no-op
    for other loggers and off rank 0 (:mod:`qcflow.utils.wandb`).

    Args:
        figure_dir: the run's figure folder.
        config: the resolved config (plain dict) to attach to the run.
        examples: log the artifact examples.
    """

    def __init__(
        self,
        figure_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        examples: bool = True,
    ) -> None:
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.config = dict(config) if config else None
        self.examples = examples
        self._seen: dict[Path, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from qcflow.utils.wandb import active_run

        run = active_run(trainer)
        if run is not None and self.config:
            run.config.update(self.config, allow_val_change=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.examples or not isinstance(batch, Mapping):
            return
        self.examples = False  # the first batch only
        made = artifact_examples(batch)
        if made is not None:
            from qcflow.utils.wandb import log_images

            grid, caption = made
            image = (grid * 255).astype(np.uint8)
            log_images(trainer, {"examples/artifacts": image}, trainer.global_step, caption)

    def _new_figures(self, trainer: pl.Trainer) -> None:
        if self.figure_dir is None or not self.figure_dir.is_dir():
            return
        from qcflow.utils.wandb import log_images

        for path in sorted(self.figure_dir.glob("*.png")):
            mtime = path.stat().st_mtime
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            key = re.sub(r"_?epoch\d+$", "", path.stem) or path.stem
            log_images(trainer, {f"figures/{key}": path}, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._new_figures(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._new_figures(trainer)


class DDPProbe(pl.Callback):
    """Record what each rank trained on and what it ended with, to check a distributed run.

    Writes ``<folder>/rank<R>.json`` per rank at the end of training: ``world_size``,
    ``global_step``, one fingerprint per training batch (``scan_id@location`` of every patch or
    item when the batch has them, else a hash of the ``image``/``query`` tensor), the SHA-256 of
    all parameters (equal on every rank after a correct DDP run), the learning rates and, when
    the module has one, ``eps``. Add it from the command line:
    ``+callbacks.probe._target_=qcflow.lit.callbacks.DDPProbe +callbacks.probe.folder=DIR``.

    Args:
        folder: where the JSON files go.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.batches: list[list[str]] = []

    @staticmethod
    def fingerprint(batch: Any) -> list[str]:
        """One string per item of a batch dict."""
        import hashlib

        if isinstance(batch, Mapping) and "scan_id" in batch:
            loc = batch.get("location")
            ids = [str(s) for s in batch["scan_id"]]
            if loc is None:
                loc = batch.get("index", [None] * len(ids))
            return [f"{sid}@{torch.as_tensor(x).tolist()}" for sid, x in zip(ids, loc, strict=True)]
        key = next(
            (k for k in ("image", "query") if isinstance(batch, Mapping) and k in batch), None
        )
        tensors = batch[key] if key else batch
        return [hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest() for t in tensors]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(self.fingerprint(batch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import hashlib
        import json

        digest = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "params_sha256": digest.hexdigest(),
            "lr": [g["lr"] for opt in trainer.optimizers for g in opt.param_groups],
            "eps": float(pl_module.eps) if hasattr(pl_module, "eps") else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
