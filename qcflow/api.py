"""Python API for notebooks and pipelines: no command line, no BIDS required.

:func:`score` composes the same configuration as ``python -m qcflow experiment=score`` (so the
same models are found, from ``$QCFLOW_HOME`` / ``$QCFLOW_RUNS_DIR``) and runs the same code.

Example:
    >>> import qcflow
    >>> table = qcflow.score("/data/scans")                          # latest trained models
    >>> table = qcflow.score(["a.nii.gz", "b.nii.gz"], models=None)  # classical measures only
    >>> table[table.qc_decision != "pass"]

Pin the models for reproducible tables: pass the run folders (``models=".../flow_density/<run>"``,
``uncertainty=".../uncertainty_student/<run>"``) instead of ``"latest"``; every row records the
models' identity in ``model_id``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from qcflow.data.discovery import Scan, strip_nifti_suffix, unique_scan_ids

__all__ = ["score", "compose_config"]


@contextmanager
def _fresh_hydra() -> Iterator[None]:
    """Let :func:`hydra.compose` run even inside another Hydra app (its state is restored)."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    saved = gh.hydra
    gh.clear()
    try:
        yield
    finally:
        gh.clear()
        if saved is not None:
            gh.initialize(saved)


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None
) -> DictConfig:
    """qcflow's configuration as the CLI composes it (``conf/config.yaml`` + overrides),
    resolved, with ``paths.output_dir`` set (default: a new temporary folder)."""
    from hydra import compose, initialize_config_dir

    from qcflow.cli import config_dir

    with _fresh_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or tempfile.mkdtemp(prefix="qcflow-"))
    OmegaConf.resolve(cfg)
    return cfg


def _scans(paths: Sequence[str | Path]) -> list[Scan]:
    """Scans of a list of files, in the given order (a file listed twice is scored once); files
    sharing a name get discovery's path-derived suffixes (adding a file never moves an id)."""
    unique = dict.fromkeys(Path(p).absolute() for p in paths)
    scans = [Scan(scan_id=strip_nifti_suffix(p.name), path=p) for p in unique]
    ids = {str(s.path): s.scan_id for s in unique_scan_ids(scans)}
    return [replace(s, scan_id=ids[str(s.path)]) for s in scans]


def _model_overrides(key: str, path_key: str, value: str | Path | None) -> list[str]:
    if value is None:
        return [f"score.{key}=false"]
    if value == "latest":
        return [f"score.{key}=auto"]
    return [f"score.{key}=true", f"score.{path_key}={Path(value).absolute()}"]


def score(
    paths_or_dir: str | Path | Sequence[str | Path],
    models: str | Path | None = "latest",
    uncertainty: str | Path | None = "latest",
    iqm: bool = True,
    output: str | Path | None = None,
    review_tau: float = 0.05,
    fail_tau: float = 0.03,
    num_workers: int = 0,
    data: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    progress: bool = False,
) -> pd.DataFrame:
    """Score scans like ``python -m qcflow experiment=score`` and return the table.

    Args:
        paths_or_dir: a list of NIfTI files, or a BIDS dataset / folder / glob.
        models: method A: a ``flow_density`` run folder, ``"latest"`` (the newest one under
            the runs folder; no density columns when there is none) or ``None`` (skip).
        uncertainty: method B: an ``uncertainty_student`` run folder or checkpoint,
            ``"latest"`` or ``None``.
        iqm: also compute the classical measures (snr, cnr, cjv, efc, fber).
        output: folder for ``scores.tsv``, thumbnails and NIfTI maps (default: a temporary
            folder, removed).
        review_tau, fail_tau: decision thresholds as fractions of the training distribution.
        num_workers: DataLoader workers for loading/preprocessing.
        data: ``data`` settings (``spacing``, ``fov_mm``, ``shape``, ``percentiles``, ``cache``)
            when no model fixes them.
        overrides: further Hydra overrides, as on the command line (e.g. ``"score.per_site=true"``).
        progress: show a progress bar.

    Returns:
        One row per scan with the CLI's columns; unusable scans have ``status == "error"``.
    """
    from qcflow.tasks.score import score_dataset

    ov = ["experiment=score", f"score.iqm={bool(iqm)}"]
    ov += _model_overrides("density", "flow_run", models)
    ov += _model_overrides("uncertainty", "student_ckpt", uncertainty)
    ov += [f"score.review_tau={review_tau}", f"score.fail_tau={fail_tau}"]
    ov += [f"data.num_workers={int(num_workers)}"]
    scans: list[Scan] | None = None
    if isinstance(paths_or_dir, (str, Path)):
        ov.append(f"data.root={Path(paths_or_dir).absolute()}")
    else:
        scans = _scans(paths_or_dir)
    ov += [f"data.{k}={v}" for k, v in (data or {}).items()]
    ov += list(overrides)
    with tempfile.TemporaryDirectory(prefix="qcflow-score-") as tmp:
        cfg = compose_config(ov, output or tmp)
        table, _ = score_dataset(cfg, scans=scans, progress=progress)
    assert table is not None  # single process
    return table
