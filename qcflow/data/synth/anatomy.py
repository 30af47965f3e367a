"""The synthetic head: tissue maps grown from nilearn's MNI152 templates, and their deformation.

**Head model** (once per process, :func:`head_model`). nilearn's MNI152 GM, WM and brain mask
(1 or 2 mm); CSF = mask − GM − WM (clipped ≥ 0). The template is skull-stripped, so a synthetic
head is grown around a smoothed hull of the brain from its signed distance *d* (mm):
extra-cerebral CSF (d < 1.5), bone (inner/outer table), marrow (diploë), bone, subcutaneous fat
(7–10 mm), skin (10–12.5 mm), air beyond. Layers are partial-volume ramps of *d*, so all tissue
fractions sum to one. Below the cerebellum an elliptic "neck" of muscle wrapped in fat and skin
joins the hull and continues 60 mm below the template (z < −72 mm), with the brainstem continued
as a cord, so cohorts with a low field of view do not end in a flat cut. For spacings coarser
than the template the maps are Gaussian pre-filtered (anti-aliasing) before sampling.
:func:`head_model_layers` regrows the layers with their edges scaled per subject
(``variation: wide``) from the cached signed distance.

**Deformation** (:func:`deform`): one random affine (rotations ±10°, scales 0.9–1.1,
translations ±5 mm) composed with a smooth random displacement field (Gaussian-smoothed noise on
a 6 mm control grid, σ ≈ 20 mm, peak 1.5–4 mm, trilinearly upsampled) maps each output voxel to
template space; the intensity (combined on the template grid by :func:`combine_intensity`), the
GM probability and the brain mask are sampled with **one** ``grid_sample`` call, so the labels
stay exactly aligned with the image. TorchIO's ``RandomAffine`` + ``RandomElasticDeformation``
resample each image through SimpleITK and cost ~2.4 s per subject at 2 mm (docs/pitfalls.md),
~10 min for the default 270 scans; this path resamples template → subject grid directly (also
doing the spacing change) in ~0.1 s. An optional ``extra`` displacement (``variation: wide``:
ventricle enlargement, hemispheric asymmetry) is evaluated on the displacement's control grid
and upsampled with it, so it costs nothing per voxel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "TISSUES",
    "CHANNELS",
    "HEAD_LAYERS",
    "HEAD_CENTER",
    "head_model",
    "head_model_layers",
    "combine_intensity",
    "deform",
    "rotation",
    "smooth_field",
]

#: tissues of the synthetic head (brain tissues first)
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "bone", "marrow", "fat", "skin", "muscle")

#: channels of :func:`head_model`. The five non-brain tissues are pre-combined into their
#: T1 / T2 partial-volume intensity ``other_t1`` / ``other_t2`` (Σ_t μ_t p_t); ``brain`` is
#: the brain mask (= gm + wm + csf_brain). ``grid_sample`` costs ~20 ms per channel at 2 mm and
#: trilinear sampling is linear, so a scan combines its intensity on the template grid and
#: samples only 3 channels (intensity, GM, brain) instead of one per tissue.
CHANNELS: tuple[str, ...] = ("gm", "wm", "csf_brain", "csf_outer", "other_t1", "other_t2", "brain")

#: synthetic head layers: (tissue, outer edge in mm of signed distance from the brain hull)
HEAD_LAYERS: tuple[tuple[str, float], ...] = (
    ("csf", 1.5),
    ("bone", 3.0),
    ("marrow", 5.5),
    ("bone", 7.0),
    ("fat", 10.0),
    ("skin", 12.5),
)
_NECK_MM = 60.0  # how far the neck continues below the template
HEAD_CENTER = (0.0, -17.0, 5.0)  # world (MNI, mm) centre of the brain's bounding box

#: non-brain tissue means (WM = 1) in T1 and in the T2-like contrast of ``t2_contrast``
_T1_OTHER = {"bone": 0.08, "marrow": 0.55, "fat": 1.15, "skin": 0.6, "muscle": 0.45}
_T2_OTHER = {"bone": 0.05, "marrow": 0.6, "fat": 0.85, "skin": 0.5, "muscle": 0.3}


@functools.lru_cache(maxsize=2)
def _mni_maps(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 GM, WM, brain mask (float32, RAS, template grid) and their affine."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    wm_img = datasets.load_mni152_wm_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    mask = (np.asarray(mask_img.get_fdata()) > 0.5).astype(np.float32)
    gm = np.clip(np.asarray(gm_img.get_fdata(), dtype=np.float32), 0, 1) * mask
    wm = np.clip(np.asarray(wm_img.get_fdata(), dtype=np.float32), 0, 1) * mask
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or np.any(
        np.diag(affine)[:3] <= 0
    ):
        raise RuntimeError(f"nilearn MNI152 templates are not RAS-diagonal: {affine.tolist()}")
    return gm, wm, mask, affine


@functools.lru_cache(maxsize=2)
def _head_geometry(res: int) -> dict[str, np.ndarray]:
    """The extended template (neck below) and the distances the head layers are ramps of.

    Returns ``gm``, ``wm``, ``mask``, ``csf_in`` (template grid, float32), ``sd`` (signed
    distance to the head hull, mm, > 0 outside), ``d_brain`` (distance to the brain hull, mm)
    and ``affine`` (voxel → world of the extended grid).
    """
    gm, wm, mask, affine = _mni_maps(res)
    ext = int(round(_NECK_MM / res))
    bottom = ext  # index of the template's lowest slice in the extended grid
    # extend below (z is the last axis, RAS) by repeating the lowest slice of the mask: the
    # brainstem continues as a "spinal cord" (80 % WM, 20 % CSF; no GM label in the neck)
    cord = np.repeat(mask[:, :, :1], ext, 2)
    gm = np.concatenate([np.zeros_like(cord), gm], axis=2)
    wm = np.concatenate([0.8 * cord, wm], axis=2)
    mask = np.concatenate([cord, mask], axis=2)
    affine = affine.copy()
    affine[2, 3] -= ext * affine[2, 2]
    # brain hull: the brain, smoothed so the head is rounder than the cortex
    hull = ndimage.gaussian_filter(mask, sigma=5.0 / res, mode="nearest") > 0.35
    hull |= mask > 0.5
    # neck: an ellipse (48 x 50 mm semi-axes) below the cerebellum, centred a little in front
    # of the brainstem, growing from nothing at z = -30 mm to full size at the template bottom
    xs = affine[0, 3] + affine[0, 0] * np.arange(mask.shape[0])
    ys = affine[1, 3] + affine[1, 1] * np.arange(mask.shape[1])
    zs = affine[2, 3] + affine[2, 2] * np.arange(mask.shape[2])
    stem = np.nonzero(mask[:, :, bottom] > 0.5)
    cx = float(xs[stem[0]].mean()) if stem[0].size else 0.0
    cy = float(ys[stem[1]].mean()) + 15.0 if stem[1].size else -20.0
    q = ((xs[:, None] - cx) / 48.0) ** 2 + ((ys[None, :] - cy) / 50.0) ** 2  # (X, Y)
    r = np.clip((-30.0 - zs) / (-30.0 - zs[bottom]), 0.0, 1.0)  # (Z,)
    neck = q[:, :, None] <= (r**2)[None, None, :]
    d_brain = ndimage.distance_transform_edt(~hull, sampling=res)
    hull |= neck
    sd = (
        ndimage.distance_transform_edt(~hull, sampling=res)
        - ndimage.distance_transform_edt(hull, sampling=res)
    ).astype(np.float32)  # signed distance to the head hull, mm, > 0 outside
    csf_in = np.clip(mask - gm - wm, 0.0, None)
    return {
        "gm": gm, "wm": wm, "mask": mask, "csf_in": csf_in, "sd": sd, "d_brain": d_brain,
        "affine": affine,
    }  # fmt: skip


def _head_layers(geo: Mapping[str, np.ndarray], res: int, thickness: float) -> dict[str, Any]:
    """``csf_outer``, ``other_t1``, ``other_t2`` of the head layers, edges × ``thickness``."""
    sd, mask = geo["sd"], geo["mask"]

    def beyond(mm: float) -> np.ndarray:  # partial-volume fraction of a voxel beyond mm
        return np.clip((sd - mm) / res + 0.5, 0.0, 1.0)

    def edge(mm: float) -> float:
        return mm if thickness == 1.0 else mm * thickness

    chans = {t: np.zeros(mask.shape, np.float32) for t in TISSUES}
    inner = 0.0
    for tissue, outer in HEAD_LAYERS:
        outer = edge(outer)
        frac = beyond(inner) - beyond(outer) if inner > 0 else (1.0 - mask) - beyond(outer)
        chans[tissue] += frac
        inner = outer
    # farther than the skull from the brain hull (the neck), CSF and bone become muscle
    far = geo["d_brain"] > edge(HEAD_LAYERS[3][1])
    for tissue in ("csf", "bone", "marrow"):
        chans["muscle"][far] += chans[tissue][far]
        chans[tissue][far] = 0.0
    others = ("bone", "marrow", "fat", "skin", "muscle")
    return {
        "csf_outer": chans["csf"],
        "other_t1": sum(_T1_OTHER[t] * chans[t] for t in others),
        "other_t2": sum(_T2_OTHER[t] * chans[t] for t in others),
    }


def _antialias(maps: np.ndarray, spacing: float, res: int) -> np.ndarray:
    if spacing > res * 1.01:  # anti-aliasing before sampling at a coarser spacing
        sigma = 0.42 * math.sqrt((spacing / res) ** 2 - 1.0)
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    return maps


@functools.lru_cache(maxsize=2)
def head_model(spacing: float) -> tuple[torch.Tensor, np.ndarray]:
    """Tissue probability channels of the synthetic head, cached per process.

    Args:
        spacing: output spacing (mm); picks the 1 mm template below 2 mm and the 2 mm one
            otherwise, Gaussian pre-filtered when the output is coarser than the template.

    Returns:
        ``(maps, affine)``: maps ``(C, X, Y, Z)`` float32 with channels :data:`CHANNELS`
        (tissue fractions sum to ≤ 1, the rest is air; ``brain`` = gm + wm + csf_brain), RAS;
        affine voxel → world (mm) of that grid (the template's, extended by the neck below).
    """
    res = 1 if spacing < 2.0 else 2
    geo = _head_geometry(res)
    out = {
        "gm": geo["gm"],
        "wm": geo["wm"],
        "csf_brain": geo["csf_in"],
        **_head_layers(geo, res, 1.0),
        "brain": geo["mask"],
    }
    maps = np.stack([out[c] for c in CHANNELS]).astype(np.float32)
    maps = _antialias(maps, spacing, res)
    return torch.from_numpy(np.ascontiguousarray(maps)), geo["affine"]


def head_model_layers(spacing: float, thickness: float) -> tuple[list[torch.Tensor], np.ndarray]:
    """:func:`head_model` with the head layers' edges scaled by ``thickness`` (not cached).

    The brain channels are the cached model's; the three layer channels are regrown from the
    cached signed distance, only in the voxels a thickness in [0.7, 1.5] can change
    (:func:`_layer_shell`; elementwise, so equal to regrowing them everywhere), ~30 ms at 2 mm.

    Returns:
        ``(channels, affine)``: a list in :data:`CHANNELS` order (what
        :func:`combine_intensity` takes; the unchanged ones are views of the cached model).
    """
    maps, affine = head_model(spacing)
    chans = list(maps)
    if thickness == 1.0:
        return chans, affine
    if not 0.7 <= thickness <= 1.5:
        raise ValueError(f"head layer thickness {thickness} is outside [0.7, 1.5]")
    res = 1 if spacing < 2.0 else 2
    geo, base, shell = _layer_shell(res)
    layers = _head_layers({k: geo[k][shell] for k in ("sd", "mask", "d_brain")}, res, thickness)
    names = ("csf_outer", "other_t1", "other_t2")
    new = np.stack([base[c] for c in names])  # a copy
    for i, c in enumerate(names):
        new[i][shell] = layers[c]
    new = _antialias(new, spacing, res)
    for c, m in zip(names, new, strict=True):
        chans[CHANNELS.index(c)] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    return chans, affine


@functools.lru_cache(maxsize=2)
def _layer_shell(res: int) -> tuple[dict[str, np.ndarray], dict[str, Any], np.ndarray]:
    """The template geometry, its layers at thickness 1 (before anti-aliasing) and the voxels
    whose layers depend on a thickness in [0.7, 1.5]: near a layer edge (−res < sd < 1.5 ×
    the outer edge + res) or near the neck's muscle boundary (``d_brain`` ≈ 0.7–1.5 × the
    skull's outer edge)."""
    geo = _head_geometry(res)
    sd, d_brain = geo["sd"], geo["d_brain"]
    skull = HEAD_LAYERS[3][1]
    shell = (sd > -res) & (sd < 1.5 * HEAD_LAYERS[-1][1] + res)
    shell |= (d_brain > 0.7 * skull - res) & (d_brain < 1.5 * skull + res)
    return geo, _head_layers(geo, res, 1.0), shell


def combine_intensity(
    maps: torch.Tensor | Sequence[torch.Tensor],
    means: Mapping[str, float],
    other: float,
    t2: bool = False,
) -> torch.Tensor:
    """The scan's intensity I = Σ_t p_t μ_t on the template grid, stacked with its labels.

    Sampling is linear, so combining on the template grid before :func:`deform` equals
    combining the sampled maps, for one sampled channel instead of four.

    Args:
        maps: :func:`head_model` channels ``(C, X', Y', Z')`` (or the list of
            :func:`head_model_layers`).
        means: brain tissue means ``gm``, ``wm``, ``csf`` (WM = 1 in T1).
        other: factor shared by the non-brain tissues (their T1 or T2 means are pre-combined).
        t2: use the T2-like non-brain intensities (``other_t2``).

    Returns:
        ``(1, 3, X', Y', Z')``: intensity, GM probability, brain mask.
    """
    ch = {c: maps[i] for i, c in enumerate(CHANNELS)}
    intensity = ch["gm"] * means["gm"]
    intensity.add_(ch["wm"], alpha=means["wm"])
    intensity.add_(ch["csf_brain"], alpha=means["csf"])
    intensity.add_(ch["csf_outer"], alpha=means["csf"])
    intensity.add_(ch["other_t2" if t2 else "other_t1"], alpha=other)
    return torch.stack([intensity, ch["gm"], ch["brain"]])[None]


def deform(
    stacked: torch.Tensor,
    t_affine: np.ndarray,
    shape: Sequence[int],
    affine: np.ndarray,
    mat: np.ndarray,
    trans: np.ndarray,
    disp_mm: float,
    spacing: float,
    rng: np.random.Generator,
    extra: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample template channels on a subject's grid: affine pose + smooth displacement.

    Output voxel → world (``affine``) → subject pose (``mat`` about :data:`HEAD_CENTER`, then
    ``trans``) plus a displacement of peak ``disp_mm`` → template voxel (``t_affine``), in one
    trilinear ``grid_sample`` (zeros outside the template).

    Args:
        stacked: ``(1, C, X', Y', Z')`` template-grid channels (:func:`combine_intensity`).
        t_affine: template voxel → world (mm).
        shape: output grid ``(X, Y, Z)``; affine: its voxel → world.
        mat: 3×3 linear part of the pose; trans: its translation (mm).
        disp_mm: peak displacement (mm).
        spacing: output spacing (mm).
        rng: the scan's anatomy stream (draws the displacement and texture fields).
        extra: an optional further smooth displacement: template world coordinates
            ``(..., 3)`` (mm, R/A/S) of the posed grid → displacement there (mm, same layout),
            evaluated on the displacement's control grid (~6 mm) and upsampled with it.

    Returns:
        ``(warped, texture)``: ``(C, X, Y, Z)`` sampled channels and a ``(X, Y, Z)`` smooth
        field in [−1, 1] (~6 mm) for the intensity texture.
    """
    center = np.asarray(HEAD_CENTER)
    subj = np.eye(4)  # world (subject) -> world (template)
    subj[:3, :3] = mat
    subj[:3, 3] = center - mat @ center + trans
    vox = np.linalg.inv(t_affine) @ subj @ affine  # output voxel -> template voxel
    t_shape = stacked.shape[2:]
    # normalised template coordinate (align_corners=True): 2 v / (n - 1) - 1; grid_sample
    # wants (N, X, Y, Z, 3) with the last dim ordered (W, H, D) = template (z, y, x)
    norm = np.diag([2.0 / (n - 1) for n in t_shape] + [1.0])
    norm[:3, 3] = -1.0
    m = torch.from_numpy((norm @ vox)[[2, 1, 0]]).float()  # (3, 4), rows z, y, x
    idx = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = (
        idx[0].reshape(-1, 1, 1, 1) * m[:, 0]
        + idx[1].reshape(1, -1, 1, 1) * m[:, 1]
        + (idx[2].reshape(1, 1, -1, 1) * m[:, 2] + m[:, 3])
    )  # (X, Y, Z, 3)
    # displacement (3 channels, smoothed over ~20 mm) and intensity texture (~6 mm), together
    t_res = np.abs(np.diag(t_affine)[:3])
    hook = None
    if extra is not None:  # smooth: evaluated on the control grid, upsampled with the noise
        to_world = subj @ affine  # output voxel -> template world (before the displacement)

        def hook(coarse: np.ndarray) -> None:
            pts = [
                np.linspace(0.0, n - 1.0, c) for n, c in zip(shape, coarse.shape[1:], strict=True)
            ]
            idx = np.stack(np.meshgrid(*pts, indexing="ij"), -1)  # (cx, cy, cz, 3)
            world = idx @ to_world[:3, :3].T + to_world[:3, 3]
            u = extra(torch.from_numpy(world.astype(np.float32))).numpy()  # mm, R A S
            # displacement channels in mm, ordered like the grid's last dim (z, y, x)
            coarse[:3] = coarse[:3] * disp_mm + np.moveaxis(u[..., ::-1], -1, 0)

    fields = smooth_field(
        rng, shape, spacing, control_mm=6.0, sigma_cp=(3.3, 3.3, 3.3, 1.0), hook=hook
    )
    disp, texture = fields[:3], fields[3]
    scale_d = (1.0 if extra is not None else disp_mm) * 2.0 / (t_res * (np.asarray(t_shape) - 1))
    grid += disp.permute(1, 2, 3, 0) * torch.tensor(scale_d[::-1].copy(), dtype=torch.float32)
    del disp, fields
    warped = F.grid_sample(
        stacked, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]  # (C, X, Y, Z)
    return warped, texture


def rotation(degrees: Sequence[float]) -> np.ndarray:
    """3×3 rotation from angles (degrees) about R, A, S (applied x, then y, then z)."""
    a, b, c = np.radians(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_field(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: float,
    control_mm: float,
    sigma_cp: Sequence[float],
    hook: Callable[[np.ndarray], None] | None = None,
) -> torch.Tensor:
    """Smooth random fields ``(len(sigma_cp), *shape)``, each scaled to max |value| = 1.

    Gaussian-smoothed white noise (``sigma_cp`` control points per channel) on a coarse control
    grid ``control_mm`` apart, trilinearly upsampled to ``shape`` in one call: no per-voxel
    work besides the interpolation. ``hook`` may modify the normalised control-grid fields
    ``(C, cx, cy, cz)`` in place before the upsampling (control point *j* of an axis of *n*
    voxels lies at voxel j (n − 1) / (c − 1)).
    """
    channels = len(sigma_cp)
    coarse = [max(2, int(math.ceil(n * spacing / control_mm)) + 1) for n in shape]
    noise = rng.standard_normal((channels, *coarse)).astype(np.float32)
    noise = np.stack(
        [ndimage.gaussian_filter(c, sg, mode="wrap") for c, sg in zip(noise, sigma_cp, strict=True)]
    )
    noise /= np.abs(noise).reshape(channels, -1).max(axis=1).reshape(-1, 1, 1, 1) + 1e-8
    if hook is not None:
        hook(noise)
    up = F.interpolate(
        torch.from_numpy(noise)[None], size=tuple(shape), mode="trilinear", align_corners=True
    )
    return up[0]
