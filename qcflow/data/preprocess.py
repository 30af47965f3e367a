"""Preprocessing of one scan with TorchIO, and an on-disk cache of the result.

Pipeline (in this order, all TorchIO):
    ToCanonical (RAS+) -> Resample(spacing) -> RescaleIntensity to [0, 1] at robust
    percentiles (values outside are clipped) -> CropOrPad(shape), centred on the head.

Centring the crop on the head (voxels above 10 % of the scaled range) rather than on the
array centre makes cohorts with different fields of view and padding line up.

The cache key is the SHA-1 of the image file (and label/mask files) plus every preprocessing
setting, so editing a file or a setting never serves a stale volume. Entries hold only tensors
(the affine too) with their key and a SHA-256 of their content, and are read without unpickling
(:func:`qcflow.utils.bundles.load_checked`): a damaged, renamed or edited entry is recomputed, and a
crafted one cannot run code, even in a cache folder shared with other users.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio

from qcflow.data.discovery import Scan
from qcflow.data.nifti import load_nifti
from qcflow.errors import ConfigError, ScanError
from qcflow.utils.bundles import load_checked, save_checked
from qcflow.utils.io import open_regular

__all__ = [
    "PreprocessConfig",
    "resolve_shape",
    "make_transform",
    "RobustRescale",
    "preprocess_scan",
    "PreprocessCache",
    "file_digest",
]

log = logging.getLogger(__name__)

#: bump when the preprocessing code changes in a way that changes its output
PREPROCESS_VERSION = 2


def resolve_shape(
    spacing: float | tuple[float, float, float],
    fov_mm: tuple[float, float, float] | list[float],
    shape: tuple[int, int, int] | list[int] | None = None,
) -> tuple[int, int, int]:
    """Output grid shape: ``shape`` if given, else ``fov_mm / spacing`` rounded up to even sizes.

    Example:
        >>> resolve_shape(2.0, (192, 224, 192))
        (96, 112, 96)
    """
    if shape is not None:
        out = tuple(int(s) for s in shape)
    else:
        sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
        out = tuple(int(2 * np.ceil(f / s / 2)) for f, s in zip(fov_mm, sp, strict=True))
    if len(out) != 3 or min(out) < 8:
        raise ConfigError(f"data.shape must be three sizes >= 8, got {out}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class PreprocessConfig:
    """Every setting that changes a preprocessed volume (and so the cache key).

    Args:
        spacing: output voxel size in mm (one value or three).
        shape: output grid ``(D, H, W)`` in RAS order (x, y, z).
        percentiles: intensities at these percentiles map to 0 and 1 (then clipped).
        head_threshold: fraction of the scaled range above which a voxel counts as head
            for centring the crop.
    """

    spacing: float | tuple[float, float, float] = 2.0
    shape: tuple[int, int, int] = (96, 112, 96)
    percentiles: tuple[float, float] = (0.5, 99.5)
    head_threshold: float = 0.1
    version: int = field(default=PREPROCESS_VERSION)

    @classmethod
    def from_data_cfg(cls, data_cfg: Any) -> PreprocessConfig:
        """Build from the ``data`` config group (spacing, fov_mm, shape, percentiles)."""
        spacing = data_cfg.spacing
        spacing = float(spacing) if np.isscalar(spacing) else tuple(float(s) for s in spacing)
        shape = resolve_shape(spacing, tuple(data_cfg.fov_mm), data_cfg.get("shape"))
        lo, hi = (float(p) for p in data_cfg.percentiles)
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"data.percentiles must satisfy 0 <= low < high <= 100, got {lo, hi}")
        return cls(spacing=spacing, shape=shape, percentiles=(lo, hi))

    def key(self) -> str:
        """Short stable hash of the settings."""
        blob = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def make_transform(pcfg: PreprocessConfig, resample: bool = True) -> tio.Compose:
    """The TorchIO preprocessing pipeline (see module docstring).

    Args:
        pcfg: preprocessing settings.
        resample: include ``tio.Resample``; :func:`preprocess_scan` leaves it out when the
            scan already has the target voxel size (resampling would be the identity).
    """
    steps: list[tio.Transform] = [tio.ToCanonical()]
    if resample:
        steps.append(tio.Resample(pcfg.spacing))
    steps += [
        RobustRescale(pcfg.percentiles),
        _HeadMask(pcfg.head_threshold),
        tio.CropOrPad(pcfg.shape, mask_name="_head"),
    ]
    return tio.Compose(steps)


class RobustRescale(tio.IntensityTransform):
    """Map the intensities at two percentiles to 0 and 1 and clip (like ``tio.RescaleIntensity``).

    Same result as ``tio.RescaleIntensity(out_min_max=(0, 1), percentiles=...)`` (tested) at
    about half the cost: one ``np.percentile`` call and an in-place torch clamp/scale.

    Args:
        percentiles: ``(low, high)`` in [0, 100].
    """

    def __init__(self, percentiles: tuple[float, float] = (0.5, 99.5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.args_names = ["percentiles"]

    @staticmethod
    def cutoffs(data: torch.Tensor, percentiles: tuple[float, float]) -> tuple[float, float]:
        """Intensities at ``percentiles`` of ``data`` (linear interpolation, like NumPy)."""
        lo, hi = np.percentile(data.numpy().reshape(-1), percentiles)
        return float(lo), float(hi)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.float()
            lo, hi = self.cutoffs(data, self.percentiles)
            if hi > lo:
                data = (data.clamp(lo, hi) - lo) / (hi - lo)
            else:  # constant image: all zeros rather than NaN
                data = torch.zeros_like(data)
            image.set_data(data.contiguous())
        return subject


class _HeadMask(tio.Transform):
    """Adds a ``_head`` label map (image above a threshold) used to centre CropOrPad."""

    def __init__(self, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.args_names = ["threshold"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        mask = (image.data > self.threshold).to(torch.uint8)
        if not mask.any():  # nothing above threshold: centre on the array instead
            mask[..., mask.shape[-3] // 2, mask.shape[-2] // 2, mask.shape[-1] // 2] = 1
        subject.add_image(tio.LabelMap(tensor=mask, affine=image.affine), "_head")
        return subject


def _load_image(path: Path, label: bool) -> tio.Image:
    img = load_nifti(path, label=label)
    data = np.asarray(img.dataobj, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(data))[None]  # (1, X, Y, Z)
    cls = tio.LabelMap if label else tio.ScalarImage
    if label:
        tensor = (tensor > 0.5).to(torch.uint8)
    return cls(tensor=tensor, affine=img.affine)


def preprocess_scan(scan: Scan, pcfg: PreprocessConfig, with_label: bool = True) -> dict[str, Any]:
    """Load, validate and preprocess one scan.

    Returns:
        ``{"image": (1, D, H, W) float32 in [0, 1], "affine": (4, 4) float64 ndarray}`` and,
        when ``with_label`` and the scan has them, ``"label"``/``"mask"``: (1, D, H, W) uint8.

    Raises:
        ScanError: the image (or its label) is missing, corrupt or unusable.
    """
    subject = tio.Subject(image=_load_image(scan.path, label=False))
    if with_label and scan.label_path is not None:
        subject.add_image(_load_image(scan.label_path, label=True), "label")
    if with_label and scan.mask_path is not None:
        subject.add_image(_load_image(scan.mask_path, label=True), "mask")
    spacing = np.broadcast_to(np.asarray(pcfg.spacing, dtype=float), (3,))
    resample = not np.allclose(subject["image"].spacing, spacing, atol=1e-3)
    try:
        # TorchIO draws torch.rand(1) per transform call: isolated, so that whether the cache
        # was warm never changes a later model initialisation or data order
        with torch.random.fork_rng(devices=[]):
            out = make_transform(pcfg, resample=resample)(subject)
    except Exception as exc:  # TorchIO raises plain errors for e.g. mismatched label grids
        raise ScanError(scan.path, f"preprocessing failed: {exc}".splitlines()[0]) from exc
    result: dict[str, Any] = {
        "image": out["image"].data.float().contiguous(),
        "affine": np.asarray(out["image"].affine, dtype=np.float64),
    }
    for name in ("label", "mask"):
        if name in out:
            result[name] = out[name].data.to(torch.uint8).contiguous()
    return result


def file_digest(path: str | Path, *more: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-1 (hex) of a file's bytes, or of several files' bytes one after the other; only
    regular files are read, in chunks (a FIFO never blocks).

    Raises:
        OSError: not a regular file (:class:`~qcflow.utils.io.NotRegularFileError`), missing
            or unreadable.
    """
    h = hashlib.sha1()
    for file in (path, *more):
        with open_regular(file) as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


