"""The embedded dataset's artifacts: which kinds, how strong, and where each acts.

Artifacts are drawn for ~``artifact_fraction`` of ``train`` and for every ``test_artifact``
scan, severity 1/2/3 with the parameter ranges in :data:`SEVERITY_RANGES`
(:func:`sample_artifact`: RandomX → X, every draw is recorded in ``artifacts.tsv``). Each is
applied where it happens physically (:func:`qcflow.data.synth.scan.synthesize_scan`): contrast
(:func:`contrast_means`) and misregistration (:func:`misregister`) before synthesis/sampling,
bias and a missing side (:func:`cut_side`) on the object, then motion → ghosting → spike
(TorchIO, deterministic transforms fed with the recorded parameters, :func:`apply_torchio`) →
wrap-around (fold onto a reduced phase-encode field of view, :func:`wrap_around`) → noise and
resolution loss in k-space (:func:`qcflow.data.synth.acquisition.kspace_acquire`). Labels
describe the anatomy: they follow misregistration (it is a pose), are cropped with a
wrap-around's reduced field of view, and ignore motion, a missing side or contrast (the tissue
is still there).

Why not :mod:`qcflow.kspace`: the dataset is a fixed benchmark (its hash names its folder), and
none of its kinds is the training simulator's model. Bias and noise here are properties of every
scan (cohort strength, SNR in the brain), wrap-around folds the object onto a smaller grid (the
kspace kind masks k-space lines on the same grid), blur is fused with the k-space noise, and
motion/spike are TorchIO's models, so a test scan is not a sample of what the methods train on.
:data:`UNSIMULATED_KINDS` are never simulated by :mod:`qcflow.kspace` at all: the test of
generalisation to unseen artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qcflow.data.synth.anatomy import rotation
from qcflow.kspace import KINDS, OPT_IN_KINDS

if TYPE_CHECKING:
    from qcflow.data.synth.acquisition import Cohort

__all__ = [
    "ARTIFACT_KINDS",
    "UNSIMULATED_KINDS",
    "TORCHIO_KINDS",
    "SEVERITY_RANGES",
    "sample_artifact",
    "contrast_means",
    "misregister",
    "cut_side",
    "apply_torchio",
    "wrap_around",
    "extent",
    "fold",
]

#: every kind of the embedded dataset, in the order ``test_artifact`` lists them (the order
#: fixes subject numbers and the train corruption draw, so it is part of the dataset)
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

#: the embedded kinds that the paper setting never trains on: not in :data:`qcflow.kspace.KINDS`,
#: or opt-in there (:data:`qcflow.kspace.OPT_IN_KINDS`, enabled only by configs that ask, e.g.
#: ``augment=contrastive_full``) -- ``ghosting``, ``missing_side``, ``misregistration``,
#: ``t2_contrast``
UNSIMULATED_KINDS: tuple[str, ...] = tuple(
    k for k in ARTIFACT_KINDS if k not in KINDS or k in OPT_IN_KINDS
)
#: the kinds applied by TorchIO's deterministic transforms (:func:`apply_torchio`)
TORCHIO_KINDS: tuple[str, ...] = ("motion", "ghosting", "spike")

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


Draw = Callable[[float, int, np.random.Generator, "Cohort"], dict[str, Any]]


def _noise(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {"snr_db": value}


def _motion(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    n = int(rng.integers(1, 3)) + severity  # 2..5 movements
    deg = rng.uniform(-1.0, 1.0, size=(n, 3))
    deg *= value / np.abs(deg).max()
    trans = rng.uniform(-1.0, 1.0, size=(n, 3)) * value * 0.8  # mm
    times = np.sort(rng.uniform(0.15, 0.9, size=n))
    return {
        "degrees": deg.round(4).tolist(),
        "translation": trans.round(4).tolist(),
        "times": times.round(4).tolist(),
    }


def _spike(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    n = int(rng.integers(1, 4))
    # positions in [0, 1) of the (shifted) spectrum, away from the very centre
    pos = 0.5 + rng.choice([-1.0, 1.0], size=(n, 3)) * rng.uniform(0.03, 0.35, size=(n, 3))
    return {"intensity": value, "positions": pos.round(4).tolist()}


def _blur(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {"ratio": value, "axes": [0, 1, 2]}


def _ghosting(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {
        "intensity": value,
        "num_ghosts": int(rng.integers(2, 7)),
        "axis": cohort.pe_axis,
        "restore": 0.02,
    }


def _bias(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {"ratio": value}


def _wrap(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {"overlap": value, "axis": cohort.pe_axis, "shift": float(rng.uniform(-0.3, 0.3))}


def _missing_side(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {
        "fraction": value,
        "axis": 0,
        "side": str(rng.choice(["left", "right"])),
        "residual": float(rng.uniform(0.0, 0.05)),
        "edge_mm": float(rng.uniform(2.0, 6.0)),
    }


def _misregistration(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    axis = int(rng.integers(0, 3))
    return {
        "degrees": value * float(rng.choice([-1.0, 1.0])),
        "axis": axis,
        "translation_mm": rng.uniform(-8.0, 8.0, size=3).round(3).tolist(),
    }


def _t2_contrast(value: float, severity: int, rng: np.random.Generator, cohort: Cohort) -> dict:
    return {"gm_wm_ratio": value, "csf_gm_ratio": float(rng.uniform(1.4, 1.9))}


#: kind -> its parameter draw, given the drawn ``severity_value``
_DRAWS: dict[str, Draw] = {
    "noise": _noise,
    "motion": _motion,
    "spike": _spike,
    "blur": _blur,
    "ghosting": _ghosting,
    "bias": _bias,
    "wrap": _wrap,
    "missing_side": _missing_side,
    "misregistration": _misregistration,
    "t2_contrast": _t2_contrast,
}


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
        JSON-serialisable parameters; ``"value"`` is the ``severity_value``, drawn uniformly
        from ``SEVERITY_RANGES[kind][severity]``.
    """
    if kind not in SEVERITY_RANGES:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {ARTIFACT_KINDS}")
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity}")
    lo, hi = SEVERITY_RANGES[kind][severity]
    value = float(rng.uniform(lo, hi))
    return {"value": value, **_DRAWS[kind](value, severity, rng, cohort)}


