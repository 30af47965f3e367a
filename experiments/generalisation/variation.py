"""Subject/acquisition variation of one real head: many plausible "clean" scans from one subject.

Why: a benchmark from one real head needs its clean scans to differ as scans of different
people on different scanners do, or a density fitted on the pool learns the one image. Each scan
draws (from its own NumPy stream) a rigid pose (±10° per axis, ±8 mm), per-axis scaling
0.9–1.1, a smooth elastic displacement (peak 2–5 mm), a monotone intensity curve I^γ
(γ ∈ [0.75, 1.35]), a mild polynomial bias (the TorchIO ``RandomBiasField`` model, order 3,
coefficients ≤ 0.15, evaluated separably: TorchIO's takes seconds), Rician noise at SNR 22–35 dB
of the mean head signal, a voxel size in {1, 1.2, 1.5, 2} mm iso or 1×1×1.5 mm, a field of view
that holds the head (optionally cut at the bottom: coverage), zero padding of a few voxels, an
intensity scale ×U(100, 4000), a storage dtype (float32/int16) and orientation (RAS/LAS/LPS).

The resampling is ONE ``affine_grid`` + ``grid_sample`` (trilinear) of (image, head mask) per
scan; the noise is added by :func:`add_rician` after the object-level artifacts, so an artifact
and the clean scan of one subject share pose, grid and noise realisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["Template", "ScanState", "prepare_template", "vary_subject", "add_rician", "rotation"]

VOXELS: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.0, 1.0),
    (1.2, 1.2, 1.2),
    (1.5, 1.5, 1.5),
    (2.0, 2.0, 2.0),
    (1.0, 1.0, 1.5),
)
ORIENTATIONS = ("RAS", "LAS", "LPS")
DTYPES = ("float32", "int16")


@dataclass
class Template:
    """A real head, RAS, intensities / their 99th percentile in the head, and its head mask."""

    image: torch.Tensor  # (X, Y, Z) float32
    head: torch.Tensor  # (X, Y, Z) float32 0/1
    affine: np.ndarray
    centre: np.ndarray  # head centroid, world mm
    corners: np.ndarray  # (N, 3) a subsample of head voxels, world mm (the posed extent)
    coverage_cut_mm: float


@dataclass
class ScanState:
    """One scan being built, RAS grid: noise-free signal, head mask, optional GM label."""

    image: torch.Tensor  # (X, Y, Z) float32
    head: torch.Tensor  # (X, Y, Z) bool
    gm: torch.Tensor | None  # (X, Y, Z) uint8
    affine: np.ndarray  # RAS voxel → world
    sigma: float = 0.0  # noise std per channel (same units as image)
    signal: float = 1.0  # mean head signal of the clean scan
    pad: list[int] = field(default_factory=lambda: [0, 0, 0])  # zero padding voxels per side


def head_mask(image: np.ndarray, frac: float = 0.1) -> np.ndarray:
    """Largest connected component above ``frac`` × p99, closed and hole-filled (per 3D)."""
    mask = image > frac * np.percentile(image, 99)
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def prepare_template(data: np.ndarray, affine: np.ndarray, coverage_cut_mm: float) -> Template:
    """Normalise a RAS head (clip < 0, / p99 inside the head) and measure its extent."""
    data = np.clip(np.nan_to_num(data), 0.0, None).astype(np.float32)
    mask = head_mask(data)
    data = data / np.float32(np.percentile(data[mask], 99))
    idx = np.argwhere(mask)
    corners = idx[:: max(1, len(idx) // 20000)].astype(np.float64)
    world = lambda v: v @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    return Template(
        torch.from_numpy(data),
        torch.from_numpy(mask.astype(np.float32)),
        affine,
        world(idx.mean(0)),
        world(corners),
        coverage_cut_mm,
    )


def rotation(deg: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles about R, A, S (degrees), applied x then y then z."""
    a, b, c = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _index_to_norm(shape) -> np.ndarray:
    """4×4: voxel index (i, j, k) → grid_sample coordinates (k, j, i) in [-1, 1]."""
    m = np.zeros((4, 4))
    for out_ax, in_ax in enumerate((2, 1, 0)):
        n = max(shape[in_ax] - 1, 1)
        m[out_ax, in_ax] = 2.0 / n
        m[out_ax, 3] = -1.0
    m[3, 3] = 1.0
    return m


