"""NIfTI reading with validation: every way a T1w file can be unusable gives a one-line reason.

The checks themselves (header and voxels) live in :mod:`qcflow.data.nifti_checks`; this module
reads files safely and applies them (one concept, the bounded reader, hence ~420 lines).

:func:`load_nifti` is the only reader the rest of qcflow should use for input scans. Files come from
other people, so reading is bounded: only regular files are opened (a FIFO, ``/dev/zero`` behind a
symbolic link or a socket is refused, never waited on or read), compression is decided from the
content rather than the extension, the header is parsed (nibabel) and checked
(:data:`HEADER_CHECKS`) from its first 540 decompressed bytes, and only then are exactly the voxel
bytes the header claims read -- after comparing that claim with a cap (:func:`max_scan_bytes`).
A gzip stream is inflated incrementally to that size and then to its end within
:data:`GZIP_SLACK_BYTES` (which verifies its CRC and length, so a truncated or corrupt stream is
detected instead of surfacing as garbage voxels), so a decompression bomb costs what its header
claims and no more. The voxels then pass :data:`DATA_CHECKS`. A failure raises
:class:`~qcflow.errors.ScanError` whose message is ``"<path>: <reason>"``; :func:`validate_scan`
turns the same checks into a report row instead.

Example:
    >>> data, affine = load_volume("sub-001_T1w.nii.gz")  # doctest: +SKIP
    >>> data.shape, data.dtype, affine.shape  # doctest: +SKIP
    ((99, 117, 95), dtype('float32'), (4, 4))
"""

from __future__ import annotations

import io
import logging
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.funcs import squeeze_image

from qcflow.data.nifti_checks import (
    DATA_CHECKS,
    HEADER_CHECKS,
    LABEL_DATA_CHECKS,
    MAX_DIM,
    MAX_FOV_MM,
    MAX_VOXEL_MM,
    MIN_DIM,
    MIN_VOXEL_MM,
    HeaderInfo,
    fmt_shape,
    fmt_zooms,
    intensity_warning,
    not_nifti_reason,
)
from qcflow.errors import ScanError
from qcflow.utils.io import NotRegularFileError, format_bytes, one_line, open_regular

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
    "MAX_FOV_MM",
    "DEFAULT_MAX_SCAN_MB",
    "GZIP_SLACK_BYTES",
    "max_scan_bytes",
    "check_readable",
]

#: default cap (MB) on the voxel data a header may claim; a 0.5 mm whole-head float64 scan is
#: ~400 MB. ``data.max_scan_mb`` / ``QCFLOW_MAX_SCAN_MB`` change it
DEFAULT_MAX_SCAN_MB = 512
#: how far a gzip stream may inflate past the data its header claims (trailing bytes)
GZIP_SLACK_BYTES = 1 << 20
#: bytes read before anything else: a NIfTI-2 header (NIfTI-1: 348 + 4)
_HEADER_BYTES = 540
_LIMIT_HINT = "raise it with data.max_scan_mb=..."

#: receives nibabel's header repair notes (e.g. "pixdim[1,2,3] should be non-zero") unprinted
_FIX_LOG = logging.getLogger(f"{__name__}.header_fixes")
_FIX_LOG.propagate = False
_FIX_LOG.addHandler(logging.NullHandler())

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_MAGIC = b"n+1\x00"  # single-file NIfTI-1 (.nii)
_NIFTI1_PAIR_MAGIC = b"ni1\x00"  # header of a .hdr/.img pair
_NIFTI2_MAGIC = b"n+2\x00"


# --------------------------------------------------------------------------------------------
# Reading: file -> header -> bounded voxel bytes -> nibabel image
# --------------------------------------------------------------------------------------------


