"""Metrics of the generalisation benchmark, from scored rows joined with a cohort's truth.

A row is a ``truth.tsv`` row (``kind``, ``severity``, ``gm_label``...) with the ``scores.tsv``
columns prefixed ``s_``. Method A's flag at τ = 5 % is the product's own decision,
``qc_decision ∈ {review, fail}`` (``score.review_tau = 0.05``), at τ = 3 % ``qc_decision = fail``
(``score.fail_tau = 0.03``): both are τ-quantiles of the log-densities of the pool the flow was
fitted on. A scan that could not be scored (``status = error``) counts as flagged. The IQM
baselines are thresholded the same way, at the τ-quantile of their values over the pool, on the
side MRIQC calls worse (``qcflow.qc.detection``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcflow.qc import detection as det

#: classical measures and the side that fails (as ``iqc_evaluate``'s ``evaluate.baselines``)
BASELINES = {"snr": "low", "cnr": "low", "cjv": "high", "efc": "high", "fber": "low"}
#: severities that count as "moderate to severe" for the per-kind target
MODERATE = (2, 3)


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def flags(rows: Sequence[Mapping[str, Any]], tau: float) -> np.ndarray:
    """Method A's decision at τ (5 %: review or fail; 3 %: fail); errors are flagged."""
    failing = {"review", "fail"} if tau >= 0.05 else {"fail"}
    return np.array(
        [r.get("s_status") != "ok" or r.get("s_qc_decision") in failing for r in rows], bool
    )


