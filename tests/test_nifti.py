"""NIfTI loading and validation: every bad-input kind gives its one-line reason."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qcflow.data.nifti import (
    DATA_CHECKS,
    HEADER_CHECKS,
    HeaderInfo,
    load_nifti,
    load_volume,
    validate_scan,
)
from qcflow.errors import QCFlowError, ScanError
from qcflow.testing import BAD_SCAN_KINDS, nifti_bytes, write_bad_scans, write_good_scan


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, write_bad_scans(folder)


@pytest.fixture(scope="module")
def good_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_scan(tmp_path_factory.mktemp("good") / "good.nii.gz")


def _header_reason(**kwargs: object) -> str | None:
    fields = {
        "shape": (32, 36, 30),
        "pixdim": (1.0, 1.0, 1.0),
        "affine": np.eye(4),
        "dtype": np.dtype(np.int16),
    }
    header = HeaderInfo(**{**fields, **kwargs})
    return next((r for check in HEADER_CHECKS if (r := check(header))), None)


def test_write_bad_scans_writes_every_kind(bad_dir: tuple[Path, dict[str, str]]) -> None:
    folder, expected = bad_dir
    assert set(expected) <= set(BAD_SCAN_KINDS)
    assert set(BAD_SCAN_KINDS) - set(expected) <= {"missing.nii.gz"}  # only without symlinks
    assert all((folder / name).is_symlink() or (folder / name).is_file() for name in expected)


@pytest.mark.parametrize("name", sorted(BAD_SCAN_KINDS))
def test_bad_scan_raises_one_line_reason(bad_dir: tuple[Path, dict[str, str]], name: str) -> None:
    folder, expected = bad_dir
    if name not in expected:
        pytest.skip("symbolic links unsupported here")
    path = folder / name
    with pytest.raises(ScanError) as info:
        load_nifti(path)
    exc = info.value
    assert isinstance(exc, QCFlowError)
    assert BAD_SCAN_KINDS[name] in exc.reason
    assert str(exc) == f"{path}: {exc.reason}"
    assert "\n" not in str(exc)
    assert exc.reason[:1] == exc.reason[:1].lower()
    with pytest.raises(ScanError, match="^" + str(path)):
        load_volume(path)


@pytest.mark.parametrize("name", sorted(BAD_SCAN_KINDS))
def test_validate_scan_reports_without_raising(
    bad_dir: tuple[Path, dict[str, str]], name: str
) -> None:
    folder, expected = bad_dir
    if name not in expected:
        pytest.skip("symbolic links unsupported here")
    row = validate_scan(folder / name)
    assert set(row) == {"path", "status", "reason", "shape", "voxel_size", "warning"}
    assert row["status"] == "error"
    assert BAD_SCAN_KINDS[name] in row["reason"]
    assert row["path"] == str(folder / name)


def test_reasons_say_how_many(bad_dir: tuple[Path, dict[str, str]]) -> None:
    folder, _ = bad_dir
    assert validate_scan(folder / "four_d.nii.gz")["reason"] == (
        "4-D image with 3 volumes; expected one 3-D T1w volume"
    )
    assert validate_scan(folder / "nan.nii.gz")["reason"] == "contains 12 NaN voxels"
    # shape and voxel size are reported once the header is readable
    row = validate_scan(folder / "nan.nii.gz")
    assert row["shape"] == "16x18x15" and row["voxel_size"] == "1.00x1.00x1.00"


def test_good_scan_passes(good_scan: Path) -> None:
    img = load_nifti(good_scan)
    assert isinstance(img, nib.Nifti1Image)
    assert img.shape == (32, 36, 30)
    data, affine = load_volume(good_scan)
    assert data.dtype == np.float32 and data.shape == (32, 36, 30)
    assert affine.dtype == np.float64 and affine.shape == (4, 4)
    np.testing.assert_allclose(np.diag(affine)[:3], 2.0)
    assert data.max() > 500 and data.min() >= 0
    row = validate_scan(good_scan)
    assert row == {
        "path": str(good_scan),
        "status": "ok",
        "reason": "",
        "shape": "32x36x30",
        "voxel_size": "2.00x2.00x2.00",
        "warning": "",
    }


def test_good_scans_differ_by_seed(tmp_path: Path) -> None:
    a, _ = load_volume(write_good_scan(tmp_path / "a.nii.gz", seed=0))
    b, _ = load_volume(write_good_scan(tmp_path / "b.nii", seed=1, shape=(20, 22, 18)))
    assert b.shape == (20, 22, 18)
    assert not np.array_equal(a[:20, :22, :18], b)


def test_single_volume_4d_is_squeezed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.random((16, 18, 15, 1)).astype(np.float32)
    affine = np.array([[1.5, 0, 0, -10], [0, 1.2, 0, 5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    img = load_nifti(path)
    assert img.shape == (16, 18, 15)
    np.testing.assert_allclose(img.affine, affine)
    vol, aff = load_volume(path)
    np.testing.assert_array_equal(vol, data[..., 0])
    np.testing.assert_allclose(aff, affine)
    assert validate_scan(path)["shape"] == "16x18x15"


def test_trailing_singleton_5d_is_squeezed(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((16, 18, 15, 1, 1)).astype(np.float32)
    path = tmp_path / "one_volume_5d.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    assert load_nifti(path).shape == (16, 18, 15)


def test_compression_is_detected_from_content(tmp_path: Path, good_scan: Path) -> None:
    gz_named_nii = tmp_path / "compressed.nii"
    gz_named_nii.write_bytes(good_scan.read_bytes())
    raw_named_gz = tmp_path / "raw.nii.gz"
    raw_named_gz.write_bytes(gzip.decompress(good_scan.read_bytes()))
    ref, _ = load_volume(good_scan)
    for path in (gz_named_nii, raw_named_gz):
        np.testing.assert_array_equal(load_volume(path)[0], ref)


def test_scaled_integer_data_and_nifti2(tmp_path: Path) -> None:
    data = np.arange(16 * 18 * 15, dtype=np.int16).reshape(16, 18, 15)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol, _ = load_volume(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(vol, data * 0.5 + 10.0)
    nib.save(nib.Nifti2Image(data.astype(np.float32), np.eye(4)), tmp_path / "v2.nii")
    img2 = load_nifti(tmp_path / "v2.nii")
    assert isinstance(img2, nib.Nifti2Image) and img2.shape == (16, 18, 15)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="file not found$"):
        load_nifti(tmp_path / "nope.nii.gz")
    with pytest.raises(ScanError, match="is a folder"):
        load_nifti(tmp_path)


def test_dicom_renamed_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dicom.nii"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 400)
    with pytest.raises(ScanError, match="DICOM file; convert it with dcm2niix"):
        load_nifti(path)


def test_nan_and_inf_counted_together(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((16, 18, 15)).astype(np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, :2] = -np.inf
    path = tmp_path / "both.nii"
    path.write_bytes(nifti_bytes(data))
    assert validate_scan(path)["reason"] == "contains 3 NaN and 2 infinite voxels"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, None),
        ({"shape": (32, 36, 30, 1)}, None),
        ({"shape": (3000, 36, 30)}, "implausible shape 3000x36x30"),
        ({"shape": (32, 0, 30)}, "empty image (shape 32x0x30)"),
        ({"shape": (32,)}, "1-D image"),
        ({"shape": (32, 36, 30, 2, 3, 4)}, "6-D image"),
        ({"pixdim": (float("nan"), 1.0, 1.0)}, "invalid voxel size"),
        ({"pixdim": (-1.0, 1.0, 1.0)}, "invalid voxel size"),
        ({"pixdim": (0.05, 1.0, 1.0)}, "implausible voxel size"),
        ({"affine": np.diag([0.05, 1, 1, 1])}, "implausible voxel size 0.05x1.00x1.00 mm"),
        ({"affine": np.diag([25.0, 1, 1, 1])}, "implausible voxel size"),
        ({"affine": np.full((4, 4), np.nan)}, "non-finite"),
        ({"affine": np.diag([1.0, 1, 0, 1])}, "non-invertible affine"),
        ({"dtype": np.dtype(np.complex64)}, "unsupported voxel type complex64"),
        ({"dtype": np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])}, "unsupported voxel"),
    ],
)
def test_header_checks(fields: dict[str, object], reason: str | None) -> None:
    got = _header_reason(**fields)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_data_checks_accept_plain_volume() -> None:
    data = np.random.default_rng(0).random((8, 8, 8))
    assert all(check(data) is None for check in DATA_CHECKS)
    assert all(
        check(data.astype(np.uint8) + np.eye(8, dtype=np.uint8)) is None for check in DATA_CHECKS
    )
