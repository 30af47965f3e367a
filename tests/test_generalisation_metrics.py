"""The generalisation benchmark's metrics (experiments/generalisation/metrics.py) on hand cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "generalisation"))

import metrics  # noqa: E402


def _row(kind: str, sev: int, decision: str, logd: float, status: str = "ok", **iqm) -> dict:
    row = {"kind": kind, "severity": str(sev), "gm_label": "", "s_status": status}
    row |= {"s_qc_decision": decision, "s_log_density": str(logd)}
    return row | {f"s_{k}": str(v) for k, v in iqm.items()}


def test_flags_follow_the_products_decisions_and_errors_fail() -> None:
    rows = [_row("none", 0, "pass", 1.0), _row("none", 0, "review", 0.0)]
    rows += [_row("blur", 2, "fail", -3.0), _row("blur", 2, "pass", 0.5, status="error")]
    assert metrics.flags(rows, 0.05).tolist() == [False, True, True, True]
    assert metrics.flags(rows, 0.03).tolist() == [False, False, True, True]


def test_method_a_counts_and_rates() -> None:
    test = [_row("none", 0, "pass", 2.0 - 0.1 * i) for i in range(8)]
    test += [_row("none", 0, "review", 0.0), _row("none", 0, "pass", 1.0)]
    test += [_row("blur", 1, "pass", 1.5), _row("blur", 2, "fail", -5.0),
             _row("blur", 3, "fail", -6.0), _row("noise", 2, "review", -1.0),
             _row("noise", 3, "pass", 1.2)]  # fmt: skip
    pool = [_row("none", 0, "pass", 1.0)] * 19 + [_row("blur", 3, "fail", -4.0)]
    a = metrics.method_a(test, pool)
    assert (a["n_clean"], a["n_artifact"]) == (10, 5)
    assert a["sensitivity_tau05"] == pytest.approx(3 / 5)
    assert a["specificity_tau05"] == pytest.approx(9 / 10)
    assert a["sensitivity_tau03"] == pytest.approx(2 / 5)
    assert a["specificity_tau03"] == pytest.approx(1.0)
    det = a["detection_tau05"]
    assert det["per_kind"] == {"blur": pytest.approx(2 / 3), "noise": pytest.approx(0.5)}
    assert det["per_kind_moderate"] == {"blur": 1.0, "noise": 0.5}  # severities 2-3 only
    assert det["per_severity"] == {"1": 0.0, "2": 1.0, "3": 0.5}
    assert a["min_kind_detection"] == 0.5
    assert a["pool_flagged_tau05"] == pytest.approx(0.05)
    # AUROC of -log-density by hand: pairs (artifact, clean) where the artifact is lower
    logd = np.array([float(r["s_log_density"]) for r in test])
    y = np.array([r["kind"] != "none" for r in test])
    pairs = [(a_, c) for a_ in logd[y] for c in logd[~y]]
    expected = np.mean([1.0 if a_ < c else 0.5 if a_ == c else 0.0 for a_, c in pairs])
    assert a["auroc"] == pytest.approx(expected)


def test_baselines_threshold_on_the_pool_on_the_worse_side() -> None:
    pool = [_row("none", 0, "pass", 0.0, snr=10.0 + i, cjv=0.3) for i in range(20)]
    test = [_row("none", 0, "pass", 0.0, snr=20.0, cjv=0.3),
            _row("noise", 3, "pass", 0.0, snr=2.0, cjv=0.3)]  # fmt: skip
    b = metrics.baselines(test, pool)
    assert b["snr"]["side"] == "low" and b["snr"]["auroc"] == 1.0
    assert b["snr"]["sensitivity_tau05"] == 1.0 and b["snr"]["specificity_tau05"] == 1.0
    assert "cnr" not in b  # no values in the pool: no baseline


def test_mean_over_takes_the_worst_kind_of_the_per_kind_means() -> None:
    def cohort(sens: float, kinds: dict) -> dict:
        summary = {"sensitivity_tau05": sens, "auroc": None}
        return {"summary": summary, "method_a": {"detection_tau05": {"per_kind_moderate": kinds}}}

    out = metrics.mean_over([cohort(0.5, {"a": 1.0, "b": 0.0}), cohort(0.7, {"a": 0.5, "b": 1.0})])
    assert out["sensitivity_tau05"] == pytest.approx(0.6) and out["auroc"] is None
    assert out["per_kind_moderate"] == {"a": 0.75, "b": 0.5}
    assert out["min_kind_detection"] == 0.5
