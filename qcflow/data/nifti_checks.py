"""What makes a T1w NIfTI scan unusable: the header and voxel checks, each a one-line reason.

:mod:`qcflow.data.nifti` reads a file (bounded, non-blocking) and runs these checks: first
:data:`HEADER_CHECKS` on the header alone, before any voxel is read, then :data:`DATA_CHECKS` on
the scaled voxel array. Each check returns ``None`` when fine, else a short lower-case reason
that becomes ``"<path>: <reason>"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HeaderInfo",
    "HEADER_CHECKS",
    "DATA_CHECKS",
    "LABEL_DATA_CHECKS",
    "intensity_warning",
    "not_nifti_reason",
    "fmt_shape",
    "fmt_zooms",
    "MIN_DIM",
    "MAX_DIM",
    "MIN_VOXEL_MM",
    "MAX_VOXEL_MM",
    "MAX_FOV_MM",
]

#: plausible spatial dimension range (voxels) of a structural brain scan
MIN_DIM, MAX_DIM = 8, 2048
#: largest plausible field of view (mm) along any axis: a whole head with neck is ~300 mm
MAX_FOV_MM = 500.0
#: plausible voxel size range (mm)
MIN_VOXEL_MM, MAX_VOXEL_MM = 0.1, 20.0
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
# Checks: each returns None when fine, else a short lower-case reason
# --------------------------------------------------------------------------------------------


def _effective_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing singleton axes beyond the third: (x, y, z, 1) -> (x, y, z)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(s)) for s in shape)


def fmt_zooms(zooms: tuple[float, ...]) -> str:
    return "x".join(f"{float(z):.2f}" for z in zooms)


def _check_size(h: HeaderInfo) -> str | None:
    if 0 in h.shape:
        return f"empty image (shape {fmt_shape(h.shape)})"
    return None


def _check_ndim(h: HeaderInfo) -> str | None:
    shape = _effective_shape(h.shape)
    if len(shape) < 3:
        return f"{len(shape)}-D image; {_EXPECTED}"
    if len(shape) == 4:
        return f"4-D image with {shape[3]} volumes; {_EXPECTED}"
    if len(shape) > 4:
        return f"{len(shape)}-D image (shape {fmt_shape(shape)}); {_EXPECTED}"
    return None


def _check_shape(h: HeaderInfo) -> str | None:
    if any(not MIN_DIM <= s <= MAX_DIM for s in h.shape[:3]):
        return (
            f"implausible shape {fmt_shape(h.shape[:3])} "
            f"(each spatial dimension must be {MIN_DIM}-{MAX_DIM} voxels)"
        )
    return None


def _check_pixdim(h: HeaderInfo) -> str | None:
    if any(not math.isfinite(z) or z <= 0 for z in h.pixdim):
        return f"invalid voxel size {fmt_zooms(h.pixdim)} mm in header (must be positive)"
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
            f"implausible voxel size {fmt_zooms(h.voxel_size)} mm "
            f"(expected {MIN_VOXEL_MM:g}-{MAX_VOXEL_MM:g} mm)"
        )
    return None


def _check_fov(h: HeaderInfo) -> str | None:
    fov = [n * z for n, z in zip(h.shape[:3], h.voxel_size, strict=False)]
    if any(f > MAX_FOV_MM for f in fov):
        return (
            f"implausible field of view {'x'.join(f'{f:.0f}' for f in fov)} mm "
            f"(shape {fmt_shape(h.shape[:3])} at {fmt_zooms(h.voxel_size)} mm; a head is "
            f"at most {MAX_FOV_MM:.0f} mm)"
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


def intensity_warning(data: np.ndarray) -> str | None:
    """A usable but suspicious scan: every voxel <= 0 (an inverted or sign-flipped image)."""
    if float(data.max()) <= 0:
        return "every intensity is <= 0 (inverted or sign-flipped image?)"
    return None


#: checks on the header, in order, before any voxel is read
HEADER_CHECKS: tuple[Callable[[HeaderInfo], str | None], ...] = (
    _check_size,
    _check_ndim,
    _check_shape,
    _check_pixdim,
    _check_affine,
    _check_voxel_size,
    _check_fov,
    _check_dtype,
)
#: checks on the (scaled) voxel array, in order
DATA_CHECKS: tuple[Callable[[np.ndarray], str | None], ...] = (_check_finite, _check_constant)
#: checks on a label map or mask: an all-zero or constant volume is legitimate there
LABEL_DATA_CHECKS: tuple[Callable[[np.ndarray], str | None], ...] = (_check_finite,)


def not_nifti_reason(raw: bytes) -> str:
    """Why ``raw`` (a file's first bytes) is not a NIfTI file, naming what it looks like."""
    for offset, magic, what in _KNOWN_FORMATS:
        if raw[offset : offset + len(magic)] == magic:
            return f"not a NIfTI file (looks like {what})"
    head = raw[:512]
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "not a NIfTI file (looks like a text file)"
    return "not a NIfTI file (no NIfTI-1/NIfTI-2 header)"
