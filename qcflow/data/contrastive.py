"""Contrastive slice triplets for the artifact encoder (Zuo et al. 2023, method A).

One item per (volume, query draw)::

    query     x*   an axial central slice                                   (1, S, S)
    positive  x+   a central slice of *another orientation of the same volume*
                   (coronal or sagittal): same artifact level, other anatomy  (1, S, S)
    corrupted      K copies of x* corrupted by the k-space library         (K, 1, S, S)
    index          the volume's index (negatives = every slice of *other* volumes in the
                   batch, gathered across ranks by the LightningModule)

Two ways to make the corrupted copies (``negatives_3d``):

* **per slice** (``False``): the sampler (``conf/augment/paper_contrastive.yaml``: noise and/or
  motion) draws explicit parameters and :func:`qcflow.kspace.apply_artifacts` applies them to
  the slice laid out as a one-voxel-thick volume ``(1, h, w, 1)``. A slice has no neighbours to
  move in from, so the out-of-plane parts of a rigid motion (rotations about the two in-plane
  axes, translation through the plane) are dropped and a phase-encode axis through the plane is
  redrawn in-plane (:func:`corrupt_slice`). ~10 ms per copy.
* **per volume** (``True``): the whole 3-D volume is corrupted (:func:`corrupt_volume`: full
  rigid motion with any phase-encode axis, 3-D noise/blur/spike/wrap/bias), re-scaled to [0, 1]
  by the same percentiles preprocessing applies to every scan, and the copy is then sliced at
  the query's position -- so a negative carries through-plane motion like a real motion-corrupted
  scan. A 3-D motion costs ~0.06-0.2 s at 2 mm on one CPU thread, so the corrupted volumes go to
  a small per-volume bank (:class:`NegativeBank`, ``bank_size`` copies per volume, each reused
  ``bank_reuse`` times by queries of different slices before it is redrawn): with the defaults
  (4 copies, 16 uses; 8 queries x 2 copies per volume per epoch) about one fresh 3-D corruption
  per volume per epoch after the first. Only the central axial slab (the slices queries come
  from) is kept: ~0.9 MB per copy at 2 mm.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qcflow.data.datamodule import ScanDataModule
from qcflow.data.datasets import (
    ORIENTATIONS,
    VolumeDataset,
    central_indices,
    extract_slice,
    fit_square,
)
from qcflow.data.negatives import (
    KIND_CODES,
    NegativeBank,
    corrupt_slice,
    corrupt_volume,
    kind_code,
)
from qcflow.kspace import RandomArtifacts

__all__ = [
    "corrupt_slice",
    "corrupt_volume",
    "NegativeBank",
    "axial_stack",
    "log_range",
    "zoom_slice",
    "ContrastiveSliceDataset",
    "ContrastiveDataModule",
    "KIND_CODES",
    "kind_code",
]

log = logging.getLogger(__name__)


def axial_stack(volume: Tensor, n_central: int | None, size: int) -> Tensor:
    """The ``n_central`` central axial slices of ``(1, D, H, W)`` -> ``(n, 1, size, size)``."""
    axis = ORIENTATIONS["axial"]
    idx = central_indices(volume.shape[axis + 1], n_central)
    return torch.stack([fit_square(extract_slice(volume, "axial", i), size) for i in idx])


def log_range(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    """A ``(lo, hi)`` range of positive factors (``None`` stays ``None``); ``ValueError``
    naming ``name`` otherwise."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be [lo, hi] or null, got {value!r}") from None
    if not 0.0 < lo <= hi:
        raise ValueError(f"{name} must be a range 0 < lo <= hi, got {list(value)}")
    return lo, hi


def _log_uniform(bounds: tuple[float, float], g: torch.Generator) -> float:
    """One draw, log-uniform in ``bounds``."""
    lo, hi = (math.log(b) for b in bounds)
    return math.exp(lo + (hi - lo) * float(torch.rand((), generator=g)))


