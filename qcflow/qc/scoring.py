"""Scoring a dataset scan by scan: robust to bad scans, incremental, atomic and resumable.

A *scorer* turns one preprocessed volume into columns (the classical IQMs here; the encoder +
flow density and the uncertainty student plug in the same way). :func:`score_scans` runs every
scorer on every scan:

* a scan that cannot be loaded or scored gets a row with ``status=error`` and the one-line
  reason in ``error``; the others continue;
* the table is rewritten atomically every ``flush_every`` rows and at the end, so an
  interrupted run (Ctrl-C, a killed job) leaves a valid partial ``scores.tsv``; when the table
  cannot be written (disk full), scoring stops with a one-line :class:`TableWriteError` and the
  file keeps its last complete content;
* with ``previous`` rows (resume), a scan whose file path, content (SHA-1) and model identity
  are unchanged is not scored again; its row is reused under the scan's current id, and
  floats and strings read back exactly as they were written (a resumed table is byte for
  byte the table of an uninterrupted run);
* loading and preprocessing run in DataLoader workers (``num_workers``); rows keep scan order;
* prediction runs through Lightning (:class:`ScoringModule` + :class:`ScoreWriter`), so a
  ``trainer`` with ``strategy=ddp`` and ``devices=N`` spreads the scans over N processes
  (each writes its rows; rank 0 merges them) with the same rows as one process.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from qcflow.data.discovery import Scan
from qcflow.data.nifti import check_readable
from qcflow.data.preprocess import PreprocessCache, PreprocessConfig, file_digest
from qcflow.errors import QCFlowError, ScanError
from qcflow.qc.iqm import IQM_NAMES, compute_iqms
from qcflow.utils.io import atomic_path

__all__ = [
    "BASE_COLUMNS",
    "Scorer",
    "IQMScorer",
    "ScoringDataset",
    "ScoringModule",
    "ScoreTable",
    "ScoreWriter",
    "STRING_COLUMNS",
    "TableWriteError",
    "default_trainer",
    "quiet_lightning",
    "rank_table_path",
    "models_identity",
    "score_scans",
]

log = logging.getLogger(__name__)

#: columns every scores.tsv starts with
BASE_COLUMNS = ("scan_id", "path", "site")
#: bookkeeping columns at the end (resume keys)
TAIL_COLUMNS = ("status", "error", "file_sha1", "model_id")
#: columns always read back as strings (an all-digit model_id or file_sha1 stays a string)
STRING_COLUMNS = (
    *BASE_COLUMNS,
    *TAIL_COLUMNS,
    "qc_decision",
    "subject",
    "session",
)


class TableWriteError(QCFlowError):
    """``scores.tsv`` could not be written (e.g. the disk is full); the file on disk keeps its
    last complete content. ``str(exc)`` is one line naming the file."""

    def __init__(self, path: Path, exc: OSError) -> None:
        reason = "disk full" if exc.errno == errno.ENOSPC else "cannot write"
        detail = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
        kept = (
            "the table keeps the rows of its last complete write"
            if path.is_file()
            else "no table was written"
        )
        super().__init__(
            f"{path}: {reason} ({detail}); scoring stopped, {kept}: free space and rerun "
            "with score.resume=true"
        )
        self.path = path


class Scorer(Protocol):
    """Computes columns for one preprocessed scan.

    ``identity`` changes whenever the scorer's output could change (e.g. a checkpoint digest);
    it is part of the resume key.
    """

    columns: Sequence[str]
    identity: str

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item``: ``{"image": (1, D, H, W) float32 in [0, 1], "affine", "scan": Scan}``."""
        ...


class IQMScorer:
    """Classical measures ``snr, cnr, cjv, efc, fber`` (:mod:`qcflow.qc.iqm`)."""

    columns = IQM_NAMES
    identity = "iqm-v1"

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        mask = item.get("mask")
        return compute_iqms(item["image"][0].cpu(), brain_mask=mask)


