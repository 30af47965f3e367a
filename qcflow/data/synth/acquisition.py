"""How a simulated site acquires and stores a scan: the cohort table and the acquisition physics.

Per cohort (:data:`COHORTS`): the field of view and grid shape (:func:`grid_affine`), a smooth
multiplicative bias field exp(polynomial of degree 3) scaled so that its 1st–99th percentile
ratio inside the brain is the cohort's ``bias_ratio`` (:func:`bias_log_field`,
:func:`scale_log_field`), complex Gaussian noise added in k-space (``norm="ortho"``, so its
image-domain std per channel is σ = mean brain signal / SNR) and k-space truncation to the
cohort's acquisition resolution (e.g. 1×1×3 mm: anisotropic blur), magnitude (Rician background)
(:func:`kspace_acquire`), exact-zero padding and the scanner intensity scale
(:func:`pad_and_scale`). Storage type (float32, int16, int16 with ``scl_slope``) and the
reorientation to the cohort's axis codes (LPS, PIL, LAS...) happen when the scan is written
(:mod:`qcflow.data.synth.bids`), so RAS canonicalisation is exercised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Cohort",
    "COHORTS",
    "grid_affine",
    "bias_log_field",
    "scale_log_field",
    "kspace_acquire",
    "pad_and_scale",
]


@dataclass(frozen=True)
class Cohort:
    """One simulated site/scanner: how its scans are acquired and stored.

    Args:
        name: ``participants.tsv`` cohort label, ``site-X``.
        fov_mm: field of view along R, A, S (mm) before padding; the grid has
            ``round(fov_mm / spacing)`` voxels.
        center_mm: world position of the field-of-view centre (mm, MNI RAS).
        pad_mm: exact-zero padding added on both sides of every RAS axis after reconstruction.
        orientation: NIfTI axis codes of the stored array (``"RAS"``, ``"LPS"``, ``"PIL"``...).
        acq_mm: acquisition resolution along R, A, S (mm); coarser than the output spacing is
            simulated by k-space truncation.
        pe_axis: phase-encode axis (RAS index) for wrap-around and ghosting.
        snr_db: image SNR (mean brain signal / noise std), jittered ±1.5 dB per subject.
        bias_ratio: 99th/1st percentile ratio of the bias field in the brain (jittered).
        scale: scanner intensity scale (WM ≈ ``scale``).
        dtype: storage: ``"float32"``, ``"int16"`` (rounded, no scaling) or ``"int16_scaled"``
            (nibabel chooses ``scl_slope``/``scl_inter``).
        gm: GM mean (WM = 1). csf: CSF mean.
    """

    name: str
    fov_mm: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    pad_mm: tuple[float, float, float]
    orientation: str
    acq_mm: tuple[float, float, float]
    pe_axis: int
    snr_db: float
    bias_ratio: float
    scale: float
    dtype: str
    gm: float
    csf: float


#: the cohort table; ``n_cohorts`` uses the first n (the first four already cover a non-RAS
#: orientation, an axes-permuted one, 1×1×3 mm acquisition, int16 storage and zero padding)
COHORTS: tuple[Cohort, ...] = (
    Cohort("site-A", (208, 240, 208), (0, -17, 10), (0, 0, 0), "RAS", (1.0, 1.0, 1.0), 1,
           31.0, 1.25, 1000.0, "float32", 0.62, 0.25),
    Cohort("site-B", (208, 256, 208), (0, -12, 8), (0, 0, 0), "LPS", (1.0, 1.0, 1.2), 0,
           27.0, 1.5, 300.0, "int16", 0.68, 0.3),
    Cohort("site-C", (192, 256, 224), (0, -20, 14), (0, 0, 0), "PIL", (3.0, 1.0, 1.0), 1,
           25.0, 1.35, 4000.0, "int16_scaled", 0.58, 0.2),
    Cohort("site-D", (208, 240, 208), (2, -17, 12), (16, 8, 16), "LAS", (1.3, 1.3, 1.3), 1,
           29.0, 1.2, 1500.0, "float32", 0.65, 0.28),
    Cohort("site-E", (192, 224, 208), (0, -15, 6), (0, 0, 0), "RAS", (1.0, 1.0, 3.0), 0,
           32.0, 1.4, 800.0, "int16", 0.6, 0.22),
    Cohort("site-F", (224, 256, 224), (-2, -19, 12), (0, 16, 0), "ASL", (1.2, 1.2, 1.2), 1,
           26.0, 1.3, 2500.0, "int16_scaled", 0.66, 0.27),
)  # fmt: skip


def grid_affine(cohort: Cohort, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output grid shape and RAS voxel → world affine of a cohort (before padding)."""
    shape = tuple(max(8, int(round(f / spacing))) for f in cohort.fov_mm)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(cohort.center_mm) - (np.asarray(shape) - 1) / 2.0 * spacing
    return shape, affine  # type: ignore[return-value]


