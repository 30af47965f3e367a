"""Scoring a dataset scan by scan: the scorer protocol, the rows and the table.

A *scorer* (:class:`Scorer`) turns one preprocessed volume into columns: the classical IQMs
here (:class:`IQMScorer`), the encoder + flow density and the uncertainty student in
:mod:`qcflow.qc.scorers`. The engine that runs every scorer on every scan
(:func:`qcflow.lit.scoring.score_scans`, a Lightning prediction loop) builds on what is here:

* :func:`prepare_scoring` decides each scorer's preprocessing once, the model identity and
  which scans an earlier table already holds (resume: a scan whose file path, content (SHA-1)
  and model identity are unchanged is not scored again; its row is reused under the scan's
  current id);
* :class:`ScoringDataset` loads and preprocesses scans; a scan that cannot be loaded gets a row
  with ``status=error`` and the one-line reason in ``error``, the others continue;
* :func:`score_row` runs the scorers on one scan (a scorer's exception becomes an error row);
* :class:`ScoreTable` is rewritten atomically every ``flush_every`` rows and at the end, so an
  interrupted run leaves a valid partial ``scores.tsv``; floats and strings read back exactly
  as they were written (a resumed table is byte for byte the table of an uninterrupted run);
  when the table cannot be written (disk full) scoring stops with a one-line
  :class:`TableWriteError` and the file keeps its last complete content.

Pure torch / NumPy / pandas: no Lightning, no run folders.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

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
    "ScoringPlan",
    "ScoreTable",
    "STRING_COLUMNS",
    "TableWriteError",
    "prepare_scoring",
    "reference_preprocessing",
    "rank_table_path",
    "models_identity",
    "score_row",
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


class Scorer:
    """Computes columns for one preprocessed scan; the one protocol every scorer follows.

    Subclasses set ``columns`` and ``identity`` and implement :meth:`__call__`; the rest has
    defaults that a scorer overrides when it needs them. Post-processing reads only these
    members, never the scorer's type.

    Attributes:
        columns: the columns :meth:`__call__` returns (in table order).
        identity: changes whenever the scorer's output could change (e.g. a checkpoint
            digest); part of the resume key.
        preprocess: the preprocessing the scorer's network was trained with; ``None``: the
            table's reference preprocessing (:func:`reference_preprocessing`).
        reference_view: the scorer's ``preprocess`` is the table's reference view: scorers
            without their own preprocessing (the IQMs) and the thumbnails of flagged scans use
            it. The density model that makes ``qc_decision`` sets it, so a flagged scan's
            thumbnail shows what the decision saw.
        thresholds: decision thresholds shown in the report and returned in the metrics.
    """

    columns: Sequence[str] = ()
    identity: str = ""
    preprocess: PreprocessConfig | None = None
    reference_view: bool = False
    thresholds: Mapping[str, Any] = MappingProxyType({})

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """``item``: ``{"image": (1, D, H, W) float32 in [0, 1], "affine", "scan": Scan}``."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Scorer:
        """Move the scorer's networks to ``device`` (scoring runs on the trainer's device)."""
        return self

    def start(self, out_dir: Path) -> None:
        """Prepare the scorer's own outputs under ``out_dir`` before the first scan (every
        process of a multi-process run calls it)."""

    def finish(self, table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
        """After the whole table is scored (rank 0): write the scorer's figures under
        ``out_dir``; returns them by name (the report shows the first)."""
        return {}


class IQMScorer(Scorer):
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


def reference_preprocessing(
    scorers: Sequence[Scorer], default: PreprocessConfig
) -> PreprocessConfig:
    """The table's reference preprocessing: the first ``reference_view`` scorer's own, else
    ``default`` (the ``data`` config). It is part of the model identity."""
    for scorer in scorers:
        if scorer.reference_view and scorer.preprocess is not None:
            if scorer.preprocess.key() != default.key():
                log.info("using the preprocessing of %s: %s", scorer.identity, scorer.preprocess)
            return scorer.preprocess
    return default


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


def score_row(
    item: dict[str, Any], scorers: Sequence[Scorer], views: Sequence[str], model_id: str
) -> dict[str, Any]:
    """One table row: every scorer on one loaded scan, each on its own preprocessing view.

    Args:
        item: a :class:`ScoringDataset` item.
        scorers: the scorers; ``views[i]`` is the preprocessing key scorer ``i`` reads.
        model_id: the models' identity (a resume key).

    Returns:
        The row; a load error or a scorer's exception gives ``status=error`` with the one-line
        reason (and no scorer columns). Keys starting with ``_`` are not table columns.
    """
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
        return row
    try:
        for scorer, key in zip(scorers, views, strict=True):
            view = item["views"].get(key)
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

    def merge_ranks(self, world_size: int) -> None:
        """Rank 0 of a multi-process run: take every other rank's rows into this table (their
        files are removed) and rewrite it."""
        for rank in range(1, world_size):
            part = rank_table_path(self.path, rank)
            for row in ScoreTable.records(ScoreTable.read(part)):
                self.rows[str(row["scan_id"])] = row
            part.unlink()
        self.flush()


def _reusable(previous: pd.DataFrame | None, model_id: str) -> dict[tuple[str, str], dict]:
    """Rows of an earlier table that can be kept: same file path, content and models."""
    if previous is None or previous.empty:
        return {}
    keep = previous[previous["model_id"].astype(str) == model_id]
    return {(str(r["path"]), str(r["file_sha1"])): r for r in ScoreTable.records(keep)}


@dataclass
class ScoringPlan:
    """What :func:`prepare_scoring` decided: the table (reused rows already in it), the scans
    left to score with their SHA-1, the preprocessing caches and each scorer's view."""

    table: ScoreTable
    model_id: str
    caches: list[PreprocessCache]
    views: list[str]
    todo: list[Scan] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)


