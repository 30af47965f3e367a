"""Python API for notebooks and pipelines: no Hydra, no BIDS required.

Example:
    >>> import qcflow
    >>> table = qcflow.score("/data/scans")                      # latest trained models
    >>> table = qcflow.score(["a.nii.gz", "b.nii.gz"], models=None)  # classical measures only
    >>> table[table.qc_decision != "pass"]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from qcflow.data.discovery import Scan, discover_scans, strip_nifti_suffix
from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import ConfigError
from qcflow.qc.scoring import IQMScorer, Scorer, score_scans

__all__ = ["score", "default_runs_dir"]


def default_runs_dir() -> Path:
    """``$QCFLOW_RUNS_DIR``, else ``$QCFLOW_HOME/runs`` (``~/qcflow/runs``), as the CLI uses."""
    if os.environ.get("QCFLOW_RUNS_DIR"):
        return Path(os.environ["QCFLOW_RUNS_DIR"])
    home = os.environ.get("QCFLOW_HOME") or str(Path.home() / "qcflow")
    return Path(home) / "runs"


def _scans(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Scan]:
    if isinstance(paths_or_dir, (str, Path)):
        return discover_scans(paths_or_dir)
    scans, seen = [], set()
    for p in paths_or_dir:
        sid = strip_nifti_suffix(Path(p).name)
        base, n = sid, 1
        while sid in seen:
            n += 1
            sid = f"{base}-{n}"
        seen.add(sid)
        scans.append(Scan(scan_id=sid, path=Path(p)))
    return scans


def score(
    paths_or_dir: str | Path | Sequence[str | Path],
    models: str | Path | None = "latest",
    iqm: bool = True,
    output: str | Path | None = None,
    review_tau: float = 0.05,
    fail_tau: float = 0.03,
    num_workers: int = 0,
    data: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Score scans like ``python -m qcflow experiment=score`` and return the table.

    Args:
        paths_or_dir: a list of NIfTI files, or a BIDS dataset / folder / glob.
        models: a ``flow_density`` run folder, ``"latest"`` (the newest one under the runs
            folder; classical measures only when there is none) or ``None`` (no model).
        iqm: also compute the classical measures (snr, cnr, cjv, efc, fber).
        output: where to write ``scores.tsv`` (default: a temporary file, removed).
        review_tau, fail_tau: decision thresholds as fractions of the training distribution.
        num_workers: DataLoader workers for loading/preprocessing.
        data: preprocessing settings when no model fixes them (``spacing``, ``fov_mm``,
            ``shape``, ``percentiles``; defaults as in ``conf/data/default.yaml``).

    Returns:
        One row per scan with the CLI's columns; unusable scans have ``status == "error"``.
    """
    from qcflow.tasks.score import DensityScorer

    scorers: list[Scorer] = []
    flow_run: Path | None = None
    if models == "latest":
        base = default_runs_dir() / "flow_density"
        runs = sorted(base.glob("**/flow.pt"), key=lambda p: p.stat().st_mtime)
        flow_run = runs[-1].parent if runs else None
    elif models is not None:
        flow_run = Path(models)
    dcfg = {"spacing": 2.0, "fov_mm": [192, 224, 192], "shape": None, "percentiles": [0.5, 99.5]}
    dcfg.update(data or {})
    pcfg = PreprocessConfig.from_data_cfg(OmegaConf.create(dcfg))
    if flow_run is not None:
        density = DensityScorer(flow_run, review_tau=review_tau, fail_tau=fail_tau)
        scorers.append(density)
        if density.data:
            pcfg = PreprocessConfig.from_data_cfg(OmegaConf.create(density.data))
    if iqm:
        scorers.append(IQMScorer())
    if not scorers:
        raise ConfigError("nothing to score: give models or set iqm=True")
    scans = _scans(paths_or_dir)
    if output is not None:
        return score_scans(scans, scorers, output, pcfg, num_workers=num_workers, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        return score_scans(
            scans, scorers, Path(tmp) / "scores.tsv", pcfg, num_workers=num_workers, progress=False
        )
