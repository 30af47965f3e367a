"""NIfTI reading with validation: every way a T1w file can be unusable gives a one-line reason.

:func:`load_nifti` is the only reader the rest of qcflow should use for input scans. It reads the
whole file (so a truncated or corrupt gzip stream is detected, CRC included, instead of surfacing
as garbage voxels later), decides compression from the content rather than the extension, parses
the NIfTI-1/NIfTI-2 header with nibabel, and runs the checks listed in :data:`HEADER_CHECKS` and
:data:`DATA_CHECKS`. A failure raises :class:`~qcflow.errors.ScanError` whose message is
``"<path>: <reason>"``; :func:`validate_scan` turns the same checks into a report row instead.

Example:
    >>> data, affine = load_volume("sub-001_T1w.nii.gz")  # doctest: +SKIP
    >>> data.shape, data.dtype, affine.shape  # doctest: +SKIP
    ((99, 117, 95), dtype('float32'), (4, 4))
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.funcs import squeeze_image

from qcflow.errors import ScanError

__all__ = [
    "load_nifti",
    "load_volume",
    "validate_scan",
    "HeaderInfo",
    "HEADER_CHECKS",
    "DATA_CHECKS",
    "MIN_DIM",
    "MAX_DIM",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
]

#: plausible spatial dimension range (voxels) of a structural brain scan
MIN_DIM, MAX_DIM = 8, 2048
#: plausible voxel size range (mm)
MIN_VOXEL_MM, MAX_VOXEL_MM = 0.1, 20.0

#: receives nibabel's header repair notes (e.g. "pixdim[1,2,3] should be non-zero") unprinted
_FIX_LOG = logging.getLogger(f"{__name__}.header_fixes")
_FIX_LOG.propagate = False
_FIX_LOG.addHandler(logging.NullHandler())

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # single-file NIfTI-1 (.nii)
_NIFTI1_PAIR_MAGIC = b"ni1\x00"  # header of a .hdr/.img pair
_NIFTI2_MAGIC = b"n+2\x00"
_EXPECTED = "expected one 3-D T1w volume"
#: signatures of files often renamed by mistake, to say what the file looks like instead
_KNOWN_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (128, b"DICM", "a DICOM file; convert it with dcm2niix"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"%PDF", "a PDF document"),
)


@dataclass(frozen=True)
class HeaderInfo:
    """What the header checks look at, read before any voxel.

    Args:
        shape: data shape as stored, e.g. ``(X, Y, Z)`` or ``(X, Y, Z, T)``.
        pixdim: voxel size in mm as written in the header (``pixdim[1:4]``), before
            nibabel's silent fix-ups of zero or negative values.
        affine: 4x4 voxel-to-world matrix nibabel chose (sform, else qform, else pixdim).
        dtype: on-disk voxel type.
    """

    shape: tuple[int, ...]
    pixdim: tuple[float, ...]
    affine: np.ndarray
    dtype: np.dtype

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each axis of the affine: the geometry used downstream."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


# --------------------------------------------------------------------------------------------
# Reading: file -> bytes -> nibabel image
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The file's (decompressed) content; compression is detected from the gzip magic bytes."""
    if not path.exists():
        if path.is_symlink():
            raise ScanError(path, f"file not found (broken symbolic link to {os.readlink(path)})")
        raise ScanError(path, "file not found")
    if path.is_dir():
        raise ScanError(path, "is a folder, not a NIfTI file")
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise ScanError(path, "cannot read file (permission denied)") from None
    except OSError as exc:
        raise ScanError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not raw:
        raise ScanError(path, "empty file (0 bytes)")
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        # decompressing everything verifies the CRC and length trailer: a partial download or
        # garbled bytes fail here instead of producing wrong voxels
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error):
        raise ScanError(path, "truncated or corrupt gzip stream") from None


def _not_nifti_reason(raw: bytes) -> str:
    for offset, magic, what in _KNOWN_FORMATS:
        if raw[offset : offset + len(magic)] == magic:
            return f"not a NIfTI file (looks like {what})"
    head = raw[:512]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "not a NIfTI file (looks like a text file)"
    return "not a NIfTI file (no NIfTI-1/NIfTI-2 header)"


