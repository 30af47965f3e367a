"""Unsupervised pass/fail detection metrics: thresholds, contingency, sens/spec, AUROC, rates.

Pure functions on arrays (NumPy; torch tensors are accepted), no files, no Lightning.
Convention: ``labels`` 1 = artifact (positive class), 0 = clean; ``flags`` True = failed QC.

Thresholds are percentiles of an unlabelled *training* distribution: a one-sided detector flags
values below the τ-percentile (``side='low'``, e.g. a density or an SNR) or above the
(1-τ)-percentile (``side='high'``, e.g. CJV); a two-sided one flags either tail at τ/2 each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "Side",
    "tau_thresholds",
    "percentile_thresholds",
    "apply_thresholds",
    "anomaly_score",
    "contingency",
    "sensitivity_specificity",
    "auroc",
    "roc",
    "detection_rates",
]

Side = Literal["low", "high", "two"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def tau_thresholds(train: Any, taus: Sequence[float]) -> np.ndarray:
    """The τ-quantiles of training values: the one definition of a τ threshold.

    A detector flags a value below the τ-quantile of the unlabelled training values (Zuo et
    al. 2023: a volume fails when its density ``log p_M(m)`` is below the τ-percentile of the
    training volumes' densities). Quantiles interpolate linearly between order statistics
    (``numpy.quantile``'s default, Hyndman & Fan type 7): with ``N`` sorted values ``v``,
    ``q(τ) = v[⌊h⌋] + (h - ⌊h⌋) (v[⌊h⌋ + 1] - v[⌊h⌋])`` at ``h = (N - 1) τ``.

    Args:
        train: 1-D training values (all of them: no filtering here).
        taus: fractions in ``[0, 1]`` (0.05 = 5 %).

    Returns:
        ``(len(taus),)`` float64 thresholds.

    Example:
        >>> tau_thresholds(np.arange(101.0), [0.05, 0.03]).tolist()
        [5.0, 3.0]
    """
    v = _np(train).astype(np.float64).ravel()
    return np.atleast_1d(np.quantile(v, [float(t) for t in taus]))


def percentile_thresholds(train: Any, tau: float, side: Side = "low") -> tuple[float, float]:
    """``(low, high)`` bounds: values outside ``[low, high]`` are flagged.

    Args:
        train: 1-D training values (unlabelled).
        tau: fraction flagged on the training set (0.05 = 5 %).
        side: ``'low'`` (flag the lowest τ), ``'high'`` (the highest τ), ``'two'`` (τ/2 each).

    Example:
        >>> percentile_thresholds(np.arange(101.0), 0.05)
        (5.0, inf)
    """
    v = _np(train).astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1), got {tau}")
    if v.size == 0:
        raise ValueError("percentile_thresholds: no finite training value")
    if side == "low":
        return float(tau_thresholds(v, [tau])[0]), float("inf")
    if side == "high":
        return float("-inf"), float(tau_thresholds(v, [1.0 - tau])[0])
    if side == "two":
        low, high = tau_thresholds(v, [tau / 2, 1.0 - tau / 2]).tolist()
        return float(low), float(high)
    raise ValueError(f"side must be 'low', 'high' or 'two', got {side!r}")


def apply_thresholds(values: Any, bounds: tuple[float, float]) -> np.ndarray:
    """Bool flags: True where a value is below ``low``, above ``high``, or not finite."""
    v = _np(values).astype(np.float64)
    low, high = bounds
    return ~np.isfinite(v) | (v < low) | (v > high)


def anomaly_score(values: Any, train: Any, side: Side = "low") -> np.ndarray:
    """A score that grows with abnormality, for ROC analysis.

    ``low``: ``-v``; ``high``: ``v``; ``two``: ``|v - median| / IQR`` of the training values.
    Non-finite values get ``+inf`` (maximally abnormal).
    """
    v = _np(values).astype(np.float64)
    if side == "low":
        s = -v
    elif side == "high":
        s = v.copy()
    elif side == "two":
        t = _np(train).astype(np.float64)
        t = t[np.isfinite(t)]
        q1, med, q3 = np.quantile(t, [0.25, 0.5, 0.75])
        s = np.abs(v - med) / max(q3 - q1, 1e-12)
    else:
        raise ValueError(f"side must be 'low', 'high' or 'two', got {side!r}")
    return np.where(np.isfinite(s), s, np.inf)


def contingency(flags: Any, labels: Any) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` of flags (True = fail) against labels (1 = artifact)."""
    f, y = _np(flags).astype(bool), _np(labels).astype(bool)
    if f.shape != y.shape:
        raise ValueError(f"flags {f.shape} and labels {y.shape} differ in shape")
    return {
        "tp": int((f & y).sum()),
        "fp": int((f & ~y).sum()),
        "tn": int((~f & ~y).sum()),
        "fn": int((~f & y).sum()),
    }


def sensitivity_specificity(table: Mapping[str, int]) -> tuple[float, float]:
    """Sensitivity TP/(TP+FN) and specificity TN/(TN+FP) (NaN when undefined)."""
    pos, neg = table["tp"] + table["fn"], table["tn"] + table["fp"]
    sens = table["tp"] / pos if pos else float("nan")
    spec = table["tn"] / neg if neg else float("nan")
    return float(sens), float(spec)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (sklearn) of scores (higher = more abnormal); NaN if one class."""
    s, y = _np(scores).astype(np.float64), _np(labels).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan")
    s = np.where(np.isposinf(s), np.finfo(np.float64).max, s)
    return float(roc_auc_score(y, s))


def roc(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve."""
    s = _np(scores).astype(np.float64)
    s = np.where(np.isposinf(s), np.finfo(np.float64).max, s)
    fpr, tpr, _ = roc_curve(_np(labels).astype(int), s)
    return fpr, tpr


def detection_rates(flags: Any, groups: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Fraction flagged per group (artifact kind, severity): ``{group: {"rate", "n"}}``."""
    f = _np(flags).astype(bool)
    g = np.asarray([str(x) for x in groups])
    out = {}
    for name in sorted(set(g.tolist())):
        sel = g == name
        out[name] = {"rate": float(f[sel].mean()), "n": int(sel.sum())}
    return out
