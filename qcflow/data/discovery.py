"""Find the input scans: a BIDS dataset, a plain folder, a glob or a single file.

Discovery only lists files; it never opens them (:mod:`qcflow.data.nifti` judges them), so a
broken file still appears here and gets its own line in the validation report. (One concept, the
four input forms and their shared id rules, hence ~430 lines.) The result is
sorted by ``scan_id`` and depends only on the file names, never on the file system's order.

BIDS layout read here (the embedded dataset uses the same names)::

    <root>/dataset_description.json            (optional)
    <root>/participants.tsv                     (optional: participant_id, site|cohort|scanner, ...)
    <root>/sub-001/[ses-01/]anat/sub-001[_ses-01]_T1w.nii.gz
    <root>/derivatives/labels/sub-001/[ses-01/]anat/sub-001[_ses-01]_label-GM_mask.nii.gz
    <root>/derivatives/labels/sub-001/[ses-01/]anat/sub-001[_ses-01]_desc-brain_mask.nii.gz

Example:
    >>> scans = discover_scans("/data/bids")  # doctest: +SKIP
    >>> scans[0].scan_id, scans[0].subject, scans[0].site  # doctest: +SKIP
    ('sub-001_ses-01', '001', 'siteA')
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from qcflow.errors import QCFlowError

__all__ = [
    "Scan",
    "discover_scans",
    "unique_scan_ids",
    "resolve_data_root",
    "is_bids",
    "is_nifti_name",
    "strip_nifti_suffix",
    "NIFTI_SUFFIXES",
    "SITE_COLUMNS",
]

log = logging.getLogger(__name__)

#: recognised NIfTI file name endings (longest first)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: participants.tsv columns used as the scan's site, first present wins
SITE_COLUMNS = ("site", "cohort", "scanner")
_BIDS_PATTERN = "*_T1w"
_LABEL_SUFFIX = "_label-GM_mask"
_MASK_SUFFIX = "_desc-brain_mask"
_SKIP_DIRS = ("derivatives", "sourcedata", "code")
_GLOB_CHARS = re.compile(r"[*?\[]")
_ENTITY = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")
_NA = ("", "n/a", "na", "nan", "none")


@dataclass(frozen=True)
class Scan:
    """One input scan and what is known about it.

    Args:
        scan_id: unique, file-system-safe id (e.g. ``sub-001_ses-01``); the row key of every
            report.
        path: the image file (absolute).
        subject: BIDS subject label without ``sub-`` (``None`` outside BIDS names).
        session: BIDS session label without ``ses-``.
        site: acquisition site from ``participants.tsv`` (``site``, else ``cohort``, else
            ``scanner`` column).
        label_path: grey-matter label map, when the dataset has one.
        mask_path: brain mask, when the dataset has one.
        meta: the other ``participants.tsv`` columns (strings); not part of equality or hash.
    """

    scan_id: str
    path: Path
    subject: str | None = None
    session: str | None = None
    site: str | None = None
    label_path: Path | None = None
    mask_path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def is_nifti_name(name: str) -> bool:
    """Whether a file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``sub-001_T1w.nii.gz`` -> ``sub-001_T1w``; other names lose their last suffix only."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _matches(name: str, pattern: str | None) -> bool:
    """``pattern`` is a file-name glob, with or without the NIfTI extension."""
    if not is_nifti_name(name):
        return False
    return (
        pattern is None
        or fnmatchcase(name, pattern)
        or fnmatchcase(strip_nifti_suffix(name), pattern)
    )


def _entities(name: str) -> dict[str, str]:
    """BIDS ``sub``/``ses`` entities of a file name (first occurrence of each)."""
    found: dict[str, str] = {}
    for key, value in _ENTITY.findall(name):
        found.setdefault(key, value)
    return found


