"""Small synthetic NIfTI files for tests: a plausible head and every kind of broken input.

:func:`write_bad_scans` is the shared catalogue of bad inputs; each file comes with the
substring its :class:`~qcflow.errors.ScanError` reason must contain, so any stage that reads
user scans (validation, scoring) can be tested against all of them at once.

Example:
    >>> good = write_good_scan(tmp / "good.nii.gz")  # doctest: +SKIP
    >>> expected = write_bad_scans(tmp / "bad")  # doctest: +SKIP
    >>> expected["nan.nii.gz"]  # doctest: +SKIP
    'contains 12 NaN voxels'
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "write_good_scan",
    "write_bad_scans",
    "BAD_SCAN_KINDS",
    "head_phantom",
    "nifti_bytes",
]


def head_phantom(shape: tuple[int, int, int] = (32, 36, 30), seed: int = 0) -> np.ndarray:
    """A head-like T1w phantom: scalp, skull, grey and white matter, ventricles, noise.

    Args:
        shape: ``(X, Y, Z)`` voxels.
        seed: seed of the texture and background noise.

    Returns:
        ``(X, Y, Z)`` float32 intensities in about [0, 1000] (T1w contrast: WM > GM > CSF).
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, (0.8, 0.9, 0.85), strict=True)))
    x, y, z = grids
    vol = np.zeros(shape, np.float32)
    vol[r < 1.0] = 400.0  # scalp
    vol[(r < 0.92)] = 150.0  # skull (dark on T1w)
    vol[r < 0.85] = 600.0  # grey matter
    wm = r < 0.65 + 0.05 * np.sin(6 * x) * np.cos(5 * y)  # folded white-matter boundary
    vol[wm] = 850.0
    ventricles = ((x / 0.12) ** 2 + (y / 0.3) ** 2 + (z / 0.15) ** 2) < 1
    vol[ventricles] = 200.0
    vol += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return np.abs(vol).astype(np.float32)  # magnitude: Rician-like background


def _affine(spacing: float | tuple[float, float, float], shape: tuple[int, ...]) -> np.ndarray:
    zooms = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -zooms * (np.asarray(shape[:3]) - 1) / 2  # centre the FOV on the origin
    return affine


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    """Uncompressed single-file NIfTI-1 bytes of ``data`` (identity affine by default)."""
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    return img.to_bytes()


def _write(path: Path, raw: bytes) -> None:
    path.write_bytes(_gz(raw) if path.name.endswith(".gz") else raw)


def write_good_scan(
    path: str | Path,
    shape: tuple[int, int, int] = (32, 36, 30),
    spacing: float = 2.0,
    seed: int = 0,
) -> Path:
    """Write a plausible T1w head phantom (int16, like most scanners' output).

    Args:
        path: ``.nii`` or ``.nii.gz`` file to write (folders are created).
        shape: ``(X, Y, Z)`` voxels.
        spacing: isotropic voxel size in mm.
        seed: noise seed (different seeds give different scans).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.round(head_phantom(shape, seed)).astype(np.int16)
    _write(path, nifti_bytes(data, _affine(spacing, shape)))
    return path


def _patched_pixdim(raw: bytes, zooms: tuple[float, float, float]) -> bytes:
    """``raw`` with ``pixdim[1:4]`` overwritten (nibabel would recompute it from the affine)."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["pixdim"][1:4] = zooms
    return header.binaryblock + raw[len(header.binaryblock) :]


def _singular_affine_bytes(data: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, np.eye(4))
    singular = np.diag([2.0, 2.0, 2.0, 1.0])
    singular[:3, 1] = singular[:3, 0]  # y axis parallel to x: every voxel size is 2 mm, det 0
    img.set_sform(singular, code=2)
    img.set_qform(None, code=0)
    return img.to_bytes()