def zoom_slice(x: Tensor, factor: float) -> Tensor:
    """``(C, H, W)`` scaled by ``factor`` about its centre, same shape (bilinear, zeros
    outside): content ``factor`` times larger."""
    theta = torch.tensor([[1.0 / factor, 0.0, 0.0], [0.0, 1.0 / factor, 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", align_corners=False)[0]


class ContrastiveSliceDataset(Dataset):
    """Query/positive/corrupted-copies items over a :class:`VolumeDataset`.

    Args:
        volumes: preprocessed volumes.
        size: square slice side (``data.slice_size``).
        n_central: central slices per orientation that queries and positives come from.
        queries_per_volume: items per volume per epoch (each draws its own axial slice).
        corrupt: sampler for the corrupted copies (``None``: no corrupted negatives).
        n_corrupt: corrupted copies of each query (K).
        positive_orientations: orientations a positive may come from (not the query's).
        deterministic: draw slice indices and corruptions from a generator seeded by
            ``(seed, item)`` (validation) instead of the global RNG (training).
        seed: seed for ``deterministic``.
        spacing: voxel size (mm) for motion translations.
        negatives_3d: corrupt the whole volume and slice it (see the module docstring) instead
            of corrupting the 2-D query slice.
        bank_size: 3-D-corrupted copies kept per volume (``negatives_3d``).
        bank_reuse: uses of a copy before it is redrawn (training; validation never redraws).
        percentiles: re-scaling of 3-D-corrupted volumes (``data.percentiles``).
        positive_nuisance: sampler applied to the positive slice (2-D, like the 2-D negatives):
            nuisance that clean scans carry too (a little noise, a weak bias field), so the
            code learns to ignore it (``None``: the paper's plain positive).
        positive_gamma: ``(lo, hi)``: the positive slice's intensities are raised to a power
            γ drawn log-uniformly in the range (x ↦ max(x, 0)^γ on the [0, 1]-scaled slice), a
            monotone change of contrast like those between scanners and sequences (tissue
            order kept), so the code learns to ignore the contrast curve (``None``: none).
        positive_zoom: ``(lo, hi)``: the positive slice is scaled about its centre by a factor
            drawn log-uniformly in the range (bilinear), so the code learns to ignore head
            size (``None``: none).

    Items: ``{"query": (1, S, S), "positive": (1, S, S), "corrupted": (K, 1, S, S),
    "index": int, "query_slice": int, "positive_orientation": int (into ORIENTATIONS order
    sagittal=0, coronal=1, axial=2), "positive_slice": int, "corrupt_kind": (K,) int}``.
    """

    def __init__(
        self,
        volumes: VolumeDataset,
        size: int = 128,
        n_central: int | None = 20,
        queries_per_volume: int = 4,
        corrupt: RandomArtifacts | None = None,
        n_corrupt: int = 1,
        positive_orientations: Sequence[str] = ("coronal", "sagittal"),
        deterministic: bool = False,
        seed: int = 0,
        spacing: float = 2.0,
        negatives_3d: bool = False,
        bank_size: int = 4,
        bank_reuse: int = 16,
        percentiles: Sequence[float] | None = (0.5, 99.5),
        positive_nuisance: RandomArtifacts | None = None,
        positive_gamma: Sequence[float] | None = None,
        positive_zoom: Sequence[float] | None = None,
    ) -> None:
        bad = set(positive_orientations) - {"coronal", "sagittal"}
        if bad or not positive_orientations:
            raise ValueError(
                "positive_orientations must be among coronal, sagittal, got "
                f"{list(positive_orientations)}"
            )
        if corrupt is None and n_corrupt:
            n_corrupt = 0
        self.volumes = volumes
        self.size = int(size)
        self.n_central = n_central
        self.queries_per_volume = int(queries_per_volume)
        self.corrupt = corrupt
        self.n_corrupt = int(n_corrupt)
        self.positive_orientations = list(positive_orientations)
        self.deterministic = deterministic
        self.seed = int(seed)
        self.spacing = float(spacing)
        self.negatives_3d = bool(negatives_3d)
        self.positive_nuisance = positive_nuisance
        self.positive_gamma = log_range(positive_gamma, "positive_gamma")
        self.positive_zoom = log_range(positive_zoom, "positive_zoom")
        if self.negatives_3d and self.n_corrupt > bank_size:
            raise ValueError(f"n_corrupt={self.n_corrupt} exceeds bank_size={bank_size}")
        self.bank = (
            NegativeBank(
                corrupt,
                size=bank_size,
                reuse=None if deterministic else bank_reuse,
                spacing=(self.spacing,) * 3,
                percentiles=percentiles,
                fixed_seed=self.seed if deterministic else None,
            )
            if self.negatives_3d and corrupt is not None
            else None
        )

    def __len__(self) -> int:
        return len(self.volumes) * self.queries_per_volume

    def set_corrupt(self, sampler: RandomArtifacts) -> None:
        """Draw later corrupted copies from ``sampler`` (a severity schedule changed the
        ranges); banked 3-D copies drawn with the old one are dropped, so every negative after
        the change comes from the new ranges."""
        if self.corrupt is None:
            raise ValueError("this dataset has no corrupted negatives (corrupt=None) to change")
        self.corrupt = sampler
        if self.bank is not None:
            self.bank.sampler = sampler
            self.bank.clear()

    def _generator(self, idx: int) -> torch.Generator:
        if self.deterministic:
            return torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i = idx // self.queries_per_volume
        g = self._generator(idx)
        vol = self.volumes.volume(i)["image"]  # (1, D, H, W)
        shape = vol.shape[1:]

        def pick(orientation: str) -> int:
            options = central_indices(shape[ORIENTATIONS[orientation]], self.n_central)
            return options[int(torch.randint(0, len(options), (1,), generator=g))]

        q_slice = pick("axial")
        p_name = self.positive_orientations[
            int(torch.randint(0, len(self.positive_orientations), (1,), generator=g))
        ]
        p_slice = pick(p_name)
        query = fit_square(extract_slice(vol, "axial", q_slice), self.size)
        positive = extract_slice(vol, p_name, p_slice)
        if self.positive_nuisance is not None:
            positive, _ = corrupt_slice(
                self.positive_nuisance, positive, g, (self.spacing, self.spacing)
            )
        positive = fit_square(positive, self.size)
        corrupted, kinds = [], []
        if self.bank is not None:  # K distinct 3-D-corrupted copies, sliced at the query
            axial = central_indices(shape[ORIENTATIONS["axial"]], self.n_central)
            slots = torch.randperm(self.bank.size, generator=g)[: self.n_corrupt].tolist()
            for slot in slots:
                slab, where, code = self.bank.get(i, slot, vol, axial, g)
                y = slab[..., where.index(q_slice)]  # (1, h, w)
                corrupted.append(fit_square(y, self.size))
                kinds.append(code)
        else:
            raw = extract_slice(vol, "axial", q_slice)  # corrupt at native resolution, then fit
            for _ in range(self.n_corrupt):
                y, record = corrupt_slice(self.corrupt, raw, g, (self.spacing, self.spacing))
                corrupted.append(fit_square(y, self.size))
                kinds.append(kind_code(record.get("kinds", [])))
        # drawn last, so these options change the positive only (same queries and negatives)
        if self.positive_gamma is not None:
            positive = positive.clamp(min=0.0) ** _log_uniform(self.positive_gamma, g)
        if self.positive_zoom is not None:
            positive = zoom_slice(positive, _log_uniform(self.positive_zoom, g))
        return {
            "query": query,
            "positive": positive,
            "corrupted": torch.stack(corrupted) if corrupted else query.new_zeros(0, *query.shape),
            "index": i,
            "query_slice": q_slice,
            "positive_orientation": ORIENTATIONS[p_name],
            "positive_slice": p_slice,
            "corrupt_kind": torch.tensor(kinds, dtype=torch.long),
        }


class ContrastiveDataModule(ScanDataModule):
    """Discovery -> preprocessing (bad scans skipped) -> subject split -> contrastive items.

    Args:
        data_cfg: the ``data`` config group (``slice_size``, ``n_central_slices``,
            ``batch_size``, ``num_workers``, ``spacing``, ...).
        corrupt: sampler of the corrupted negatives (``hydra.utils.instantiate(cfg.augment)``).
        queries_per_volume: training items per volume per epoch.
        n_corrupt: corrupted copies per query.
        val_queries_per_volume: validation items per volume (fixed draws).
        scans: use these scans instead of discovering them.
        negatives_3d: corrupt whole volumes, then slice (:class:`NegativeBank`).
        bank_size: 3-D-corrupted copies kept per volume.
        bank_reuse: uses of a training copy before it is redrawn.
        positive_nuisance: sampler of nuisance applied to the positive slices (training and
            validation; ``None``: the paper).
        positive_gamma, positive_zoom: contrast and size nuisance of the positive slices
            (:class:`ContrastiveSliceDataset`; ``None``: the paper).
    """

    def __init__(
        self,
        data_cfg: Any,
        corrupt: RandomArtifacts | None,
        queries_per_volume: int = 4,
        n_corrupt: int = 1,
        val_queries_per_volume: int = 2,
        scans: Sequence[Any] | None = None,
        negatives_3d: bool = False,
        bank_size: int = 4,
        bank_reuse: int = 16,
        positive_nuisance: RandomArtifacts | None = None,
        positive_gamma: Sequence[float] | None = None,
        positive_zoom: Sequence[float] | None = None,
    ) -> None:
        super().__init__(data_cfg, with_label=False, scans=scans)
        if corrupt is not None and corrupt.rate < 1.0:
            # an uncorrupted "corrupted copy" equals its query: a negative identical to x*
            log.warning("augment.rate=%s < 1: some corrupted negatives stay clean", corrupt.rate)
        self.corrupt = corrupt
        self.queries_per_volume = int(queries_per_volume)
        self.n_corrupt = int(n_corrupt)
        self.val_queries_per_volume = int(val_queries_per_volume)
        self.negatives_3d = bool(negatives_3d)
        self.bank_size = int(bank_size)
        self.bank_reuse = int(bank_reuse)
        self.positive_nuisance = positive_nuisance
        self.positive_gamma = positive_gamma
        self.positive_zoom = positive_zoom
        self._datasets: dict[bool, ContrastiveSliceDataset] = {}

    def _dataset(self, scans: Sequence[Any], train: bool) -> ContrastiveSliceDataset:
        spacing = self.cfg.get("spacing", 2.0)
        spacing = float(spacing[0] if isinstance(spacing, Sequence) else spacing)
        percentiles = self.cfg.get("percentiles", (0.5, 99.5))
        return ContrastiveSliceDataset(
            self.volumes(scans),
            size=int(self.cfg.get("slice_size", 128)),
            n_central=self.cfg.get("n_central_slices", 20),
            queries_per_volume=self.queries_per_volume if train else self.val_queries_per_volume,
            corrupt=self.corrupt,
            n_corrupt=self.n_corrupt,
            deterministic=not train,
            seed=int(self.cfg.get("seed", 0)),
            spacing=spacing,
            negatives_3d=self.negatives_3d,
            bank_size=self.bank_size,
            bank_reuse=self.bank_reuse,
            percentiles=None if percentiles is None else [float(v) for v in percentiles],
            positive_nuisance=self.positive_nuisance,
            positive_gamma=self.positive_gamma,
            positive_zoom=self.positive_zoom,
        )

    def _cached_dataset(self, train: bool) -> ContrastiveSliceDataset:
        # one dataset per split for the whole fit: its negative bank outlives the epoch
        # (Lightning asks for the loaders again; with num_workers > 0 each worker holds a copy)
        if train not in self._datasets:
            scans = self.train_scans if train else (self.val_scans or self.train_scans[:2])
            self._datasets[train] = self._dataset(scans, train)
        return self._datasets[train]

    @property
    def train_corrupt(self) -> RandomArtifacts | None:
        """The sampler of the training negatives (the configured one until
        :meth:`set_train_corrupt`)."""
        return self._cached_dataset(True).corrupt

    @property
    def train_bank(self) -> NegativeBank | None:
        """The training negatives' bank (``negatives_3d``; ``None`` otherwise)."""
        return self._cached_dataset(True).bank

    def set_train_corrupt(self, sampler: RandomArtifacts) -> None:
        """Training negatives from now on come from ``sampler`` (banked copies are redrawn);
        validation keeps the configured sampler, so ``val/loss`` stays comparable across epochs.

        Raises:
            ValueError: with ``num_workers > 0`` (persistent workers hold their own copy of the
                dataset, which a change in the main process would not reach).
        """
        if int(self.cfg.get("num_workers", 0)) > 0:
            raise ValueError(
                "changing the negatives' ranges during training needs data.num_workers=0 "
                "(persistent DataLoader workers keep their own copy of the sampler)"
            )
        self._cached_dataset(True).set_corrupt(sampler)

    def train_dataloader(self) -> DataLoader:
        # drop_last keeps every batch large enough to hold negatives from other volumes
        n = len(self.train_scans) * self.queries_per_volume
        drop = n > int(self.cfg.get("batch_size", 8))
        return self._loader(self._cached_dataset(True), shuffle=True, drop_last=drop)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._cached_dataset(False), shuffle=False)