def max_scan_bytes() -> int:
    """The largest voxel data (bytes) a scan's header may claim: ``QCFLOW_MAX_SCAN_MB`` or
    :data:`DEFAULT_MAX_SCAN_MB` (config: ``data.max_scan_mb``, which tasks export to it)."""
    text = os.environ.get("QCFLOW_MAX_SCAN_MB", "")
    try:
        mb = float(text) if text.strip() else DEFAULT_MAX_SCAN_MB
    except ValueError:
        mb = DEFAULT_MAX_SCAN_MB
    if not math.isfinite(mb) or mb <= 0:
        mb = DEFAULT_MAX_SCAN_MB
    return int(mb * 2**20)


class _GzipError(Exception):
    """The gzip stream is truncated or corrupt."""


class _Plain:
    """Bytes of an uncompressed file, from its current position (after ``first``)."""

    def __init__(self, f: Any, first: bytes) -> None:
        self.f, self.pending = f, first

    def read(self, n: int) -> bytes:
        head, self.pending = self.pending[:n], self.pending[n:]
        return head + (self.f.read(n - len(head)) if n > len(head) else b"")

    def finish(self, slack: int) -> None:
        """Nothing to check: the bytes after the voxel data are never read."""


class _Inflater:
    """Decompressed bytes of a (multi-member) gzip file, inflated only as far as asked.

    ``read(n)`` never inflates more than ``n`` bytes (``zlib``'s ``max_length``), so a stream
    that inflates to gigabytes costs only what the header claims; ``finish`` inflates at most
    ``slack`` more bytes to reach the end of the stream, which verifies every member's CRC-32
    and length, and refuses a stream that goes on (a decompression bomb).
    """

    CHUNK = 1 << 16
    OUT_CHUNK = 16 << 20

    def __init__(self, f: Any, first: bytes) -> None:
        self.f, self.pending = f, first
        self.d = zlib.decompressobj(wbits=31)  # gzip wrapper: header, CRC-32 and length checked
        self.done = False

    def _input(self) -> bytes:
        data, self.pending = self.pending, b""
        return data or self.f.read(self.CHUNK)

    def read(self, n: int) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while got < n and not self.done:
            if self.d.eof:  # end of a member: another member, zero padding or the end
                tail = self.d.unused_data or self._input()
                if not tail:
                    self.done = True
                elif tail[:2] == _GZIP_MAGIC or len(tail) < 2:
                    self.d, self.pending = zlib.decompressobj(wbits=31), tail
                elif not tail.strip(b"\0") and not self.f.read(self.CHUNK).strip(b"\0"):
                    self.done = True  # zero padding after the last member (tape/NFS tools)
                else:
                    raise _GzipError("trailing garbage after the gzip stream")
                continue
            data = self.d.unconsumed_tail or self._input()
            if not data:
                raise _GzipError("gzip stream ends early")
            try:  # at most OUT_CHUNK bytes per call: a bomb never inflates past what is asked
                out = self.d.decompress(data, min(n - got, self.OUT_CHUNK))
            except zlib.error as exc:
                raise _GzipError(str(exc)) from None
            chunks.append(out)
            got += len(out)
        return b"".join(chunks)

    def finish(self, slack: int) -> None:
        extra = self.read(slack + 1)
        if len(extra) > slack or not self.done:
            raise _BombError


class _BombError(Exception):
    """The gzip stream inflates well past the size its header describes."""


