"""What a W&B dashboard shows besides Lightning's scalars: config, artifact examples, figures.

The W&B plumbing without Lightning (mode, active run, image/table logging) is
:mod:`qcflow.utils.wandb`; this callback is its Lightning side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from qcflow.data.contrastive import KIND_CODES

__all__ = ["WandbMedia", "artifact_examples"]

#: corruption codes of the contrastive batches -> their names
_KIND_NAMES = {code: name for name, code in KIND_CODES.items()}


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
