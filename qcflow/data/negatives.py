"""Corrupted copies for method A's contrastive negatives: per slice, per volume, and a bank.

The k-space library (:mod:`qcflow.kspace`) corrupts either the query slice itself, laid out as a
one-voxel-thick volume (:func:`corrupt_slice`: the in-plane part of a rigid motion only), or the
whole 3-D volume (:func:`corrupt_volume`: full rigid motion, re-scaled like preprocessing), whose
copies a :class:`NegativeBank` keeps and reuses; :mod:`qcflow.data.contrastive` (the triplet
dataset) explains when each is used and what it costs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from qcflow.data.preprocess import RobustRescale
from qcflow.kspace import RandomArtifacts, apply_artifacts

__all__ = ["KIND_CODES", "kind_code", "corrupt_slice", "corrupt_volume", "NegativeBank"]

log = logging.getLogger(__name__)

#: codes of the corruption a negative got (for the validation scatter): 0 clean query
KIND_CODES: dict[str, int] = {"clean": 0, "noise": 1, "motion": 2, "motion+noise": 3, "other": 4}


def kind_code(kinds: Sequence[str]) -> int:
    """Record kinds -> :data:`KIND_CODES` value."""
    key = "+".join(sorted(kinds)) if kinds else "clean"
    return KIND_CODES.get(key, KIND_CODES["other"])


def corrupt_slice(
    sampler: RandomArtifacts,
    image: Tensor,
    generator: torch.Generator | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
) -> tuple[Tensor, dict[str, Any]]:
    """Corrupt one 2-D slice with a 3-D artifact sampler.

    Args:
        sampler: draws the artifact parameters (its ``rate``/``p``/ranges apply).
        image: ``(C, h, w)`` slice in [0, 1].
        generator: CPU generator for the draws.
        spacing: in-plane voxel size (mm).

    Returns:
        ``(C, h, w)`` corrupted slice clipped to [0, 1] (not min-max rescaled), and its record.
    """
    g = sampler._generator(generator)
    params = sampler.sample(g)
    if params.motion is not None:  # keep the in-plane part of the rigid motion only
        mo = params.motion
        degrees = tuple((0.0, 0.0, d[2]) for d in mo.degrees)
        translation = tuple((t[0], t[1], 0.0) for t in mo.translation)
        pe = mo.pe_axis if mo.pe_axis in (0, 1) else int(torch.randint(0, 2, (1,), generator=g))
        motion = dataclasses.replace(mo, degrees=degrees, translation=translation, pe_axis=pe)
        params = dataclasses.replace(params, motion=motion)
    vol = image.unsqueeze(-1)  # (C, h, w, 1)
    y = apply_artifacts(
        vol,
        params,
        spacing=(float(spacing[0]), float(spacing[1]), 1.0),
        pad_to_smooth=sampler.pad_to_smooth,
        rescale=False,
        strategy=sampler.strategy,
    )
    # no per-slice min-max rescale: the clean query keeps its volume-level [0, 1] scale, so a
    # rescale would hand the encoder a trivial brightness cue; clip like preprocessing does
    return y[..., 0].clamp(0.0, 1.0), params.to_record()


def corrupt_volume(
    sampler: RandomArtifacts,
    volume: Tensor,
    generator: torch.Generator | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    percentiles: Sequence[float] | None = (0.5, 99.5),
) -> tuple[Tensor, dict[str, Any]]:
    """Corrupt a whole preprocessed volume in 3-D, as the scanner would have.

    Args:
        sampler: draws the artifact parameters (its ``rate``/``p``/ranges apply).
        volume: ``(C, D, H, W)`` preprocessed volume in [0, 1].
        generator: CPU generator for the draws.
        spacing: voxel size (mm), for motion translations.
        percentiles: re-scale the corrupted magnitude image so that these percentiles map to
            0 and 1 and clip -- what preprocessing does to every scan, corrupted or not
            (``data.percentiles``); ``None``: clip to [0, 1] only.

    Returns:
        ``(C, D, H, W)`` corrupted volume in [0, 1] and its record.
    """
    params = sampler.sample(sampler._generator(generator))
    y = apply_artifacts(
        volume,
        params,
        spacing=tuple(float(v) for v in spacing),
        pad_to_smooth=sampler.pad_to_smooth,
        rescale=False,
        strategy=sampler.strategy,
    )
    if percentiles is not None:
        lo, hi = RobustRescale.cutoffs(y, (float(percentiles[0]), float(percentiles[1])))
        y = (y.clamp(lo, hi) - lo) / (hi - lo) if hi > lo else torch.zeros_like(y)
    return y.clamp(0.0, 1.0), params.to_record()


class NegativeBank:
    """Per-volume bank of 3-D-corrupted copies, kept as their central axial slab.

    Entry ``(volume, slot)`` is drawn on first use and redrawn after ``reuse`` uses (never, when
    ``reuse`` is ``None``: validation). A redrawn entry is seeded from the caller's generator,
    so a seeded caller (``torch.manual_seed`` in training, ``(seed, item)`` in validation)
    reproduces the bank.

    Args:
        sampler: the artifact sampler.
        size: copies per volume (slots).
        reuse: uses of a copy before it is redrawn (``None``: never redrawn).
        spacing: voxel size (mm).
        percentiles: re-scaling after corruption (see :func:`corrupt_volume`).
        fixed_seed: when set, slot ``(i, j)`` is always drawn from seed
            ``(fixed_seed, i, j)`` (validation: the same negatives every epoch).
    """

    def __init__(
        self,
        sampler: RandomArtifacts,
        size: int = 4,
        reuse: int | None = 16,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        percentiles: Sequence[float] | None = (0.5, 99.5),
        fixed_seed: int | None = None,
    ) -> None:
        if size < 1 or (reuse is not None and reuse < 1):
            raise ValueError(f"bank size and reuse must be >= 1, got {size}, {reuse}")
        self.sampler = sampler
        self.size = int(size)
        self.reuse = None if reuse is None else int(reuse)
        self.spacing = tuple(float(v) for v in spacing)
        self.percentiles = percentiles
        self.fixed_seed = fixed_seed
        # (volume, slot) -> [slab (C, D, H, n), slice indices, kind code, uses, seed]
        self._store: dict[tuple[int, int], list[Any]] = {}
        # (volume, slot) -> (seed, uses) of copies restored by load_state_dict, recomputed on use
        self._restored: dict[tuple[int, int], tuple[int, int]] = {}
        self.drawn = 0  # corrupted volumes computed so far (for tests and logs)

    def clear(self) -> None:
        """Drop every banked copy: later uses redraw them (from the current ``sampler``)."""
        self._store.clear()
        self._restored.clear()

    def state_dict(self) -> dict[str, Any]:
        """The bank as ``(volume, slot, seed, uses)`` rows: a copy is a pure function of its
        seed, the volume and the sampler, so this is all a resumed fit needs to continue with
        the same negatives (:class:`~qcflow.lit.resume.ResumeState`)."""
        rows = [[i, j, int(e[4]), int(e[3])] for (i, j), e in self._store.items()]
        rows += [[i, j, seed, uses] for (i, j), (seed, uses) in self._restored.items()]
        return {"entries": sorted(rows), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: each copy is recomputed from its seed when next used,
        with its use count, without drawing from the caller's generator (as the uninterrupted
        bank would have reused it)."""
        self._store.clear()
        self._restored = {(int(i), int(j)): (int(seed), int(uses))
                          for i, j, seed, uses in state.get("entries", [])}  # fmt: skip
        self.drawn = int(state.get("drawn", 0))

    def get(
        self, i: int, slot: int, volume: Tensor, indices: Sequence[int], g: torch.Generator
    ) -> tuple[Tensor, list[int], int]:
        """Slab ``(C, D, H, n)`` of the central axial slices ``indices`` of copy ``slot``."""
        entry = self._store.get((i, slot))
        if entry is None and (i, slot) in self._restored:
            seed, uses = self._restored.pop((i, slot))
            if self.reuse is None or uses < self.reuse:  # else: redrawn below, as it would be
                entry = self._compute(i, slot, volume, indices, seed)
                entry[3] = uses
        if entry is None or (self.reuse is not None and entry[3] >= self.reuse):
            if self.fixed_seed is not None:
                seed = (self.fixed_seed * 1_000_003 + i) * 1_009 + slot
            else:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            entry = self._compute(i, slot, volume, indices, seed)
            self.drawn += 1
        entry[3] += 1
        return entry[0], entry[1], entry[2]

    def _compute(
        self, i: int, slot: int, volume: Tensor, indices: Sequence[int], seed: int
    ) -> list[Any]:
        gen = torch.Generator().manual_seed(seed)
        y, record = corrupt_volume(self.sampler, volume, gen, self.spacing, self.percentiles)
        slab = y[..., list(indices)].contiguous()  # keep the query slab only
        entry = [slab, list(indices), kind_code(record.get("kinds", [])), 0, seed]
        self._store[(i, slot)] = entry
        return entry
