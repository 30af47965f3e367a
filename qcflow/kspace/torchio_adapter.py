"""TorchIO transforms around the fused pipeline (so it composes with TorchIO pipelines).

* :class:`KSpaceArtifacts` -- deterministic, takes explicit records (like TorchIO's ``Motion``);
* :class:`RandomKSpaceArtifacts` -- draws records with a
  :class:`~qcflow.kspace.sampler.RandomArtifacts` and applies them through
  :class:`KSpaceArtifacts` (like TorchIO's ``RandomMotion``).

Because the random transform delegates to the deterministic one, the Subject's history holds a
``KSpaceArtifacts`` with the exact records: ``subject.get_composed_history()`` replays the
corruption bit-for-bit, and ``subject.history`` lists it. The records are also written into the
Subject as one JSON string under ``record_key`` (a string collates cleanly in a DataLoader),
mapping each image name to its record; :func:`records_from_subject` reads them back.

TorchIO image tensors are ``(C, W, H, D)`` in TorchIO's naming -- array axes 0, 1, 2 -- which is
what qcflow calls ``(C, D, H, W)``; ``image.spacing`` is in the same axis order.

The module is named ``torchio_adapter`` rather than ``torchio`` so that it can never shadow the
``torchio`` package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform

from qcflow.kspace.params import ArtifactParams
from qcflow.kspace.pipeline import apply_artifacts
from qcflow.kspace.sampler import RandomArtifacts

__all__ = ["KSpaceArtifacts", "RandomKSpaceArtifacts", "records_from_subject"]


def _is_record(obj: Mapping[str, Any]) -> bool:
    return "kinds" in obj or "params" in obj


class KSpaceArtifacts(IntensityTransform):
    """Apply explicit k-space artifacts to every scalar image of a Subject.

    Args:
        params: one record (``ArtifactParams.to_record()``, applied to every image) or a
            mapping from image name to record.
        rescale: min-max rescale each channel to ``[0, 1]`` (as the fused pipeline does).
        pad_to_smooth: pad FFT axes to 2/3/5-smooth lengths.
        record_key: Subject key that receives the applied records as a JSON string
            (``None``: do not write it).
        **kwargs: TorchIO ``Transform`` arguments (``include``, ``exclude``, ``copy``, ...).
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        rescale: bool = True,
        pad_to_smooth: bool = True,
        record_key: str | None = "artifacts",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.rescale = rescale
        self.pad_to_smooth = pad_to_smooth
        self.record_key = record_key
        self.args_names = ["params", "rescale", "pad_to_smooth", "record_key"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        records: dict[str, Any] = {}
        for name, image in self.get_images_dict(subject).items():
            record = self.params if _is_record(self.params) else self.params[name]
            params = ArtifactParams.from_record(record)
            data = apply_artifacts(
                image.data,
                params,
                spacing=tuple(float(s) for s in image.spacing),
                pad_to_smooth=self.pad_to_smooth,
                rescale=self.rescale,
            )
            image.set_data(data)
            records[name] = params.to_record()
        if self.record_key:
            subject[self.record_key] = json.dumps(records)
            subject.update_attributes()
        return subject


class RandomKSpaceArtifacts(RandomTransform, IntensityTransform):
    """Random k-space artifacts for TorchIO pipelines (TorchIO's Random/deterministic pattern).

    Each scalar image gets its own draw. The draw is seeded from torch's global RNG, so
    ``torch.manual_seed`` reproduces it, as for TorchIO's own random transforms. Leave TorchIO's
    ``p`` at 1 and use the sampler's ``rate``: a clean draw is still recorded (``kinds: []``).

    Args:
        sampler: the :class:`RandomArtifacts` (default: :meth:`RandomArtifacts.paper`).
        record_key: Subject key for the JSON records (``None``: not written).
        **kwargs: TorchIO ``Transform`` arguments.

    Example:
        >>> import torchio as tio
        >>> aug = RandomKSpaceArtifacts(RandomArtifacts(rate=1.0, noise=True))
        >>> pipeline = tio.Compose([tio.RescaleIntensity((0, 1)), aug])
    """

    def __init__(
        self,
        sampler: RandomArtifacts | None = None,
        record_key: str | None = "artifacts",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sampler = RandomArtifacts.paper() if sampler is None else sampler
        self.record_key = record_key

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        images = self.get_images_dict(subject)
        if not images:
            return subject
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))[0]))
        records = {name: self.sampler.sample(g).to_record() for name in images}
        transform = KSpaceArtifacts(
            records,
            rescale=self.sampler.rescale,
            pad_to_smooth=self.sampler.pad_to_smooth,
            record_key=self.record_key,
            **self._get_base_args(),
        )
        transformed = transform(subject)
        assert isinstance(transformed, tio.Subject)
        return transformed


def records_from_subject(
    subject: Mapping[str, Any], record_key: str = "artifacts"
) -> dict[str, Any]:
    """The records a k-space transform wrote into ``subject`` (image name -> record)."""
    value = subject[record_key]
    return json.loads(value) if isinstance(value, str) else dict(value)
