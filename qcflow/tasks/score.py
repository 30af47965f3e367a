"""Task ``score``: one row per scan in ``<run>/scores.tsv``; bad scans reported, not fatal.

Exit status (through the CLI): 0 when at least one scan was scored, 1 when none could be
(or the configuration is invalid), 130 after Ctrl-C (the partial table is valid).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from qcflow.data.discovery import discover_scans, resolve_data_root
from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import ConfigError, QCFlowError
from qcflow.qc.scoring import IQMScorer, Scorer, ScoreTable, score_scans

__all__ = ["run", "build_scorers", "previous_table"]

log = logging.getLogger(__name__)


def build_scorers(cfg: DictConfig) -> list[Scorer]:
    """The scorers the config asks for (classical measures today; models plug in here)."""
    scorers: list[Scorer] = []
    if cfg.score.get("iqm", True):
        scorers.append(IQMScorer())
    if not scorers:
        raise ConfigError("nothing to score: enable at least one scorer (e.g. score.iqm=true)")
    return scorers


def previous_table(cfg: DictConfig) -> pd.DataFrame | None:
    """The table to resume from: ``score.resume_from`` or the latest ``score`` run's."""
    given = cfg.score.get("resume_from")
    if given:
        path = Path(str(given)).expanduser()
        path = path / "scores.tsv" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{path}: no scores.tsv to resume from (score.resume_from)")
        return ScoreTable.read(path)
    here = Path(cfg.paths.output_dir).resolve()
    base = Path(cfg.paths.runs_dir) / str(cfg.experiment_name)
    tables = [p for p in base.glob("**/scores.tsv") if p.parent.resolve() != here]
    if not tables:
        log.info("resume: no earlier scores.tsv under %s; scoring everything", base)
        return None
    latest = max(tables, key=lambda p: p.stat().st_mtime)
    log.info("resume: reusing rows of %s", latest)
    return ScoreTable.read(latest)


def run(cfg: DictConfig) -> dict[str, Any]:
    scans = discover_scans(resolve_data_root(cfg.data), cfg.data.get("pattern"))
    scorers = build_scorers(cfg)
    pcfg = PreprocessConfig.from_data_cfg(cfg.data)
    previous = previous_table(cfg) if cfg.score.get("resume") else None
    out = Path(cfg.paths.output_dir) / "scores.tsv"
    cache_dir = cfg.data.get("cache_dir") if cfg.data.get("cache") else None
    try:
        table = score_scans(
            scans,
            scorers,
            out,
            pcfg,
            cache_dir=cache_dir,
            previous=previous,
            num_workers=int(cfg.data.get("num_workers") or 0),
            flush_every=int(cfg.score.get("flush_every", 10)),
            progress=cfg.score.get("progress"),
        )
    except KeyboardInterrupt:
        print(f"qcflow: interrupted; partial table in {out}", file=sys.stderr)
        sys.exit(130)
    ok = table["status"] == "ok"
    errors = table[~ok]
    print(f"scored {int(ok.sum())} of {len(table)} scans -> {out}")
    for _, row in errors.iterrows():
        print(f"  {row['scan_id']}: {row['error']}")
    if not ok.any():
        raise QCFlowError(f"{out}: no scan could be scored ({len(table)} failed); see the table")
    return {
        "n_scans": len(table),
        "n_ok": int(ok.sum()),
        "n_error": len(errors),
        "scores_tsv": str(out),
    }
