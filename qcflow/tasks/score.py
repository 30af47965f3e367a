"""Task ``score``: one row per scan in ``<run>/scores.tsv``; bad scans reported, not fatal.

Exit status (through the CLI): 0 when at least one scan was scored, 1 when none could be
(or the configuration is invalid), 130 after Ctrl-C (the partial table is valid).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from qcflow.data.discovery import discover_scans, resolve_data_root
from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import ConfigError, QCFlowError
from qcflow.qc.report import write_report, write_thumbnail
from qcflow.qc.scoring import IQMScorer, Scorer, ScoreTable, score_scans
from qcflow.utils.runs import find_latest_run

__all__ = ["run", "build_scorers", "previous_table", "DensityScorer", "find_flow_run"]

log = logging.getLogger(__name__)


class DensityScorer:
    """Method A: artifact code ``m``, ``log p_M(m)``, its training percentile and a decision.

    ``qc_decision`` is ``fail`` below the ``fail_tau`` density percentile of the unlabelled
    training volumes, ``review`` between ``fail_tau`` and ``review_tau``, else ``pass``.

    Args:
        flow_run: a ``flow_density`` run folder (``flow.pt`` + ``codes_train.tsv``); its bundle
            names the encoder checkpoint and the slice settings used in training.
        review_tau, fail_tau: fractions of the training distribution (0.05, 0.03).
        per_site: thresholds and percentiles within the scan's site, from the training volumes
            of that site (``site`` column of ``participants.tsv``); a site with fewer than
            ``min_site_volumes`` training volumes, or unknown in training, uses the global
            distribution (column ``threshold_scope`` says which).
    """

    def __init__(
        self,
        flow_run: str | Path,
        review_tau: float = 0.05,
        fail_tau: float = 0.03,
        per_site: bool = False,
        min_site_volumes: int = 10,
    ):
        from qcflow.tasks.flow_density import FLOW_FILE, load_encoder, load_flow, read_codes

        run = Path(flow_run)
        if not (run / FLOW_FILE).is_file():
            raise ConfigError(f"{run}: no {FLOW_FILE} (not a flow_density run)")
        if not 0 < fail_tau <= review_tau < 1:
            raise ConfigError(
                f"need 0 < score.fail_tau <= score.review_tau < 1, got {fail_tau}, {review_tau}"
            )
        self.density, bundle = load_flow(run)
        encoder_ckpt = Path(bundle["encoder_checkpoint"])
        if not encoder_ckpt.is_file():
            raise ConfigError(f"{encoder_ckpt}: encoder checkpoint of {run} not found")
        self.encoder = load_encoder(encoder_ckpt)
        self.n_central = bundle["n_central_slices"]
        self.size = int(bundle["slice_size"])
        self.data = bundle.get("data") or {}
        train_ids, self.train_codes, train_logp = read_codes(run / "codes_train.tsv")
        self.train_logp = np.sort(train_logp)
        self.review_thr = float(np.quantile(self.train_logp, review_tau))
        self.fail_thr = float(np.quantile(self.train_logp, fail_tau))
        d = int(self.density.features)
        self.columns = (*(f"m_{j + 1}" for j in range(d)), "log_density")
        self.columns += ("density_percentile", "qc_decision")
        digest = hashlib.sha1((run / FLOW_FILE).read_bytes())
        digest.update(encoder_ckpt.read_bytes())
        self.identity = f"density-{digest.hexdigest()[:12]}-{review_tau}-{fail_tau}"
        self.thresholds = {"review_tau": review_tau, "fail_tau": fail_tau}
        self.thresholds |= {"review_log_density": self.review_thr}
        self.thresholds |= {"fail_log_density": self.fail_thr}
        self.per_site = per_site
        self.site_logp: dict[str, np.ndarray] = {}
        self.site_thr: dict[str, tuple[float, float]] = {}  # site -> (review, fail)
        if per_site:
            self.columns += ("threshold_scope",)
            self.identity += f"-site{int(min_site_volumes)}"
            sites = self._training_sites()
            logp = dict(zip(train_ids, train_logp, strict=True))
            for site in sorted(set(sites.values())):
                vals = [logp[sid] for sid, st in sites.items() if st == site and sid in logp]
                if len(vals) >= int(min_site_volumes):
                    self.site_logp[site] = np.sort(np.asarray(vals, dtype=np.float64))
            for site, vals in self.site_logp.items():
                review = float(np.quantile(vals, review_tau))
                fail = float(np.quantile(vals, fail_tau))
                self.site_thr[site] = (review, fail)
                self.thresholds[f"review_log_density[{site}]"] = review
                self.thresholds[f"fail_log_density[{site}]"] = fail

    def _training_sites(self) -> dict[str, str]:
        """``scan_id -> site`` of the training volumes (re-discovered from the model's data)."""
        from qcflow.data.discovery import discover_scans, resolve_data_root

        try:
            scans = discover_scans(resolve_data_root(OmegaConf.create(self.data)))
        except Exception as exc:  # training data moved: fall back to global thresholds
            log.warning("per-site thresholds unavailable (%s); using global ones", exc)
            return {}
        return {s.scan_id: s.site for s in scans if s.site}

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        from qcflow.data.contrastive import axial_stack
        from qcflow.models.encoder import volume_code

        slices = axial_stack(item["image"], self.n_central, self.size)
        m = volume_code(self.encoder, slices)
        logp = float(self.density.log_prob(m[None].float())[0])
        site = item["scan"].site if item.get("scan") is not None else None
        ref = self.site_logp.get(site) if self.per_site and site else None
        if ref is None:
            ref, review_thr, fail_thr = self.train_logp, self.review_thr, self.fail_thr
        else:
            review_thr, fail_thr = self.site_thr[site]
        pct = 100.0 * float(np.searchsorted(ref, logp, side="right")) / len(ref)
        decision = "fail" if logp < fail_thr else "review" if logp < review_thr else "pass"
        row = {f"m_{j + 1}": float(v) for j, v in enumerate(m.tolist())}
        row.update(log_density=logp, density_percentile=pct, qc_decision=decision)
        if self.per_site:
            row["threshold_scope"] = f"site:{site}" if ref is not self.train_logp else "global"
        return row

    def plot(self, table: pd.DataFrame, path: Path) -> Path | None:
        """Density contours of p_M(m) with the training codes and every scored scan on top."""
        from qcflow.qc.plots import density_contours

        cols = [f"m_{j + 1}" for j in range(int(self.density.features))]
        ok = table[table["status"] == "ok"]
        if len(cols) != 2 or ok.empty:
            return None  # contours are drawn for d = 2 only

        def log_prob(x: np.ndarray) -> np.ndarray:
            import torch

            with torch.no_grad():
                return self.density.log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()

        return density_contours(
            log_prob,
            self.train_codes,
            ok[cols].to_numpy(dtype=np.float64),
            list(ok["qc_decision"]),
            path,
            thresholds={"review": self.review_thr, "fail": self.fail_thr},
        )


def find_flow_run(cfg: DictConfig) -> Path | None:
    """``score.flow_run`` or the latest ``flow_density`` run with ``flow.pt`` (None if absent)."""
    given = cfg.score.get("flow_run")
    if given:
        return Path(str(given)).expanduser()
    try:
        return find_latest_run(cfg.paths.runs_dir, "flow_density", require="flow.pt")
    except ConfigError:
        return None


def build_scorers(cfg: DictConfig) -> list[Scorer]:
    """The scorers the config asks for: method A's density, then the classical measures."""
    scorers: list[Scorer] = []
    density = cfg.score.get("density", "auto")
    if density:
        run = find_flow_run(cfg)
        if run is None and str(density) != "auto":
            raise ConfigError(
                "score.density=true but no flow_density run was found; run "
                "`python -m qcflow experiment=flow_density` or set score.flow_run=PATH"
            )
        if run is None:
            log.warning("no trained density model found: scoring classical measures only")
        else:
            log.info("density model: %s", run)
            scorers.append(
                DensityScorer(
                    run,
                    review_tau=float(cfg.score.get("review_tau", 0.05)),
                    fail_tau=float(cfg.score.get("fail_tau", 0.03)),
                    per_site=bool(cfg.score.get("per_site", False)),
                    min_site_volumes=int(cfg.score.get("min_site_volumes", 10)),
                )
            )
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
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    scans = discover_scans(resolve_data_root(cfg.data), cfg.data.get("pattern"))
    scorers = build_scorers(cfg)
    pcfg = PreprocessConfig.from_data_cfg(cfg.data)
    for scorer in scorers:  # preprocess exactly as the model was trained
        if isinstance(scorer, DensityScorer) and scorer.data:
            trained = PreprocessConfig.from_data_cfg(OmegaConf.create(scorer.data))
            if trained.key() != pcfg.key():
                log.info("using the density model's preprocessing: %s", trained)
            pcfg = trained
    previous = previous_table(cfg) if cfg.score.get("resume") else None
    out = Path(cfg.paths.output_dir) / "scores.tsv"
    cache_dir = cfg.data.get("cache_dir") if cfg.data.get("cache") else None
    out_dir = Path(cfg.paths.output_dir)
    thumbs: dict[str, str] = {}

    def on_row(row: dict[str, Any], item: dict[str, Any]) -> None:
        """Thumbnails of flagged scans for report.html."""
        if row.get("qc_decision") in ("review", "fail") and item.get("image") is not None:
            rel = f"thumbs/{row['scan_id']}.png"
            write_thumbnail(item["image"], out_dir / rel)
            thumbs[str(row["scan_id"])] = rel

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
            on_row=on_row,
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
    thresholds = {k: v for s in scorers for k, v in getattr(s, "thresholds", {}).items()}
    plot = None
    for scorer in scorers:
        if isinstance(scorer, DensityScorer):
            made = scorer.plot(table, out_dir / "density_contours.png")
            plot = made.name if made else None
    report = write_report(table, out_dir, thresholds, plot, thumbs)
    print(f"report: {report}")
    if "qc_decision" in table:
        counts = table.loc[ok, "qc_decision"].value_counts().to_dict()
        print(
            "decisions: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("pass", "review", "fail"))
        )
    return {
        "thresholds": thresholds,
        "decisions": table.loc[ok, "qc_decision"].value_counts().to_dict()
        if "qc_decision" in table
        else {},
        "report_html": str(report),
        "n_scans": len(table),
        "n_ok": int(ok.sum()),
        "n_error": len(errors),
        "scores_tsv": str(out),
    }
