"""Per-scan NIfTI maps in a BIDS-derivatives-style layout (``<out>/derivatives/qcflow``).

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
so viewers overlay them on the original scan. Every file is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from qcflow.data.discovery import Scan
from qcflow.utils.io import atomic_write_json

__all__ = ["DERIVATIVES", "scan_folder", "write_maps", "write_description"]

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


def write_maps(
    root: str | Path,
    scan: Scan,
    pred: Mapping[str, Tensor],
    sources: Sequence[str],
    affine: np.ndarray,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write one scan's segmentation and variance maps; returns ``name -> path`` (relative to
    ``root``)."""
    from qcflow.qc.segmentation import prediction_maps, save_nifti

    root = Path(root)
    folder = scan_folder(scan)
    files: dict[str, str] = {}
    for name, tensor in prediction_maps(pred, sources).items():
        rel = folder / f"{scan.scan_id}_{_entities(name)}.nii.gz"
        save_nifti(root / rel, tensor, affine)
        files[name] = str(rel)
    record = {"scan_id": scan.scan_id, "source_file": str(scan.path), "sources": list(sources)}
    record.update({**dict(summary or {}), "files": files})
    atomic_write_json(root / folder / f"{scan.scan_id}_qc.json", record)
    return files
