"""Paired patches for method B: a corrupted patch and the clean patch at the same place.

Shaw et al. (MELBA 2021) corrupt ~50 % of the training images with simulated k-space artifacts;
their teachers and student compare a corrupted patch with the frozen task network's output on
the same patch *before* the corruption. k-space artifacts act on the whole volume, so the volume
is corrupted first (``augment.device: loader``) and the queue then samples the corrupted and the
clean copy at one location, with one intensity scaling.
"""

from __future__ import annotations

from typing import Any

import torch
import torchio as tio

from qcflow.data.datamodule import PatchDataModule, patch_collate

__all__ = ["RECORD_KEY", "KeepClean", "paired_collate", "PairedPatchDataModule"]

#: Subject key of the applied artifact records (JSON, see ``records_from_subject``)
RECORD_KEY = "artifacts"


class KeepClean(tio.Transform):
    """Copy ``image`` to ``image_clean`` (before the corruption) so patches come in pairs."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        clean = tio.ScalarImage(tensor=image.data.clone(), affine=image.affine)
        subject.add_image(clean, "image_clean")
        return subject


def paired_collate(batch: list[tio.Subject]) -> dict[str, Any]:
    """:func:`~qcflow.data.datamodule.patch_collate` plus ``image_clean`` ``(B, 1, p, p, p)``
    and ``artifact_kinds`` (per sample, the kinds applied to ``image``; ``[]`` when clean)."""
    from qcflow.kspace.torchio_adapter import records_from_subject

    out = patch_collate(batch)
    if "image_clean" in batch[0]:
        out["image_clean"] = torch.stack([s["image_clean"].data for s in batch])
    else:  # clean training / validation: the image is its own clean version
        out["image_clean"] = out["image"]
    out["artifact_kinds"] = [
        list(records_from_subject(s, RECORD_KEY)["image"]["kinds"]) if RECORD_KEY in s else []
        for s in batch
    ]
    return out


class PairedPatchDataModule(PatchDataModule):
    """Patches of a corrupted volume with the matching clean patch (``image_clean``).

    Validation patches are clean (``image_clean == image``).

    Args:
        data_cfg: the ``data`` config group.
        sampler: a :class:`~qcflow.kspace.RandomArtifacts`, or ``None`` for clean training.
    """

    def __init__(self, data_cfg: Any, sampler: Any | None = None) -> None:
        transform = None
        if sampler is not None:
            from qcflow.kspace.torchio_adapter import RandomKSpaceArtifacts

            transform = tio.Compose(
                [
                    KeepClean(),
                    RandomKSpaceArtifacts(sampler, record_key=RECORD_KEY, include=["image"]),
                ]
            )
        super().__init__(data_cfg, with_label=True, transform=transform)

    def _collate(self, batch: list[tio.Subject]) -> dict[str, Any]:
        return paired_collate(batch)