def models_identity(scorers: Iterable[Scorer], pcfg: PreprocessConfig) -> str:
    """Short hash of every scorer's identity and the preprocessing settings."""
    blob = "|".join([pcfg.key(), *(s.identity for s in scorers)])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class ScoringDataset(Dataset):
    """Loads and preprocesses scans; a bad scan yields ``error`` instead of raising.

    Items: ``{"scan", "file_sha1", "image" | None, "affine" | None, "views", "error": str}``.
    ``image``/``affine`` come from the first cache; ``views`` maps every cache's
    preprocessing key to ``{"image", "affine"}`` (scorers trained with other preprocessing
    read their own view).

    Args:
        scans: the scans to load.
        cache: preprocessing (and its optional on-disk cache), or several (first = default).
        digests: the files' SHA-1 when already computed (one read of each file saved).
    """

    def __init__(
        self,
        scans: Sequence[Scan],
        cache: PreprocessCache | Sequence[PreprocessCache],
        digests: Sequence[str] | None = None,
    ) -> None:
        self.scans = list(scans)
        self.caches = [cache] if isinstance(cache, PreprocessCache) else list(cache)
        self.digests = list(digests) if digests is not None else [""] * len(self.scans)

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        item: dict[str, Any] = {"scan": scan, "file_sha1": "", "image": None, "affine": None}
        item.update(views={}, error="")
        try:
            check_readable(scan.path)  # missing, a FIFO, a device...: the reason, never a hang
            item["file_sha1"] = self.digests[index] or file_digest(scan.path)
            for cache in self.caches:
                out = cache.load(scan, with_label=False, digest=item["file_sha1"])
                item["views"][cache.pcfg.key()] = {"image": out["image"], "affine": out["affine"]}
            first = item["views"][self.caches[0].pcfg.key()]
            item["image"], item["affine"] = first["image"], first["affine"]
        except ScanError as exc:
            item["error"] = exc.reason
        except Exception as exc:  # never let one scan end the batch
            item["error"] = f"unexpected error while loading: {type(exc).__name__}: {exc}"
            item["error"] = item["error"].splitlines()[0]
        return item


