"""LightningDataModules: discovery -> validation -> subject-level split -> datasets.

* :class:`VolumeDataModule`: whole preprocessed volumes (embedding, scoring, evaluation);
* :class:`SliceDataModule`: 2-D slices in three orientations (method A's encoder);
* :class:`PatchDataModule`: 3-D patches from a ``tio.Queue`` (method B's U-Nets).

Scans that fail to load are reported once (file and reason) and skipped; ``setup`` raises
only when no usable scan is left. The train/val split is by subject (all sessions of a
subject land on the same side) and depends only on ``seed``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler

from qcflow.data.datasets import PatchSubjectsDataset, SliceDataset, VolumeDataset
from qcflow.data.discovery import Scan, discover_scans, resolve_data_root
from qcflow.data.preprocess import PreprocessCache, PreprocessConfig
from qcflow.errors import QCFlowError, ScanError

__all__ = [
    "split_by_subject",
    "ScanDataModule",
    "VolumeDataModule",
    "SliceDataModule",
    "PatchDataModule",
    "collate",
    "patch_collate",
]

log = logging.getLogger(__name__)


def split_by_subject(
    scans: Sequence[Scan], val_fraction: float, seed: int
) -> tuple[list[Scan], list[Scan]]:
    """Deterministic subject-level split into (train, val).

    At least one subject goes to validation when ``val_fraction > 0`` and there are two or
    more subjects; the order of ``scans`` does not matter.
    """
    if not 0 <= val_fraction < 1:
        raise QCFlowError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    subjects = sorted({s.subject or s.scan_id for s in scans})
    random.Random(seed).shuffle(subjects)
    n_val = round(len(subjects) * val_fraction)
    if val_fraction > 0 and len(subjects) >= 2:
        n_val = min(max(n_val, 1), len(subjects) - 1)
    val_subjects = set(subjects[:n_val])
    train = [s for s in scans if (s.subject or s.scan_id) not in val_subjects]
    val = [s for s in scans if (s.subject or s.scan_id) in val_subjects]
    return train, val


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep strings/ints as lists/tensors (default_collate semantics)."""
    return torch.utils.data.default_collate(batch)


class ScanDataModule(pl.LightningDataModule):
    """Base: finds scans, preprocesses them once (filling the cache), splits by subject.

    Args:
        root: BIDS dataset, folder, glob or file; ``None`` uses the embedded dataset.
        data_cfg: the ``data`` config group (any mapping with its keys); explicit keyword
            arguments below override it.
        with_label: load ``label``/``mask`` too (segmentation tasks).
        scans: use these scans instead of discovering them.
    """

    def __init__(
        self,
        data_cfg: Any,
        with_label: bool = False,
        scans: Sequence[Scan] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = data_cfg
        self.with_label = with_label
        self.pcfg = PreprocessConfig.from_data_cfg(data_cfg)
        cache_dir = data_cfg.get("cache_dir") if data_cfg.get("cache", True) else None
        self.cache = PreprocessCache(cache_dir, self.pcfg)
        self._given_scans = list(scans) if scans is not None else None
        self.scans: list[Scan] = []
        self.errors: list[tuple[Scan, str]] = []
        self.train_scans: list[Scan] = []
        self.val_scans: list[Scan] = []
        self._prepared = False

    # ------------------------------------------------------------------ discovery
    def discover(self) -> list[Scan]:
        if self._given_scans is not None:
            return list(self._given_scans)
        root = resolve_data_root(self.cfg)
        return discover_scans(root, self.cfg.get("pattern"))

    def prepare(self) -> None:
        """Discover and preprocess every scan once; bad scans are logged and skipped."""
        if self._prepared:
            return
        good, errors = [], []
        for scan in self.discover():
            try:
                self.cache.load(scan, with_label=self.with_label)
            except ScanError as exc:
                errors.append((scan, exc.reason))
                log.warning("skipping %s", exc)
                continue
            good.append(scan)
        self.scans, self.errors = good, errors
        if not good:
            raise QCFlowError(
                f"no usable scan found ({len(errors)} failed validation; first: "
                f"{errors[0][0].path}: {errors[0][1]})"
                if errors
                else "no scan found"
            )
        seed = int(self.cfg.get("seed", 0))
        self.train_scans, self.val_scans = split_by_subject(
            good, float(self.cfg.get("val_fraction", 0.2)), seed
        )
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def volumes(self, scans: Sequence[Scan]) -> VolumeDataset:
        """The preprocessed volumes of ``scans`` (e.g. ``dm.volumes(dm.scans)``: every usable
        scan), through this module's cache, with labels when the module has them."""
        return VolumeDataset(
            scans, self.cache, with_label=self.with_label, in_memory=self.cfg.get("in_memory", True)
        )

    def _loader(self, dataset: Any, shuffle: bool, **kwargs: Any) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        generator = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        return DataLoader(
            dataset,
            batch_size=int(self.cfg.get("batch_size", 8)),
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
            **kwargs,
        )


class VolumeDataModule(ScanDataModule):
    """Whole volumes. ``predict_dataloader`` covers every usable scan in a fixed order."""

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.volumes(self.train_scans), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.volumes(self.val_scans), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.volumes(self.scans), shuffle=False)


