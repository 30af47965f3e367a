"""Earlier ``score`` runs: the table a resumed scoring run reuses rows from."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from qcflow.errors import ConfigError
from qcflow.qc.scoring import ScoreTable

__all__ = ["previous_table"]

log = logging.getLogger(__name__)


def previous_table(
    runs_dir: str | Path,
    experiment: str,
    output_dir: str | Path,
    given: str | Path | None = None,
) -> tuple[pd.DataFrame, Path] | None:
    """The table to resume from and its run folder: ``given`` (a ``scores.tsv`` or its run
    folder) or the newest ``scores.tsv`` of an ``experiment`` run other than ``output_dir``
    (finished or not), with the rows of every rank of a multi-process run; ``None`` when there
    is none.

    Raises:
        ConfigError: ``given`` holds no ``scores.tsv``.
    """
    if given:
        path = Path(str(given)).expanduser()
        path = path / "scores.tsv" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{path}: no scores.tsv to resume from (score.resume_from)")
    else:
        here = Path(output_dir).resolve()
        base = Path(runs_dir) / str(experiment)
        tables = [p for p in base.glob("**/scores.tsv") if p.parent.resolve() != here]
        if not tables:
            log.info("resume: no earlier scores.tsv under %s; scoring everything", base)
            return None
        path = max(tables, key=lambda p: p.stat().st_mtime)
    log.info("resume: reusing rows of %s", path)
    parts = [ScoreTable.read(path)]
    parts += [ScoreTable.read(p) for p in sorted(path.parent.glob(f"{path.stem}.rank*.tsv"))]
    return pd.concat(parts, ignore_index=True), path.parent