def _abs(path: str | Path) -> Path:
    """Absolute and normalised, without resolving symlinks (a link stays the scan's path)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


def is_bids(root: Path) -> bool:
    """A folder is read as BIDS when it has ``dataset_description.json`` or ``sub-*`` folders."""
    if (root / "dataset_description.json").is_file():
        return True
    return any(p.is_dir() for p in root.glob("sub-*"))


def _read_participants(root: Path) -> dict[str, dict[str, str]]:
    """``participants.tsv`` as ``{subject label without 'sub-': {column: value}}``.

    Read as plain tab-separated text (no quoting, no index column inferred): trailing tabs
    (empty fields after the last column) are ignored; a row with another number of fields
    than the header, or without a participant id, is skipped, and one warning line names the
    file and every skipped row; the other rows are kept. A file that cannot be read at all is
    ignored with one warning.
    """
    tsv = root / "participants.tsv"
    if not tsv.is_file():
        return {}
    try:
        text = tsv.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("%s: cannot read (%s); site and participant columns ignored", tsv, reason)
        return {}
    lines = [line.removesuffix("\r") for line in text.split("\n")]

    def fields(line: str) -> list[str]:
        return [v.strip() for v in line.split("\t")]

    header = fields(lines[0]) if lines else []
    while header and not header[-1]:  # trailing tabs after the last column name
        header.pop()
    if "participant_id" not in header:
        log.warning("%s: no participant_id column; site and participant columns ignored", tsv)
        return {}
    width = len(header)
    rows: dict[str, dict[str, str]] = {}
    bad: list[str] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = fields(line)
        if len(values) > width and not any(values[width:]):
            values = values[:width]  # trailing tabs
        if len(values) != width:
            bad.append(f"line {number} has {len(values)}")
            continue
        record = dict(zip(header, values, strict=True))
        pid = record.pop("participant_id")
        if not pid:
            bad.append(f"line {number} has no participant_id")
            continue
        rows[pid[4:] if pid.startswith("sub-") else pid] = record
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        log.warning(
            "%s: %d row(s) skipped (expected %d tab-separated fields): %s",
            tsv,
            len(bad),
            width,
            shown,
        )
    return rows


def _site_and_meta(row: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    site = None
    for column in SITE_COLUMNS:
        value = row.get(column, "")
        if value.lower() not in _NA:
            site = value
            break
    meta = {k: v for k, v in row.items() if k not in SITE_COLUMNS}
    return site, meta


def _derivative(root: Path, rel_dir: Path, stem: str, suffix: str) -> Path | None:
    """``derivatives/labels/<rel_dir>/<stem><suffix>.nii[.gz]`` when it exists."""
    folder = root / "derivatives" / "labels" / rel_dir
    for ext in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _bids_anat_dirs(root: Path) -> Iterable[Path]:
    """``sub-*/anat`` and ``sub-*/ses-*/anat`` folders, sorted."""
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        if (sub / "anat").is_dir():
            yield sub / "anat"
        for ses in sorted(p for p in sub.glob("ses-*") if p.is_dir()):
            if (ses / "anat").is_dir():
                yield ses / "anat"


def _discover_bids(root: Path, pattern: str | None) -> list[Scan]:
    participants = _read_participants(root)
    pattern = pattern or _BIDS_PATTERN
    scans = []
    for anat in _bids_anat_dirs(root):
        for name in sorted(os.listdir(anat)):
            if _hidden(name) or not _matches(name, pattern):
                continue
            stem = strip_nifti_suffix(name)
            stem = stem[: -len("_T1w")] if stem.endswith("_T1w") else stem
            ents = _entities(stem)
            subject = ents.get("sub") or anat.relative_to(root).parts[0][4:]
            session = ents.get("ses")
            site, meta = _site_and_meta(participants.get(subject, {}))
            rel_dir = anat.relative_to(root)
            scans.append(
                Scan(
                    scan_id=stem,
                    path=anat / name,
                    subject=subject,
                    session=session,
                    site=site,
                    label_path=_derivative(root, rel_dir, stem, _LABEL_SUFFIX),
                    mask_path=_derivative(root, rel_dir, stem, _MASK_SUFFIX),
                    meta=meta,
                )
            )
    return scans


def _walk_nifti(root: Path, pattern: str | None) -> list[Path]:
    """Every NIfTI file under ``root``; hidden and ``derivatives``-like folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d) and d not in _SKIP_DIRS)
        found += [Path(dirpath) / f for f in filenames if not _hidden(f) and _matches(f, pattern)]
    return sorted(found)


def _plain_scans(paths: Iterable[Path], base: Path) -> list[Scan]:
    """Scans named by their path relative to ``base`` (``a/b.nii.gz`` -> ``a_b``)."""
    scans = []
    for path in paths:
        try:
            rel = path.relative_to(base)
        except ValueError:
            rel = Path(path.name)
        parts = [*rel.parts[:-1], strip_nifti_suffix(rel.name)]
        scan_id = "_".join(parts)
        ents = _entities(strip_nifti_suffix(rel.name))
        scans.append(Scan(scan_id, path, subject=ents.get("sub"), session=ents.get("ses")))
    return scans