def bias_log_field(rng: np.random.Generator, shape: Sequence[int], order: int = 3) -> torch.Tensor:
    """Random polynomial of degree ``order`` in normalised coordinates, ``(X, Y, Z)``.

    The TorchIO ``RandomBiasField`` model, Σ c_ijk x^i y^j z^k with c ~ U(−1, 1) (no constant
    term), evaluated as Σ_i x^i ⊗ G_i(y, z): ``order + 1`` full-volume operations, not one per
    term (~20 ms at 2 mm; TorchIO's takes seconds, docs/pitfalls.md).
    """
    x, y, z = (torch.linspace(-1.0, 1.0, n, dtype=torch.float64) for n in shape)
    out = torch.zeros(tuple(shape))
    for i in range(order + 1):
        plane = torch.zeros(shape[1], shape[2], dtype=torch.float64)
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                if i + j + k == 0:
                    continue
                c = float(rng.uniform(-1.0, 1.0))
                plane += c * (y**j)[:, None] * (z**k)[None, :]
        out.addcmul_((x**i).float().reshape(-1, 1, 1), plane.float()[None])
    return out


def scale_log_field(log_field: torch.Tensor, brain: torch.Tensor, ratio: float) -> torch.Tensor:
    """``exp`` of ``log_field`` scaled so its 99th/1st percentile ratio in ``brain`` is ``ratio``,
    normalised to mean 1 in the brain."""
    vals = log_field[brain]
    if vals.numel() < 10 or ratio <= 1.0:
        return torch.ones_like(log_field)
    vals = vals[:: max(1, vals.numel() // 50_000)]
    lo, hi = torch.quantile(vals, torch.tensor([0.01, 0.99])).tolist()
    scaled = log_field * (math.log(ratio) / max(hi - lo, 1e-6))
    field_ = torch.exp(scaled - scaled[brain].mean())
    return field_


def kspace_acquire(
    image: torch.Tensor, keep: Sequence[float], sigma: float, rng: np.random.Generator
) -> torch.Tensor:
    """Complex Gaussian noise + k-space truncation, magnitude image ``(X, Y, Z)``.

    With ``norm="ortho"`` the FFT is unitary, so white complex noise of std σ per channel in
    k-space is white complex noise of std σ per channel in the image: without truncation
    (``keep`` all ≥ 1) the noise is added in the image (same distribution, no FFT). With
    truncation it is raised by 1/sqrt(kept fraction) so the *image* noise stays σ after it
    (a low-resolution acquisition reaches the same per-voxel SNR).
    """
    kept = float(np.prod([min(1.0, k) for k in keep]))
    noise = None
    if sigma > 0:
        noise = rng.standard_normal((*image.shape, 2), dtype=np.float32)  # (X, Y, Z, re/im)
        noise = torch.view_as_complex(torch.from_numpy(noise))
    if kept >= 1.0:
        if noise is None:
            return image.abs()
        return torch.hypot(image + sigma * noise.real, sigma * noise.imag)
    spec = torch.fft.fftn(image.to(torch.complex64), norm="ortho")
    if noise is not None:
        spec.add_(noise, alpha=sigma / math.sqrt(kept))
    for axis, frac in enumerate(keep):
        if frac < 1.0:
            freq = torch.fft.fftfreq(image.shape[axis]).abs()
            band = (freq <= 0.5 * frac + 1e-6).to(spec.real.dtype)
            shape = [1, 1, 1]
            shape[axis] = -1
            spec *= band.reshape(shape)
    return torch.fft.ifftn(spec, norm="ortho").abs()


def pad_and_scale(
    image: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    affine: np.ndarray,
    cohort: Cohort,
    spacing: float,
    scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any], np.ndarray]:
    """Storage: the cohort's exact-zero padding on every RAS axis, then its intensity scale
    (or ``scale``, a subject's own under ``variation: wide``).

    Returns:
        ``(image, labels, affine)``: padded image times ``cohort.scale``, the labels padded
        alike (as float when padded), and the affine moved by the padding.
    """
    labels = dict(labels)
    pad = [int(round(pm / spacing)) for pm in cohort.pad_mm]
    if any(pad):
        spec_pad = []
        for pv in reversed(pad):  # F.pad takes the last axis first
            spec_pad += [pv, pv]
        image = F.pad(image[None, None], spec_pad)[0, 0]
        labels = {k: F.pad(v[None, None].float(), spec_pad)[0, 0] for k, v in labels.items()}
        affine = affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.asarray(pad, dtype=np.float64)
    return image * (cohort.scale if scale is None else scale), labels, affine
