"""Scan discovery: BIDS (sessions, participants.tsv, derivatives), plain folders, globs, files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from qcflow.data.discovery import Scan, discover_scans, is_bids, strip_nifti_suffix
from qcflow.errors import QCFlowError


def touch(root: Path, *names: str) -> None:
    """Discovery never opens files, so empty placeholders are enough."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


@pytest.fixture()
def bids(tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    touch(
        root,
        "sub-001/ses-01/anat/sub-001_ses-01_T1w.nii.gz",
        "sub-001/ses-02/anat/sub-001_ses-02_T1w.nii.gz",
        "sub-001/ses-02/anat/sub-001_ses-02_T1w.json",
        "sub-002/anat/sub-002_T1w.nii.gz",
        "sub-002/anat/sub-002_run-2_T1w.nii",
        "sub-003/anat/sub-003_T2w.nii.gz",
        "sub-003/func/sub-003_task-rest_bold.nii.gz",
        "derivatives/labels/sub-002/anat/sub-002_label-GM_mask.nii.gz",
        "derivatives/labels/sub-002/anat/sub-002_desc-brain_mask.nii.gz",
        "derivatives/labels/sub-001/ses-02/anat/sub-001_ses-02_label-GM_mask.nii.gz",
        "derivatives/fmriprep/sub-001/anat/sub-001_desc-preproc_T1w.nii.gz",
        ".git/sub-009_T1w.nii.gz",
    )
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9"}))
    (root / "participants.tsv").write_text(
        "participant_id\tsite\tage\nsub-001\tsiteA\t34\nsub-002\tn/a\t51\nsub-003\tsiteB\t29\n"
    )
    return root


def test_bids_with_sessions_and_participants(bids: Path) -> None:
    scans = discover_scans(bids)
    assert [s.scan_id for s in scans] == [
        "sub-001_ses-01",
        "sub-001_ses-02",
        "sub-002",
        "sub-002_run-2",
    ]
    by_id = {s.scan_id: s for s in scans}
    s1 = by_id["sub-001_ses-02"]
    assert (s1.subject, s1.session, s1.site) == ("001", "02", "siteA")
    assert s1.path == bids / "sub-001/ses-02/anat/sub-001_ses-02_T1w.nii.gz"
    assert s1.label_path == (
        bids / "derivatives/labels/sub-001/ses-02/anat/sub-001_ses-02_label-GM_mask.nii.gz"
    )
    assert s1.mask_path is None
    assert s1.meta == {"age": "34"}
    s2 = by_id["sub-002"]
    assert (s2.subject, s2.session, s2.site) == ("002", None, None)  # "n/a" is no site
    assert s2.label_path == bids / "derivatives/labels/sub-002/anat/sub-002_label-GM_mask.nii.gz"
    assert s2.mask_path == bids / "derivatives/labels/sub-002/anat/sub-002_desc-brain_mask.nii.gz"
    assert by_id["sub-002_run-2"].label_path is None
    assert all(s.path.is_absolute() for s in scans)
    assert all("derivatives" not in s.path.parts and ".git" not in s.path.parts for s in scans)


def test_bids_pattern_and_site_fallback_columns(bids: Path) -> None:
    (bids / "participants.tsv").write_text("participant_id\tcohort\tscanner\nsub-003\tc1\tprisma\n")
    scans = discover_scans(bids, pattern="*_T2w")
    assert [s.scan_id for s in scans] == ["sub-003_T2w"]
    assert scans[0].site == "c1" and scans[0].meta == {}
    (bids / "participants.tsv").write_text("participant_id\tscanner\n003\tprisma\n")
    assert discover_scans(bids, pattern="*_T2w.nii.gz")[0].site == "prisma"


def test_bids_detected_from_subject_folders(tmp_path: Path) -> None:
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/notes.nii.gz")
    assert is_bids(tmp_path)
    scans = discover_scans(tmp_path)
    assert [(s.scan_id, s.subject) for s in scans] == [("sub-01", "01")]


def test_bids_without_t1w_is_an_error(tmp_path: Path) -> None:
    touch(tmp_path, "sub-01/anat/sub-01_T2w.nii.gz")
    with pytest.raises(QCFlowError, match=r"_T1w\.nii\[\.gz\]"):
        discover_scans(tmp_path)


def test_plain_nested_folder(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "site1/a.nii.gz",
        "site1/deep/b.nii",
        "z.NII.GZ",
        "c.nii",
        "c.nii.gz",
        "notes.txt",
        ".hidden/q.nii.gz",
        ".r.nii.gz",
    )
    os.symlink(tmp_path / "gone.nii.gz", tmp_path / "broken.nii.gz")  # listed; validation judges
    scans = discover_scans(tmp_path)
    ids = [s.scan_id for s in scans]
    # c.nii and c.nii.gz collide: each gets the start of the SHA-1 of its relative path
    tag = {n: hashlib.sha1(n.encode()).hexdigest()[:8] for n in ("c.nii", "c.nii.gz")}
    c_nii, c_gz = f"c-{tag['c.nii']}", f"c-{tag['c.nii.gz']}"
    assert ids == sorted(["broken", c_nii, c_gz, "site1_a", "site1_deep_b", "z"])
    assert ids == sorted(ids)
    by_id = {s.scan_id: s for s in scans}
    assert by_id[c_nii].path.name == "c.nii" and by_id[c_gz].path.name == "c.nii.gz"
    assert by_id["site1_deep_b"].path == tmp_path / "site1/deep/b.nii"
    assert all(s.subject is None and s.site is None for s in scans)
    assert discover_scans(tmp_path) == scans  # deterministic
    with pytest.raises(QCFlowError, match=r"matching 'nothing_\*' found"):
        discover_scans(tmp_path, pattern="nothing_*")
    assert [s.scan_id for s in discover_scans(tmp_path, pattern="[ab]")] == [
        "site1_a",
        "site1_deep_b",
    ]


def test_glob(tmp_path: Path) -> None:
    touch(tmp_path, "s1/x/a.nii.gz", "s1/b.nii.gz", "s2/c.nii", "s2/d.txt")
    scans = discover_scans(str(tmp_path / "**" / "*.nii.gz"))
    assert [s.scan_id for s in scans] == ["s1_b", "s1_x_a"]
    scans = discover_scans(str(tmp_path / "s*" / "*.nii*"))
    assert [s.scan_id for s in scans] == ["s1_b", "s2_c"]
    with pytest.raises(QCFlowError, match="no .nii/.nii.gz files match"):
        discover_scans(str(tmp_path / "*.nii.gz"))


def test_single_file(tmp_path: Path) -> None:
    touch(tmp_path, "sub-07_ses-2_T1w.nii.gz")
    scans = discover_scans(tmp_path / "sub-07_ses-2_T1w.nii.gz")
    assert scans == [Scan("sub-07_ses-2_T1w", tmp_path / "sub-07_ses-2_T1w.nii.gz", "07", "2")]


def test_missing_and_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(QCFlowError) as info:
        discover_scans(tmp_path / "x" / "y")
    message = str(info.value)
    assert str(tmp_path / "x" / "y") in message and "\n" not in message
    touch(tmp_path, "empty/readme.txt")
    with pytest.raises(QCFlowError, match="no .nii/.nii.gz files found") as info:
        discover_scans(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_scan_is_hashable_and_meta_ignored() -> None:
    a = Scan("x", Path("/x.nii"), meta={"age": "3"})
    b = Scan("x", Path("/x.nii"))
    assert a == b and hash(a) == hash(b)
    assert strip_nifti_suffix("a.b.nii.gz") == "a.b" and strip_nifti_suffix("a.img") == "a"