def _open_scan(path: Path) -> Any:
    """The file opened for reading; only a regular file (after links), never blocking."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise ScanError(path, f"file not found (broken symbolic link to {target})") from None
        raise ScanError(path, "file not found") from None
    except NotRegularFileError as exc:
        if path.is_dir():
            raise ScanError(path, "is a folder, not a NIfTI file") from None
        raise ScanError(path, f"{exc}; expected a NIfTI file") from None
    except PermissionError:
        raise ScanError(path, "cannot read file (permission denied)") from None
    except OSError as exc:
        raise ScanError(path, f"cannot read file ({exc.strerror or exc})") from None


def check_readable(path: str | Path) -> None:
    """Raise the :class:`~qcflow.errors.ScanError` :func:`load_nifti` would give for a path
    that is missing, a folder, a FIFO, a device or unreadable; return for a readable file."""
    _open_scan(Path(path)).close()


@dataclass
class _Header:
    klass: type[nib.Nifti1Image]
    header: Any
    info: HeaderInfo
    offset: int
    n_bytes: int


def _parse_header(path: Path, head: bytes) -> _Header:
    """The NIfTI-1/NIfTI-2 header at the start of ``head`` (the first decompressed bytes)."""
    if head[4:8] == _NIFTI2_MAGIC and len(head) >= 540:
        klass: type[nib.Nifti1Image] = nib.Nifti2Image
    elif head[344:348] == _NIFTI1_MAGIC:
        klass = nib.Nifti1Image
    elif head[344:348] == _NIFTI1_PAIR_MAGIC:
        raise ScanError(path, "header of a .hdr/.img pair; convert it to a single .nii.gz file")
    else:
        raise ScanError(path, not_nifti_reason(head))
    try:
        header = klass.header_class.from_fileobj(io.BytesIO(head), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        pixdim = tuple(float(z) for z in header["pixdim"][1 : 1 + min(len(shape), 3)])
        # nibabel's usual repairs (what from_bytes does), logged quietly: the checks below
        # judge the header as written, and a repair note per scan would only add noise
        header.check_fix(logger=_FIX_LOG, error_level=40)
        info = HeaderInfo(
            shape=shape,
            pixdim=pixdim,
            affine=np.asarray(header.get_best_affine(), dtype=np.float64),
            dtype=header.get_data_dtype(),
        )
        # Python integers: a hostile shape cannot overflow the size computation
        n_bytes = math.prod(max(n, 0) for n in shape) * info.dtype.itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises many types for a bad header
        raise ScanError(path, f"unreadable NIfTI header ({one_line(exc)})") from None
    return _Header(klass, header, info, offset, n_bytes)


def _image(path: Path, h: _Header, raw: bytes) -> nib.Nifti1Image:
    """The image of the bytes read (header + voxel data; data stay lazy until asked for)."""
    if len(raw) < h.offset + h.n_bytes:
        found = max(len(raw) - h.offset, 0)
        raise ScanError(path, f"truncated data: expected {h.n_bytes} bytes, found {found}")
    try:
        proxy = h.klass.ImageArrayProxy(io.BytesIO(raw), h.header.copy(), mmap=False)
        return h.klass(proxy, h.header.get_best_affine(), h.header)
    except Exception as exc:
        raise ScanError(path, f"unreadable NIfTI header ({one_line(exc)})") from None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _load_checked(
    path: str | Path,
    info: dict[str, str],
    label: bool = False,
    max_bytes: int | None = None,
) -> nib.Nifti1Image:
    """:func:`load_nifti`, filling ``info['shape']``/``info['voxel_size']`` once they are known.

    Order: open (regular files only) -> the header alone (the first 540 decompressed bytes) ->
    :data:`HEADER_CHECKS` and the size cap -> exactly the voxel bytes the header claims -> the
    end of a gzip stream within :data:`GZIP_SLACK_BYTES` -> :data:`DATA_CHECKS`. Peak memory is
    bounded by the claimed size, which the cap bounds, whatever the file holds.
    """
    path = Path(path)
    cap = max_scan_bytes() if max_bytes is None else int(max_bytes)
    with _open_scan(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ScanError(path, "empty file (0 bytes)")
        limit = f"the scan size limit of {format_bytes(cap)} ({_LIMIT_HINT})"
        if size > cap + _HEADER_BYTES + GZIP_SLACK_BYTES:
            raise ScanError(path, f"file is {format_bytes(size)}, over {limit}")
        first = f.read(2)
        stream: _Plain | _Inflater = (
            _Inflater(f, first) if first == _GZIP_MAGIC else _Plain(f, first)
        )
        try:
            head = stream.read(_HEADER_BYTES)
            h = _parse_header(path, head)
            info["shape"] = fmt_shape(h.info.shape)
            info["voxel_size"] = fmt_zooms(h.info.voxel_size)
            for check in HEADER_CHECKS:
                reason = check(h.info)
                if reason:
                    raise ScanError(path, reason)
            need = h.offset + h.n_bytes
            if need > cap:
                raise ScanError(
                    path,
                    f"header claims {format_bytes(need)} of data ({fmt_shape(h.info.shape)} "
                    f"{h.info.dtype}), over {limit}",
                )
            raw = head + stream.read(need - len(head)) if need > len(head) else head
            if len(raw) >= need:  # a short stream is reported as truncated below
                stream.finish(GZIP_SLACK_BYTES)
        except _GzipError:
            raise ScanError(path, "truncated or corrupt gzip stream") from None
        except _BombError:
            raise ScanError(
                path,
                f"gzip stream inflates past the {format_bytes(need)} its header describes "
                "(a decompression bomb or trailing data)",
            ) from None
        except PermissionError:
            raise ScanError(path, "cannot read file (permission denied)") from None
        except OSError as exc:
            raise ScanError(path, f"cannot read file ({exc.strerror or exc})") from None
    img = _image(path, h, raw)
    if img.ndim > 3:
        img = squeeze_image(img)  # (x, y, z, 1) -> (x, y, z); affine and header kept
        info["shape"] = fmt_shape(img.shape)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ScanError(path, f"cannot read voxel data ({one_line(exc)})") from None
    for check in LABEL_DATA_CHECKS if label else DATA_CHECKS:  # an empty mask is legitimate
        reason = check(data)
        if reason:
            raise ScanError(path, reason)
    if not label:
        info["warning"] = intensity_warning(data) or ""
    return img


def load_nifti(
    path: str | Path, label: bool = False, max_bytes: int | None = None
) -> nib.Nifti1Image:
    """Load a NIfTI T1w scan and check that it is one plausible 3-D volume.

    The header passes :data:`HEADER_CHECKS` and the size cap before any voxel is read; the
    voxels (the whole gzip stream: truncation and CRC errors are caught) then pass
    :data:`DATA_CHECKS`. Compression is recognised from the content, so a gzip file named
    ``.nii`` (or the reverse) still loads.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file (NIfTI-1 or NIfTI-2, single file).
        label: the file is a label map or mask: an all-zero/constant volume is accepted.
        max_bytes: cap on the voxel data the header may claim (default :func:`max_scan_bytes`).

    Returns:
        A 3-D image (``Nifti2Image`` is a subclass of ``Nifti1Image``). A 4-D image holding
        exactly one volume (shape ``(x, y, z, 1)``) is squeezed to 3-D, keeping its affine.
        Its data are in memory; read them with ``np.asanyarray(img.dataobj)``.

    Raises:
        ScanError: with message ``"<path>: <reason>"`` when the file is missing, not a regular
            file, not NIfTI, over the size cap, truncated or corrupt (or inflates past its
            header), not a single 3-D volume, has an implausible shape, field of view, voxel
            size or affine, contains NaN/Inf voxels, or is constant.
    """
    return _load_checked(path, {}, label=label, max_bytes=max_bytes)


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


def validate_scan(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """Check one scan and describe the result; never raises for a bad scan.

    Args:
        path: the file to check.
        max_bytes: cap on the voxel data the header may claim (default :func:`max_scan_bytes`).

    Returns:
        ``{"path", "status": "ok" | "error", "reason": "" when ok, "shape": "99x117x95" or "",
        "voxel_size": "2.00x2.00x2.00" or "", "warning": ""}``. Shape and voxel size are filled
        whenever the header could be read, also for scans that fail a later check;
        ``warning`` describes a usable but suspicious scan (every intensity <= 0).
    """
    info = {"shape": "", "voxel_size": "", "warning": ""}
    row: dict[str, Any] = {"path": str(path), "status": "ok", "reason": ""}
    try:
        _load_checked(path, info, max_bytes=max_bytes)
    except ScanError as exc:
        row.update(status="error", reason=exc.reason)
    except MemoryError:
        row.update(status="error", reason="too large to load into memory")
    except Exception as exc:  # a reader bug must not stop a batch validation
        row.update(status="error", reason=f"unreadable ({one_line(exc)})")
    return {**row, **info}