def contrast_means(art: dict[str, Any]) -> dict[str, float]:
    """``t2_contrast``: brain tissue means of a T2-like contrast (CSF > GM > WM, WM = 0.45)."""
    wm = 0.45
    gm = wm * art["gm_wm_ratio"]
    return {"gm": gm, "wm": wm, "csf": gm * art["csf_gm_ratio"]}


def misregister(
    mat: np.ndarray, trans: np.ndarray, art: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """``misregistration``: an extra rotation about one axis and a shift of the subject pose."""
    angles = [0.0, 0.0, 0.0]
    angles[art["axis"]] = art["degrees"]
    return rotation(angles) @ mat, trans + np.asarray(art["translation_mm"])


def cut_side(
    image: torch.Tensor, brain: torch.Tensor, grow: int, spacing: float, art: dict[str, Any]
) -> None:
    """``missing_side``: attenuate a fraction of the head along one axis, in place.

    A sigmoid edge (``edge_mm`` wide) down to ``residual`` of the signal, over ``fraction`` of
    the head's extent (the brain grown by ``grow`` voxels) from the left (low R index) or right.
    """
    axis = art["axis"]
    shape = image.shape
    lo, hi = extent(brain, axis, grow)
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


def _torchio_image(image: torch.Tensor, affine: np.ndarray) -> Any:
    import torchio as tio

    return tio.ScalarImage(tensor=image[None].float(), affine=affine)


def apply_torchio(kind: str, p: dict[str, Any], image: torch.Tensor, affine: np.ndarray):
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


def wrap_around(
    image: torch.Tensor,
    labels: dict[str, torch.Tensor],
    affine: np.ndarray,
    brain: torch.Tensor,
    grow: int,
    art: dict[str, Any],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], np.ndarray]:
    """``wrap``: fold the object onto a phase-encode field of view smaller than the head.

    The field of view keeps ``1 - overlap`` of the head's extent along ``axis`` (at least 8
    voxels), centred on the head and moved by ``shift``; everything outside folds back into it
    (:func:`fold`). The labels are cropped to the new field of view and the affine moved with
    it; ``art["fov_voxels"]`` records ``[before, after]``.
    """
    axis = art["axis"]
    shape = tuple(image.shape)
    lo, hi = extent(brain, axis, grow)
    span = hi - lo + 1
    size = int(round(span * (1.0 - art["overlap"])))
    size = max(8, min(size, shape[axis] - 1))
    mid = (lo + hi) / 2.0 + art["shift"] * (span - size) / 2.0
    start = int(round(mid - size / 2.0))
    start = min(max(start, 0), shape[axis] - size)
    image = fold(image, axis, start, size)
    labels = {k: _crop(v, axis, start, size) for k, v in labels.items()}
    affine = affine.copy()
    affine[:3, 3] += affine[:3, axis] * start
    art["fov_voxels"] = [shape[axis], size]
    return image, labels, affine


def extent(mask: torch.Tensor, axis: int, grow: int = 0) -> tuple[int, int]:
    """First and last index along ``axis`` where ``mask`` (3D bool) has a voxel, grown by
    ``grow`` voxels on both sides and clipped to the grid."""
    dims = tuple(d for d in range(3) if d != axis)
    idx = torch.nonzero(mask.sum(dims) > 0)
    if idx.numel() == 0:
        return 0, mask.shape[axis] - 1
    return max(0, int(idx.min()) - grow), min(mask.shape[axis] - 1, int(idx.max()) + grow)


def fold(array: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
    """Wrap-around: fold everything outside ``[start, start + size)`` along ``axis`` into it."""
    n = array.shape[axis]
    target = torch.remainder(torch.arange(n) - start, size)
    out_shape = list(array.shape)
    out_shape[axis] = size
    out = torch.zeros(out_shape, dtype=array.dtype)
    return out.index_add_(axis, target, array)


def _crop(array: torch.Tensor, axis: int, start: int, size: int) -> torch.Tensor:
    return array.narrow(axis, start, size).contiguous()
