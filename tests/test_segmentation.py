"""Dice, Spearman, full-volume heteroscedastic inference and the maps it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qcflow.data.discovery import Scan
from qcflow.models.unet import TwoHeadUNet
from qcflow.qc.derivatives import write_maps
from qcflow.qc.segmentation import (
    dice,
    entropy_map,
    predict_volume,
    spearman,
    summarize_prediction,
)


def test_dice_known_values() -> None:
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[:2] = True  # 32 voxels
    b[1:3] = True  # 32 voxels, 16 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(torch.zeros_like(a), torch.zeros_like(a)) == 1.0


def test_spearman() -> None:
    rho, p = spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7.5])
    assert rho == pytest.approx(0.9) and 0 < p < 0.1
    assert spearman([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2])[0])


def test_entropy_map_bounds() -> None:
    logits = torch.zeros(1, 2, 2, 2, 2)
    ent = entropy_map(logits, torch.ones(1, 1, 2, 2, 2))
    assert torch.allclose(ent, torch.full_like(ent, math.log(2)))
    confident = entropy_map(
        torch.tensor([50.0, -50.0]).view(1, 2, 1, 1, 1), torch.ones(1, 1, 1, 1, 1)
    )
    assert confident.item() == pytest.approx(0.0, abs=1e-6)


def test_predict_volume_and_writer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TwoHeadUNet(num_sources=3, filters=[4, 8, 16]).eval()
    sources = ["task", "noise", "blur"]
    image = torch.rand(1, 12, 14, 10)
    pred = predict_volume(net.predict, image, sources, roi_size=[8, 8, 8])
    assert pred["segmentation"].shape == (12, 14, 10)
    assert pred["logits"].shape == (2, 12, 14, 10)
    for s in sources:
        assert pred[f"var_{s}"].shape == (12, 14, 10) and (pred[f"var_{s}"] > 0).all()
    assert torch.allclose(pred["var_artifact"], pred["var_noise"] + pred["var_blur"])
    assert torch.allclose(pred["var_total"], pred["var_task"] + pred["var_artifact"])
    assert (pred["entropy"] >= 0).all() and (pred["entropy"] <= math.log(2) + 1e-6).all()
    label = (torch.rand(12, 14, 10) > 0.5).to(torch.uint8)
    summ = summarize_prediction(pred, sources, voxel_volume_ml=0.008, label=label)
    expected_std = float(
        (torch.exp(2 * pred["entropy"].double()) / (2 * math.pi * math.e)).sum().sqrt() * 0.008
    )
    assert summ["gm_volume_std_ml"] == pytest.approx(expected_std)
    assert 0 <= summ["dice"] <= 1
    scan = Scan(scan_id="sub-01", path=tmp_path / "sub-01_T1w.nii.gz", subject="01")
    files = write_maps(tmp_path, scan, pred, sources, np.diag([2.0, 2, 2, 1]), summ)
    assert set(files) == {"seg", "entropy", "var-task", "var-noise", "var-blur", "var-artifact"}
    assert files["var-noise"] == "sub-01/anat/sub-01_desc-noise_uncertainty.nii.gz"
    assert nib.load(tmp_path / files["var-noise"]).shape == (12, 14, 10)
    record = json.loads((tmp_path / "sub-01" / "anat" / "sub-01_qc.json").read_text())
    assert record["dice"] == pytest.approx(summ["dice"]) and record["files"] == files