def _parse(path: Path, raw: bytes) -> tuple[nib.Nifti1Image, HeaderInfo]:
    """Parse a single-file NIfTI-1/NIfTI-2 image from its decompressed bytes (data stay lazy)."""
    if raw[4:8] == _NIFTI2_MAGIC and len(raw) >= 540:
        klass: type[nib.Nifti1Image] = nib.Nifti2Image
    elif raw[344:348] == _NIFTI1_MAGIC:
        klass = nib.Nifti1Image
    elif raw[344:348] == _NIFTI1_PAIR_MAGIC:
        raise ScanError(path, "header of a .hdr/.img pair; convert it to a single .nii.gz file")
    else:
        raise ScanError(path, _not_nifti_reason(raw))
    try:
        header = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        pixdim = tuple(float(z) for z in header["pixdim"][1 : 1 + min(len(shape), 3)])
        # nibabel's usual repairs (what from_bytes does), logged quietly: the checks below
        # judge the header as written, and a repair note per scan would only add noise
        header.check_fix(logger=_FIX_LOG, error_level=40)
        proxy = klass.ImageArrayProxy(io.BytesIO(raw), header.copy(), mmap=False)
        img = klass(proxy, header.get_best_affine(), header)
        info = HeaderInfo(
            shape=shape,
            pixdim=pixdim,
            affine=np.asarray(img.affine, dtype=np.float64),
            dtype=header.get_data_dtype(),
        )
        n_bytes = int(np.prod(shape, dtype=np.int64)) * info.dtype.itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises many types for a bad header
        raise ScanError(path, f"unreadable NIfTI header ({_one_line(exc)})") from None
    if len(raw) < offset + n_bytes:
        found = max(len(raw) - offset, 0)
        raise ScanError(path, f"truncated data: expected {n_bytes} bytes, found {found}")
    return img, info


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


# --------------------------------------------------------------------------------------------
# Checks: each returns None when fine, else a short lower-case reason
# --------------------------------------------------------------------------------------------


def _effective_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing singleton axes beyond the third: (x, y, z, 1) -> (x, y, z)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_zooms(zooms: tuple[float, ...]) -> str:
    return "x".join(f"{float(z):.2f}" for z in zooms)


def _check_size(h: HeaderInfo) -> str | None:
    if 0 in h.shape:
        return f"empty image (shape {_fmt_shape(h.shape)})"
    return None


def _check_ndim(h: HeaderInfo) -> str | None:
    shape = _effective_shape(h.shape)
    if len(shape) < 3:
        return f"{len(shape)}-D image; {_EXPECTED}"
    if len(shape) == 4:
        return f"4-D image with {shape[3]} volumes; {_EXPECTED}"
    if len(shape) > 4:
        return f"{len(shape)}-D image (shape {_fmt_shape(shape)}); {_EXPECTED}"
    return None


def _check_shape(h: HeaderInfo) -> str | None:
    if any(not MIN_DIM <= s <= MAX_DIM for s in h.shape[:3]):
        return (
            f"implausible shape {_fmt_shape(h.shape[:3])} "
            f"(each spatial dimension must be {MIN_DIM}-{MAX_DIM} voxels)"
        )
    return None


def _check_pixdim(h: HeaderInfo) -> str | None:
    if any(not math.isfinite(z) or z <= 0 for z in h.pixdim):
        return f"invalid voxel size {_fmt_zooms(h.pixdim)} mm in header (must be positive)"
    return None


def _check_affine(h: HeaderInfo) -> str | None:
    affine = np.asarray(h.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        return "affine (voxel-to-world matrix) has non-finite values"
    # relative to the voxel scale, so 0.1 mm and 20 mm voxels are judged alike
    scale = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0)))
    det = abs(float(np.linalg.det(affine[:3, :3])))
    if scale == 0 or det < 1e-6 * scale:
        return "non-invertible affine (singular voxel-to-world matrix)"
    return None


def _check_voxel_size(h: HeaderInfo) -> str | None:
    sizes = (*h.pixdim, *h.voxel_size)
    if any(not MIN_VOXEL_MM <= z <= MAX_VOXEL_MM for z in sizes):
        return (
            f"implausible voxel size {_fmt_zooms(h.voxel_size)} mm "
            f"(expected {MIN_VOXEL_MM:g}-{MAX_VOXEL_MM:g} mm)"
        )
    return None


def _check_dtype(h: HeaderInfo) -> str | None:
    dtype = h.dtype
    if dtype.fields is not None or not (
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.bool_)
    ):
        return f"unsupported voxel type {dtype} (expected real-valued intensities)"
    return None


