"""Scoring under hostile inputs: resume by identity, exact round trips, odd participants.tsv,
URL-hostile scan names in the report, and a full disk (thumbnails, maps, the table itself)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import qcflow.tasks.score as score_task
from qcflow.data.discovery import discover_scans
from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import QCFlowError
from qcflow.lit.scoring import score_scans
from qcflow.qc.derivatives import DERIVATIVES, write_maps
from qcflow.qc.scoring import Scorer, ScoreTable, TableWriteError
from qcflow.testing import write_good_scan
from tests.helpers import compose_cfg

PCFG = PreprocessConfig(spacing=2.0, shape=(32, 36, 32))
SMALL = ["data.shape=[32,36,32]", "data.cache=false", "score.progress=false"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Identity(Scorer):
    """Flags every scan (so each gets a thumbnail) and writes maps holding the scan's own mean
    intensity: a copied output that belongs to another scan shows up as a different value."""

    columns = ("mean_intensity", "qc_decision")
    identity = "identity-v1"

    def __init__(self, maps_dir: Path | None) -> None:
        self.maps_dir, self.calls = maps_dir, 0

    def __call__(self, item):
        self.calls += 1
        mean = float(item["image"].mean())
        if self.maps_dir is not None:
            value = torch.full((2, 2, 2), mean)
            pred = {"segmentation": torch.zeros(2, 2, 2), "var_task": value}
            pred |= {"var_artifact": value, "entropy": value}
            write_maps(self.maps_dir, item["scan"], pred, ["task"], np.eye(4), {"mean": mean})
        return {"mean_intensity": mean, "qc_decision": "fail"}


def score_folder(monkeypatch, root: Path, out: Path, *extra: str, maps: bool = True):
    """``score_dataset`` on ``root`` with the :class:`Identity` scorer; returns it and the table."""
    made: list[Identity] = []

    def build(cfg, maps_dir=None):
        made.append(Identity(maps_dir if maps else None))
        return made

    monkeypatch.setattr(score_task, "build_scorers", build)
    cfg = compose_cfg(["experiment=score", f"data.root={root}", *SMALL, *extra], out)
    table, _ = score_task.score_dataset(cfg, progress=False)
    return made[0], table


def outputs(run: Path) -> dict[str, object]:
    """Every thumbnail (bytes), map (voxels) and qc.json (record) of a run, by relative path."""
    found: dict[str, object] = {}
    for path in sorted(run.rglob("*")):
        rel = str(path.relative_to(run))
        if path.name.endswith(".png") and "thumbs" in path.parts:
            found[rel] = path.read_bytes()
        elif path.name.endswith(".nii.gz"):
            found[rel] = np.asarray(nib.load(path).dataobj).tolist()
        elif path.name.endswith("_qc.json"):
            found[rel] = json.loads(path.read_text())
    return found


# --------------------------------------------------------------------------------------------
# 1. resume by identity
# --------------------------------------------------------------------------------------------


def test_resume_copies_each_scans_own_outputs_after_ids_change(monkeypatch, tmp_path) -> None:
    root = tmp_path / "bids"
    # sub-01's files carry no session entity: the ids collide and need a suffix
    write_good_scan(root / "sub-01/ses-b/anat/sub-01_T1w.nii.gz", seed=1)
    write_good_scan(root / "sub-01/ses-c/anat/sub-01_T1w.nii.gz", seed=2)
    write_good_scan(root / "sub-02/anat/sub-02_T1w.nii.gz", seed=3)
    first, _ = score_folder(monkeypatch, root, tmp_path / "run1")
    assert first.calls == 3
    before = {s.path: s.scan_id for s in discover_scans(root)}

    # a session that sorts first, and a second sub-02 file (sub-02 now collides too)
    write_good_scan(root / "sub-01/ses-a/anat/sub-01_T1w.nii.gz", seed=4)
    write_good_scan(root / "sub-02/anat/sub-02_T1w.nii", seed=5)
    after = {s.path: s.scan_id for s in discover_scans(root)}
    for path, sid in before.items():  # suffixes depend on the file alone
        if path.parent.parent.name.startswith("ses-"):
            assert after[path] == sid
    resumed, table = score_folder(
        monkeypatch, root, tmp_path / "run2", "score.resume=true",
        f"score.resume_from={tmp_path / 'run1'}",
    )  # fmt: skip
    assert resumed.calls == 2  # only the two new files
    assert len(table) == 5
    fresh, _ = score_folder(monkeypatch, root, tmp_path / "run3")
    assert fresh.calls == 5

    got, want = outputs(tmp_path / "run2"), outputs(tmp_path / "run3")
    thumbs = [k for k in want if k.startswith("thumbs/")]
    assert len(thumbs) == 5 and len({bytes(want[k]) for k in thumbs}) == 5  # all different
    assert sorted(got) == sorted(want)  # the same files under the same (current) ids...
    for rel, value in want.items():  # ...each holding its own scan's thumbnail and maps
        assert got[rel] == value, rel
    for sid, path in table.set_index("scan_id")["path"].items():
        folder = "sub-01" if "sub-01" in sid else "sub-02"
        qc = json.loads((tmp_path / "run2" / DERIVATIVES / folder / "anat" / f"{sid}_qc.json")
                        .read_text())  # fmt: skip
        assert qc["scan_id"] == sid and qc["source_file"] == path
        assert all(Path(f).name.startswith(f"{sid}_desc-") for f in qc["files"].values())
    # and the table is byte for byte the fresh one
    run2, run3 = (tmp_path / r / "scores.tsv" for r in ("run2", "run3"))
    assert run2.read_bytes() == run3.read_bytes()


def test_duplicate_suffix_is_a_hash_of_the_relative_path(tmp_path) -> None:
    root = tmp_path / "bids"
    names = ["sub-01/ses-1/anat/sub-01_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_T1w.nii.gz"]
    for name in [*names, "sub-02/anat/sub-02_T1w.nii.gz"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    tag = {n: hashlib.sha1(n.encode()).hexdigest()[:8] for n in names}
    expected = sorted([f"sub-01-{tag[n]}" for n in names] + ["sub-02"])
    assert [s.scan_id for s in discover_scans(root)] == expected
    # moving the dataset keeps the ids; adding a third session keeps the first two
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert [s.scan_id for s in discover_scans(moved)] == expected
    (moved / "sub-01/ses-0/anat").mkdir(parents=True)
    (moved / "sub-01/ses-0/anat/sub-01_T1w.nii.gz").write_bytes(b"")
    assert set(expected) < {s.scan_id for s in discover_scans(moved)}


def test_api_file_list_ids_are_stable_and_unique(tmp_path) -> None:
    """qcflow.score([...]) gets discovery's path-derived suffixes, in the caller's order."""
    from qcflow.api import _scans

    a, b, c = (tmp_path / d / "sub-01_T1w.nii.gz" for d in ("x", "y", "z"))
    first = {s.path: s.scan_id for s in _scans([b, a])}
    assert len(set(first.values())) == 2 and all(
        v.startswith("sub-01_T1w-") for v in first.values()
    )
    later = _scans([c, a, b, a])  # a file added (first in the list), one listed twice
    assert [s.path for s in later] == [c.absolute(), a.absolute(), b.absolute()]
    assert all(first[s.path] == s.scan_id for s in later if s.path in first)
    assert [s.scan_id for s in _scans([a])] == ["sub-01_T1w"]  # no collision, no suffix


# --------------------------------------------------------------------------------------------
# 2. exact round trips on resume
# --------------------------------------------------------------------------------------------


class HostileFloats(Scorer):
    """Floats that a default-precision TSV reader does not read back exactly."""

    columns = tuple(f"f{i}" for i in range(10))
    identity = "floats-v1"

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.calls, self.interrupt_at = 0, interrupt_at

    def __call__(self, item):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        m = float(item["image"].double().mean())
        values = [m * 10.0**e for e in (-300, -30, -7, 0, 13, 99, 300)]
        values += [m / 3.0, float(np.float32(m) * np.float32(1.1)), 5e-324]
        return dict(zip(self.columns, values, strict=True))


def test_resumed_table_is_byte_identical_to_an_uninterrupted_one(tmp_path) -> None:
    for i in range(4):
        write_good_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i)
    scans = discover_scans(tmp_path / "in")
    whole = score_scans(scans, [HostileFloats()], tmp_path / "whole.tsv", PCFG)
    with pytest.raises(KeyboardInterrupt):
        score_scans(scans, [HostileFloats(interrupt_at=3)], tmp_path / "p.tsv", PCFG, flush_every=1)
    partial = ScoreTable.read(tmp_path / "p.tsv")
    assert len(partial) == 2
    again = HostileFloats()
    resumed = score_scans(scans, [again], tmp_path / "r.tsv", PCFG, previous=partial)
    assert again.calls == 2
    assert (tmp_path / "r.tsv").read_bytes() == (tmp_path / "whole.tsv").read_bytes()
    cols = list(HostileFloats.columns)
    exact = whole[cols].to_numpy(np.float64)
    for frame in (resumed, ScoreTable.read(tmp_path / "whole.tsv")):
        assert np.array_equal(frame[cols].to_numpy(np.float64).view(np.int64), exact.view(np.int64))


@pytest.mark.parametrize("model_id", ["012345678901", "1234e5678901"])
def test_all_digit_ids_are_strings_and_rows_are_reused(monkeypatch, tmp_path, model_id) -> None:
    monkeypatch.setattr("qcflow.qc.scoring.models_identity", lambda scorers, pcfg: model_id)
    for i, name in enumerate(["0123", "4567"]):
        write_good_scan(tmp_path / "in" / f"{name}.nii.gz", seed=i)
    scans = discover_scans(tmp_path / "in")
    first = HostileFloats()
    score_scans(scans, [first], tmp_path / "a.tsv", PCFG)
    previous = ScoreTable.read(tmp_path / "a.tsv")
    assert previous["model_id"].tolist() == [model_id] * 2
    assert previous["scan_id"].tolist() == ["0123", "4567"]
    assert all(isinstance(v, str) and len(v) == 40 for v in previous["file_sha1"])
    second = HostileFloats()
    score_scans(scans, [second], tmp_path / "b.tsv", PCFG, previous=previous)
    assert (first.calls, second.calls) == (2, 0)
    assert (tmp_path / "b.tsv").read_bytes() == (tmp_path / "a.tsv").read_bytes()


# --------------------------------------------------------------------------------------------
# 3. participants.tsv
# --------------------------------------------------------------------------------------------


def test_participants_with_trailing_tabs_short_and_long_rows(tmp_path, caplog) -> None:
    root = tmp_path / "bids"
    for sub in ("01", "02", "03", "04", "05"):
        (root / f"sub-{sub}/anat").mkdir(parents=True)
        (root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz").write_bytes(b"")
    tsv = root / "participants.tsv"
    tsv.write_text(
        "participant_id\tsite\tage\t\n"  # a trailing tab after the header too
        "sub-01\tsiteA\t34\t\n"
        "sub-02\t007\t51\t\t\n"  # an all-digit site, two trailing tabs
        "sub-03\tsiteC\n"  # short: skipped
        "sub-04\tsiteD\t40\textra\n"  # long: skipped
        "\n"
        "sub-05\tsiteE\t29\n"
    )
    with caplog.at_level(logging.WARNING, logger="qcflow.data.discovery"):
        scans = {s.subject: s for s in discover_scans(root)}
    assert {k: s.site for k, s in scans.items()} == {
        "01": "siteA", "02": "007", "03": None, "04": None, "05": "siteE",
    }  # fmt: skip
    assert scans["01"].meta == {"age": "34"} and scans["04"].meta == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert str(tsv) in warnings[0] and "line 4" in warnings[0] and "line 5" in warnings[0]
    assert "line 2" not in warnings[0] and "line 3 " not in warnings[0]


# --------------------------------------------------------------------------------------------
# 4. hostile scan names in the report
# --------------------------------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_td = tag == "td"

    def handle_endtag(self, tag):
        self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.cells.append(data)


HOSTILE = ["a#b", "q?x=1", "100%", "50%25", "sp ace", "quo'te\"d", "<script>alert(1)", "&amp;"]


def test_report_links_survive_hostile_scan_names(monkeypatch, tmp_path) -> None:
    root = tmp_path / "in"
    for i, name in enumerate(HOSTILE):
        write_good_scan(root / f"{name}.nii.gz", seed=i)
    monkeypatch.setattr(score_task, "build_scorers", lambda cfg, maps_dir=None: [Identity(None)])
    overrides = ["experiment=score", f"data.root={root}", *SMALL, "logger=none"]
    cfg = compose_cfg(overrides, tmp_path / "run")
    result = score_task.run(cfg)
    assert result["n_ok"] == len(HOSTILE)
    report = Path(result["report_html"])
    page = _Page()
    page.feed(report.read_text())
    images = [attrs["src"] for tag, attrs in page.tags if tag == "img"]
    assert len(images) == len(HOSTILE)
    resolved = {unquote(src) for src in images}
    assert resolved == {f"thumbs/{name}.png" for name in HOSTILE}
    assert all((report.parent / rel).is_file() for rel in resolved)
    assert [tag for tag, _ in page.tags].count("script") == 1  # the page's own, no injected one
    handlers = {tag for tag, attrs in page.tags for k in attrs if k.startswith("on")}
    assert handlers == {"th", "input", "select"}  # the page's own (sort, filter), no injected one
    assert set(HOSTILE) <= set(page.cells)  # names shown as text


# --------------------------------------------------------------------------------------------
# 5. full disk
# --------------------------------------------------------------------------------------------


def test_failed_thumbnail_and_map_writes_warn_and_scoring_goes_on(monkeypatch, tmp_path, caplog):
    import matplotlib.figure

    import qcflow.qc.derivatives as derivatives

    root = tmp_path / "in"
    for i in range(4):
        write_good_scan(root / f"s{i}.nii.gz", seed=i)
    savefig, save_nifti = matplotlib.figure.Figure.savefig, derivatives.save_nifti

    def full_savefig(self, fname, *args, **kwargs):
        if ".s1.png." in str(fname):  # atomic_path's temporary file for thumbs/s1.png
            Path(fname).write_bytes(b"\x89PNG half")
            raise OSError(ENOSPC.errno, ENOSPC.strerror)
        return savefig(self, fname, *args, **kwargs)

    def full_save_nifti(path, tensor, affine):
        if Path(path).name.startswith("s2_") and "uncertainty" in Path(path).name:
            raise OSError(ENOSPC.errno, ENOSPC.strerror)  # after s2's segmentation was written
        return save_nifti(path, tensor, affine)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_savefig)
    monkeypatch.setattr(derivatives, "save_nifti", full_save_nifti)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        scorer, table = score_folder(monkeypatch, root, run)
    assert scorer.calls == 4 and (table["status"] == "ok").all()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("qcflow") and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings), warnings
    assert any(str(run / "thumbs" / "s1.png") in w and "No space left" in w for w in warnings)
    assert any("s2_desc-" in w and "No space left" in w for w in warnings)
    assert sorted(p.name for p in (run / "thumbs").iterdir()) == ["s0.png", "s2.png", "s3.png"]
    maps = {p.name for p in (run / DERIVATIVES).rglob("*") if p.is_file()}
    assert not {m for m in maps if m.startswith("s2_")}  # no half set of maps
    for sid in ("s0", "s1", "s3"):
        assert f"{sid}_qc.json" in maps and f"{sid}_desc-gm_dseg.nii.gz" in maps
    assert not [p for p in run.rglob(".*") if p.is_file()]  # no temporary leftovers


def test_full_disk_on_the_table_stops_with_one_line_and_a_valid_table(monkeypatch, tmp_path):
    for i in range(4):
        write_good_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i)
    scans = discover_scans(tmp_path / "in")
    to_csv, calls = pd.DataFrame.to_csv, []

    def full_to_csv(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            Path(path).write_text("scan_id\tpa")  # half a file, then the disk is full
            raise OSError(ENOSPC.errno, ENOSPC.strerror)
        return to_csv(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_to_csv)
    scorer = HostileFloats()
    table = tmp_path / "out" / "scores.tsv"
    with pytest.raises(TableWriteError) as info:
        score_scans(scans, [scorer], table, PCFG, flush_every=1)
    assert isinstance(info.value, QCFlowError)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{table}: disk full")
    assert len(calls) == 3 and scorer.calls == 3  # stopped at the failed write
    written = ScoreTable.read(table)
    assert list(written["scan_id"]) == ["s0", "s1"] and (written["status"] == "ok").all()
    assert sorted(p.name for p in table.parent.iterdir()) == ["scores.tsv"]


CLI_FULL_DISK = """
import errno, os, sys
import pandas as pd
to_csv, calls = pd.DataFrame.to_csv, []
def full(self, path, *a, **k):
    calls.append(path)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return to_csv(self, path, *a, **k)
pd.DataFrame.to_csv = full
sys.argv = ["qcflow", *sys.argv[1:]]
from qcflow.cli import main
main()
"""


def test_cli_full_disk_is_one_error_line(tmp_path) -> None:
    for i in range(3):
        write_good_scan(tmp_path / "in" / f"s{i}.nii.gz", seed=i)
    run = tmp_path / "run"
    args = ["experiment=score", f"data.root={tmp_path / 'in'}", *SMALL, "score.flush_every=1"]
    args += ["score.density=false", "score.uncertainty=false", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run(
        [sys.executable, "-c", CLI_FULL_DISK, *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("qcflow: error:")]
    assert errors == [res.stderr.strip().splitlines()[-1]]
    assert f"{run / 'scores.tsv'}: disk full" in errors[0]
    assert list(ScoreTable.read(run / "scores.tsv")["scan_id"]) == ["s0"]
