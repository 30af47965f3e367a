"""The batched accelerator path: corrupt a batch after it reaches the device.

Lightning calls ``LightningModule.on_after_batch_transfer(batch, dataloader_idx)`` once the batch
is on the module's device; corrupting there runs the FFTs and the resampling on the GPU for the
whole batch (``strategy='dense'``) instead of in the DataLoader workers. Which path a run uses is
config: ``augment.device: loader`` (the data module applies the sampler per volume) or
``augment.device: batch`` (this module). The module knows nothing of files or Hydra; it only
needs the sampler.

Usage::

    class MyModule(KSpaceAugmentMixin, pl.LightningModule):
        def __init__(self, augment: RandomArtifacts | None):
            super().__init__()
            self.kspace_augment = batch_augment_from_sampler(augment)  # None unless 'batch'

The mixin corrupts training batches only (validation and test see clean data) and stores the
records in the batch under ``record_key`` (for dict batches) or in ``kspace_augment.last_records``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from qcflow.kspace.pipeline import apply_artifacts
from qcflow.kspace.sampler import RandomArtifacts

__all__ = ["KSpaceAugmentBatch", "KSpaceAugmentMixin", "batch_augment_from_sampler"]


class KSpaceAugmentBatch:
    """Corrupt the image tensor of a batch with a :class:`RandomArtifacts` sampler.

    Args:
        sampler: draws each sample's parameters (on the CPU; the noise is drawn on the device).
        key: where the image tensor ``(B, C, D, H, W)`` is: a dict key, a tuple/list index, or
            ``None`` when the batch *is* the tensor.
        record_key: dict key that receives the list of ``B`` records (dict batches only).
        spacing: voxel size (mm); default the sampler's.

    Attributes:
        last_records: the records of the most recent call.
    """

    def __init__(
        self,
        sampler: RandomArtifacts,
        key: str | int | None = "image",
        record_key: str | None = "artifacts",
        spacing: Sequence[float] | None = None,
    ) -> None:
        self.sampler = sampler
        self.key = key
        self.record_key = record_key
        self.spacing = tuple(sampler.spacing if spacing is None else spacing)
        self.last_records: list[dict[str, Any]] = []

    def corrupt(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[dict[str, Any]]]:
        """Corrupt ``x`` ``(B, C, D, H, W)``; returns the new tensor and the ``B`` records."""
        if x.ndim != 5:
            raise ValueError(f"the batch path needs (B, C, D, H, W) volumes, got {tuple(x.shape)}")
        params = self.sampler.sample_batch(x.shape[0], generator)
        y = apply_artifacts(
            x,
            params,
            spacing=self.spacing,
            pad_to_smooth=self.sampler.pad_to_smooth,
            rescale=self.sampler.rescale,
            strategy=self.sampler.strategy,
        ).to(x.dtype)
        return y, [p.to_record() for p in params]

    def __call__(self, batch: Any, generator: torch.Generator | None = None) -> Any:
        """Return ``batch`` with its images corrupted (same container type)."""
        if self.key is None:
            y, records = self.corrupt(batch, generator)
            self.last_records = records
            return y
        if isinstance(batch, Mapping):
            y, records = self.corrupt(batch[self.key], generator)
            out = dict(batch)
            out[self.key] = y
            if self.record_key:
                out[self.record_key] = records
        elif isinstance(batch, tuple | list):
            y, records = self.corrupt(batch[self.key], generator)  # type: ignore[index]
            items = list(batch)
            items[self.key] = y  # type: ignore[index]
            out = type(batch)(items) if isinstance(batch, list) else tuple(items)
        else:
            raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")
        self.last_records = records
        return out


def batch_augment_from_sampler(
    sampler: RandomArtifacts | None, **kwargs: Any
) -> KSpaceAugmentBatch | None:
    """A :class:`KSpaceAugmentBatch` when ``sampler.device == 'batch'``, else ``None``."""
    if sampler is None or sampler.device != "batch":
        return None
    return KSpaceAugmentBatch(sampler, **kwargs)


class KSpaceAugmentMixin:
    """LightningModule mixin: corrupt training batches in ``on_after_batch_transfer``.

    Set ``self.kspace_augment`` to a :class:`KSpaceAugmentBatch` (or ``None`` to disable). Put
    the mixin before ``LightningModule`` in the bases so its hook runs.
    """

    kspace_augment: KSpaceAugmentBatch | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        aug = getattr(self, "kspace_augment", None)
        trainer = getattr(self, "_trainer", None)
        if aug is not None and trainer is not None and trainer.training:
            batch = aug(batch)
        return batch
