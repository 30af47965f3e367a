"""Data modules on the small embedded dataset: shapes, ranges, splits, bad scans skipped.

``data_cfg`` (the real data config on the small embedded train split) is in conftest.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qcflow.data.datamodule import (
    PatchDataModule,
    SliceDataModule,
    VolumeDataModule,
    split_by_subject,
)
from qcflow.data.discovery import Scan


def test_split_by_subject_is_deterministic_and_grouped() -> None:
    scans = [
        Scan(scan_id=f"sub-{i}_ses-{s}", path=Path("x"), subject=f"sub-{i}")
        for i in range(10)
        for s in (1, 2)
    ]
    train, val = split_by_subject(scans, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not {s.subject for s in train} & {s.subject for s in val}
    again = split_by_subject(list(reversed(scans)), 0.2, seed=3)
    assert {s.scan_id for s in again[1]} == {s.scan_id for s in val}
    other = split_by_subject(scans, 0.2, seed=4)
    assert {s.scan_id for s in other[1]} != {s.scan_id for s in val}


def test_volume_datamodule_shapes_and_split(data_cfg) -> None:
    dm = VolumeDataModule(data_cfg, with_label=True)
    dm.setup("fit")
    assert len(dm.scans) == 8 and not dm.errors
    assert len(dm.val_scans) == 2 and len(dm.train_scans) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 48, 56, 48)  # 192x224x192 mm at 4 mm
    assert batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["label"].shape == batch["image"].shape
    assert set(batch["label"].unique().tolist()) <= {0, 1}
    # GM labels lie on brain tissue: the image is brighter than background inside them
    assert batch["image"][batch["label"].bool()].mean() > 0.2
    predicted = [b["scan_id"] for b in dm.predict_dataloader()]
    assert sum(len(p) for p in predicted) == 8


def test_slice_datamodule(data_cfg) -> None:
    dm = SliceDataModule(data_cfg)
    dm.setup("fit")
    ds = dm.train_dataloader().dataset
    assert len(ds) == len(dm.train_scans) * 3 * 5  # 3 orientations x 5 central slices
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64)
    assert set(batch["orientation"].tolist()) <= {0, 1, 2}
    # central slices of a head are not empty
    assert (batch["image"].flatten(1).max(1).values > 0.5).all()


def test_patch_datamodule(data_cfg) -> None:
    dm = PatchDataModule(data_cfg)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 0  # the queue has its own workers
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    assert batch["label"].shape == (4, 1, 16, 16, 16)
    assert len(batch["scan_id"]) == 4
    n = sum(b["image"].shape[0] for b in loader)
    assert n == len(dm.train_scans) * 2


def test_bad_scans_are_skipped_and_reported(small_embedded: Path, data_cfg, tmp_path: Path) -> None:
    from qcflow.testing import write_bad_scans

    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted((small_embedded / "train").glob("sub-*/anat/*_T1w.nii.gz"))[:3]:
        shutil.copy(src, folder / src.name)
    expected = write_bad_scans(folder / "bad")
    cfg = OmegaConf.merge(data_cfg, {"root": str(folder), "val_fraction": 0.0})
    dm = VolumeDataModule(cfg)
    dm.setup("fit")
    assert len(dm.scans) == 3
    assert len(dm.errors) >= len([p for p in expected if (folder / "bad" / p).exists()])
    assert all(reason for _, reason in dm.errors)


def test_no_usable_scan_raises(tmp_path: Path, data_cfg) -> None:
    from qcflow.errors import QCFlowError
    from qcflow.testing import write_bad_scans

    write_bad_scans(tmp_path / "bad")
    dm = VolumeDataModule(OmegaConf.merge(data_cfg, {"root": str(tmp_path / "bad")}))
    with pytest.raises(QCFlowError, match="no usable scan"):
        dm.setup("fit")