def _labels(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([r["kind"] != "none" for r in rows], int)


def _rates(flagged: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    kinds = sorted({r["kind"] for r in rows if r["kind"] != "none"})
    by_kind, by_kind_mod, by_sev = {}, {}, {}
    for kind in kinds:
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        by_kind[kind] = float(flagged[idx].mean())
        mod = [i for i in idx if int(rows[i]["severity"]) in MODERATE]
        by_kind_mod[kind] = float(flagged[mod].mean()) if mod else float("nan")
    for sev in sorted({int(r["severity"]) for r in rows if r["kind"] != "none"}):
        idx = [i for i, r in enumerate(rows) if r["kind"] != "none" and int(r["severity"]) == sev]
        by_sev[str(sev)] = float(flagged[idx].mean())
    return {"per_kind": by_kind, "per_kind_moderate": by_kind_mod, "per_severity": by_sev}


def method_a(test: Sequence[Mapping[str, Any]], pool: Sequence[Mapping[str, Any]]) -> dict:
    """Sensitivity/specificity at each τ, AUROC of −log-density, detection per kind/severity."""
    y = _labels(test)
    out: dict[str, Any] = {"n_clean": int((y == 0).sum()), "n_artifact": int(y.sum())}
    for tau in (0.05, 0.03):
        f = flags(test, tau)
        sens, spec = det.sensitivity_specificity(det.contingency(f, y))
        key = f"tau{round(tau * 100):02d}"
        out[f"sensitivity_{key}"], out[f"specificity_{key}"] = sens, spec
        out[f"detection_{key}"] = _rates(f, test)
        out[f"pool_flagged_{key}"] = float(flags(pool, tau).mean())
    logd = np.array([_float(r.get("s_log_density")) for r in test])
    out["auroc"] = det.auroc(np.where(np.isfinite(logd), -logd, np.inf), y)
    out["n_errors"] = int(sum(r.get("s_status") != "ok" for r in test))
    mod = out["detection_tau05"]["per_kind_moderate"]
    out["min_kind_detection"] = min(mod.values()) if mod else float("nan")
    return out


def baselines(test: Sequence[Mapping[str, Any]], pool: Sequence[Mapping[str, Any]]) -> dict:
    """Each IQM thresholded at the pool's τ = 5 % quantile on its worse side, and its AUROC."""
    y = _labels(test)
    out = {}
    for name, side in BASELINES.items():
        train = np.array([_float(r.get(f"s_{name}")) for r in pool])
        values = np.array([_float(r.get(f"s_{name}")) for r in test])
        if not np.isfinite(train).any():
            continue
        f = det.apply_thresholds(values, det.percentile_thresholds(train, 0.05, side))
        sens, spec = det.sensitivity_specificity(det.contingency(f, y))
        score = det.anomaly_score(values, train, side)
        out[name] = {
            "side": side,
            "auroc": det.auroc(score, y),
            "sensitivity_tau05": sens,
            "specificity_tau05": spec,
        }
    return out


def _dice(seg_path: Path, truth_path: Path) -> float:
    """GM Dice of a written segmentation against the truth label (resampled onto its grid)."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    seg = nib.load(str(seg_path))
    truth = resample_to_img(
        nib.load(str(truth_path)), seg, interpolation="nearest", force_resample=True
    )
    a = np.asarray(seg.dataobj) > 0.5
    b = np.asarray(truth.dataobj) > 0.5
    denom = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / denom) if denom else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    return float(spearmanr(x[ok], y[ok]).statistic) if ok.sum() >= 5 else float("nan")


def method_b(
    test: Sequence[Mapping[str, Any]], cdir: Path, score_run: Path
) -> dict[str, Any] | None:
    """Artifact variance as a detector, the channel ranking per kind, ρ(variance, GM Dice)."""
    if not test or "s_artifact_variance_total" not in test[0]:
        return None
    y = _labels(test)
    total = np.array([_float(r.get("s_artifact_variance_total")) for r in test])
    out: dict[str, Any] = {"auroc": det.auroc(np.nan_to_num(total, nan=np.inf), y)}
    channels = sorted(
        k[len("s_artifact_variance_") :]
        for k in test[0]
        if k.startswith("s_artifact_variance_") and k != "s_artifact_variance_total"
    )
    clean = [r for r in test if r["kind"] == "none"]
    ranking = {}
    for kind in sorted({r["kind"] for r in test if r["kind"] != "none"}):
        rows = [r for r in test if r["kind"] == kind]
        z = {}
        for c in channels:
            ref = np.array([_float(r.get(f"s_artifact_variance_{c}")) for r in clean])
            val = np.array([_float(r.get(f"s_artifact_variance_{c}")) for r in rows])
            med, mad = np.nanmedian(ref), np.nanmedian(np.abs(ref - np.nanmedian(ref)))
            z[c] = float(np.nanmean((val - med) / max(mad, 1e-12)))
        ranking[kind] = sorted(z, key=z.get, reverse=True)
    out["channel_ranking"] = ranking
    dice, var = [], []
    for r, v in zip(test, total, strict=True):
        if not r.get("gm_label"):
            continue
        sid = r.get("s_scan_id", "")
        segs = sorted(score_run.rglob(f"{sid}_*seg*.nii.gz")) if sid else []
        if segs:
            dice.append(_dice(segs[0], cdir / r["gm_label"]))
            var.append(v)
    if dice:
        out["spearman_dice"] = _spearman(np.array(var), np.array(dice))
        out["n_dice"] = len(dice)
    return out


def cohort_metrics(
    pool: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    taus: Sequence[float],
    cdir: Path,
    score_run: Path,
) -> dict[str, Any]:
    """Every metric of one cohort, and a short ``summary`` of the headline numbers."""
    del taus  # the two τ are the score task's review_tau / fail_tau
    a = method_a(test, pool)
    out: dict[str, Any] = {"method_a": a, "baselines": baselines(test, pool)}
    b = method_b(test, cdir, score_run)
    out["method_b"] = b
    out["summary"] = {
        "sensitivity_tau05": a["sensitivity_tau05"],
        "specificity_tau05": a["specificity_tau05"],
        "auroc": a["auroc"],
        "min_kind_detection": a["min_kind_detection"],
        "pool_flagged_tau05": a["pool_flagged_tau05"],
        "method_b_auroc": b["auroc"] if b else None,
        "method_b_spearman": b.get("spearman_dice") if b else None,
    }
    return out


def mean_over(cohorts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each summary number over cohorts (ignoring missing ones)."""
    keys = cohorts[0]["summary"].keys() if cohorts else ()
    out = {}
    for k in keys:
        vals = [c["summary"][k] for c in cohorts if c["summary"][k] is not None]
        vals = [v for v in vals if isinstance(v, float | int) and math.isfinite(v)]
        out[k] = float(np.mean(vals)) if vals else None
    # per kind: its moderate-to-severe detection averaged over the cohorts, then the worst kind
    per_kind: dict[str, list[float]] = {}
    for c in cohorts:
        for kind, rate in c["method_a"]["detection_tau05"]["per_kind_moderate"].items():
            per_kind.setdefault(kind, []).append(rate)
    if per_kind:
        means = {k: float(np.nanmean(v)) for k, v in per_kind.items()}
        out["per_kind_moderate"] = means
        out["min_kind_detection"] = min(means.values())
    return out
