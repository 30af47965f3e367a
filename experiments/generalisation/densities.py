"""Other densities on the codes a benchmark run scored (offline; no retraining, no rescoring).

Reads each cohort's ``score_pool`` / ``score_test`` ``scores.tsv`` (the codes ``m_*`` and the
flow's ``log_density``) and compares, at the pool's τ = 5 % quantile: the run's own flow; a
Gaussian with Ledoit–Wolf shrinkage fitted on the pool (Mahalanobis distance); the same refitted
without the pool's 10 % most outlying codes (the pool holds ~5 % corrupted scans). Prints
AUROC / sensitivity / specificity per run and cohort, and their means.

Usage::

    python experiments/generalisation/densities.py TAG [TAG ...] \
        [--work $QCFLOW_HOME/bench/generalisation] [--cohorts-dir $QCFLOW_HOME/bench/cohorts]
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

HOME = Path(os.environ.get("QCFLOW_HOME", Path.home() / "qcflow"))


def load(run: Path, cohort_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(cohort_dir / "truth.tsv", newline="") as fh:
        truth = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")}
    with open(run / f"score_{split}" / "scores.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["status"] == "ok"]
    cols = [k for k in rows[0] if k.startswith("m_")]
    x = np.array([[float(r[k]) for k in cols] for r in rows])
    logd = np.array([float(r["log_density"]) for r in rows])
    pid = [next(p for p in Path(r["path"]).parts if p.startswith("sub-")) for r in rows]
    y = np.array([truth[p]["kind"] != "none" for p in pid])
    return x, logd, y


def _rates(score: np.ndarray, pool_score: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    flag = score > np.quantile(pool_score, 0.95)  # higher = more abnormal
    return roc_auc_score(y, score), flag[y].mean(), 1.0 - flag[~y].mean()


def compare(run: Path, cohort_dir: Path) -> dict[str, tuple[float, ...]]:
    xp, lp, _ = load(run, cohort_dir, "pool")
    xt, lt, yt = load(run, cohort_dir, "test")
    out = {"flow": _rates(-lt, -lp, yt)}
    g = LedoitWolf().fit(xp)
    out["gaussian"] = _rates(g.mahalanobis(xt), g.mahalanobis(xp), yt)
    d = g.mahalanobis(xp)
    t = LedoitWolf().fit(xp[d < np.quantile(d, 0.9)])
    out["gaussian_trimmed"] = _rates(t.mahalanobis(xt), t.mahalanobis(xp), yt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("tags", nargs="+")
    p.add_argument("--work", type=Path, default=HOME / "bench" / "generalisation")
    p.add_argument("--cohorts-dir", type=Path, default=HOME / "bench" / "cohorts")
    args = p.parse_args()
    means: dict[str, list] = {}
    for tag in args.tags:
        for run in sorted((args.work / tag).iterdir()):
            if not (run / "score_test" / "scores.tsv").exists() or run.name == "embedded":
                continue
            res = compare(run, args.cohorts_dir / run.name)
            for k, v in res.items():
                means.setdefault(k, []).append(v)
            cells = "  ".join(f"{k} {a:.3f}/{s:.2f}/{sp:.2f}" for k, (a, s, sp) in res.items())
            print(f"{tag:14s} {run.name:15s} {cells}")
    for k, v in means.items():
        a, s, sp = np.mean(v, axis=0)
        print(f"mean {k}: AUROC {a:.3f}, sensitivity {s:.3f}, specificity {sp:.3f} (n={len(v)})")


if __name__ == "__main__":
    main()
