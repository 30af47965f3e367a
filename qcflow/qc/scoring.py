"""Scoring a dataset scan by scan: robust to bad scans, incremental, atomic and resumable.

A *scorer* turns one preprocessed volume into columns (the classical IQMs here; the encoder +
flow density and the uncertainty student plug in the same way). :func:`score_scans` runs every
scorer on every scan:

* a scan that cannot be loaded or scored gets a row with ``status=error`` and the one-line
  reason in ``error``; the others continue;
* the table is rewritten atomically every ``flush_every`` rows and at the end, so an
  interrupted run (Ctrl-C, a killed job) leaves a valid partial ``scores.tsv``;
* with ``previous`` rows (resume), a scan whose file content (SHA-1) and model identity are
  unchanged is not scored again;
* loading and preprocessing run in DataLoader workers (``num_workers``); rows keep scan order.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from qcflow.data.discovery import Scan
from qcflow.data.preprocess import PreprocessCache, PreprocessConfig, file_digest
from qcflow.errors import ScanError
from qcflow.qc.iqm import IQM_NAMES, compute_iqms
from qcflow.utils.io import atomic_path

__all__ = [
    "BASE_COLUMNS",
    "Scorer",
    "IQMScorer",
    "ScoringDataset",
    "ScoreTable",
    "models_identity",
    "score_scans",
]

log = logging.getLogger(__name__)

#: columns every scores.tsv starts with
BASE_COLUMNS = ("scan_id", "path", "site")
#: bookkeeping columns at the end (resume keys)
TAIL_COLUMNS = ("status", "error", "file_sha1", "model_id")


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
        return compute_iqms(item["image"][0], brain_mask=item.get("mask"))


def models_identity(scorers: Iterable[Scorer], pcfg: PreprocessConfig) -> str:
    """Short hash of every scorer's identity and the preprocessing settings."""
    blob = "|".join([pcfg.key(), *(s.identity for s in scorers)])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class ScoringDataset(Dataset):
    """Loads and preprocesses scans; a bad scan yields ``error`` instead of raising.

    Items: ``{"scan", "file_sha1", "image" | None, "affine" | None, "error": str}``.

    Args:
        scans: the scans to load.
        cache: preprocessing (and its optional on-disk cache).
        digests: the files' SHA-1 when already computed (one read of each file saved).
    """

    def __init__(
        self,
        scans: Sequence[Scan],
        cache: PreprocessCache,
        digests: Sequence[str] | None = None,
    ) -> None:
        self.scans = list(scans)
        self.cache = cache
        self.digests = list(digests) if digests is not None else [""] * len(self.scans)

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        item: dict[str, Any] = {"scan": scan, "file_sha1": "", "image": None, "affine": None}
        item["error"] = ""
        try:
            if not Path(scan.path).is_file():
                raise ScanError(scan.path, "file not found")
            item["file_sha1"] = self.digests[index] or file_digest(scan.path)
            out = self.cache.load(scan, with_label=False, digest=item["file_sha1"])
            item["image"], item["affine"] = out["image"], out["affine"]
        except ScanError as exc:
            item["error"] = exc.reason
        except Exception as exc:  # never let one scan end the batch
            item["error"] = f"unexpected error while loading: {type(exc).__name__}: {exc}"
            item["error"] = item["error"].splitlines()[0]
        return item


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
        self.rows[str(row["scan_id"])] = row
        self._dirty += 1
        if self._dirty >= self.flush_every:
            self.flush()

    def frame(self) -> pd.DataFrame:
        rank = {sid: i for i, sid in enumerate(self.order)}
        ids = sorted(self.rows, key=lambda sid: rank.get(sid, len(rank)))
        return pd.DataFrame([self.rows[sid] for sid in ids], columns=self.columns)

    def flush(self) -> None:
        with atomic_path(self.path) as tmp:
            self.frame().to_csv(tmp, sep="\t", index=False, na_rep="n/a")
        self._dirty = 0

    @staticmethod
    def read(path: str | Path) -> pd.DataFrame:
        """A scores.tsv as written by :meth:`flush` (``n/a`` -> NaN, ids as strings)."""
        return pd.read_csv(
            path,
            sep="\t",
            na_values=["n/a"],
            keep_default_na=False,
            dtype={"scan_id": str, "site": str},
        )


def _reusable(previous: pd.DataFrame | None, model_id: str) -> dict[tuple[str, str], dict]:
    """Rows of an earlier table that can be kept: same file path, content and models."""
    if previous is None or previous.empty:
        return {}
    keep = previous[previous["model_id"].astype(str) == model_id]
    return {
        (str(r["path"]), str(r["file_sha1"])): r
        for r in keep.astype(object).where(keep.notna(), None).to_dict("records")
    }


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
) -> pd.DataFrame:
    """Score every scan with every scorer; see the module docstring for the guarantees.

    Args:
        scans: what to score (order kept in the table).
        scorers: column producers; their columns follow ``scan_id, path, site``.
        table_path: the ``scores.tsv`` written incrementally.
        pcfg: preprocessing settings (part of the model identity).
        cache_dir: preprocessing cache (None: no cache).
        previous: an earlier table to resume from (rows with the same file content and
            model identity are kept, not recomputed).
        num_workers: DataLoader workers for loading/preprocessing.
        flush_every: rows between atomic rewrites of the table.
        progress: show a progress bar with ETA (default: when stderr is a terminal).
        on_row: called as ``on_row(row, item)`` for every newly scored scan (``item`` holds
            the preprocessed ``image``; e.g. to write thumbnails or per-scan maps).

    Returns:
        The final table. On KeyboardInterrupt the partial table is flushed, then it re-raises.
    """
    columns = [c for s in scorers for c in s.columns]
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
        else:
            todo.append(scan)
            digests.append(digest)
    if reusable:
        log.info("resume: %d of %d scans already scored", len(scans) - len(todo), len(scans))

    loader = DataLoader(
        ScoringDataset(todo, PreprocessCache(cache_dir, pcfg), digests),
        batch_size=None,  # one scan at a time, no collation
        num_workers=num_workers,
        shuffle=False,
    )
    show = sys.stderr.isatty() if progress is None else progress
    iterator: Iterable[dict[str, Any]] = loader
    if show and todo:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, total=len(todo), desc="scoring", unit="scan", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        for item in iterator:
            scan: Scan = item["scan"]
            row: dict[str, Any] = {
                "scan_id": scan.scan_id,
                "path": str(scan.path),
                "site": scan.site or "",
                "file_sha1": item["file_sha1"],
                "model_id": model_id,
                "status": "ok",
                "error": "",
            }
            if item["error"]:
                row.update(status="error", error=item["error"])
            else:
                try:
                    with torch.inference_mode():
                        for scorer in scorers:
                            row.update(scorer(item))
                except Exception as exc:
                    reason = f"scoring failed: {type(exc).__name__}: {exc}".splitlines()[0]
                    row.update(status="error", error=reason)
                    log.warning("%s: %s", scan.path, reason)
            table.add(row)
            if on_row is not None:
                on_row(row, item)
    finally:
        table.flush()  # also on Ctrl-C: a valid partial table
    log.info("scored %d scans in %.1f s", len(todo), time.perf_counter() - t0)
    return table.frame()
