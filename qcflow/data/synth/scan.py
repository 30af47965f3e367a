"""One scan of the embedded dataset: a subject's anatomy, acquisition and artifact, in memory.

All random draws come from a per-scan ``SeedSequence`` derived from ``(seed, split, index)``
(``ScanSpec.entropy``), split into an anatomy/acquisition stream and an artifact stream, so two
builds with one config are voxel-identical and an artifact never changes the subject it is
applied to.

**Labels**: ``probseg`` is the warped GM probability p_GM. The GM label is the set of voxels
where GM is the most probable class of (GM, WM, CSF, rest) *and* p_GM > 0.5; as the template
fractions sum to one and trilinear weights are convex, the warped fractions also sum to one, so
both conditions reduce to ``p_GM > 0.5`` (what is computed). The brain mask is the warped
template mask > 0.5.

**Intensities** are re-synthesised from the tissue maps, I = Σ_t p_t μ_t(cohort), with T1
ordering WM > GM > CSF (fat bright, bone dark), per-subject jitter of the means (±3 %), a mild
smooth multiplicative texture (±3 %) and the cohort's bias field
(:mod:`qcflow.data.synth.acquisition`), then the acquisition and the artifact
(:mod:`qcflow.data.synth.artifacts`) in physical order.

Under ``variation: wide`` (``ScanSpec.variation``) the subject's contrast, atrophy, pose,
deformation, head layers, bias, SNR, acquisition resolution, intensity scale and S coverage are
its own draws from a third random stream (:mod:`qcflow.data.synth.variation`); the anatomy and
artifact streams are consumed exactly as under ``cohort``, whose output is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qcflow.data.synth.acquisition import (
    Cohort,
    bias_log_field,
    grid_affine,
    kspace_acquire,
    pad_and_scale,
    scale_log_field,
)
from qcflow.data.synth.anatomy import (
    HEAD_LAYERS,
    combine_intensity,
    deform,
    head_model,
    head_model_layers,
    rotation,
)
from qcflow.data.synth.artifacts import (
    TORCHIO_KINDS,
    apply_torchio,
    contrast_means,
    cut_side,
    misregister,
    sample_artifact,
    wrap_around,
)
from qcflow.data.synth.variation import atrophy, cut_fov, sample_wide, wide_displacement

__all__ = ["ScanSpec", "synthesize_scan"]


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
    variation: str = "cohort"  # qcflow.data.synth.variation.VARIATIONS


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
    cohort, kind = spec.cohort, spec.kind
    ss = np.random.SeedSequence(list(spec.entropy))
    rng, arng = (np.random.default_rng(s) for s in ss.spawn(2))  # anatomy, artifact streams
    art = sample_artifact(kind, spec.severity, arng, cohort) if kind != "none" else {}
    # ``wide``: the subject's own draws, from a third stream (the first two are unchanged)
    wide = sample_wide(np.random.default_rng(ss.spawn(1)[0])) if spec.variation == "wide" else None

    if wide is None:
        maps, t_affine = head_model(spacing)
    else:
        maps, t_affine = head_model_layers(spacing, wide["head_thickness"])
    shape, affine = grid_affine(cohort, spacing)

    # ---- contrast: brain tissue means jittered per subject, the non-brain tissues share one
    # factor; combined on the template grid before sampling
    t2 = kind == "t2_contrast"
    jitter = rng.uniform(0.97, 1.03, size=4)
    base = contrast_means(art) if t2 else {"gm": cohort.gm, "wm": 1.0, "csf": cohort.csf}
    means = {t: base[t] * j for t, j in zip(("gm", "wm", "csf"), jitter[:3], strict=True)}
    other = float(jitter[3])
    if wide is not None:
        means = contrast_means(art) if t2 else {"gm": wide["gm"], "wm": 1.0, "csf": wide["csf"]}
        other = wide["other"]
    stacked = combine_intensity(maps, means, other, t2)  # (1, 3, X', Y', Z')
    if wide is not None:
        atrophy(stacked, spacing, means, wide["atrophy"])

    # ---- subject pose and deformation (a misregistration is a pose: the labels follow it)
    rot = rng.uniform(-10.0, 10.0, size=3)
    scales = rng.uniform(0.9, 1.1, size=3)
    trans = rng.uniform(-5.0, 5.0, size=3)
    disp_mm = float(rng.uniform(1.5, 4.0))
    extra = None
    if wide is not None:
        rot, scales, trans = wide["rotation_deg"], wide["scales"], wide["translation_mm"]
        disp_mm, extra = wide["displacement_mm"], wide_displacement(wide)
    mat = rotation(rot) @ np.diag(scales)
    if kind == "misregistration":
        mat, trans = misregister(mat, trans, art)
    # (3, X, Y, Z): intensity, GM probability, brain mask
    warped, texture = deform(
        stacked, t_affine, shape, affine, mat, trans, disp_mm, spacing, rng, extra
    )
    del stacked
    # the head (object) extends beyond the brain by the synthetic head layers
    head_mm = HEAD_LAYERS[-1][1] * (1.0 if wide is None else wide["head_thickness"])
    grow = int(math.ceil(head_mm / spacing))
    fov_cut = None
    if wide is not None and wide["fov_cut"] is not None:  # a shorter field of view along S
        warped, texture, affine, fov_cut = cut_fov(
            warped, texture, affine, grow, spacing, wide["fov_cut"]
        )
        shape = tuple(warped.shape[1:])

    image, p_gm = warped[0], warped[1]
    probseg = p_gm.clamp(0.0, 1.0)
    # the sampled class probabilities are convex combinations of template ones that sum to
    # <= 1, so p_GM > 0.5 is exactly "GM is the most probable of (GM, WM, CSF, rest)"
    gm_label = p_gm > 0.5
    brain = warped[2] > 0.5

    image *= 1.0 + 0.03 * texture

    # ---- bias field (cohort strength, or the artifact's)
    bias_ratio = float(cohort.bias_ratio * math.exp(rng.uniform(-0.15, 0.15)))
    if wide is not None:
        bias_ratio = wide["bias_ratio"]
    if kind == "bias":
        bias_ratio = art["ratio"]
    log_field = bias_log_field(rng, shape)
    image *= scale_log_field(log_field, brain, bias_ratio)
    ref_signal = float(image[brain].mean()) if brain.any() else float(image.mean())

    snr_db = float(cohort.snr_db + rng.uniform(-1.5, 1.5))
    if wide is not None:
        snr_db = wide["snr_db"]
    noise_seed = int(rng.integers(0, 2**63 - 1))
    subject_params = {
        "rotation_deg": rot.round(4).tolist(),
        "scales": scales.round(5).tolist(),
        "translation_mm": trans.round(4).tolist(),
        "displacement_mm": round(disp_mm, 4),
        "tissue_means": {t: round(v, 5) for t, v in means.items()},
        "other_tissue_factor": round(other, 5),
        "bias_ratio": round(bias_ratio, 5),
        "snr_db": round(snr_db, 4),
    }
    acq_mm, scale = cohort.acq_mm, None
    if wide is not None:
        acq_mm, scale = wide["acq_mm"], wide["scale"]
        subject_params.update(
            variation="wide",
            acq_mm=acq_mm,
            scale=round(scale, 3),
            fov_cut=fov_cut and {**fov_cut, "mm": round(fov_cut["mm"], 3)},
            **{
                k: round(wide[k], 5)
                for k in ("atrophy", "ventricle_expansion", "hemisphere_width", "torque_mm")
            },
            head_thickness=round(wide["head_thickness"], 5),
        )

    # ---- object-level artifacts, then the acquisition's (TorchIO, deterministic transforms)
    if kind == "missing_side":
        cut_side(image, brain, grow, spacing, art)
    if kind in TORCHIO_KINDS:
        image = apply_torchio(kind, art, image, affine)

    labels: dict[str, torch.Tensor] = {"probseg": probseg, "gm": gm_label, "brain": brain}
    if kind == "wrap":
        image, labels, affine = wrap_around(image, labels, affine, brain, grow, art)

    # ---- k-space: noise + resolution
    keep = [min(1.0, spacing / a) for a in acq_mm]
    if kind == "blur":
        keep = [min(k, 1.0 / art["ratio"]) for k in keep]
    if kind == "noise":
        snr_db = art["snr_db"]
    sigma = ref_signal / 10.0 ** (snr_db / 20.0)
    image = kspace_acquire(image, keep, sigma, np.random.default_rng(noise_seed))

    # ---- storage: zero padding, scanner scale
    image, labels, affine = pad_and_scale(image, labels, affine, cohort, spacing, scale)

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
