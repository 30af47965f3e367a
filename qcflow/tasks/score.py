"""Task ``score``: one row per scan in ``<run>/scores.tsv``; bad scans reported, not fatal.

Outputs in the run folder: ``scores.tsv``, ``report.html`` (+ ``thumbs/``, the density plot)
and, with the uncertainty student, ``derivatives/qcflow/`` (per-scan NIfTI maps, see
:mod:`qcflow.qc.derivatives`). Prediction runs through a Lightning trainer built from the
``trainer`` group: ``trainer=ddp trainer.devices=N`` spreads the scans over N processes/devices
with the same rows as one process.

Exit status (through the CLI): 0 when at least one scan was scored, 1 when none could be
(or the configuration is invalid, or ``scores.tsv`` cannot be written: one line names it, the
file keeps its last complete rows), 130 after Ctrl-C (the partial table is valid). A thumbnail
or map that cannot be written (disk full) is one warning line for that scan; the others go on.

With ``score.resume``, a row is reused when the file's path, content (SHA-1) and the model
identity match a row of the earlier table; its thumbnail and maps are copied from the files
of the id it had *then* to its id now, so no scan ever shows another scan's outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from qcflow.data.discovery import Scan, discover_scans, resolve_data_root
from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import ConfigError, QCFlowError
from qcflow.lit.scoring import quiet_lightning, score_scans
from qcflow.qc.derivatives import DERIVATIVES, copy_maps
from qcflow.qc.report import write_report, write_thumbnail
from qcflow.qc.scorers import DensityScorer, UncertaintyScorer
from qcflow.qc.scoring import IQMScorer, Scorer
from qcflow.runs.flow import find_flow_run, load_density_model
from qcflow.runs.scores import previous_table
from qcflow.runs.stages import find_student_checkpoint, load_student_model
from qcflow.tasks.common import build_loggers, set_threads
from qcflow.utils.io import atomic_path
from qcflow.utils.wandb import log_images, log_table

__all__ = ["run", "score_dataset", "build_scorers", "build_score_trainer"]

log = logging.getLogger(__name__)


def _found(find: Any) -> Path | None:
    """``find()``, or ``None`` when it finds no trained model (``auto`` scoring skips it)."""
    try:
        return find()
    except ConfigError:
        return None


def _enabled(value: Any, what: str, found: Path | None, hint: str) -> bool:
    """``auto``: use when found; ``true``: required (error if missing); ``false``: off."""
    if not value:
        return False
    if found is None:
        if str(value) != "auto":
            raise ConfigError(f"{what}=true but no trained model was found; {hint}")
        return False
    return True


def build_scorers(cfg: DictConfig, maps_dir: Path | None = None) -> list[Scorer]:
    """The scorers the config asks for: method A's density, method B's student, then the
    classical measures. ``maps_dir``: where the student writes per-scan NIfTI maps."""
    scorers: list[Scorer] = []
    sc = cfg.score
    want = sc.get("density", "auto")
    run = _found(lambda: find_flow_run(cfg.paths.runs_dir, sc.get("flow_run"))) if want else None
    hint = "run `python -m qcflow experiment=flow_density` or set score.flow_run=PATH"
    if _enabled(want, "score.density", run, hint):
        log.info("density model: %s", run)
        per_site = bool(sc.get("per_site", False))
        scorers.append(
            DensityScorer(
                load_density_model(run, sites=per_site),
                review_tau=float(sc.get("review_tau", 0.05)),
                fail_tau=float(sc.get("fail_tau", 0.03)),
                per_site=per_site,
                min_site_volumes=int(sc.get("min_site_volumes", 10)),
            )
        )
    elif want:
        log.warning("no trained density model found: no qc_decision column")
    want = sc.get("uncertainty", "auto")
    experiment = str(sc.get("student_experiment") or "uncertainty_student")
    given = sc.get("student_ckpt")
    ckpt = None
    if want and given:  # an explicit checkpoint that is not there is an error
        ckpt = find_student_checkpoint(cfg.paths.runs_dir, given, experiment)
    elif want:
        ckpt = _found(lambda: find_student_checkpoint(cfg.paths.runs_dir, None, experiment))
    hint = "run the uncertainty stages (README) or set score.student_ckpt=PATH"
    if _enabled(want, "score.uncertainty", ckpt, hint):
        log.info("uncertainty model: %s", ckpt)
        roi = sc.get("uncertainty_roi")
        scorers.append(
            UncertaintyScorer(
                load_student_model(ckpt),
                roi_size=list(roi) if roi else None,
                overlap=float(sc.get("uncertainty_overlap", 0.25)),
                sw_batch_size=int(sc.get("uncertainty_sw_batch_size", 16)),
                maps_dir=maps_dir if sc.get("maps", True) else None,
            )
        )
    if sc.get("iqm", True):
        scorers.append(IQMScorer())
    if not scorers:
        raise ConfigError("nothing to score: enable at least one scorer (e.g. score.iqm=true)")
    return scorers


def build_score_trainer(cfg: DictConfig, progress: bool) -> pl.Trainer:
    """The ``trainer`` group as a prediction trainer (no checkpoints; configured loggers)."""
    with quiet_lightning():
        return instantiate(
            cfg.trainer,
            logger=build_loggers(cfg) or False,
            callbacks=[],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]


def _copy_outputs(scan: Scan, old_id: str, src: Path, dst: Path) -> None:
    """Thumbnail and NIfTI maps of a resumed row: the files of the id the scan had in the run
    ``src`` it was scored in (``old_id``), copied under its current id into ``dst``. A copy that
    fails (disk full) is one warning line; the scan keeps its row."""
    thumb_src = src / "thumbs" / f"{old_id}.png"
    thumb_dst = dst / "thumbs" / f"{scan.scan_id}.png"
    target = thumb_dst
    try:
        if thumb_src.is_file() and thumb_src.resolve() != thumb_dst.resolve():
            with atomic_path(thumb_dst) as tmp:
                shutil.copy2(thumb_src, tmp)
        target = dst / DERIVATIVES
        copy_maps(src / DERIVATIVES, old_id, dst / DERIVATIVES, scan)
    except OSError as exc:
        log.warning(
            "%s: cannot copy (%s); scan %s resumed without it", target, _reason(exc), scan.scan_id
        )


def score_dataset(
    cfg: DictConfig,
    scans: Sequence[Scan] | None = None,
    trainer: pl.Trainer | None = None,
    progress: bool | None = None,
) -> tuple[pd.DataFrame | None, list[Scorer]]:
    """Score ``scans`` (default: ``data.root``'s) into ``<paths.output_dir>/scores.tsv``.

    Shared by the CLI task and :func:`qcflow.score`. Writes the table, thumbnails of flagged
    scans and the student's maps; returns the table (``None`` on ranks other than 0) and the
    scorers. Raises KeyboardInterrupt after Ctrl-C (the partial table is valid).
    """
    out_dir = Path(cfg.paths.output_dir)
    if scans is None:
        scans = discover_scans(resolve_data_root(cfg.data), cfg.data.get("pattern"))
    if cfg.score.get("max_scans"):
        scans = list(scans)[: int(cfg.score.max_scans)]
    scorers = build_scorers(cfg, maps_dir=out_dir / DERIVATIVES)
    for scorer in scorers:
        scorer.start(out_dir)
    previous = None
    if cfg.score.get("resume"):
        previous = previous_table(
            cfg.paths.runs_dir,
            str(cfg.experiment_name),
            cfg.paths.output_dir,
            cfg.score.get("resume_from"),
        )

    def on_row(row: dict[str, Any], item: dict[str, Any]) -> None:
        """Thumbnails of flagged scans for report.html (a failed write: one warning line)."""
        if row.get("qc_decision") in ("review", "fail") and item.get("image") is not None:
            thumb = out_dir / "thumbs" / f"{row['scan_id']}.png"
            try:
                write_thumbnail(item["image"].cpu(), thumb)
            except OSError as exc:
                log.warning("%s: cannot write (%s); no thumbnail", thumb, _reason(exc))

    def on_reuse(scan: Scan, old: dict[str, Any]) -> None:
        """A reused row's outputs, copied before scoring starts (kept if it is interrupted)."""
        if previous is not None:
            _copy_outputs(scan, str(old["scan_id"]), previous[1], out_dir)

    table = score_scans(
        scans,
        scorers,
        out_dir / "scores.tsv",
        PreprocessConfig.from_data_cfg(cfg.data),
        cache_dir=cfg.data.get("cache_dir") if cfg.data.get("cache") else None,
        previous=previous[0] if previous else None,
        num_workers=int(cfg.data.get("num_workers") or 0),
        flush_every=int(cfg.score.get("flush_every", 10)),
        progress=progress,
        on_row=on_row,
        trainer=trainer,
        on_reuse=on_reuse,
    )
    return table, scorers


def _thumbs(table: pd.DataFrame, out_dir: Path) -> dict[str, str]:
    """Thumbnails that exist for flagged scans (written by whichever rank scored them)."""
    flagged = table[(table["status"] == "ok") & table["qc_decision"].isin(["review", "fail"])]
    thumbs = {}
    for sid in flagged["scan_id"].astype(str):
        rel = f"thumbs/{sid}.png"
        if (out_dir / rel).is_file():
            thumbs[sid] = rel
    return thumbs


def run(cfg: DictConfig) -> dict[str, Any]:
    set_threads(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out = out_dir / "scores.tsv"
    progress = cfg.score.get("progress")
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    trainer = build_score_trainer(cfg, progress)
    t0 = time.perf_counter()
    try:
        table, scorers = score_dataset(cfg, trainer=trainer, progress=progress)
    except KeyboardInterrupt:
        print(f"qcflow: interrupted; partial table in {out}", file=sys.stderr)
        sys.exit(130)
    seconds = time.perf_counter() - t0
    if table is None:  # another rank of a multi-process run: rank 0 reports
        return {"global_rank": trainer.global_rank}
    ok = table["status"] == "ok"
    errors = table[~ok]
    print(f"scored {int(ok.sum())} of {len(table)} scans -> {out}")
    for _, row in errors.iterrows():
        print(f"  {row['scan_id']}: {row['error']}")
    if not ok.any():
        raise QCFlowError(f"{out}: no scan could be scored ({len(table)} failed); see the table")
    thresholds = {k: v for s in scorers for k, v in s.thresholds.items()}
    figures = {name: path for s in scorers for name, path in s.finish(table, out_dir).items()}
    plot = None  # the report shows the first figure (a path relative to the run folder)
    if figures:
        plot = Path(os.path.relpath(next(iter(figures.values())), out_dir)).as_posix()
    thumbs = _thumbs(table, out_dir) if "qc_decision" in table else {}
    report = write_report(table, out_dir, thresholds, plot, thumbs)
    print(f"report: {report}")
    log_table(trainer, "score/scores", table)  # W&B dashboard (a no-op for other loggers)
    if figures:
        log_images(trainer, {f"score/{name}": path for name, path in figures.items()})
    decisions: dict[str, int] = {}
    if "qc_decision" in table:
        counts = table.loc[ok, "qc_decision"].value_counts().to_dict()
        decisions = {k: int(counts.get(k, 0)) for k in ("pass", "review", "fail")}
        print("decisions: " + ", ".join(f"{k} {v}" for k, v in decisions.items()))
    maps = out_dir / DERIVATIVES
    return {
        "thresholds": thresholds,
        "decisions": decisions,
        "report_html": str(report),
        "maps_dir": str(maps) if maps.is_dir() else None,
        "n_scans": len(table),
        "n_ok": int(ok.sum()),
        "n_error": len(errors),
        "scores_tsv": str(out),
        "world_size": trainer.world_size,
        # discovery, model loading and scoring (loading + preprocessing + every scorer)
        "score_seconds": round(seconds, 2),
    }