class SliceDataModule(ScanDataModule):
    """2-D slices (``data.orientations``, ``data.n_central_slices``, ``data.slice_size``)."""

    def _slices(self, scans: Sequence[Scan]) -> SliceDataset:
        return SliceDataset(
            self.volumes(scans),
            orientations=list(self.cfg.get("orientations", ["axial", "coronal", "sagittal"])),
            n_central=self.cfg.get("n_central_slices", 20),
            size=int(self.cfg.get("slice_size", 128)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._slices(self.train_scans), shuffle=True, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._slices(self.val_scans), shuffle=False)


class PatchDataModule(ScanDataModule):
    """3-D patches sampled uniformly by a ``tio.Queue`` (``data.patch_size``,
    ``data.samples_per_volume``, ``data.queue_length``).

    Args:
        transform: per-subject TorchIO transform applied before patch sampling (augmentation).
    """

    def __init__(
        self,
        data_cfg: Any,
        with_label: bool = True,
        scans: Sequence[Scan] | None = None,
        transform: tio.Transform | None = None,
    ) -> None:
        super().__init__(data_cfg, with_label=with_label, scans=scans)
        self.transform = transform

    def _queue(self, scans: Sequence[Scan], train: bool) -> tio.Queue:
        """The patch queue; under DDP each rank's queue holds only its share of the subjects.

        A ``tio.Queue`` ignores the index it is asked for, so the ``DistributedSampler``
        Lightning would put around it splits nothing: every rank (same seed) drew the same
        patches. Instead the subjects are split by a ``DistributedSampler`` (TorchIO's
        ``subject_sampler``; padded so every rank takes the same number of steps) and the
        patch loader keeps all of its rank's patches (:class:`_RankQueueSampler`).
        """
        subjects = PatchSubjectsDataset(self.volumes(scans), self.transform if train else None)
        patch = tuple(int(p) for p in self.cfg.get("patch_size", [64, 64, 64]))
        spv = int(self.cfg.get("samples_per_volume", 8))
        trainer = getattr(self, "trainer", None)  # set by Lightning when it uses the module
        subject_sampler = None
        if trainer is not None and trainer.world_size > 1:
            subject_sampler = DistributedSampler(
                subjects,
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                shuffle=train,
                seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),  # the same order on every rank
            )
        return tio.Queue(
            subjects,
            max_length=max(int(self.cfg.get("queue_length", 64)), spv),
            samples_per_volume=spv,
            sampler=tio.UniformSampler(patch),
            subject_sampler=subject_sampler,
            # the queue has its own workers; the DataLoader around it must use none
            # (docs/pitfalls.md)
            num_workers=int(self.cfg.get("num_workers", 0)),
            shuffle_subjects=train and subject_sampler is None,
            shuffle_patches=train,
            verbose=False,
        )

    def _collate(self, batch: list[tio.Subject]) -> dict[str, Any]:
        """Patches -> batch dict; subclasses add keys (see :func:`patch_collate`)."""
        return patch_collate(batch)

    def _patch_loader(self, queue: tio.Queue) -> DataLoader:
        ranked = queue.subject_sampler is not None
        return DataLoader(
            queue,
            batch_size=int(self.cfg.get("batch_size", 2)),
            sampler=_RankQueueSampler(queue) if ranked else None,
            num_workers=0,
            collate_fn=self._collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._patch_loader(self._queue(self.train_scans, train=True))

    def val_dataloader(self) -> DataLoader:
        return self._patch_loader(self._queue(self.val_scans, train=False))


class _RankQueueSampler(DistributedSampler):
    """Every patch index of one rank's queue, in order (the queue shuffles its patches).

    A ``DistributedSampler`` of one replica only so that Lightning leaves it alone (it would
    otherwise halve the rank's already split queue); ``set_epoch``, which Lightning calls every
    epoch, reaches the queue's subject sampler so the subjects are reshuffled per epoch.
    """

    def __init__(self, queue: tio.Queue) -> None:
        super().__init__(queue, num_replicas=1, rank=0, shuffle=False)
        self.subject_sampler = queue.subject_sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.subject_sampler.set_epoch(epoch)


def patch_collate(batch: list[tio.Subject]) -> dict[str, Any]:
    """Patches -> ``{"image": (B, 1, p, p, p), ["label"], "scan_id": [...], "location"}``."""
    out: dict[str, Any] = {"image": torch.stack([s["image"].data for s in batch])}
    for name in ("label", "mask"):
        if name in batch[0]:
            out[name] = torch.stack([s[name].data for s in batch])
    out["scan_id"] = [s["scan_id"] for s in batch]
    out["index"] = torch.as_tensor([int(s["index"]) for s in batch])
    if tio.LOCATION in batch[0]:
        out["location"] = torch.stack([torch.as_tensor(s[tio.LOCATION]) for s in batch])
    return out