def sample_grid(src_affine, src_shape, dst_affine, dst_shape, world_map) -> torch.Tensor:
    """grid_sample grid: destination voxel → (world, then ``world_map`` 4×4) → source voxel."""
    vox = np.linalg.inv(src_affine) @ world_map @ dst_affine  # dst index → src index
    theta = _index_to_norm(src_shape) @ vox @ np.linalg.inv(_index_to_norm(dst_shape))
    size = (1, 1, *dst_shape)
    theta_t = torch.tensor(theta[:3], dtype=torch.float32)[None]
    return F.affine_grid(theta_t, size, align_corners=True)  # (1, X, Y, Z, 3)


def add_displacement(grid, rng: np.random.Generator, peak: float, lin, modes: int = 4) -> None:
    """Add a smooth random field (mm, max |d| = ``peak``) to ``grid`` (1, X, Y, Z, 3) in place.

    Each component is a sum of ``modes`` separable cosines (≤ 1 cycle over the field of view);
    the peak is measured on every 4th voxel. ``lin`` (3×3, diagonal) maps mm to grid units.
    """
    shape = grid.shape[1:4]
    coeffs = [[(rng.uniform(0.5, 2.0, 3), rng.uniform(0, 2 * math.pi, 3), float(rng.normal()))
               for _ in range(modes)] for _ in range(3)]  # fmt: skip

    def field(k: int, step: int) -> torch.Tensor:
        d = torch.zeros([len(range(0, n, step)) for n in shape])
        for f, ph, amp in coeffs[k]:
            ax = [torch.cos(torch.linspace(0, math.pi * f[i], n)[::step] + ph[i])
                  for i, n in enumerate(shape)]  # fmt: skip
            d.add_(ax[0][:, None, None] * (amp * ax[1][:, None] * ax[2][None])[None])
        return d

    coarse = torch.stack([field(k, 4) for k in range(3)])
    scale = peak / float(coarse.square().sum(0).sqrt().max().clamp_min(1e-6))
    for k in range(3):  # grid's last axis is (z, y, x)
        grid[0, ..., 2 - k].add_(field(k, 1), alpha=scale * float(lin[2 - k, k]))


def poly_bias(shape, rng: np.random.Generator, coef: float, order: int = 3) -> torch.Tensor:
    """exp(Σ c_ijk x^i y^j z^k), c ~ U(−coef, coef): TorchIO's bias model, separably."""
    x, y, z = (torch.linspace(-1.0, 1.0, n, dtype=torch.float64) for n in shape)
    out = torch.zeros(tuple(shape))
    for i in range(order + 1):
        plane = torch.zeros(shape[1], shape[2], dtype=torch.float64)
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                plane += float(rng.uniform(-coef, coef)) * (y**j)[:, None] * (z**k)[None, :]
        out.addcmul_((x**i).float().reshape(-1, 1, 1), plane.float()[None])
    return out.exp_()


def _draw_pose(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "rotation_deg": rng.uniform(-10.0, 10.0, size=3).round(4).tolist(),
        "translation_mm": rng.uniform(-8.0, 8.0, size=3).round(4).tolist(),
        "scales": rng.uniform(0.9, 1.1, size=3).round(5).tolist(),
        "displacement_peak_mm": round(float(rng.uniform(2.0, 5.0)), 4),
    }


