"""Losses of the heteroscedastic uncertainty networks (Shaw et al., MIDL 2020 / MELBA 2021).

* :func:`heteroscedastic_ce`: ``CE(y, f) / (sigma^2 + eps) + 1/2 log(sigma^2 + eps)`` per voxel,
  averaged, with the variance sum ``sigma^2 = sum_k exp(s_k)`` over the sources (task + one per
  artifact kind). With ``sigma^2 = 1`` and ``eps = 0`` it is the plain cross-entropy.
* :func:`consistency_loss`: how well a predicted variance map matches a reference one:
  ``L1(a, b) + sum_axes L1(d a, d b) + lambda (1 - SSIM3D(a, b))`` with forward finite
  differences along the three spatial axes and SSIM over a 3x3x3 uniform window
  (``lambda = 0.1``); SSIM is MONAI's (:func:`monai.metrics.regression.compute_ssim_and_cs`),
  whose uniform window uses population statistics and drops the border voxels.

Pure tensor functions: no Lightning, no Hydra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs
from torch import Tensor

__all__ = ["variance", "heteroscedastic_ce", "finite_differences", "ssim3d", "consistency_loss"]


def variance(log_var: Tensor) -> Tensor:
    """Per-source variances ``exp(s)`` ``(B, K, D, H, W)``."""
    return log_var.exp()


def heteroscedastic_ce(
    logits: Tensor, target: Tensor, log_var: Tensor, eps: float = 0.0, reduction: str = "mean"
) -> Tensor:
    """Heteroscedastic cross-entropy with a variance sum over sources.

    Args:
        logits: ``(B, C, D, H, W)`` segmentation logits ``f``.
        target: ``(B, D, H, W)`` or ``(B, 1, D, H, W)`` integer class labels ``y``.
        log_var: ``(B, K, D, H, W)`` log-variances ``s_k``; ``sigma^2 = sum_k exp(s_k)``.
        eps: the stabilising ``epsilon`` (0.05 halved on plateaus during training).
        reduction: ``"mean"`` or ``"none"`` (per-voxel ``(B, D, H, W)``).

    Returns:
        ``mean( CE / (sigma^2 + eps) + 0.5 log(sigma^2 + eps) )``.
    """
    if target.ndim == logits.ndim:
        target = target[:, 0]
    ce = F.cross_entropy(logits, target.long(), reduction="none")  # (B, D, H, W)
    var = log_var.exp().sum(dim=1) + eps  # (B, D, H, W)
    loss = ce / var + 0.5 * torch.log(var)
    if reduction == "none":
        return loss
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return loss.mean()


def finite_differences(x: Tensor) -> list[Tensor]:
    """Forward differences of ``(B, C, D, H, W)`` along D, H and W (each one shorter)."""
    return [torch.diff(x, dim=d) for d in (2, 3, 4)]


def ssim3d(a: Tensor, b: Tensor, win_size: int = 3, data_range: float | None = None) -> Tensor:
    """Mean SSIM of ``(B, C, D, H, W)`` maps with a ``win_size^3`` uniform window (MONAI).

    Args:
        data_range: dynamic range ``L`` in the SSIM constants ``(k1 L)^2, (k2 L)^2``; default the
            larger maximum of the two maps (detached; variance maps have no fixed range).
    """
    if data_range is None:
        data_range = float(torch.maximum(a.detach().max(), b.detach().max()).clamp_min(1e-6))
    ssim_map, _ = compute_ssim_and_cs(
        a,
        b,
        spatial_dims=3,
        kernel_size=[win_size] * 3,
        kernel_sigma=[1.5] * 3,
        data_range=data_range,
        kernel_type="uniform",
    )
    return ssim_map.mean()


def consistency_loss(
    pred: Tensor, target: Tensor, ssim_weight: float = 0.1, win_size: int = 3
) -> Tensor:
    """``L1 + L1 of finite differences (3 axes) + ssim_weight * (1 - SSIM3D)``.

    Args:
        pred: ``(B, C, D, H, W)`` predicted variance maps (e.g. a teacher's sigma_t^2 estimate).
        target: same shape, the reference (e.g. the frozen task network's sigma_t^2); it is
            detached, gradients flow only into ``pred``.

    Returns:
        A scalar, 0 for identical maps (up to rounding) and positive otherwise.
    """
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}")
    target = target.detach()
    loss = (pred - target).abs().mean()
    for dp, dt in zip(finite_differences(pred), finite_differences(target), strict=True):
        loss = loss + (dp - dt).abs().mean()
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim3d(pred, target, win_size=win_size))
    return loss
