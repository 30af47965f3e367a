"""Segmentation quality and full-volume heteroscedastic inference (method B).

* :func:`dice`, :func:`spearman`: the metrics of the study;
* :func:`predict_volume`: sliding-window prediction of a whole volume with a two-head network:
  segmentation, ``sigma_t^2``, each ``sigma_i^2``, the entropy of ``softmax(f / sigma^2)``
  (``sigma^2`` the variance sum) and the GM volume with an error bar;
* :func:`summarize_prediction`: the per-scan numbers (the maps are written by
  :func:`qcflow.qc.derivatives.write_maps`).

GM volume error bar (Shaw et al. 2021): each voxel's entropy ``H`` is turned into a variance with
the Gaussian variance-entropy relation ``sigma_v^2 = exp(2 H) / (2 pi e)``; the volume variance is
the sum over voxels (voxels treated as independent), so ``std(V) = sqrt(sum_v sigma_v^2)`` voxels,
times the voxel volume. Note that a fully confident voxel (``H = 0``) still contributes
``1 / (2 pi e) ~ 0.059``: the Gaussian relation does not hold for a two-class distribution, so the
error bar has a floor that grows with the number of voxels summed (``volume_mask``: the head by
default); its *changes* with image quality are what carry the information.

Pure tensor / NumPy functions (no files).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "dice",
    "spearman",
    "entropy_map",
    "predict_volume",
    "summarize_prediction",
]


def dice(pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
    """Dice ``2 |A & B| / (|A| + |B|)`` of two binary masks (1.0 when both are empty)."""
    a = torch.as_tensor(np.asarray(pred) if not isinstance(pred, Tensor) else pred).bool()
    b = torch.as_tensor(np.asarray(target) if not isinstance(target, Tensor) else target).bool()
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman rank correlation and its two-sided p-value (scipy); NaN for < 3 pairs."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), float("nan")
    res = spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue)


def entropy_map(logits: Tensor, total_var: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of ``p = softmax(f / sigma^2)``.

    Args:
        logits: ``(B, C, D, H, W)``; total_var: ``(B, 1, D, H, W)`` variance sum.

    Returns:
        ``(B, 1, D, H, W)`` entropy in nats.
    """
    logp = torch.log_softmax(logits / total_var, dim=1)
    return -(logp.exp() * logp).sum(dim=1, keepdim=True)


@torch.no_grad()
def predict_volume(
    predictor: Callable[[Tensor], Tensor],
    image: Tensor,
    sources: Sequence[str],
    roi_size: Sequence[int],
    num_classes: int = 2,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
) -> dict[str, Tensor]:
    """Sliding-window prediction of one volume (MONAI ``sliding_window_inference``).

    Args:
        predictor: maps ``(n, 1, *roi)`` to ``(n, num_classes + K, *roi)`` (logits then
            log-variances), e.g. ``TwoHeadUNet.predict``.
        image: ``(1, D, H, W)`` or ``(1, 1, D, H, W)``.
        sources: names of the K log-variance channels (``task`` first).
        roi_size: window size (the training patch size).

    Returns:
        ``logits`` (C, D, H, W), ``segmentation`` (D, H, W) int64, ``prob_gm`` (D, H, W)
        (of ``softmax(f / sigma^2)``), ``var_<source>`` (D, H, W) per source, ``var_total``,
        ``var_artifact`` (sum over non-task sources; zeros if none) and ``entropy`` (D, H, W).
        Log-variances are blended across windows (Gaussian weights) before exponentiation.
    """
    from monai.inferers import sliding_window_inference

    x = image if image.ndim == 5 else image[None]
    out = sliding_window_inference(
        x.float(), list(roi_size), sw_batch_size, predictor, overlap=overlap, mode="gaussian"
    )[0]  # (C + K, D, H, W)
    logits, log_var = out[:num_classes], out[num_classes:]
    var = log_var.exp()  # (K, D, H, W)
    total = var.sum(0, keepdim=True)  # (1, D, H, W)
    logp = torch.log_softmax(logits / total, dim=0)
    res: dict[str, Tensor] = {
        "logits": logits,
        "segmentation": logits.argmax(0),
        "prob_gm": logp[1].exp(),
        "entropy": -(logp.exp() * logp).sum(0),
        "var_total": total[0],
    }
    for name, v in zip(sources, var, strict=True):
        res[f"var_{name}"] = v
    art = [v for name, v in zip(sources, var, strict=True) if name != "task"]
    res["var_artifact"] = torch.stack(art).sum(0) if art else torch.zeros_like(total[0])
    return res


def summarize_prediction(
    pred: Mapping[str, Tensor],
    sources: Sequence[str],
    voxel_volume_ml: float,
    label: Tensor | None = None,
    volume_mask: Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-scan numbers: mean variances, GM volume +- error bar, entropy, Dice (if ``label``).

    Args:
        pred: :func:`predict_volume`'s output.
        voxel_volume_ml: one voxel's volume in ml.
        label: ``(D, H, W)`` ground-truth GM (optional).
        volume_mask: voxels summed for the volume error bar (default: all).
    """
    ent = pred["entropy"].double()
    mask = (
        torch.ones_like(ent, dtype=torch.bool)
        if volume_mask is None
        else torch.as_tensor(np.asarray(volume_mask)).reshape(ent.shape).bool()
    )
    voxel_var = torch.exp(2 * ent) / (2 * math.pi * math.e)
    out: dict[str, Any] = {
        "gm_volume_ml": float((pred["segmentation"] == 1).sum()) * voxel_volume_ml,
        "gm_volume_soft_ml": float(pred["prob_gm"].double().sum()) * voxel_volume_ml,
        "gm_volume_std_ml": float(voxel_var[mask].sum().sqrt()) * voxel_volume_ml,
        "mean_entropy": float(ent.mean()),
        "mean_var_total": float(pred["var_total"].double().mean()),
        "mean_var_artifact": float(pred["var_artifact"].double().mean()),
    }
    for name in sources:
        out[f"mean_var_{name}"] = float(pred[f"var_{name}"].double().mean())
    if label is not None:
        out["dice"] = dice(
            pred["segmentation"] == 1, torch.as_tensor(label).reshape(ent.shape) == 1
        )
    return out