def _output_grid(tpl: Template, mat, trans, voxel, margin, cut_mm, pad):
    """Shape and RAS affine of a grid holding the posed head (+margin, −cut at the bottom)."""
    posed = (tpl.corners - tpl.centre) @ mat.T + tpl.centre + trans
    lo, hi = posed.min(0) - margin, posed.max(0) + margin
    lo[2] += cut_mm
    ext = zip(lo, hi, voxel, strict=True)
    shape = tuple(int(math.ceil((h - low) / v)) + 1 for low, h, v in ext)
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = lo - np.asarray(pad) * np.asarray(voxel)
    shape = tuple(n + 2 * p for n, p in zip(shape, pad, strict=True))
    return shape, affine


def vary_subject(tpl: Template, rng: np.random.Generator) -> tuple[ScanState, dict[str, Any]]:
    """One noise-free "subject/acquisition" from the template; ``params`` has every draw.

    The zero padding (``pad_vox``) is part of the grid here: the head never reaches it because
    the grid's margin keeps the head inside, and :func:`add_rician` leaves it exact zero.
    """
    p = _draw_pose(rng)
    voxel = VOXELS[int(rng.integers(len(VOXELS)))]
    cut = float(rng.uniform(0.0, tpl.coverage_cut_mm)) if tpl.coverage_cut_mm > 0 else 0.0
    pad = rng.integers(0, 7, size=3).tolist()
    p.update(voxel_mm=list(voxel), coverage_cut_mm=round(cut, 3), pad_vox=pad,
             gamma=round(float(rng.uniform(0.75, 1.35)), 5),
             bias_coefficients=round(float(rng.uniform(0.0, 0.15)), 5),
             snr_db=round(float(rng.uniform(22.0, 35.0)), 4))  # fmt: skip
    mat = rotation(np.asarray(p["rotation_deg"])) @ np.diag(p["scales"])
    trans = np.asarray(p["translation_mm"])
    margin = p["displacement_peak_mm"] + 1.5
    shape, affine = _output_grid(tpl, mat, trans, voxel, margin, cut, pad)
    inner = tuple(n - 2 * q for n, q in zip(shape, pad, strict=True))

    # destination world y → template world x = M⁻¹(y − c − t) + c, plus a smooth displacement
    world_map = np.eye(4)
    world_map[:3, :3] = np.linalg.inv(mat)
    world_map[:3, 3] = tpl.centre - world_map[:3, :3] @ (tpl.centre + trans)
    inner_aff = affine.copy()
    inner_aff[:3, 3] += np.asarray(pad) * np.asarray(voxel)
    src_shape = tuple(tpl.image.shape)
    grid = sample_grid(tpl.affine, src_shape, inner_aff, inner, world_map)
    lin = _index_to_norm(src_shape)[:3, :3] @ np.linalg.inv(tpl.affine[:3, :3])
    add_displacement(grid, rng, p["displacement_peak_mm"], lin)
    src = torch.stack([tpl.image, tpl.head])[None]
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    del grid
    image, head = out[0].clamp_min_(0.0), out[1] > 0.5

    image.pow_(p["gamma"])
    image.mul_(poly_bias(inner, rng, p["bias_coefficients"]))
    pads = [q for q in reversed(pad) for _ in (0, 1)]
    image = F.pad(image[None, None], pads)[0, 0]
    head = F.pad(head[None, None].float(), pads)[0, 0] > 0.5
    signal = float(image[head].mean())
    sigma = signal / 10.0 ** (p["snr_db"] / 20.0)
    p["noise_seed"] = int(rng.integers(0, 2**63 - 1))
    state = ScanState(image, head, None, affine, sigma=sigma, signal=signal, pad=list(pad))
    return state, p


def add_rician(state: ScanState, seed: int) -> torch.Tensor:
    """|image + σ(n₁ + i n₂)|: magnitude of complex Gaussian noise; the padding stays zero."""
    rng = np.random.default_rng(seed)
    shape = tuple(state.image.shape)
    n1 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    n2 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    out = torch.hypot(state.image + state.sigma * n1, state.sigma * n2)
    for ax, q in enumerate(state.pad):
        if q:
            out.narrow(ax, 0, q).zero_()
            out.narrow(ax, shape[ax] - q, q).zero_()
    return out
