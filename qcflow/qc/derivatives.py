"""Per-scan NIfTI maps in a BIDS-derivatives-style layout (``<out>/derivatives/qcflow``): the
one writer of method B's maps (scoring and ``uncertainty_evaluate`` alike).

Layout (``<d>`` = ``derivatives/qcflow/sub-001/[ses-01/]anat/<scan_id>``)::

    derivatives/qcflow/dataset_description.json
    <d>_desc-gm_dseg.nii.gz                 segmentation (1 = grey matter)
    <d>_desc-<source>_uncertainty.nii.gz    variance map per source
    <d>_desc-artifact_uncertainty.nii.gz    sum over the artifact kinds
    <d>_desc-entropy_uncertainty.nii.gz     entropy of softmax(f / sigma^2)
    <d>_qc.json                             the scan's numbers and file list

``<source>`` is ``task`` and each artifact kind (variance maps sigma^2); ``artifact`` is their
sum over the artifact kinds. Scans outside BIDS (no subject) go to ``<scan_id>/``. Maps are on the
preprocessed grid (RAS, ``data.spacing``, cropped to ``data.shape``) with its scanner-space affine,
so viewers overlay them on the original scan. Every file is written atomically; when one
cannot be written (disk full) the scan's maps are removed and one warning line names the file,
and scoring goes on.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qcflow.data.discovery import Scan
from qcflow.utils.io import atomic_path, atomic_write_json

__all__ = [
    "DERIVATIVES",
    "scan_folder",
    "scan_files",
    "copy_maps",
    "prediction_maps",
    "save_nifti",
    "write_maps",
    "write_description",
]

log = logging.getLogger(__name__)

#: derivatives folder under a scoring run
DERIVATIVES = Path("derivatives") / "qcflow"


def _entities(name: str) -> str:
    """BIDS entities + suffix of a map: ``seg`` -> ``desc-gm_dseg``; ``var-<source>`` and
    ``entropy`` -> ``desc-<source|entropy>_uncertainty``."""
    return "desc-gm_dseg" if name == "seg" else f"desc-{name.removeprefix('var-')}_uncertainty"


def scan_folder(scan: Scan) -> Path:
    """The scan's folder relative to the derivatives root (BIDS entities when known)."""
    if scan.subject:
        folder = Path(f"sub-{scan.subject}")
        if scan.session:
            folder = folder / f"ses-{scan.session}"
        return folder / "anat"
    return Path(scan.scan_id)


def _file_pattern(scan_id: str) -> re.Pattern[str]:
    """Names :func:`write_maps` gives a scan's files (and no other scan's: ``<id>_run-2_...``
    or ``<id>_desc-x_desc-...`` belong to other ids)."""
    sid = re.escape(scan_id)
    return re.compile(rf"{sid}_(?:desc-[A-Za-z0-9]+_(?:dseg|uncertainty)\.nii\.gz|qc\.json)")


def scan_files(root: str | Path, scan: Scan) -> list[Path]:
    """The map files of ``scan`` under the derivatives folder ``root`` (sorted)."""
    folder = Path(root) / scan_folder(scan)
    if not folder.is_dir():
        return []
    pattern = _file_pattern(scan.scan_id)
    return sorted(f for f in folder.iterdir() if pattern.fullmatch(f.name) and f.is_file())


def copy_maps(src_root: str | Path, old_id: str, dst_root: str | Path, scan: Scan) -> list[Path]:
    """Copy the maps that ``scan`` got in an earlier run, where its id was ``old_id``, into
    ``dst_root`` under its current id (file names and the ``_qc.json`` record renamed).

    Returns:
        The files written. Raises OSError when one cannot be written.
    """
    old = replace(scan, scan_id=old_id)
    src_root, dst_root = Path(src_root), Path(dst_root)
    dst_dir = scan_folder(scan)
    written = []
    for src in scan_files(src_root, old):
        name = scan.scan_id + src.name[len(old_id) :]
        dst = dst_root / dst_dir / name
        if dst.resolve() == src.resolve():
            continue
        if name.endswith("_qc.json") and old_id != scan.scan_id:
            record = json.loads(src.read_text())
            record["scan_id"] = scan.scan_id
            files = record.get("files") or {}
            for key, rel in files.items():
                rel_name = Path(str(rel)).name
                if rel_name.startswith(old_id):
                    files[key] = str(dst_dir / (scan.scan_id + rel_name[len(old_id) :]))
            atomic_write_json(dst, record)
        else:
            with atomic_path(dst) as tmp:
                shutil.copy2(src, tmp)
        written.append(dst)
    return written


def write_description(root: str | Path) -> Path:
    """``dataset_description.json`` of the derivatives folder (BIDS derivative metadata)."""
    from qcflow import __version__

    path = Path(root) / "dataset_description.json"
    if not path.is_file():
        atomic_write_json(
            path,
            {
                "Name": "qcflow uncertainty maps",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qcflow", "Version": __version__}],
                "Labels": {"dseg": {"0": "background", "1": "grey matter"}},
            },
        )
    return path


def prediction_maps(pred: Mapping[str, Tensor], sources: Sequence[str]) -> dict[str, Tensor]:
    """The per-scan maps that are written: ``seg`` (uint8), ``var-<source>`` for every source,
    ``var-artifact`` and ``entropy`` (float32), on the CPU."""
    maps = {"seg": pred["segmentation"].to("cpu", torch.uint8)}
    maps.update({f"var-{s}": pred[f"var_{s}"] for s in sources})
    maps["var-artifact"] = pred["var_artifact"]
    maps["entropy"] = pred["entropy"]
    return {k: v if k == "seg" else v.detach().to("cpu", torch.float32) for k, v in maps.items()}


def save_nifti(path: str | Path, tensor: Tensor, affine: np.ndarray) -> Path:
    """Write ``tensor`` as a gzipped NIfTI (millimetre units), atomically."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(tensor.numpy(), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1))
    return Path(path)


def write_maps(
    root: str | Path,
    scan: Scan,
    pred: Mapping[str, Tensor],
    sources: Sequence[str],
    affine: np.ndarray,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write one scan's segmentation and variance maps; returns ``name -> path`` (relative to
    ``root``).

    A file that cannot be written (OSError, e.g. the disk is full) costs this scan its maps,
    not its scores: the files written so far are removed, one warning line names the file and
    ``{}`` is returned.
    """
    root = Path(root)
    folder = scan_folder(scan)
    files: dict[str, str] = {}
    target = root / folder
    try:
        for name, tensor in prediction_maps(pred, sources).items():
            rel = folder / f"{scan.scan_id}_{_entities(name)}.nii.gz"
            target = root / rel
            save_nifti(target, tensor, affine)
            files[name] = str(rel)
        record = {"scan_id": scan.scan_id, "source_file": str(scan.path)}
        record.update({"sources": list(sources), **dict(summary or {}), "files": files})
        target = root / folder / f"{scan.scan_id}_qc.json"
        atomic_write_json(target, record)
    except OSError as exc:
        for rel in files.values():
            (root / rel).unlink(missing_ok=True)
        reason = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
        log.warning("%s: cannot write (%s); no maps for scan %s", target, reason, scan.scan_id)
        return {}
    return files