class PreprocessCache:
    """On-disk cache of :func:`preprocess_scan` results (tensor files with their key and content
    hash, written atomically, read with ``weights_only=True``).

    Args:
        root: cache folder (``data.cache_dir``); ``None`` disables caching.
        pcfg: preprocessing settings; part of every key.
    """

    def __init__(self, root: str | Path | None, pcfg: PreprocessConfig) -> None:
        self.root = Path(root) if root is not None else None
        self.pcfg = pcfg

    def key(self, scan: Scan, with_label: bool, digest: str | None = None) -> str:
        """Cache key of ``scan`` (``digest``: its file's SHA-1 when already known)."""
        parts = [self.pcfg.key(), digest or file_digest(scan.path)]
        if with_label:
            for p in (scan.label_path, scan.mask_path):
                parts.append(file_digest(p) if p is not None and Path(p).exists() else "-")
        return hashlib.sha1("|".join(parts).encode()).hexdigest()

    def load(
        self, scan: Scan, with_label: bool = True, digest: str | None = None
    ) -> dict[str, Any]:
        """Preprocessed scan from the cache, computing and storing it on a miss.

        Args:
            digest: the image file's SHA-1 when the caller already computed it.
        """
        if self.root is None:
            return preprocess_scan(scan, self.pcfg, with_label)
        try:
            key = self.key(scan, with_label, digest)
        except OSError:  # missing, a FIFO, a device...: the reader names the reason
            return preprocess_scan(scan, self.pcfg, with_label)
        path = self.root / key[:2] / f"{key}.pt"
        stored = load_checked(path, key)  # a damaged or altered entry is a miss
        if isinstance(stored, dict) and isinstance(stored.get("affine"), torch.Tensor):
            return {**stored, "affine": stored["affine"].numpy()}
        result = preprocess_scan(scan, self.pcfg, with_label)
        try:
            save_checked(path, key, {**result, "affine": torch.from_numpy(result["affine"])})
        except OSError as exc:  # a full or read-only cache never stops the scan
            log.warning("%s: cache entry not written (%s)", path, exc.strerror or exc)
        return result