def _glob_base(pattern: str) -> Path:
    """The longest leading folder of a glob without wildcard characters."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(os.sep if pattern.startswith(os.sep) else ".")


def _discover_glob(pattern_text: str, pattern: str | None) -> list[Scan]:
    expanded = os.path.expanduser(pattern_text)
    matches = glob.glob(expanded, recursive=True)
    paths = sorted(
        _abs(m) for m in matches if not os.path.isdir(m) and _matches(os.path.basename(m), pattern)
    )
    return _plain_scans(paths, _abs(_glob_base(expanded)))


def _path_tag(path: Path, base: Path | None, length: int) -> str:
    """Short SHA-1 of the file's path relative to ``base`` (POSIX form; absolute outside it)."""
    try:
        rel = path.relative_to(base).as_posix() if base is not None else path.as_posix()
    except ValueError:
        rel = path.as_posix()
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def unique_scan_ids(scans: list[Scan], base: Path | None = None) -> list[Scan]:
    """Sorted by ``scan_id``; every scan of a group that shares an id gets ``-<tag>``.

    The tag is the first 8 hex digits of the SHA-1 of the file's path relative to ``base``
    (the dataset root), so it depends on that file alone: adding, removing or renaming other
    files never moves an id onto another scan (a position-based ``-2``, ``-3`` did). Scans
    whose id is unique keep it unchanged. In the (astronomically rare) case that a tagged id
    is already taken, the tag grows by two digits until it is free.
    """
    groups: dict[str, list[Scan]] = {}
    for scan in sorted(scans, key=lambda s: (s.scan_id, str(s.path))):
        groups.setdefault(scan.scan_id, []).append(scan)
    taken = {sid for sid, group in groups.items() if len(group) == 1}
    out = []
    for sid, group in groups.items():
        if len(group) == 1:
            out += group
            continue
        for scan in group:
            length = 8
            new = f"{sid}-{_path_tag(scan.path, base, length)}"
            while new in taken and length < 40:
                length += 2
                new = f"{sid}-{_path_tag(scan.path, base, length)}"
            taken.add(new)
            out.append(replace(scan, scan_id=new))
    return sorted(out, key=lambda s: (s.scan_id, str(s.path)))


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------


def discover_scans(root: str | Path, pattern: str | None = None) -> list[Scan]:
    """List the input scans under ``root``, sorted by ``scan_id``.

    Args:
        root: one of
            (a) a BIDS dataset (``dataset_description.json`` or ``sub-*`` folders): images
            ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, ids like ``sub-001_ses-01`` (the file name
            without ``_T1w`` and extension), subject/session from the BIDS entities, site and
            other columns from ``participants.tsv``, GM labels and brain masks from
            ``derivatives/labels``;
            (b) a plain folder: every ``.nii``/``.nii.gz`` below it (hidden, ``derivatives``,
            ``sourcedata`` and ``code`` folders skipped), id = relative path without extension
            with ``/`` -> ``_``;
            (c) a glob (contains ``*``, ``?`` or ``[``; ``**`` recurses), ids relative to its
            fixed leading folder;
            (d) a single file.
        pattern: file-name glob applied to each file name, with or without its extension
            (e.g. ``"*_acq-mprage_T1w"``); for BIDS it replaces the default ``"*_T1w"``.

    Returns:
        Scans sorted by ``scan_id``. When several files would get the same id (``a.nii`` and
        ``a.nii.gz``, or ``sub-01_T1w`` in two session folders), each of them gets
        ``-<8 hex digits>``: the start of the SHA-1 of its path relative to ``root``, so the
        id stays with its file when other files are added or removed; ids without a
        collision are unchanged.

    Raises:
        QCFlowError: ``root`` does not exist or holds no matching NIfTI file.
    """
    text = str(root)
    path = _abs(text)
    if not path.exists() and not path.is_symlink() and _GLOB_CHARS.search(text):
        scans = _discover_glob(text, pattern)
        if not scans:
            raise QCFlowError(f"{text}: no .nii/.nii.gz files match this glob")
        return unique_scan_ids(scans, _abs(_glob_base(os.path.expanduser(text))))
    if not path.exists() and not path.is_symlink():
        raise QCFlowError(f"{path}: no such file or folder (data.root)")
    if not path.is_dir():
        ents = _entities(strip_nifti_suffix(path.name))
        scan = Scan(strip_nifti_suffix(path.name), path, ents.get("sub"), ents.get("ses"))
        return [scan]
    if is_bids(path):
        scans = _discover_bids(path, pattern)
        where = f"sub-*/[ses-*/]anat/{pattern or _BIDS_PATTERN}.nii[.gz]"
        if not scans:
            raise QCFlowError(f"{path}: BIDS dataset without images matching {where}")
        return unique_scan_ids(scans, path)
    scans = _plain_scans(_walk_nifti(path, pattern), path)
    if not scans:
        suffix = f" matching '{pattern}'" if pattern else ""
        raise QCFlowError(
            f"{path}: no .nii/.nii.gz files{suffix} found "
            "(expected a BIDS dataset, a folder or a glob)"
        )
    return unique_scan_ids(scans, path)


def resolve_data_root(data_cfg: Any) -> Path | str:
    """``data.root``, or the embedded dataset's ``data.split`` folder (built on first use).

    Args:
        data_cfg: the ``data`` config group (``root``, ``split``, ``embedded``).

    Returns:
        The root given by the user (a path or a glob, unchanged) or ``<embedded>/<split>``.
    """
    if data_cfg.get("root"):
        return str(data_cfg.root)
    from qcflow.data.synth import ensure_embedded  # local: building it pulls in nilearn

    split = str(data_cfg.get("split") or "train")
    root = Path(ensure_embedded(data_cfg.embedded)) / split
    if not root.is_dir():
        raise QCFlowError(f"{root}: embedded split '{split}' not found (data.split)")
    return root
