"""The embedded default dataset: synthetic T1w heads from nilearn's MNI152 tissue maps.

qcflow must run out of the box on a machine without network, so its default data is generated
on first use from the MNI152 template files that ship inside nilearn, and cached under the data
root. :func:`ensure_embedded` returns the folder, building it if needed::

    <dir>/mni2mm_n150_s0_<hash8>/
      dataset_complete.json                 completion marker (+ config, counts, build time)
      cohorts.json                          the acquisition table used
      train/ test_clean/ test_artifact/     three BIDS datasets, each with
        dataset_description.json  participants.tsv  participants.json  artifacts.tsv
        sub-001/anat/sub-001_T1w.nii.gz
        derivatives/labels/dataset_description.json
        derivatives/labels/sub-001/anat/sub-001_label-GM_mask.nii.gz     uint8 GM ground truth
        derivatives/labels/sub-001/anat/sub-001_label-GM_probseg.nii.gz  float32 warped GM prob.
        derivatives/labels/sub-001/anat/sub-001_desc-brain_mask.nii.gz   uint8 brain mask

Subject numbers continue across splits (``train`` 1..n, then ``test_clean``, then
``test_artifact``), so every ``participant_id`` is unique in the whole dataset.

Generative model, per scan (all random draws come from a per-scan ``SeedSequence`` derived from
``(seed, split, index)``, so two builds with one config are voxel-identical):

1. **Head model** (once per process, :func:`head_model`). nilearn's MNI152 GM, WM and brain
   mask (1 or 2 mm); CSF = mask − GM − WM (clipped ≥ 0). The template is skull-stripped, so a
   synthetic head is grown around a smoothed hull of the brain from its signed distance *d*
   (mm): extra-cerebral CSF (d < 1.5), bone (inner/outer table), marrow (diploë), bone,
   subcutaneous fat (7–10 mm), skin (10–12.5 mm), air beyond. Layers are partial-volume ramps
   of *d*, so all tissue fractions sum to one. Below the cerebellum an elliptic "neck" of
   muscle wrapped in fat and skin joins the hull and continues 60 mm below the template
   (z < −72 mm), with the brainstem continued as a cord, so cohorts with a low field of view
   do not end in a flat cut. For spacings coarser than the template the maps are Gaussian
   pre-filtered (anti-aliasing) before sampling.
2. **Deformation**: one random affine (rotations ±10°, scales 0.9–1.1, translations ±5 mm)
   composed with a smooth random displacement field (Gaussian-smoothed noise on a 6 mm control
   grid, σ ≈ 20 mm, peak 1.5–4 mm, trilinearly upsampled) maps each output voxel to template
   space; the intensity (combined on the template grid, step 4), the GM probability and the
   brain mask are sampled with **one** ``grid_sample`` call, so the labels stay exactly aligned
   with the image. TorchIO's ``RandomAffine`` + ``RandomElasticDeformation`` resample each image
   through SimpleITK and cost ~2.4 s per subject at 2 mm (PITFALLS.md), ~10 min for the default
   270 scans; this path resamples template → subject grid directly (also doing the spacing
   change) in ~0.1 s.
3. **Labels**: ``probseg`` is the warped GM probability p_GM. The GM label is the set of
   voxels where GM is the most probable class of (GM, WM, CSF, rest) *and* p_GM > 0.5; as the
   template fractions sum to one and trilinear weights are convex, the warped fractions also
   sum to one, so both conditions reduce to ``p_GM > 0.5`` (what is computed). The brain mask
   is the warped template mask > 0.5.
4. **Intensities** re-synthesised from the tissue maps, I = Σ_t p_t μ_t(cohort), with T1
   ordering WM > GM > CSF (fat bright, bone dark), per-subject jitter of the means (±3 %), a
   mild smooth multiplicative texture (±3 %), and a smooth multiplicative bias field
   exp(polynomial of degree 3), scaled so that its 1st–99th percentile ratio inside the brain is
   the cohort's ``bias_ratio`` (jittered per subject).
5. **Acquisition** (per cohort, :data:`COHORTS`): complex Gaussian noise added in k-space
   (``norm="ortho"``, so its image-domain std per channel is σ = mean brain signal / SNR), then
   k-space truncation to the cohort's acquisition resolution (e.g. 1×1×3 mm: anisotropic
   blur), magnitude (Rician background), exact-zero padding, scanner intensity scale and
   storage type (float32, int16, int16 with ``scl_slope``), and reorientation to the cohort's
   axis codes (LPS, PIL, LAS...) with a matching affine, so RAS canonicalisation is exercised.
   Field of view and grid shape differ per cohort.
6. **Artifacts** (:data:`ARTIFACT_KINDS`, :func:`sample_artifact`): drawn for ~``artifact_fraction``
   of ``train`` and for every ``test_artifact`` scan, severity 1/2/3 with the parameter ranges
   in :data:`SEVERITY_RANGES`. Each is applied where it happens physically: contrast and
   misregistration before synthesis/sampling, bias and a missing side on the object, then
   motion → ghosting → spike (TorchIO, deterministic transforms fed with recorded parameters)
   → wrap-around (fold onto a reduced phase-encode field of view) → noise and resolution loss
   in k-space. ``artifacts.tsv`` records kind, severity, the continuous ``severity_value`` and
   every sampled parameter (JSON: ``subject`` = anatomy/acquisition draws, ``artifact`` = the
   artifact's; axes are RAS axes of the generated grid, before reorientation). Clean scans
   have ``kind=none``, ``severity=0``, ``severity_value=0``. Labels describe the anatomy: they
   follow misregistration (it is a pose), are cropped with a wrap-around's reduced field of
   view, and ignore motion, a missing side or contrast (the tissue is still there).

The build goes into a temporary sibling folder renamed into place only when complete
(:func:`qcflow.utils.io.atomic_dir`) and ``dataset_complete.json`` is written last, so an
interrupted build is never trusted; a later call rebuilds.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from qcflow.errors import ConfigError
from qcflow.utils.io import atomic_dir, atomic_write_json, atomic_write_text

__all__ = [
    "GENERATOR_VERSION",
    "ARTIFACT_KINDS",
    "SEVERITY_RANGES",
    "SPLITS",
    "TISSUES",
    "CHANNELS",
    "Cohort",
    "COHORTS",
    "EmbeddedConfig",
    "ScanSpec",
    "ensure_embedded",
    "build_embedded",
    "embedded_name",
    "head_model",
    "sample_artifact",
    "synthesize_scan",
]

log = logging.getLogger(__name__)

#: bump when the generated data changes for the same config (invalidates cached datasets)
GENERATOR_VERSION = "1"

#: the three BIDS datasets under the root, in build order
SPLITS: tuple[str, ...] = ("train", "test_clean", "test_artifact")

#: tissues of the synthetic head (brain tissues first)
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "bone", "marrow", "fat", "skin", "muscle")
#: channels of :func:`head_model`. The five non-brain tissues are pre-combined into their
#: T1 / T2 partial-volume intensity ``other_t1`` / ``other_t2`` (Σ_t μ_t p_t); ``brain`` is
#: the brain mask (= gm + wm + csf_brain). ``grid_sample`` costs ~20 ms per channel at 2 mm and
#: trilinear sampling is linear, so a scan combines its intensity on the template grid and
#: samples only 3 channels (intensity, GM, brain) instead of one per tissue.
CHANNELS: tuple[str, ...] = ("gm", "wm", "csf_brain", "csf_outer", "other_t1", "other_t2", "brain")

#: synthetic head layers: (tissue, outer edge in mm of signed distance from the brain hull)
_HEAD_LAYERS: tuple[tuple[str, float], ...] = (
    ("csf", 1.5),
    ("bone", 3.0),
    ("marrow", 5.5),
    ("bone", 7.0),
    ("fat", 10.0),
    ("skin", 12.5),
)
_NECK_MM = 60.0  # how far the neck continues below the template
_HEAD_CENTER = (0.0, -17.0, 5.0)  # world (MNI, mm) centre of the brain's bounding box

#: the artifact kinds, in the order ``test_artifact`` lists them
ARTIFACT_KINDS: tuple[str, ...] = (
    "noise",
    "motion",
    "spike",
    "blur",
    "ghosting",
    "bias",
    "wrap",
    "missing_side",
    "misregistration",
    "t2_contrast",
)

#: ``severity_value`` range per kind and severity 1/2/3, and what the value means
SEVERITY_RANGES: dict[str, dict[int, tuple[float, float]]] = {
    # image SNR in dB (mean brain signal / noise std per channel); clean cohorts 26-32 dB
    "noise": {1: (17.0, 20.0), 2: (12.0, 15.0), 3: (5.0, 9.0)},
    # largest rotation of any movement, degrees (translations scale with it, mm)
    "motion": {1: (2.0, 4.0), 2: (5.0, 8.0), 3: (9.0, 14.0)},
    # spike magnitude as a multiple of the largest |k| (TorchIO Spike intensity)
    "spike": {1: (0.15, 0.3), 2: (0.4, 0.7), 3: (0.9, 1.6)},
    # equivalent downsampling ratio of the k-space truncation (all three axes)
    "blur": {1: (1.6, 2.2), 2: (2.6, 3.4), 3: (4.0, 6.0)},
    # fraction by which every n-th phase-encode plane is attenuated (TorchIO Ghosting)
    "ghosting": {1: (0.25, 0.4), 2: (0.5, 0.7), 3: (0.8, 1.0)},
    # 99th/1st percentile ratio of the bias field inside the brain; clean cohorts 1.2-1.5
    "bias": {1: (1.8, 2.2), 2: (2.5, 3.2), 3: (3.8, 5.0)},
    # fraction of the head's phase-encode extent that falls outside the field of view and wraps
    "wrap": {1: (0.06, 0.12), 2: (0.15, 0.22), 3: (0.26, 0.35)},
    # fraction of the head (along left-right) that is missing / strongly attenuated
    "missing_side": {1: (0.12, 0.2), 2: (0.25, 0.35), 3: (0.42, 0.55)},
    # extra rotation about one axis, degrees
    "misregistration": {1: (20.0, 26.0), 2: (28.0, 35.0), 3: (37.0, 45.0)},
    # GM/WM intensity ratio of a T2-like contrast (CSF > GM > WM); T1 has ~0.6
    "t2_contrast": {1: (1.08, 1.2), 2: (1.25, 1.45), 3: (1.5, 1.9)},
}

#: non-brain tissue means (WM = 1) in T1 and in the T2-like contrast of ``t2_contrast``
_T1_OTHER = {"bone": 0.08, "marrow": 0.55, "fat": 1.15, "skin": 0.6, "muscle": 0.45}
_T2_OTHER = {"bone": 0.05, "marrow": 0.6, "fat": 0.85, "skin": 0.5, "muscle": 0.3}


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


@dataclass(frozen=True)
class EmbeddedConfig:
    """Generator parameters (the ``data.embedded`` config block)."""

    dir: str
    spacing: float = 2.0
    n_subjects: int = 150
    n_test_clean: int = 40
    n_test_per_kind: int = 8
    artifact_fraction: float = 0.05
    n_cohorts: int = 4
    seed: int = 0
    progress: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> EmbeddedConfig:
        """Build from a DictConfig or any mapping; validates every value (``ConfigError``)."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):  # resolve interpolations (paths from the environment)
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"data.embedded: expected a mapping, got {type(cfg).__name__}")
        cfg = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ConfigError(f"data.embedded: unknown keys {unknown}; known: {sorted(names)}")
        if cfg.get("dir") in (None, ""):
            raise ConfigError("data.embedded.dir: must be set (the parent folder of the dataset)")
        out = cls(
            dir=str(cfg["dir"]),
            spacing=float(cfg.get("spacing", cls.spacing)),
            n_subjects=int(cfg.get("n_subjects", cls.n_subjects)),
            n_test_clean=int(cfg.get("n_test_clean", cls.n_test_clean)),
            n_test_per_kind=int(cfg.get("n_test_per_kind", cls.n_test_per_kind)),
            artifact_fraction=float(cfg.get("artifact_fraction", cls.artifact_fraction)),
            n_cohorts=int(cfg.get("n_cohorts", cls.n_cohorts)),
            seed=int(cfg.get("seed", cls.seed)),
            progress=bool(cfg.get("progress", cls.progress)),
        )
        out.validate()
        return out

    def validate(self) -> None:
        if not 0.5 <= self.spacing <= 8.0:
            raise ConfigError(f"data.embedded.spacing: {self.spacing} mm is outside [0.5, 8]")
        if self.n_subjects < 1:
            raise ConfigError(f"data.embedded.n_subjects: {self.n_subjects} must be >= 1")
        if self.n_test_clean < 0 or self.n_test_per_kind < 0:
            raise ConfigError("data.embedded: n_test_clean and n_test_per_kind must be >= 0")
        if not 0.0 <= self.artifact_fraction <= 1.0:
            raise ConfigError(
                f"data.embedded.artifact_fraction: {self.artifact_fraction} is not in [0, 1]"
            )
        if not 1 <= self.n_cohorts <= len(COHORTS):
            raise ConfigError(
                f"data.embedded.n_cohorts: {self.n_cohorts} is not in [1, {len(COHORTS)}]"
            )

    def params(self) -> dict[str, Any]:
        """Everything that determines the generated voxels (what the folder hash covers)."""
        return {
            "generator_version": GENERATOR_VERSION,
            "spacing": self.spacing,
            "n_subjects": self.n_subjects,
            "n_test_clean": self.n_test_clean,
            "n_test_per_kind": self.n_test_per_kind,
            "artifact_fraction": self.artifact_fraction,
            "n_cohorts": self.n_cohorts,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ScanSpec:
    """One scan to generate: who, where, and which artifact (``kind="none"`` for clean)."""

    participant_id: str
    split: str
    index: int  # position within its split
    cohort: Cohort
    kind: str = "none"
    severity: int = 0
    entropy: tuple[int, ...] = field(default=(0,))


# ----------------------------------------------------------------------------- naming


def embedded_name(cfg: EmbeddedConfig) -> str:
    """Folder name: spacing, train size, seed and a hash of every generator parameter."""
    digest = hashlib.sha256(json.dumps(cfg.params(), sort_keys=True).encode()).hexdigest()[:8]
    spacing = f"{cfg.spacing:g}".replace(".", "p")
    return f"mni{spacing}mm_n{cfg.n_subjects}_s{cfg.seed}_{digest}"


# ----------------------------------------------------------------------------- head model


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

    def beyond(mm: float) -> np.ndarray:  # partial-volume fraction of a voxel beyond mm
        return np.clip((sd - mm) / res + 0.5, 0.0, 1.0)

    chans = {t: np.zeros(mask.shape, np.float32) for t in TISSUES}
    csf_in = np.clip(mask - gm - wm, 0.0, None)
    inner = 0.0
    for tissue, outer in _HEAD_LAYERS:
        frac = beyond(inner) - beyond(outer) if inner > 0 else (1.0 - mask) - beyond(outer)
        chans[tissue] += frac
        inner = outer
    # farther than the skull from the brain hull (the neck), CSF and bone become muscle
    far = d_brain > _HEAD_LAYERS[3][1]
    for tissue in ("csf", "bone", "marrow"):
        chans["muscle"][far] += chans[tissue][far]
        chans[tissue][far] = 0.0
    others = ("bone", "marrow", "fat", "skin", "muscle")
    out = {
        "gm": gm,
        "wm": wm,
        "csf_brain": csf_in,
        "csf_outer": chans["csf"],
        "other_t1": sum(_T1_OTHER[t] * chans[t] for t in others),
        "other_t2": sum(_T2_OTHER[t] * chans[t] for t in others),
        "brain": mask,
    }
    maps = np.stack([out[c] for c in CHANNELS]).astype(np.float32)
    if spacing > res * 1.01:  # anti-aliasing before sampling at a coarser spacing
        sigma = 0.42 * math.sqrt((spacing / res) ** 2 - 1.0)
        maps = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])
    return torch.from_numpy(np.ascontiguousarray(maps)), affine