def _check_finite(data: np.ndarray) -> str | None:
    if not np.issubdtype(data.dtype, np.floating):
        return None
    n_nan = int(np.count_nonzero(np.isnan(data)))
    n_inf = int(np.count_nonzero(np.isinf(data)))
    if n_nan and n_inf:
        return f"contains {n_nan} NaN and {n_inf} infinite voxels"
    if n_nan:
        return f"contains {n_nan} NaN voxels"
    if n_inf:
        return f"contains {n_inf} infinite voxels"
    return None


def _check_constant(data: np.ndarray) -> str | None:
    lo, hi = data.min(), data.max()
    if lo != hi:
        return None
    if lo == 0:
        return "all-zero image (no signal)"
    return f"constant image (every voxel is {float(lo):g})"


#: checks on the header, in order, before any voxel is read
HEADER_CHECKS: tuple[Callable[[HeaderInfo], str | None], ...] = (
    _check_size,
    _check_ndim,
    _check_shape,
    _check_pixdim,
    _check_affine,
    _check_voxel_size,
    _check_dtype,
)
#: checks on the (scaled) voxel array, in order
DATA_CHECKS: tuple[Callable[[np.ndarray], str | None], ...] = (_check_finite, _check_constant)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _load_checked(path: str | Path, info: dict[str, str], label: bool = False) -> nib.Nifti1Image:
    """:func:`load_nifti`, filling ``info['shape']``/``info['voxel_size']`` once they are known."""
    path = Path(path)
    img, header = _parse(path, _read_bytes(path))
    info["shape"] = _fmt_shape(header.shape)
    info["voxel_size"] = _fmt_zooms(header.voxel_size)
    for check in HEADER_CHECKS:
        reason = check(header)
        if reason:
            raise ScanError(path, reason)
    if img.ndim > 3:
        img = squeeze_image(img)  # (x, y, z, 1) -> (x, y, z); affine and header kept
        info["shape"] = _fmt_shape(img.shape)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ScanError(path, f"cannot read voxel data ({_one_line(exc)})") from None
    for check in DATA_CHECKS:
        if label and check is _check_constant:  # an empty label/mask is legitimate
            continue
        reason = check(data)
        if reason:
            raise ScanError(path, reason)
    return img


def load_nifti(path: str | Path, label: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI T1w scan and check that it is one plausible 3-D volume.

    The whole file is read and decompressed (truncation and CRC errors are caught), the header
    and then the voxels pass :data:`HEADER_CHECKS` and :data:`DATA_CHECKS`. Compression is
    recognised from the content, so a gzip file named ``.nii`` (or the reverse) still loads.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2, single file).
        label: the file is a label map or mask: an all-zero/constant volume is accepted.

    Returns:
        A 3-D image (``Nifti2Image`` is a subclass of ``Nifti1Image``). A 4-D image holding
        exactly one volume (shape ``(x, y, z, 1)``) is squeezed to 3-D, keeping its affine.
        Its data are in memory; read them with ``np.asanyarray(img.dataobj)``.

    Raises:
        ScanError: with message ``"<path>: <reason>"`` when the file is missing, not NIfTI,
            truncated or corrupt, not a single 3-D volume, has an implausible shape, voxel
            size or affine, contains NaN/Inf voxels, or is constant.
    """
    return _load_checked(path, {}, label=label)


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and check a scan (see :func:`load_nifti`) and return its voxels and affine.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(data, affine)``: data ``(X, Y, Z)`` float32 with the header's scaling applied, and
        the 4x4 float64 voxel-to-world matrix.

    Raises:
        ScanError: as :func:`load_nifti`.
    """
    img = load_nifti(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data, np.asarray(img.affine, dtype=np.float64)


def validate_scan(path: str | Path) -> dict[str, Any]:
    """Check one scan and describe the result; never raises for a bad scan.

    Args:
        path: the file to check.

    Returns:
        ``{"path", "status": "ok" | "error", "reason": "" when ok, "shape": "99x117x95" or "",
        "voxel_size": "2.00x2.00x2.00" or ""}``. Shape and voxel size are filled whenever the
        header could be read, also for scans that fail a later check.
    """
    info = {"shape": "", "voxel_size": ""}
    row: dict[str, Any] = {"path": str(path), "status": "ok", "reason": ""}
    try:
        _load_checked(path, info)
    except ScanError as exc:
        row.update(status="error", reason=exc.reason)
    except MemoryError:
        row.update(status="error", reason="too large to load into memory")
    except Exception as exc:  # a reader bug must not stop a batch validation
        row.update(status="error", reason=f"unreadable ({_one_line(exc)})")
    return {**row, **info}
