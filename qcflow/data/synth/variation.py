"""Between-subject variation of the embedded dataset: ``data.embedded.variation``.

``cohort`` (the default): each subject is its cohort's scanner with a small jitter: tissue
means of the cohort ±3 %, affine ±10° / 0.9–1.1 / ±5 mm, displacement peak 1.5–4 mm, the
cohort's acquisition resolution, SNR ±1.5 dB and bias ratio ×e^±0.15, one intensity scale.

``wide`` (SynthSeg-style domain randomisation, :func:`sample_wide`): every subject draws its own
contrast, anatomy and acquisition, from the scan's third random stream (the anatomy and artifact
streams are the same as in ``cohort`` mode, so the displacement/texture noise, bias polynomial
and artifacts of subject *i* are too). The cohort still decides the field of view, orientation,
storage type and padding, and the artifacts are unchanged. Per subject:

=====================  ====================================================================
contrast               WM = 1, GM ~ U[0.55, 0.70], CSF ~ U[0.18, 0.33], non-brain factor
                       ~ U[0.8, 1.2] (strictly inside the benchmark's unseen contrasts:
                       GM 0.50 / 0.74, CSF 0.15 / 0.38)
atrophy                a ~ U[0, 0.25] of the GM probability moves into CSF where GM borders
                       CSF (cortex, sulci, ventricle walls): p_GM' = (1 − a s) p_GM,
                       p_CSF' = p_CSF + a s p_GM, s ∈ [0, 1] the smoothed CSF proximity.
                       Uniform thinning (s = 1) would darken pure GM to (1 − a) μ_GM + a μ_CSF,
                       down to 0.46 < 0.50, a held-out contrast
ventricles             enlarged by a radial displacement about the lateral ventricles
                       (magnification up to 1/(1 − 0.15) at the centre, Gaussian, σ 25 mm)
pose / shape           rotations ±15°, scales 0.85–1.15 per axis, translations ±8 mm,
                       smooth displacement peak 2–8 mm
asymmetry              one hemisphere wider than the other (±4 %) and a torque: the A–P
                       displacement ±4 mm with opposite sign in the two hemispheres
head layers            edges of the synthetic scalp/skull (``HEAD_LAYERS``) × U[0.7, 1.5],
                       regrown from the cached signed distance (~0.1 s at 2 mm)
acquisition            SNR ~ U[24, 36] dB, bias ratio ~ U[1.1, 1.8], resolution per axis
                       from {1.0, 1.2, 1.5} mm and, with p = 0.5, one thick axis of 2 or 3 mm
storage scale          log-uniform in [200, 4000] (WM ≈ scale)
coverage               with p = 0.3 the field of view along S ends 0–25 mm inside the head,
                       at the top (of the scalp) or the bottom (of the head in the grid)
=====================  ====================================================================

Every geometric change happens in the one ``grid_sample`` (or a crop after it), so the GM
probability, GM label and brain mask follow; the atrophy moves the GM channel with the intensity.
All draws are recorded in ``artifacts.tsv`` (``subject``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from qcflow.data.synth.anatomy import CHANNELS, head_model

__all__ = ["VARIATIONS", "ACQ_MM", "sample_wide", "atrophy", "wide_displacement", "cut_fov"]

#: the values of ``data.embedded.variation``
VARIATIONS: tuple[str, ...] = ("cohort", "wide")

#: acquisition resolutions (mm) a ``wide`` axis draws from; > 1.5 mm counts as thick
ACQ_MM: tuple[float, ...] = (1.0, 1.2, 1.5, 2.0, 3.0)
_THIN = tuple(a for a in ACQ_MM if a <= 1.5)
_THICK = tuple(a for a in ACQ_MM if a > 1.5)

_VENTRICLES = (0.0, -8.0, 14.0)  # MNI (mm) centre of the lateral ventricles
_VENTRICLE_SIGMA = 25.0  # mm


def sample_wide(rng: np.random.Generator) -> dict[str, Any]:
    """One subject's ``wide`` draws (plain floats and lists, JSON-serialisable)."""
    out: dict[str, Any] = {
        "gm": float(rng.uniform(0.55, 0.70)),
        "csf": float(rng.uniform(0.18, 0.33)),
        "other": float(rng.uniform(0.8, 1.2)),
        "atrophy": float(rng.uniform(0.0, 0.25)),
        "ventricle_expansion": float(rng.uniform(0.0, 0.15)),
        "rotation_deg": rng.uniform(-15.0, 15.0, size=3),
        "scales": rng.uniform(0.85, 1.15, size=3),
        "translation_mm": rng.uniform(-8.0, 8.0, size=3),
        "displacement_mm": float(rng.uniform(2.0, 8.0)),
        "hemisphere_width": float(rng.uniform(-0.04, 0.04)),
        "torque_mm": float(rng.uniform(-4.0, 4.0)),
        "head_thickness": float(rng.uniform(0.7, 1.5)),
        "snr_db": float(rng.uniform(24.0, 36.0)),
        "bias_ratio": float(rng.uniform(1.1, 1.8)),
        "scale": float(math.exp(rng.uniform(math.log(200.0), math.log(4000.0)))),
    }
    acq = [float(a) for a in rng.choice(_THIN, size=3)]
    if rng.uniform() < 0.5:
        acq[int(rng.integers(0, 3))] = float(rng.choice(_THICK))
    out["acq_mm"] = acq
    cut = None
    if rng.uniform() < 0.3:
        cut = {"side": str(rng.choice(["top", "bottom"])), "mm": float(rng.uniform(0.0, 25.0))}
    out["fov_cut"] = cut
    return out


