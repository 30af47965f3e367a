"""Preprocessing (TorchIO) and its cache: orientation, grid, range, label alignment, keys."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from qcflow.data import preprocess as pp
from qcflow.data.datasets import central_indices, extract_slice, fit_square
from qcflow.data.discovery import Scan
from qcflow.errors import ConfigError, ScanError


def test_resolve_shape_from_fov() -> None:
    assert pp.resolve_shape(2.0, (192, 224, 192)) == (96, 112, 96)
    assert pp.resolve_shape(1.0, (192, 224, 192)) == (192, 224, 192)
    assert pp.resolve_shape(3.0, (100, 100, 100)) == (34, 34, 34)  # rounded up to even
    assert pp.resolve_shape(2.0, (192, 224, 192), [10, 12, 14]) == (10, 12, 14)
    with pytest.raises(ConfigError):
        pp.resolve_shape(2.0, (192, 224, 192), [4, 12, 14])


def test_config_key_changes_with_every_setting() -> None:
    base = pp.PreprocessConfig()
    keys = {
        base.key(),
        pp.PreprocessConfig(spacing=1.0).key(),
        pp.PreprocessConfig(shape=(96, 112, 98)).key(),
        pp.PreprocessConfig(percentiles=(1.0, 99.0)).key(),
    }
    assert len(keys) == 4
    assert pp.PreprocessConfig().key() == base.key()


def _cube_scan(folder: Path, lps: bool) -> Scan:
    """A 3 mm volume with a bright box at a known world position and its label.

    Stored either RAS or LPS (x and y flipped in the affine and the array), which must give the
    same preprocessed result.
    """
    shape = (40, 44, 36)
    data = np.zeros(shape, np.float32)
    rng = np.random.default_rng(0)
    data[5:35, 5:39, 5:31] = 100 + rng.normal(0, 1, (30, 34, 26))  # "head"
    data[10:18, 12:20, 8:14] = 400  # bright box (the "label")
    label = np.zeros(shape, np.uint8)
    label[10:18, 12:20, 8:14] = 1
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-60, -66, -54]
    if lps:  # flip x and y: voxel i -> shape-1-i, affine columns negated, origin moved
        data, label = data[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flip
    tag = "lps" if lps else "ras"
    img_path, lab_path = folder / f"{tag}.nii.gz", folder / f"{tag}_label.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), img_path)
    nib.save(nib.Nifti1Image(label, affine), lab_path)
    return Scan(scan_id=tag, path=img_path, label_path=lab_path)


@pytest.mark.parametrize("lps", [False, True])
def test_preprocess_canonical_grid_range_and_label(tmp_path: Path, lps: bool) -> None:
    pcfg = pp.PreprocessConfig(spacing=2.0, shape=(64, 72, 60), percentiles=(0.5, 99.5))
    out = pp.preprocess_scan(_cube_scan(tmp_path, lps), pcfg)
    image, label, affine = out["image"], out["label"], out["affine"]
    assert image.shape == label.shape == (1, 64, 72, 60)
    assert image.dtype == torch.float32 and label.dtype == torch.uint8
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert np.allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])  # RAS+, 2 mm
    assert set(label.unique().tolist()) == {0, 1}
    # the label sits on the bright box: its voxels are the brightest in the image
    inside = image[label.bool()].mean()
    outside = image[(~label.bool()) & (image > 0.05)].mean()
    assert inside > 0.9 and outside < 0.5


def test_preprocess_orientation_invariant(tmp_path: Path) -> None:
    pcfg = pp.PreprocessConfig(spacing=2.0, shape=(64, 72, 60))
    ras = pp.preprocess_scan(_cube_scan(tmp_path, lps=False), pcfg)
    lps = pp.preprocess_scan(_cube_scan(tmp_path, lps=True), pcfg)
    assert torch.allclose(ras["image"], lps["image"], atol=1e-5)
    assert torch.equal(ras["label"], lps["label"])


def test_cache_hits_and_invalidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = _cube_scan(tmp_path, lps=False)
    pcfg = pp.PreprocessConfig(spacing=2.0, shape=(64, 72, 60))
    cache = pp.PreprocessCache(tmp_path / "cache", pcfg)
    first = cache.load(scan)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1

    calls = []
    real = pp.preprocess_scan
    monkeypatch.setattr(pp, "preprocess_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = cache.load(scan)
    assert not calls, "a cache hit must not preprocess again"
    assert torch.equal(first["image"], again["image"])

    # a damaged entry is recomputed, not trusted
    entry = next((tmp_path / "cache").rglob("*.pt"))
    entry.write_bytes(b"garbage")
    assert torch.equal(cache.load(scan)["image"], first["image"]) and calls

    # changing the file's content or the settings changes the key
    key = cache.key(scan, True)
    img = nib.load(scan.path)
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32) * 2 + 1, img.affine), scan.path)
    assert cache.key(scan, True) != key
    other = pp.PreprocessCache(tmp_path / "cache", pp.PreprocessConfig(spacing=3.0))
    assert other.key(scan, True) != cache.key(scan, True)


def test_missing_file_is_scan_error(tmp_path: Path) -> None:
    cache = pp.PreprocessCache(tmp_path / "cache", pp.PreprocessConfig())
    with pytest.raises(ScanError, match="missing.nii.gz"):
        cache.load(Scan(scan_id="x", path=tmp_path / "missing.nii.gz"))


def test_slice_helpers() -> None:
    assert central_indices(10, 4) == [3, 4, 5, 6]
    assert central_indices(5, None) == [0, 1, 2, 3, 4]
    assert central_indices(3, 20) == [0, 1, 2]
    vol = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    assert extract_slice(vol, "axial", 1).shape == (1, 2, 3)  # fixed z
    assert extract_slice(vol, "coronal", 1).shape == (1, 2, 4)  # fixed y
    assert extract_slice(vol, "sagittal", 1).shape == (1, 3, 4)  # fixed x
    assert torch.equal(extract_slice(vol, "axial", 2)[0], vol[0, :, :, 2])

    square = fit_square(torch.ones(1, 6, 4), 10)
    assert square.shape == (1, 10, 10) and square.sum() == 24
    assert square[0, 2:8, 3:7].sum() == 24  # centred
    shrunk = fit_square(torch.ones(1, 20, 10), 10)
    assert shrunk.shape == (1, 10, 10) and torch.allclose(shrunk.sum(), torch.tensor(50.0))


def test_robust_rescale_matches_torchio() -> None:
    """Our percentile rescaling gives TorchIO's RescaleIntensity result."""
    rng = np.random.default_rng(1)
    vol = np.zeros((60, 64, 56), np.float32)
    vol[10:50, 8:56, 6:50] = rng.gamma(4.0, 50.0, (40, 48, 44))  # skewed "tissue"
    data = torch.from_numpy(vol)[None]
    ours = pp.RobustRescale((0.5, 99.5))(tio.Subject(image=tio.ScalarImage(tensor=data)))
    ref = tio.RescaleIntensity((0.0, 1.0), percentiles=(0.5, 99.5))(
        tio.Subject(image=tio.ScalarImage(tensor=data))
    )
    assert float(ours["image"].data.min()) == 0.0 and float(ours["image"].data.max()) == 1.0
    assert torch.allclose(ours["image"].data, ref["image"].data, atol=1e-5)


