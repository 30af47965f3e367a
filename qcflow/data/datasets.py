"""Torch datasets over preprocessed scans: whole volumes, 2-D slices, 3-D patch subjects.

All volumes are RAS+ canonical ``(1, D, H, W)`` = ``(1, x, y, z)`` tensors in [0, 1]
(see :mod:`qcflow.data.preprocess`). Orientation names follow radiology:

* ``axial``: a slice at fixed z (plane x-y),
* ``coronal``: a slice at fixed y (plane x-z),
* ``sagittal``: a slice at fixed x (plane y-z).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
import torchio as tio
from torch.utils.data import Dataset

from qcflow.data.discovery import Scan
from qcflow.data.preprocess import PreprocessCache

__all__ = [
    "ORIENTATIONS",
    "VolumeDataset",
    "SliceDataset",
    "PatchSubjectsDataset",
    "central_indices",
    "extract_slice",
    "fit_square",
]

log = logging.getLogger(__name__)

#: orientation name -> the volume axis (of D, H, W) held fixed
ORIENTATIONS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


class VolumeDataset(Dataset):
    """Preprocessed whole volumes, one item per scan.

    Args:
        scans: the scans (already known to load; see ``ScanDataModule.prepare``).
        cache: preprocessing cache (also does the preprocessing on a miss).
        with_label: also return ``label`` / ``mask`` when the scan has them.
        in_memory: keep loaded volumes in a per-process dict (fast epochs, ~4 MB a volume at 2 mm).

    Items: ``{"image": (1, D, H, W) float32, "index": int, "scan_id": str, "site": str,
    ["label": (1, D, H, W) uint8], ["mask": ...]}``.
    """

    def __init__(
        self,
        scans: Sequence[Scan],
        cache: PreprocessCache,
        with_label: bool = False,
        in_memory: bool = True,
    ) -> None:
        self.scans = list(scans)
        self.cache = cache
        self.with_label = with_label
        self.in_memory = in_memory
        self._memory: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.scans)

    def volume(self, index: int) -> dict[str, Any]:
        """Preprocessed tensors of scan ``index`` (no metadata)."""
        if index in self._memory:
            return self._memory[index]
        out = self.cache.load(self.scans[index], with_label=self.with_label)
        if self.in_memory:
            self._memory[index] = out
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        vol = self.volume(index)
        scan = self.scans[index]
        item = {"image": vol["image"], "index": index, "scan_id": scan.scan_id}
        item["site"] = scan.site or ""
        for name in ("label", "mask"):
            if self.with_label and name in vol:
                item[name] = vol[name]
        return item


def central_indices(size: int, n: int | None) -> list[int]:
    """The ``n`` central indices of an axis of length ``size`` (all when ``n`` is None).

    Example:
        >>> central_indices(10, 4)
        [3, 4, 5, 6]
    """
    if n is None or n >= size:
        return list(range(size))
    start = (size - n) // 2
    return list(range(start, start + n))


def extract_slice(volume: torch.Tensor, orientation: str, index: int) -> torch.Tensor:
    """Slice ``(C, D, H, W)`` at ``index`` along the axis of ``orientation`` -> ``(C, h, w)``."""
    axis = ORIENTATIONS[orientation]
    return volume.select(axis + 1, index)


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``(C, h, w)`` to a centred ``size`` x ``size`` square.

    A slice larger than ``size`` is first shrunk (area interpolation, aspect ratio kept) so
    that no anatomy is cropped away.
    """
    c, h, w = image.shape
    if max(h, w) > size:
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        image = F.interpolate(image[None], size=(nh, nw), mode="area")[0]
        h, w = nh, nw
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(image, (left, size - w - left, top, size - h - top))


class SliceDataset(Dataset):
    """2-D slices of preprocessed volumes, padded to a square.

    One item per (scan, orientation, central slice).

    Args:
        volumes: the volume dataset to slice.
        orientations: any of ``axial``, ``coronal``, ``sagittal``.
        n_central: central slices per orientation (None = all).
        size: side of the square output (``data.slice_size``).

    Items: ``{"image": (1, size, size) float32, "index": scan index, "scan_id": str,
    "orientation": int (position in ``orientations``), "slice": int}``.
    """

    def __init__(
        self,
        volumes: VolumeDataset,
        orientations: Sequence[str] = ("axial", "coronal", "sagittal"),
        n_central: int | None = 20,
        size: int = 128,
    ) -> None:
        unknown = set(orientations) - set(ORIENTATIONS)
        if unknown:
            raise ValueError(f"unknown orientations {sorted(unknown)}; use {list(ORIENTATIONS)}")
        self.volumes = volumes
        self.orientations = list(orientations)
        self.n_central = n_central
        self.size = int(size)
        self._items: list[tuple[int, int, int]] | None = None

    def _index(self) -> list[tuple[int, int, int]]:
        if self._items is None:
            items = []
            for i in range(len(self.volumes)):
                shape = self.volumes.volume(i)["image"].shape[1:]
                for o, name in enumerate(self.orientations):
                    for s in central_indices(shape[ORIENTATIONS[name]], self.n_central):
                        items.append((i, o, s))
            self._items = items
        return self._items

    def __len__(self) -> int:
        return len(self._index())

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i, o, s = self._index()[idx]
        vol = self.volumes.volume(i)["image"]  # (1, D, H, W)
        img = fit_square(extract_slice(vol, self.orientations[o], s), self.size)
        scan = self.volumes.scans[i]
        return {"image": img, "index": i, "scan_id": scan.scan_id, "orientation": o, "slice": s}


class PatchSubjectsDataset(tio.SubjectsDataset):
    """TorchIO subjects built lazily from the preprocessing cache, for a ``tio.Queue``.

    Each subject has ``image`` (ScalarImage) and, when present, ``label``/``mask`` (LabelMap),
    plus ``scan_id`` and ``index``. ``transform`` (e.g. k-space augmentation) runs per subject.
    """

    def __init__(self, volumes: VolumeDataset, transform: tio.Transform | None = None) -> None:
        # not SubjectsDataset.__init__: it rejects an empty list, and ours is lazy
        self.volumes = volumes
        self._subjects = []
        self.load_getitem = False
        self.set_transform(transform)

    def __len__(self) -> int:
        return len(self.volumes)

    def dry_iter(self) -> list[SimpleNamespace]:
        """Light stand-ins (``scan_id`` only): ``tio.Queue`` counts patches per epoch with it."""
        return [SimpleNamespace(scan_id=s.scan_id) for s in self.volumes.scans]

    def __getitem__(self, index: int) -> tio.Subject:
        vol = self.volumes.volume(index)
        scan = self.volumes.scans[index]
        images: dict[str, Any] = {
            "image": tio.ScalarImage(tensor=vol["image"], affine=vol["affine"])
        }
        for name in ("label", "mask"):
            if name in vol:
                images[name] = tio.LabelMap(tensor=vol[name], affine=vol["affine"])
        subject = tio.Subject(**images, scan_id=scan.scan_id, index=index)
        if self._transform is not None:
            subject = self._transform(subject)
        return subject
