"""The Lightning prediction engine of scoring: every scorer on every scan, one row each.

:func:`score_scans` runs :class:`ScoringModule` (one scan per ``predict_step``, through
:func:`qcflow.qc.scoring.score_row`) with a :class:`ScoreWriter` that adds each row to the
table. Loading and preprocessing run in DataLoader workers (``num_workers``); rows keep scan
order. A ``trainer`` with ``strategy=ddp`` and ``devices=N`` spreads the scans over N processes
(each writes its rows; rank 0 merges them) with the same rows as one process. The guarantees
(bad scans, atomic incremental writes, resume) are those of :mod:`qcflow.qc.scoring`.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from qcflow.data.discovery import Scan
from qcflow.data.preprocess import PreprocessConfig
from qcflow.qc.scoring import (
    Scorer,
    ScoreTable,
    ScoringDataset,
    TableWriteError,
    prepare_scoring,
    rank_table_path,
    score_row,
)

__all__ = ["ScoringModule", "ScoreWriter", "default_trainer", "quiet_lightning", "score_scans"]

log = logging.getLogger(__name__)


def _single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for ``batch_size=1``: the item itself (scans differ in what they carry)."""
    return batch[0]


class ScoringModule(pl.LightningModule):
    """Runs every scorer on one scan per ``predict_step`` and returns the row.

    The scorers' networks are moved to the module's device at the start of prediction
    (:meth:`Scorer.to`); a scan's tensors are moved in :meth:`transfer_batch_to_device`. Row
    keys starting with ``_`` are not table columns: they are handed to the writer's ``on_row``
    in ``item["extras"]``.

    Args:
        scorers: the scorers.
        views: the preprocessing key each scorer reads (:class:`~qcflow.qc.scoring.ScoringPlan`).
        model_id: the models' identity.
    """

    def __init__(self, scorers: Sequence[Scorer], views: Sequence[str], model_id: str) -> None:
        super().__init__()
        self.scorers = list(scorers)
        self.views = list(views)
        self.model_id = model_id

    def on_predict_start(self) -> None:
        for scorer in self.scorers:
            scorer.to(self.device)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        def move(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        out = move(batch)
        out["views"] = {k: move(v) for k, v in batch.get("views", {}).items()}
        return out

    def predict_step(self, item: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        # float32 even under a mixed-precision trainer: thresholds were computed in float32
        with torch.autocast(self.device.type, enabled=False):
            return score_row(item, self.scorers, self.views, self.model_id)


class ScoreWriter(BasePredictionWriter):
    """Adds each predicted row to this rank's :class:`ScoreTable` (flushed incrementally and
    on an exception) and calls ``on_row(row, item)``."""

    def __init__(
        self,
        table: ScoreTable,
        on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.table = table
        self.on_row = on_row
        self.new = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.table.path = rank_table_path(self.table.path, trainer.global_rank)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        extras = {k: prediction.pop(k) for k in [k for k in prediction if k.startswith("_")]}
        self.table.add(prediction)
        self.new += 1
        if self.on_row is not None:
            self.on_row(prediction, {**batch, "extras": extras})

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, TableWriteError):
            return  # the table cannot be written: the last complete one stays
        try:
            self.table.flush()  # Ctrl-C or a crash: a valid partial table
        except TableWriteError as exc:
            log.warning("%s", exc)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.table.flush()


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up banner (GPU/TPU availability, tips) and a torch pytree
    deprecation warning it triggers; warnings and errors still show."""
    import warnings

    banner = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
            yield
    finally:
        banner.setLevel(level)


def default_trainer(progress: bool) -> pl.Trainer:
    """A single-process CPU trainer for scoring (no logger, no checkpoints)."""
    with quiet_lightning():
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )


def score_scans(
    scans: Sequence[Scan],
    scorers: Sequence[Scorer],
    table_path: str | Path,
    pcfg: PreprocessConfig,
    cache_dir: str | Path | None = None,
    previous: pd.DataFrame | None = None,
    num_workers: int = 0,
    flush_every: int = 10,
    progress: bool | None = None,
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    trainer: pl.Trainer | None = None,
    on_reuse: Callable[[Scan, dict[str, Any]], None] | None = None,
) -> pd.DataFrame | None:
    """Score every scan with every scorer; see :mod:`qcflow.qc.scoring` for the guarantees.

    Args:
        scans: what to score (order kept in the table).
        scorers: column producers; their columns follow ``scan_id, path, site``. A scorer with
            its own ``preprocess`` gets its own view.
        table_path: the ``scores.tsv`` written incrementally.
        pcfg: default preprocessing settings (the ``data`` config), unless a scorer fixes the
            reference view (:func:`~qcflow.qc.scoring.reference_preprocessing`).
        cache_dir: preprocessing cache (None: no cache).
        previous: an earlier table to resume from (rows with the same file content and
            model identity are kept, not recomputed).
        num_workers: DataLoader workers for loading/preprocessing.
        flush_every: rows between atomic rewrites of the table.
        progress: show a progress bar with ETA (default: when stderr is a terminal).
        on_row: called as ``on_row(row, item)`` for every newly scored scan (``item`` holds
            the preprocessed ``image``; e.g. to write thumbnails).
        trainer: the Lightning trainer that runs prediction (default: one CPU process). With
            several processes (``strategy=ddp``, ``devices=N``) each rank scores its share
            into ``scores.rank<r>.tsv``; rank 0 merges them into ``table_path``.
        on_reuse: called as ``on_reuse(scan, previous_row)`` for every scan whose previous
            row is kept (``previous_row["scan_id"]`` is the id it had then, e.g. to copy its
            thumbnail and maps).

    Returns:
        The final table (``None`` on ranks other than 0). After Ctrl-C the partial table is
        flushed, then KeyboardInterrupt is raised.

    Raises:
        TableWriteError: the table could not be written (disk full); it keeps the rows of
            its last complete write.
    """
    plan = prepare_scoring(
        scans, scorers, table_path, pcfg, cache_dir, previous, flush_every, on_reuse
    )
    table = plan.table
    show = sys.stderr.isatty() if progress is None else bool(progress)
    trainer = trainer if trainer is not None else default_trainer(show)
    writer = ScoreWriter(table, on_row)
    trainer.callbacks.append(writer)
    loader = DataLoader(
        ScoringDataset(plan.todo, plan.caches, plan.digests),
        batch_size=1,
        collate_fn=_single,
        num_workers=num_workers,
        shuffle=False,
    )
    t0 = time.perf_counter()
    handler = signal.getsignal(signal.SIGINT)
    try:
        if plan.todo:
            with quiet_lightning():
                module = ScoringModule(scorers, plan.views, plan.model_id)
                trainer.predict(module, loader, return_predictions=False)
        else:
            table.flush()
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after on_exception
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning leaves SIGINT ignored after Ctrl-C
        trainer.callbacks.remove(writer)
    log.info("scored %d scans in %.1f s", writer.new, time.perf_counter() - t0)
    if trainer.world_size > 1:
        trainer.strategy.barrier("qcflow-score-merge")
        if trainer.global_rank != 0:
            return None
        table.merge_ranks(trainer.world_size)
    return table.frame()