def _corrupt_gzip(raw: bytes) -> bytes:
    """Valid gzip header and trailer, garbled bytes in the middle of the deflate stream."""
    packed = bytearray(gzip.compress(raw, mtime=0))
    middle = len(packed) // 2
    packed[middle : middle + 64] = bytes((b ^ 0x5A) for b in packed[middle : middle + 64])
    return bytes(packed)


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _bad_builders() -> dict[str, Callable[[np.ndarray, bytes], bytes]]:
    """``{file name: build(good voxels, good uncompressed bytes) -> file content}``."""

    def stack(good: np.ndarray, n: int) -> np.ndarray:
        return np.stack([good] * n, axis=-1)

    def with_values(good: np.ndarray, value: float, n: int, step: int) -> np.ndarray:
        out = good.copy()
        out.flat[np.arange(n) * step] = value
        return out

    return {
        "empty_file.nii.gz": lambda g, r: b"",
        "image_png.nii.gz": lambda g, r: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "notes_txt.nii": lambda g, r: b"subject,age\nsub-001,42\n" * 40,
        "truncated.nii.gz": lambda g, r: _gz(r)[: len(_gz(r)) // 2],
        "corrupt.nii.gz": lambda g, r: _corrupt_gzip(r),
        "truncated_data.nii": lambda g, r: r[: len(r) - 1000],
        "flat_2d.nii.gz": lambda g, r: _gz(nifti_bytes(g[:, :, g.shape[2] // 2])),
        "four_d.nii.gz": lambda g, r: _gz(nifti_bytes(stack(g, 3))),
        "five_d.nii.gz": lambda g, r: _gz(nifti_bytes(stack(stack(g, 2), 2))),
        "nan.nii.gz": lambda g, r: _gz(nifti_bytes(with_values(g, np.nan, 12, 37))),
        "inf.nii.gz": lambda g, r: _gz(nifti_bytes(with_values(g, np.inf, 5, 41))),
        "constant.nii.gz": lambda g, r: _gz(nifti_bytes(np.full(g.shape, 7.0, np.float32))),
        "zeros.nii.gz": lambda g, r: _gz(nifti_bytes(np.zeros(g.shape, np.float32))),
        "huge_voxels.nii.gz": lambda g, r: _gz(nifti_bytes(g, _affine(50.0, g.shape))),
        "zero_voxels.nii.gz": lambda g, r: _gz(_patched_pixdim(r, (0.0, 2.0, 2.0))),
        "tiny_shape.nii.gz": lambda g, r: _gz(nifti_bytes(g[:4, :4, :4])),
        "singular_affine.nii.gz": lambda g, r: _gz(_singular_affine_bytes(g)),
    }


#: every bad-input kind :func:`write_bad_scans` writes: ``{file name: expected reason part}``
BAD_SCAN_KINDS: dict[str, str] = {
    "missing.nii.gz": "file not found",  # a broken symbolic link
    "empty_file.nii.gz": "empty file",
    "image_png.nii.gz": "not a NIfTI file",
    "notes_txt.nii": "not a NIfTI file",
    "truncated.nii.gz": "truncated or corrupt gzip stream",
    "corrupt.nii.gz": "truncated or corrupt gzip stream",
    "truncated_data.nii": "truncated data",
    "flat_2d.nii.gz": "2-D image",
    "four_d.nii.gz": "4-D image with 3 volumes",
    "five_d.nii.gz": "5-D image",
    "nan.nii.gz": "contains 12 NaN voxels",
    "inf.nii.gz": "contains 5 infinite voxels",
    "constant.nii.gz": "constant image",
    "zeros.nii.gz": "all-zero image",
    "huge_voxels.nii.gz": "implausible voxel size",
    "zero_voxels.nii.gz": "invalid voxel size",
    "tiny_shape.nii.gz": "implausible shape",
    "singular_affine.nii.gz": "non-invertible affine",
}


def write_bad_scans(folder: str | Path) -> dict[str, str]:
    """Write one file per kind of unusable input (see :data:`BAD_SCAN_KINDS`) into ``folder``.

    Kinds: missing file (a broken symbolic link), empty file, PNG and text files named NIfTI,
    truncated gzip, corrupt gzip, truncated uncompressed data, 2-D, 4-D with 3 volumes, 5-D,
    NaN voxels, infinite voxels, constant, all-zero, absurd and zero voxel sizes, a tiny
    shape, a non-invertible affine. Each file is small (16x18x15 voxels at most).

    Args:
        folder: where to write (created if needed).

    Returns:
        ``{file name: substring its ScanError reason contains}`` (the missing-file kind is left
        out where the file system has no symbolic links).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (16, 18, 15)
    good = head_phantom(shape, seed=1)
    good_raw = nifti_bytes(good, _affine(2.0, shape))
    expected: dict[str, str] = {}
    link = folder / "missing.nii.gz"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(folder / "does-not-exist.nii.gz", link)
        expected[link.name] = BAD_SCAN_KINDS[link.name]
    except OSError:  # no symbolic links on this file system
        pass
    for name, build in _bad_builders().items():
        (folder / name).write_bytes(build(good, good_raw))
        expected[name] = BAD_SCAN_KINDS[name]
    return expected
