"""Writing the cohorts: BIDS metadata and one scan's NIfTI in its storage orientation and dtype.

Why separate: storage is where scanners differ most visibly (axis order, sign, integer types);
the QC method must canonicalise it, so every scan is reoriented from RAS to its drawn axis codes
(array and affine, nibabel) and cast (float32, or int16 rounded without scaling).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

__all__ = ["reorient", "store_scan", "write_bids_meta"]


def reorient(array: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """A RAS array + affine as the same image stored with axis codes ``codes`` (e.g. ``LPS``)."""
    xform = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.axcodes2ornt(tuple(codes)))
    out = nio.apply_orientation(array, xform)
    return np.ascontiguousarray(out), affine @ nio.inv_ornt_aff(xform, array.shape)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if array.dtype != np.float32:
        img.header.set_slope_inter(1.0, 0.0)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def store_scan(scan: dict[str, Any], path: Path, gm_path: Path | None) -> None:
    """Write ``scan['image']`` (and its GM label) in the drawn orientation and dtype."""
    storage = scan["params"]["storage"]
    image, affine = reorient(scan["image"], scan["affine"], storage["orientation"])
    if storage["dtype"] == "int16":
        image = np.clip(np.rint(image), -32768, 32767).astype(np.int16)
    else:
        image = image.astype(np.float32)
    _save(image, affine, path)
    if gm_path is not None and scan["gm"] is not None:
        gm, _ = reorient(scan["gm"], scan["affine"], storage["orientation"])
        _save(gm.astype(np.uint8), affine, gm_path)


def write_bids_meta(root: Path, cohort: str, split: str, participants: list[str]) -> None:
    """``dataset_description.json`` and ``participants.tsv`` of one split's BIDS dataset."""
    root.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": f"qcflow generalisation benchmark: {cohort} {split}",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "experiments/generalisation/cohorts.py"}],
    }
    (root / "dataset_description.json").write_text(json.dumps(desc, indent=2) + "\n")
    lines = ["participant_id"] + sorted(participants)
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