def test_resample_skipped_only_at_target_spacing(tmp_path: Path) -> None:
    """A 2 mm scan is not resampled for 2 mm output; the result equals the resampled path."""
    scan = _cube_scan(tmp_path, lps=False)  # 3 mm voxels
    img = nib.load(scan.path)
    two = tmp_path / "two.nii.gz"
    aff = img.affine.copy()
    aff[:3, :3] = np.diag([2.0, 2.0, 2.0])
    nib.save(nib.Nifti1Image(img.get_fdata().astype(np.float32), aff), two)
    pcfg = pp.PreprocessConfig(spacing=2.0, shape=(48, 48, 40))
    fast = pp.preprocess_scan(Scan(scan_id="two", path=two), pcfg, with_label=False)
    subject = tio.Subject(image=pp._load_image(two, label=False))
    slow = pp.make_transform(pcfg, resample=True)(subject)["image"].data
    assert torch.allclose(fast["image"], slow, atol=1e-4)


def test_preprocessing_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """A cold cache (TorchIO transforms draw torch.rand) must not shift later random draws."""
    import torch

    from qcflow.data.discovery import discover_scans
    from qcflow.data.preprocess import PreprocessConfig, preprocess_scan
    from qcflow.testing import write_good_scan

    scan = discover_scans(write_good_scan(tmp_path / "a_T1w.nii.gz"))[0]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    preprocess_scan(scan, PreprocessConfig(shape=(16, 16, 16)))
    assert torch.equal(torch.rand(3), expected)