def _single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for ``batch_size=1``: the item itself (scans differ in what they carry)."""
    return batch[0]


class ScoringModule(pl.LightningModule):
    """Runs every scorer on one scan per ``predict_step`` and returns the row.

    The scorers' networks are moved to the module's device at the start of prediction (a
    scorer exposes them through an optional ``to(device)``); a scan's tensors are moved in
    :meth:`transfer_batch_to_device`. A scorer's exception becomes an ``error`` row.
    Row keys starting with ``_`` are not table columns: they are handed to the writer's
    ``on_row`` in ``item["extras"]``.
    """

    def __init__(self, scorers: Sequence[Scorer], model_id: str) -> None:
        super().__init__()
        self.scorers = list(scorers)
        self.model_id = model_id

    def on_predict_start(self) -> None:
        for scorer in self.scorers:
            if hasattr(scorer, "to"):
                scorer.to(self.device)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        def move(d: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

        out = move(batch)
        out["views"] = {k: move(v) for k, v in batch.get("views", {}).items()}
        return out

    def predict_step(self, item: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        scan: Scan = item["scan"]
        row: dict[str, Any] = {
            "scan_id": scan.scan_id,
            "path": str(scan.path),
            "site": scan.site or "",
            "file_sha1": item["file_sha1"],
            "model_id": self.model_id,
            "status": "ok",
            "error": "",
        }
        if item["error"]:
            row.update(status="error", error=item["error"])
            return row
        try:
            # float32 even under a mixed-precision trainer: thresholds were computed in float32
            with torch.autocast(self.device.type, enabled=False):
                for scorer in self.scorers:
                    view = item["views"].get(getattr(scorer, "preprocess_key", None))
                    row.update(scorer({**item, **view} if view else item))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            reason = f"scoring failed: {type(exc).__name__}: {exc}".splitlines()[0]
            row = {k: row[k] for k in (*BASE_COLUMNS, "file_sha1", "model_id")}
            row.update(status="error", error=reason)
            log.warning("%s: %s", scan.path, reason)
        return row


def rank_table_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` of a multi-process run writes its rows (rank 0: ``path`` itself)."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


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


class ScoreTable:
    """Rows keyed by ``scan_id``, written atomically as a TSV.

    Args:
        path: the ``scores.tsv`` to write.
        columns: scorer columns (between :data:`BASE_COLUMNS` and :data:`TAIL_COLUMNS`).
        flush_every: rewrite the file after this many new rows (and on :meth:`flush`).
    """

    def __init__(self, path: str | Path, columns: Sequence[str], flush_every: int = 10) -> None:
        self.path = Path(path)
        self.columns = [*BASE_COLUMNS, *columns, *TAIL_COLUMNS]
        self.flush_every = max(1, int(flush_every))
        self.rows: dict[str, dict[str, Any]] = {}
        #: scan ids in the order rows are written (others follow in insertion order)
        self.order: list[str] = []
        self._dirty = 0

    def add(self, row: dict[str, Any]) -> None:
        """Add (or replace) a row; NumPy scalars become Python numbers (written exactly)."""
        row = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
        self.rows[str(row["scan_id"])] = row
        self._dirty += 1
        if self._dirty >= self.flush_every:
            self.flush()

    def frame(self) -> pd.DataFrame:
        rank = {sid: i for i, sid in enumerate(self.order)}
        ids = sorted(self.rows, key=lambda sid: rank.get(sid, len(rank)))
        return pd.DataFrame([self.rows[sid] for sid in ids], columns=self.columns)

    def flush(self) -> None:
        """Rewrite the file atomically; floats are written in their shortest exact form.

        Raises:
            TableWriteError: the file cannot be written (disk full...); it keeps its last
                complete content.
        """
        try:
            with atomic_path(self.path) as tmp:
                self.frame().to_csv(tmp, sep="\t", index=False, na_rep="n/a")
        except OSError as exc:
            raise TableWriteError(self.path, exc) from exc
        self._dirty = 0

    @staticmethod
    def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
        """Rows of a read table as dicts, missing values as ``None`` (as :meth:`add` takes them)."""
        return frame.astype(object).where(frame.notna(), None).to_dict("records")

    @staticmethod
    def read(path: str | Path) -> pd.DataFrame:
        """A scores.tsv as written by :meth:`flush`: ``n/a`` -> NaN, :data:`STRING_COLUMNS` as
        strings, floats bit for bit as written."""
        return pd.read_csv(
            path,
            sep="\t",
            na_values=["n/a"],
            keep_default_na=False,
            dtype=dict.fromkeys(STRING_COLUMNS, str),
            float_precision="round_trip",
        )


def _reusable(previous: pd.DataFrame | None, model_id: str) -> dict[tuple[str, str], dict]:
    """Rows of an earlier table that can be kept: same file path, content and models."""
    if previous is None or previous.empty:
        return {}
    keep = previous[previous["model_id"].astype(str) == model_id]
    return {(str(r["path"]), str(r["file_sha1"])): r for r in ScoreTable.records(keep)}


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
    """Score every scan with every scorer; see the module docstring for the guarantees.

    Args:
        scans: what to score (order kept in the table).
        scorers: column producers; their columns follow ``scan_id, path, site``. A scorer with
            a ``preprocess`` attribute (a :class:`PreprocessConfig`) gets its own view.
        table_path: the ``scores.tsv`` written incrementally.
        pcfg: default preprocessing settings (part of the model identity).
        cache_dir: preprocessing cache (None: no cache).
        previous: an earlier table to resume from (rows with the same file content and
            model identity are kept, not recomputed).
        num_workers: DataLoader workers for loading/preprocessing.
        flush_every: rows between atomic rewrites of the table.
        progress: show a progress bar with ETA (default: when stderr is a terminal).
        on_row: called as ``on_row(row, item)`` for every newly scored scan (``item`` holds
            the preprocessed ``image``; e.g. to write thumbnails or per-scan maps).
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
    columns = [c for s in scorers for c in s.columns]
    caches = [PreprocessCache(cache_dir, pcfg)]
    for scorer in scorers:
        own = getattr(scorer, "preprocess", None)
        if own is not None and own.key() not in {c.pcfg.key() for c in caches}:
            caches.append(PreprocessCache(cache_dir, own))
        scorer.preprocess_key = (own or pcfg).key()  # type: ignore[attr-defined]
    model_id = models_identity(scorers, pcfg)
    table = ScoreTable(table_path, columns, flush_every)
    table.order = [scan.scan_id for scan in scans]
    reusable = _reusable(previous, model_id)

    todo: list[Scan] = []
    digests: list[str] = []
    for scan in scans:
        digest = file_digest(scan.path) if Path(scan.path).is_file() else ""
        old = reusable.get((str(scan.path), digest))
        if old is not None and digest:
            table.rows[scan.scan_id] = {**old, "scan_id": scan.scan_id}
            if on_reuse is not None:
                on_reuse(scan, old)
        else:
            todo.append(scan)
            digests.append(digest)
    if reusable:
        log.info("resume: %d of %d scans already scored", len(scans) - len(todo), len(scans))

    show = sys.stderr.isatty() if progress is None else bool(progress)
    trainer = trainer if trainer is not None else default_trainer(show)
    writer = ScoreWriter(table, on_row)
    trainer.callbacks.append(writer)
    loader = DataLoader(
        ScoringDataset(todo, caches, digests),
        batch_size=1,
        collate_fn=_single,
        num_workers=num_workers,
        shuffle=False,
    )
    t0 = time.perf_counter()
    handler = signal.getsignal(signal.SIGINT)
    try:
        if todo:
            with quiet_lightning():
                module = ScoringModule(scorers, model_id)
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
        for rank in range(1, trainer.world_size):
            part = rank_table_path(table.path, rank)
            for row in ScoreTable.records(ScoreTable.read(part)):
                table.rows[str(row["scan_id"])] = row
            part.unlink()
        table.flush()
    return table.frame()