def prepare_scoring(
    scans: Sequence[Scan],
    scorers: Sequence[Scorer],
    table_path: str | Path,
    pcfg: PreprocessConfig,
    cache_dir: str | Path | None = None,
    previous: pd.DataFrame | None = None,
    flush_every: int = 10,
    on_reuse: Callable[[Scan, dict[str, Any]], None] | None = None,
) -> ScoringPlan:
    """Decide preprocessing, model identity and what is left to score (see the module docstring).

    The table's reference preprocessing is :func:`reference_preprocessing` of ``pcfg``; a
    scorer with its own ``preprocess`` reads its own view (one preprocessing cache per distinct
    setting). ``on_reuse(scan, previous_row)`` is called for every scan whose previous row is
    kept (``previous_row["scan_id"]`` is the id it had then).
    """
    pcfg = reference_preprocessing(scorers, pcfg)
    caches = [PreprocessCache(cache_dir, pcfg)]
    views = []
    for scorer in scorers:
        own = scorer.preprocess if scorer.preprocess is not None else pcfg
        if own.key() not in {c.pcfg.key() for c in caches}:
            caches.append(PreprocessCache(cache_dir, own))
        views.append(own.key())
    model_id = models_identity(scorers, pcfg)
    table = ScoreTable(table_path, [c for s in scorers for c in s.columns], flush_every)
    table.order = [scan.scan_id for scan in scans]
    plan = ScoringPlan(table, model_id, caches, views)
    reusable = _reusable(previous, model_id)
    for scan in scans:
        digest = file_digest(scan.path) if Path(scan.path).is_file() else ""
        old = reusable.get((str(scan.path), digest))
        if old is not None and digest:
            table.rows[scan.scan_id] = {**old, "scan_id": scan.scan_id}
            if on_reuse is not None:
                on_reuse(scan, old)
        else:
            plan.todo.append(scan)
            plan.digests.append(digest)
    if reusable:
        log.info("resume: %d of %d scans already scored", len(scans) - len(plan.todo), len(scans))
    return plan