@functools.lru_cache(maxsize=2)
def _cortical_gm(spacing: float) -> torch.Tensor:
    """p_GM × s on the template grid, s = CSF proximity (CSF smoothed over ~2 mm, × 3, ≤ 1)."""
    maps, affine = head_model(spacing)
    res = float(abs(affine[0, 0]))
    ch = {c: maps[i].numpy() for i, c in enumerate(CHANNELS)}
    csf = ch["csf_brain"] + ch["csf_outer"]
    near = np.clip(3.0 * ndimage.gaussian_filter(csf, 2.0 / res), 0.0, 1.0)
    return torch.from_numpy((ch["gm"] * near).astype(np.float32))


def atrophy(stacked: torch.Tensor, spacing: float, means: dict[str, float], a: float) -> None:
    """Move a fraction ``a`` × s of GM into CSF in :func:`combine_intensity`'s output, in place
    (intensity and GM channel; the brain mask is unchanged: CSF is brain)."""
    if a <= 0.0:
        return
    gm_s = _cortical_gm(spacing)
    stacked[0, 0].add_(gm_s, alpha=a * (means["csf"] - means["gm"]))
    stacked[0, 1].sub_(gm_s, alpha=a)


def wide_displacement(draw: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``extra`` displacement of :func:`~qcflow.data.synth.anatomy.deform`: ventricle
    enlargement and left/right asymmetry, as a function of template world coordinates (mm)."""
    k = draw["ventricle_expansion"]
    width, torque = draw["hemisphere_width"], draw["torque_mm"]
    centre = torch.tensor(_VENTRICLES, dtype=torch.float32)

    def displacement(world: torch.Tensor) -> torch.Tensor:
        rel = world - centre  # (X, Y, Z, 3)
        g = torch.exp(rel.square().sum(-1, keepdim=True) / (-2.0 * _VENTRICLE_SIGMA**2))
        # sampling nearer the centre magnifies what is there: the ventricles grow
        out = rel * g * (-k)
        side = torch.tanh(world[..., 0] / 10.0)  # −1 left, +1 right hemisphere
        # hemispheres of different widths: sampled at x − width·|x|, so the right one is
        # magnified by ~1 + width and the left one shrunk by ~1 − width (x·tanh(x/10) ≈ |x|)
        out[..., 0] -= width * world[..., 0] * side
        # torque (petalia): one hemisphere pushed forward, the other back, most at the poles
        out[..., 1] += torque * side * torch.clamp(rel[..., 1].abs() / 60.0, max=1.5)
        return out

    return displacement


def cut_fov(
    warped: torch.Tensor,
    texture: torch.Tensor,
    affine: np.ndarray,
    grow: int,
    spacing: float,
    cut: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, dict[str, Any]]:
    """Shorten the field of view along S so it ends ``cut["mm"]`` inside the head.

    The head spans the warped brain mask grown by ``grow`` voxels (the head layers); ``top``
    moves the upper edge to ``cut["mm"]`` below the head's top (or the grid's, if lower),
    ``bottom`` the lower edge to ``cut["mm"]`` above the head's bottom. Image, labels and
    texture are cropped together; at least half the grid is kept.

    Returns:
        ``(warped, texture, affine, record)``: record = ``cut`` with the ``slices`` removed.
    """
    n = warped.shape[3]
    idx = torch.nonzero((warped[2] > 0.5).sum((0, 1)) > 0)
    lo, hi = (int(idx.min()) - grow, int(idx.max()) + grow) if idx.numel() else (0, n - 1)
    c, half = int(round(cut["mm"] / spacing)), (n + 1) // 2
    if cut["side"] == "top":
        start, stop = 0, max(half, min(n, hi + 1) - c)
    else:
        start, stop = min(n - half, max(0, lo) + c), n
    affine = affine.copy()
    affine[:3, 3] += affine[:3, 2] * start
    record = {**cut, "slices": n - (stop - start)}
    return (
        warped[:, :, :, start:stop].contiguous(),
        texture[:, :, start:stop].contiguous(),
        affine,
        record,
    )
