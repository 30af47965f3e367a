"""Detection metrics: percentile thresholds (one- and two-sided), contingency, AUROC, rates."""

from __future__ import annotations

import numpy as np
import pytest

from qcflow.qc import detection as det


def test_percentile_thresholds_one_and_two_sided() -> None:
    train = np.arange(1001.0)  # quantile q is exactly 1000 q
    assert det.percentile_thresholds(train, 0.05, "low") == (50.0, float("inf"))
    assert det.percentile_thresholds(train, 0.05, "high") == (float("-inf"), 950.0)
    assert det.percentile_thresholds(train, 0.05, "two") == (25.0, 975.0)
    for side in ("low", "high", "two"):
        flags = det.apply_thresholds(train, det.percentile_thresholds(train, 0.03, side))
        assert flags.mean() == pytest.approx(0.03, abs=2e-3), side
    with pytest.raises(ValueError):
        det.percentile_thresholds(train, 1.5)
    with pytest.raises(ValueError):
        det.percentile_thresholds(train, 0.05, "left")  # type: ignore[arg-type]


def test_non_finite_values_fail() -> None:
    flags = det.apply_thresholds([np.nan, 1.0, np.inf], (0.0, 2.0))
    assert flags.tolist() == [True, False, True]


def test_contingency_and_sensitivity_specificity() -> None:
    flags = np.array([1, 1, 0, 0, 1, 0], bool)
    labels = np.array([1, 1, 1, 0, 0, 0])
    table = det.contingency(flags, labels)
    assert table == {"tp": 2, "fp": 1, "tn": 2, "fn": 1}
    sens, spec = det.sensitivity_specificity(table)
    assert sens == pytest.approx(2 / 3) and spec == pytest.approx(2 / 3)


def test_auroc_known_values_and_two_sided_score() -> None:
    labels = [0, 0, 1, 1]
    assert det.auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert det.auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert det.auroc([0.1, 0.8, 0.2, 0.9], labels) == 0.75
    assert np.isnan(det.auroc([0.1, 0.2], [0, 0]))
    # both tails are abnormal for a two-sided score
    train = np.linspace(-1, 1, 101)
    s = det.anomaly_score([-5.0, 0.0, 5.0], train, "two")
    assert s[0] == pytest.approx(s[2]) and s[1] == pytest.approx(0.0)
    assert det.auroc(det.anomaly_score([-5.0, 0.1, -0.1, 5.0], train, "two"), [1, 0, 0, 1]) == 1.0


def test_detection_rates_per_group() -> None:
    rates = det.detection_rates([1, 0, 1, 1], ["noise", "noise", "bias", 3])
    assert rates == {
        "3": {"rate": 1.0, "n": 1},
        "bias": {"rate": 1.0, "n": 1},
        "noise": {"rate": 0.5, "n": 2},
    }


def test_tau_thresholds_are_the_one_definition_of_a_threshold() -> None:
    """numpy's linear quantile; the flow's stored thresholds and the IQM baselines use it."""
    import torch

    from qcflow.models.flow import DensityFlow

    rng = np.random.default_rng(0)
    for n in (2, 7, 60, 151):
        v = rng.normal(size=n)
        got = det.tau_thresholds(v, [0.05, 0.03, 0.5])
        assert got.dtype == np.float64
        assert got.tolist() == [np.quantile(v, t) for t in (0.05, 0.03, 0.5)]  # bit for bit
        assert det.percentile_thresholds(v, 0.05, "low")[0] == got[0]
    assert det.tau_thresholds(np.arange(101.0), [0.05]).tolist() == [5.0]
    torch.manual_seed(0)
    density = DensityFlow(features=2, transforms=1, hidden_features=(4,), taus=(0.05, 0.03))
    m = torch.randn(40, 2)
    stored = density.set_thresholds(m)
    with torch.no_grad():
        logp = density.log_prob(m).double()
    assert stored.dtype == torch.float64
    assert stored.tolist() == det.tau_thresholds(logp, [0.05, 0.03]).tolist()