# ----------------------------------------------------------------------------- helpers


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    """3×3 rotation from angles (degrees) about R, A, S (applied x, then y, then z)."""
    a, b, c = np.radians(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_field(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: float,
    control_mm: float,
    sigma_cp: Sequence[float],
) -> torch.Tensor:
    """Smooth random fields ``(len(sigma_cp), *shape)``, each scaled to max |value| = 1.

    Gaussian-smoothed white noise (``sigma_cp`` control points per channel) on a coarse control
    grid ``control_mm`` apart, trilinearly upsampled to ``shape`` in one call: no per-voxel
    work besides the interpolation.
    """
    channels = len(sigma_cp)
    coarse = [max(2, int(math.ceil(n * spacing / control_mm)) + 1) for n in shape]
    noise = rng.standard_normal((channels, *coarse)).astype(np.float32)
    noise = np.stack(
        [ndimage.gaussian_filter(c, sg, mode="wrap") for c, sg in zip(noise, sigma_cp, strict=True)]
    )
    noise /= np.abs(noise).reshape(channels, -1).max(axis=1).reshape(-1, 1, 1, 1) + 1e-8
    up = F.interpolate(
        torch.from_numpy(noise)[None], size=tuple(shape), mode="trilinear", align_corners=True
    )
    return up[0]


def _grid_affine(cohort: Cohort, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Output grid shape and RAS voxel → world affine of a cohort (before padding)."""
    shape = tuple(max(8, int(round(f / spacing))) for f in cohort.fov_mm)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(cohort.center_mm) - (np.asarray(shape) - 1) / 2.0 * spacing
    return shape, affine  # type: ignore[return-value]


def _bias_log_field(rng: np.random.Generator, shape: Sequence[int], order: int = 3) -> torch.Tensor:
    """Random polynomial of degree ``order`` in normalised coordinates, ``(X, Y, Z)``.

    The TorchIO ``RandomBiasField`` model, Σ c_ijk x^i y^j z^k with c ~ U(−1, 1) (no constant
    term), evaluated as Σ_i x^i ⊗ G_i(y, z): ``order + 1`` full-volume operations, not one per
    term (~20 ms at 2 mm; TorchIO's takes seconds, PITFALLS.md).
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


def _scale_log_field(log_field: torch.Tensor, brain: torch.Tensor, ratio: float) -> torch.Tensor:
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


def _extent(mask: torch.Tensor, axis: int, grow: int = 0) -> tuple[int, int]:
    """First and last index along ``axis`` where ``mask`` (3D bool) has a voxel, grown by
    ``grow`` voxels on both sides and clipped to the grid."""
    dims = tuple(d for d in range(3) if d != axis)
    idx = torch.nonzero(mask.sum(dims) > 0)
    if idx.numel() == 0:
        return 0, mask.shape[axis] - 1
    return max(0, int(idx.min()) - grow), min(mask.shape[axis] - 1, int(idx.max()) + grow)


def _kspace_acquire(
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


def _fold(array: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
    """Wrap-around: fold everything outside ``[start, start + size)`` along ``axis`` into it."""
    n = array.shape[axis]
    target = torch.remainder(torch.arange(n) - start, size)
    out_shape = list(array.shape)
    out_shape[axis] = size
    out = torch.zeros(out_shape, dtype=array.dtype)
    return out.index_add_(axis, target, array)


def _crop(array: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
    return array.narrow(axis, start, size).contiguous()


# ----------------------------------------------------------------------------- artifacts


def sample_artifact(
    kind: str, severity: int, rng: np.random.Generator, cohort: Cohort
) -> dict[str, Any]:
    """Draw the parameters of one artifact (RandomX → X: every draw is recorded).

    Args:
        kind: one of :data:`ARTIFACT_KINDS`.
        severity: 1 (mild), 2 (moderate) or 3 (severe).
        rng: the scan's artifact random stream.
        cohort: the scan's cohort (phase-encode axis for wrap/ghosting).

    Returns:
        JSON-serialisable parameters; ``"value"`` is the ``severity_value``.
    """
    if kind not in SEVERITY_RANGES:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {ARTIFACT_KINDS}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity}")
    lo, hi = SEVERITY_RANGES[kind][severity]
    value = float(rng.uniform(lo, hi))
    p: dict[str, Any] = {"value": value}
    if kind == "noise":
        p["snr_db"] = value
    elif kind == "motion":
        n = int(rng.integers(1, 3)) + severity  # 2..5 movements
        deg = rng.uniform(-1.0, 1.0, size=(n, 3))
        deg *= value / np.abs(deg).max()
        trans = rng.uniform(-1.0, 1.0, size=(n, 3)) * value * 0.8  # mm
        times = np.sort(rng.uniform(0.15, 0.9, size=n))
        p.update(
            degrees=deg.round(4).tolist(),
            translation=trans.round(4).tolist(),
            times=times.round(4).tolist(),
        )
    elif kind == "spike":
        n = int(rng.integers(1, 4))
        # positions in [0, 1) of the (shifted) spectrum, away from the very centre
        pos = 0.5 + rng.choice([-1.0, 1.0], size=(n, 3)) * rng.uniform(0.03, 0.35, size=(n, 3))
        p.update(intensity=value, positions=pos.round(4).tolist())
    elif kind == "blur":
        p.update(ratio=value, axes=[0, 1, 2])
    elif kind == "ghosting":
        p.update(
            intensity=value, num_ghosts=int(rng.integers(2, 7)), axis=cohort.pe_axis, restore=0.02
        )
    elif kind == "bias":
        p["ratio"] = value
    elif kind == "wrap":
        p.update(overlap=value, axis=cohort.pe_axis, shift=float(rng.uniform(-0.3, 0.3)))
    elif kind == "missing_side":
        p.update(
            fraction=value,
            axis=0,
            side=str(rng.choice(["left", "right"])),
            residual=float(rng.uniform(0.0, 0.05)),
            edge_mm=float(rng.uniform(2.0, 6.0)),
        )
    elif kind == "misregistration":
        axis = int(rng.integers(0, 3))
        p.update(
            degrees=value * float(rng.choice([-1.0, 1.0])),
            axis=axis,
            translation_mm=rng.uniform(-8.0, 8.0, size=3).round(3).tolist(),
        )
    elif kind == "t2_contrast":
        p.update(gm_wm_ratio=value, csf_gm_ratio=float(rng.uniform(1.4, 1.9)))
    return p


def _torchio_image(image: torch.Tensor, affine: np.ndarray) -> Any:
    import torchio as tio

    return tio.ScalarImage(tensor=image[None].float(), affine=affine)


def _apply_torchio(kind: str, p: dict[str, Any], image: torch.Tensor, affine: np.ndarray):
    """Motion, ghosting and spike through TorchIO's deterministic transforms."""
    import torchio as tio

    if kind == "motion":
        transform = tio.Motion(
            degrees=np.asarray(p["degrees"]),
            translation=np.asarray(p["translation"]),
            times=np.asarray(p["times"]),
            image_interpolation="linear",
        )
    elif kind == "ghosting":
        transform = tio.Ghosting(
            num_ghosts=p["num_ghosts"],
            axis=p["axis"],
            intensity=p["intensity"],
            restore=p["restore"],
        )
    elif kind == "spike":
        transform = tio.Spike(spikes_positions=np.asarray(p["positions"]), intensity=p["intensity"])
    else:  # pragma: no cover
        raise ValueError(kind)
    out = transform(_torchio_image(image, affine))
    return out.data[0].float()


# ----------------------------------------------------------------------------- one scan


def synthesize_scan(spec: ScanSpec, spacing: float) -> dict[str, Any]:
    """Generate one scan and its labels (pure: arrays in memory, nothing written).

    Args:
        spec: who/which cohort/which artifact; ``spec.entropy`` seeds everything.
        spacing: output voxel size (mm).

    Returns:
        dict with ``image`` (float32, scanner units), ``probseg`` (float32), ``gm`` and
        ``brain`` (uint8), all ``(X, Y, Z)`` in RAS; ``affine`` (RAS, 4×4); ``params`` (every
        sampled parameter, JSON-serialisable); ``value`` (``severity_value``).
    """
    cohort = spec.cohort
    ss = np.random.SeedSequence(list(spec.entropy))
    rng, arng = (np.random.default_rng(s) for s in ss.spawn(2))  # anatomy, artifact streams
    art = sample_artifact(spec.kind, spec.severity, arng, cohort) if spec.kind != "none" else {}

    maps, t_affine = head_model(spacing)
    shape, affine = _grid_affine(cohort, spacing)

    # ---- contrast: I = sum_t p_t mu_t, combined on the template grid before sampling
    # (sampling is linear, so this equals combining the sampled maps, for 1 channel not 4);
    # brain tissue means jittered per subject, the non-brain tissues share one factor
    t2 = spec.kind == "t2_contrast"
    jitter = rng.uniform(0.97, 1.03, size=4)
    if t2:
        wm = 0.45
        gm = wm * art["gm_wm_ratio"]
        means = {"gm": gm, "wm": wm, "csf": gm * art["csf_gm_ratio"]}
    else:
        means = {"gm": cohort.gm, "wm": 1.0, "csf": cohort.csf}
    means = {t: means[t] * j for t, j in zip(("gm", "wm", "csf"), jitter[:3], strict=True)}
    ch = {c: maps[i] for i, c in enumerate(CHANNELS)}
    intensity = ch["gm"] * means["gm"]
    intensity.add_(ch["wm"], alpha=means["wm"])
    intensity.add_(ch["csf_brain"], alpha=means["csf"])
    intensity.add_(ch["csf_outer"], alpha=means["csf"])
    intensity.add_(ch["other_t2" if t2 else "other_t1"], alpha=float(jitter[3]))
    stacked = torch.stack([intensity, ch["gm"], ch["brain"]])[None]  # (1, 3, X', Y', Z')
    del intensity

    # ---- subject deformation: output voxel -> world -> (affine + displacement) -> template
    rot = rng.uniform(-10.0, 10.0, size=3)
    scales = rng.uniform(0.9, 1.1, size=3)
    trans = rng.uniform(-5.0, 5.0, size=3)
    disp_mm = float(rng.uniform(1.5, 4.0))
    mat = _rotation(rot) @ np.diag(scales)
    if spec.kind == "misregistration":
        angles = [0.0, 0.0, 0.0]
        angles[art["axis"]] = art["degrees"]
        mat = _rotation(angles) @ mat
        trans = trans + np.asarray(art["translation_mm"])
    center = np.asarray(_HEAD_CENTER)
    subj = np.eye(4)  # world (subject) -> world (template)
    subj[:3, :3] = mat
    subj[:3, 3] = center - mat @ center + trans
    vox = np.linalg.inv(t_affine) @ subj @ affine  # output voxel -> template voxel
    t_shape = maps.shape[1:]
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
    fields = _smooth_field(rng, shape, spacing, control_mm=6.0, sigma_cp=(3.3, 3.3, 3.3, 1.0))
    disp, texture = fields[:3], fields[3]
    t_res = np.abs(np.diag(t_affine)[:3])
    scale_d = disp_mm * 2.0 / (t_res * (np.asarray(t_shape) - 1))
    grid += disp.permute(1, 2, 3, 0) * torch.tensor(scale_d[::-1].copy(), dtype=torch.float32)
    del disp, fields
    warped = F.grid_sample(
        stacked, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]  # (3, X, Y, Z): intensity, GM probability, brain mask
    del grid, stacked

    image, p_gm = warped[0], warped[1]
    probseg = p_gm.clamp(0.0, 1.0)
    # the sampled class probabilities are convex combinations of template ones that sum to
    # <= 1, so p_GM > 0.5 is exactly "GM is the most probable of (GM, WM, CSF, rest)"
    gm_label = p_gm > 0.5
    brain = warped[2] > 0.5
    # the head (object) extends beyond the brain by the synthetic head layers
    grow = int(math.ceil(_HEAD_LAYERS[-1][1] / spacing))

    image *= 1.0 + 0.03 * texture

    # ---- bias field (cohort strength, or the artifact's)
    bias_ratio = float(cohort.bias_ratio * math.exp(rng.uniform(-0.15, 0.15)))
    if spec.kind == "bias":
        bias_ratio = art["ratio"]
    log_field = _bias_log_field(rng, shape)
    image *= _scale_log_field(log_field, brain, bias_ratio)
    ref_signal = float(image[brain].mean()) if brain.any() else float(image.mean())

    snr_db = float(cohort.snr_db + rng.uniform(-1.5, 1.5))
    noise_seed = int(rng.integers(0, 2**63 - 1))
    subject_params = {
        "rotation_deg": rot.round(4).tolist(),
        "scales": scales.round(5).tolist(),
        "translation_mm": trans.round(4).tolist(),
        "displacement_mm": round(disp_mm, 4),
        "tissue_means": {t: round(v, 5) for t, v in means.items()},
        "other_tissue_factor": round(float(jitter[3]), 5),
        "bias_ratio": round(bias_ratio, 5),
        "snr_db": round(snr_db, 4),
    }

    # ---- object-level artifacts
    if spec.kind == "missing_side":
        axis = art["axis"]
        lo, hi = _extent(brain, axis, grow)
        coords = torch.arange(shape[axis], dtype=torch.float32)
        width = max(art["edge_mm"] / spacing, 0.5)
        if art["side"] == "left":  # RAS: left = low index along R
            edge = lo + art["fraction"] * (hi - lo)
            ramp = torch.sigmoid((coords - edge) / width)
        else:
            edge = hi - art["fraction"] * (hi - lo)
            ramp = torch.sigmoid((edge - coords) / width)
        profile = art["residual"] + (1.0 - art["residual"]) * ramp
        view = [1, 1, 1]
        view[axis] = -1
        image *= profile.reshape(view)

    # ---- acquisition artifacts (TorchIO, deterministic transforms)
    if spec.kind in ("motion", "ghosting", "spike"):
        image = _apply_torchio(spec.kind, art, image, affine)

    labels = {"probseg": probseg, "gm": gm_label, "brain": brain}
    if spec.kind == "wrap":
        axis = art["axis"]
        lo, hi = _extent(brain, axis, grow)
        extent = hi - lo + 1
        size = int(round(extent * (1.0 - art["overlap"])))
        size = max(8, min(size, shape[axis] - 1))
        mid = (lo + hi) / 2.0 + art["shift"] * (extent - size) / 2.0
        start = int(round(mid - size / 2.0))
        start = min(max(start, 0), shape[axis] - size)
        image = _fold(image, axis, start, size)
        labels = {k: _crop(v, axis, start, size) for k, v in labels.items()}
        affine = affine.copy()
        affine[:3, 3] += affine[:3, axis] * start
        art["fov_voxels"] = [shape[axis], size]
        shape = tuple(image.shape)

    # ---- k-space: noise + resolution
    keep = [min(1.0, spacing / a) for a in cohort.acq_mm]
    if spec.kind == "blur":
        keep = [min(k, 1.0 / art["ratio"]) for k in keep]
    if spec.kind == "noise":
        snr_db = art["snr_db"]
    sigma = ref_signal / 10.0 ** (snr_db / 20.0)
    image = _kspace_acquire(image, keep, sigma, np.random.default_rng(noise_seed))

    # ---- storage: zero padding, scanner scale
    pad = [int(round(pm / spacing)) for pm in cohort.pad_mm]
    if any(pad):
        spec_pad = []
        for pv in reversed(pad):  # F.pad takes the last axis first
            spec_pad += [pv, pv]
        image = F.pad(image[None, None], spec_pad)[0, 0]
        labels = {k: F.pad(v[None, None].float(), spec_pad)[0, 0] for k, v in labels.items()}
        affine = affine.copy()
        affine[:3, 3] -= affine[:3, :3] @ np.asarray(pad, dtype=np.float64)
    image = image * cohort.scale

    value = art.get("value", 0.0)
    params = {"subject": subject_params}
    if art:
        params["artifact"] = {k: v for k, v in art.items() if k != "value"}
    return {
        "image": image.numpy().astype(np.float32),
        "probseg": labels["probseg"].numpy().astype(np.float32),
        "gm": labels["gm"].numpy().astype(np.uint8),
        "brain": labels["brain"].numpy().astype(np.uint8),
        "affine": affine,
        "params": params,
        "value": float(value),
    }


# ----------------------------------------------------------------------------- writing


def _round_mantissa(array: np.ndarray, bits: int = 12) -> np.ndarray:
    """Round float32 values to ``bits`` mantissa bits (relative error ≤ 2**-(bits+1)).

    12 bits (1e-4 relative, far below the simulated noise) make gzip ~1.6× faster and the
    files ~30 % smaller; full-precision noise is incompressible and zlib is slow on it.
    """
    drop = 23 - bits
    u = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(1 << (drop - 1))) & np.uint32((0xFFFFFFFF >> drop) << drop)
    return u.view(np.float32)


def _save(path: Path, array: np.ndarray, affine: np.ndarray, orientation: str, dtype: str) -> None:
    """Write RAS ``array`` reoriented to ``orientation`` with a matching affine (gzip NIfTI)."""
    from nibabel import orientations as nio

    ornt = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), nio.axcodes2ornt(orientation))
    data = nio.apply_orientation(array, ornt)
    out_affine = affine @ nio.inv_ornt_aff(ornt, array.shape)
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    elif dtype == "uint8":
        data = data.astype(np.uint8)
    else:
        data = _round_mantissa(data)
    img = nib.Nifti1Image(data, out_affine)
    if dtype == "int16_scaled":
        img.set_data_dtype(np.int16)  # nibabel picks scl_slope / scl_inter
    img.set_qform(out_affine, code=1)
    img.set_sform(out_affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_scan(split_root: Path, spec: ScanSpec, out: dict[str, Any]) -> None:
    pid = spec.participant_id
    orient = spec.cohort.orientation
    aff = out["affine"]
    _save(
        split_root / pid / "anat" / f"{pid}_T1w.nii.gz",
        out["image"],
        aff,
        orient,
        spec.cohort.dtype,
    )
    lab = split_root / "derivatives" / "labels" / pid / "anat"
    _save(lab / f"{pid}_label-GM_mask.nii.gz", out["gm"], aff, orient, "uint8")
    _save(lab / f"{pid}_label-GM_probseg.nii.gz", out["probseg"], aff, orient, "float32")
    _save(lab / f"{pid}_desc-brain_mask.nii.gz", out["brain"], aff, orient, "uint8")


def _tsv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(str(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def _write_split_metadata(split_root: Path, split: str, rows: list[dict[str, Any]]) -> None:
    from qcflow import __version__

    split_root.mkdir(parents=True, exist_ok=True)
    generated = [{"Name": "qcflow", "Version": __version__, "Description": "qcflow.data.synth"}]
    atomic_write_json(
        split_root / "dataset_description.json",
        {
            "Name": f"qcflow embedded synthetic T1w ({split})",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": generated,
            "License": "derived from the MNI152 ICBM 2009 templates shipped with nilearn",
        },
    )
    atomic_write_json(
        split_root / "derivatives" / "labels" / "dataset_description.json",
        {
            "Name": f"qcflow embedded synthetic T1w ({split}): ground-truth labels",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": generated,
        },
    )
    atomic_write_text(split_root / "participants.tsv", _tsv(rows, ["participant_id", "cohort"]))
    atomic_write_json(
        split_root / "participants.json",
        {"cohort": {"Description": "simulated site/scanner (see cohorts.json at the root)"}},
    )
    cols = ["participant_id", "kind", "severity", "severity_value", "params"]
    atomic_write_text(split_root / "artifacts.tsv", _tsv(rows, cols))


# ----------------------------------------------------------------------------- build


def _plan(cfg: EmbeddedConfig) -> dict[str, list[ScanSpec]]:
    """Which scans each split holds: ids, cohorts (round robin), artifacts, seeds."""
    cohorts = COHORTS[: cfg.n_cohorts]
    n_art = cfg.n_test_per_kind * len(ARTIFACT_KINDS)
    total = cfg.n_subjects + cfg.n_test_clean + n_art
    width = max(3, len(str(total)))
    plan: dict[str, list[ScanSpec]] = {s: [] for s in SPLITS}
    number = 0

    def pid() -> str:
        nonlocal number
        number += 1
        return f"sub-{number:0{width}d}"

    # corrupted train subjects: a seeded draw of round(fraction * n), kinds cycled in a
    # seeded order, severities drawn
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 9000]))
    n_bad = int(round(cfg.artifact_fraction * cfg.n_subjects))
    bad = rng.choice(cfg.n_subjects, size=n_bad, replace=False) if n_bad else []
    kinds = [ARTIFACT_KINDS[i] for i in rng.permutation(len(ARTIFACT_KINDS))]
    corrupt = {
        int(b): (kinds[r % len(kinds)], int(rng.integers(1, 4))) for r, b in enumerate(sorted(bad))
    }
    for i in range(cfg.n_subjects):
        kind, sev = corrupt.get(i, ("none", 0))
        plan["train"].append(
            ScanSpec(pid(), "train", i, cohorts[i % len(cohorts)], kind, sev, (cfg.seed, 0, i))
        )
    for i in range(cfg.n_test_clean):
        plan["test_clean"].append(
            ScanSpec(pid(), "test_clean", i, cohorts[i % len(cohorts)], entropy=(cfg.seed, 1, i))
        )
    i = 0
    for kind in ARTIFACT_KINDS:
        for j in range(cfg.n_test_per_kind):
            cohort = cohorts[i % len(cohorts)]
            spec = ScanSpec(pid(), "test_artifact", i, cohort, kind, 1 + j % 3, (cfg.seed, 2, i))
            plan["test_artifact"].append(spec)
            i += 1
    return plan


def build_embedded(cfg: EmbeddedConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every split into ``out_dir`` (no atomicity here; see :func:`ensure_embedded`).

    Returns:
        counts per split and the number of corrupted train scans.
    """
    plan = _plan(cfg)
    total = sum(len(v) for v in plan.values())
    bar = None
    if cfg.progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="embedded dataset", unit="scan", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    counts: dict[str, Any] = {}
    # one writer thread overlaps gzip (which releases the GIL) with the next scan's synthesis;
    # at most two scans wait in memory, and a writer error surfaces at the next submit
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer") as writer:
        pending: list[Future] = []
        for split in SPLITS:
            counts[split] = _build_split(
                cfg, out_dir / split, split, plan[split], writer, pending, bar
            )
        for fut in pending:
            fut.result()
    if bar is not None:
        bar.close()
    counts["train_corrupted"] = sum(s.kind != "none" for s in plan["train"])
    atomic_write_json(
        out_dir / "cohorts.json",
        [dataclasses.asdict(c) for c in COHORTS[: cfg.n_cohorts]],
    )
    return counts


def _build_split(
    cfg: EmbeddedConfig,
    split_root: Path,
    split: str,
    specs: list[ScanSpec],
    writer: ThreadPoolExecutor,
    pending: list[Future],
    bar: Any,
) -> int:
    split_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        out = synthesize_scan(spec, cfg.spacing)
        while len(pending) >= 2:
            pending.pop(0).result()
        pending.append(writer.submit(_write_scan, split_root, spec, out))
        rows.append(
            {
                "participant_id": spec.participant_id,
                "cohort": spec.cohort.name,
                "kind": spec.kind,
                "severity": spec.severity,
                "severity_value": f"{out['value']:.6g}",
                "params": json.dumps(out["params"], sort_keys=True, separators=(",", ":")),
            }
        )
        if bar is not None:
            bar.update(1)
    _write_split_metadata(split_root, split, rows)
    return len(rows)


_MARKER = "dataset_complete.json"


def ensure_embedded(
    cfg: Mapping[str, Any] | Any, return_info: bool = False
) -> Path | tuple[Path, dict[str, Any]]:
    """Return the embedded dataset's root, building it on first use.

    Args:
        cfg: the ``data.embedded`` block (DictConfig or mapping): ``dir``, ``spacing``,
            ``n_subjects``, ``n_test_clean``, ``n_test_per_kind``, ``artifact_fraction``,
            ``n_cohorts``, ``seed`` and optional ``progress``.
        return_info: also return a JSON-serialisable dict (name, counts, build seconds,
            ``reused``).

    Returns:
        ``<dir>/<name>`` (and the info dict). A folder holding ``dataset_complete.json`` is
        reused as is; anything else is rebuilt into a temporary sibling and renamed into place.
    """
    ecfg = cfg if isinstance(cfg, EmbeddedConfig) else EmbeddedConfig.from_mapping(cfg)
    name = embedded_name(ecfg)
    root = Path(ecfg.dir).expanduser() / name
    t0 = time.perf_counter()
    marker = root / _MARKER
    reused = marker.is_file()
    if not reused:
        if root.exists():  # a folder without the marker was not produced by a finished build
            log.warning("%s: no %s, rebuilding", root, _MARKER)
            stale = root.with_name(f".{name}.stale-{os.getpid()}-{time.time_ns()}")
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building embedded dataset %s (first use)", root)
        with atomic_dir(root) as tmp:
            counts = build_embedded(ecfg, tmp)
            seconds = time.perf_counter() - t0
            atomic_write_json(
                tmp / _MARKER,
                {
                    "name": name,
                    "params": ecfg.params(),
                    "counts": counts,
                    "build_seconds": round(seconds, 3),
                    "torch_threads": torch.get_num_threads(),
                    "artifact_kinds": list(ARTIFACT_KINDS),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        log.info("embedded dataset built in %.1f s: %s", seconds, root)
    meta = json.loads(marker.read_text())
    info = {
        "name": name,
        "reused": reused,
        "build_seconds": meta.get("build_seconds"),
        "elapsed_seconds": round(time.perf_counter() - t0, 3),
        "counts": meta.get("counts"),
        "params": meta.get("params"),
    }
    return (root, info) if return_info else root
