"""Scoring with method B's student: uncertainty columns, NIfTI maps in a derivatives layout,
resume carrying the maps over, and 2-process (DDP, gloo) scoring equal to one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from qcflow.api import compose_config
from qcflow.qc.scoring import ScoreTable
from qcflow.tasks.uncertainty_train import instantiate_module
from qcflow.testing import BAD_SCAN_KINDS, write_bad_scans, write_good_scan
from tests.helpers import check_report, run_cli

KINDS = ["noise", "blur"]
# the student was "trained" at 4 mm on 16^3 patches; the default scoring view is 2 mm
STUDENT_DATA = {
    "spacing": 4.0,
    "fov_mm": [64, 72, 64],
    "shape": None,
    "percentiles": [0.5, 99.5],
    "patch_size": [16, 16, 16],
}
SMALL = ["data.shape=[32,36,32]", "score.progress=false"]


@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) student checkpoint in a run folder with its Hydra config."""
    run = tmp_path_factory.mktemp("runs") / "uncertainty_student" / "run0"
    torch.manual_seed(0)
    over = ["model.filters=[4,8,16]", "model.context=false", "model.attribution=false"]
    kinds = f"uncertainty.kinds=[{','.join(KINDS)}]"
    m = instantiate_module(compose_config(["experiment=uncertainty_student", kinds, *over]))
    ckpt = {
        "state_dict": m.state_dict(),
        "hyper_parameters": dict(m.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    (run / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": STUDENT_DATA}))
    return run


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """BIDS-named good scans (one with a session) plus every kind of bad file."""
    root = tmp_path / "bids"
    write_good_scan(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", seed=1)
    write_good_scan(root / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_T1w.nii.gz", seed=2)
    write_good_scan(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz", seed=3)
    for name in write_bad_scans(tmp_path / "bad"):
        src = tmp_path / "bad" / name
        if src.is_symlink() or src.exists():  # every bad kind as a subject of its own
            stem = "".join(c for c in name.split(".")[0] if c.isalnum())
            dst = root / f"sub-bad{stem}" / "anat" / f"sub-bad{stem}_T1w.nii.gz"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst) if not src.is_dir() else None
    return root


def test_student_columns_and_maps(student_run: Path, folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "score"
    res = run_cli(
        "experiment=score", f"data.root={folder}", f"score.student_ckpt={student_run}",
        "score.uncertainty=true", *SMALL, f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    table = ScoreTable.read(run_dir / "scores.tsv")
    ok = table[table.status == "ok"].set_index("scan_id")
    assert sorted(ok.index) == ["sub-01", "sub-02_ses-a", "sub-03"]
    errors = table[table.status == "error"]
    assert len(errors) >= len(BAD_SCAN_KINDS) - 2 and errors.error.str.len().gt(0).all()
    cols = ["artifact_variance_total", *[f"artifact_variance_{k}" for k in KINDS]]
    cols += ["task_variance", "gm_volume_ml", "gm_volume_sd_ml", "snr", "cnr"]
    assert np.isfinite(ok[cols].to_numpy(float)).all()
    assert (ok[cols[:4]] > 0).all().all()
    # the total is the sum over the artifact kinds (means commute with sums)
    np.testing.assert_allclose(
        ok.artifact_variance_total, ok[[f"artifact_variance_{k}" for k in KINDS]].sum(1), rtol=1e-4
    )
    deriv = run_dir / "derivatives" / "qcflow"
    assert json.loads((deriv / "dataset_description.json").read_text())["DatasetType"] == (
        "derivative"
    )
    anat = deriv / "sub-02" / "ses-a" / "anat"
    seg = nib.load(anat / "sub-02_ses-a_desc-gm_dseg.nii.gz")
    var = nib.load(anat / "sub-02_ses-a_desc-noise_uncertainty.nii.gz")
    assert seg.shape == var.shape == (16, 18, 16)  # the student's own 4 mm view
    np.testing.assert_allclose(np.abs(np.diag(seg.affine))[:3], 4.0)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    summary = json.loads((anat / "sub-02_ses-a_qc.json").read_text())
    assert summary["gm_volume_ml"] == pytest.approx(ok.loc["sub-02_ses-a", "gm_volume_ml"])
    for rel in summary["files"].values():
        assert (deriv / rel).is_file()
    assert np.asarray(var.dataobj).mean() == pytest.approx(
        ok.loc["sub-02_ses-a", "artifact_variance_noise"], rel=1e-4
    )
    assert not list(deriv.glob("sub-bad*"))  # no maps for unreadable scans
    check_report(run_dir / "report.html", list(table.scan_id))

    # resume: nothing recomputed, maps carried over from the earlier run
    again = tmp_path / "again"
    res = run_cli(
        "experiment=score", f"data.root={folder}", f"score.student_ckpt={student_run}",
        "score.uncertainty=true", "score.resume=true", f"score.resume_from={run_dir}", *SMALL,
        f"hydra.run.dir={again}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = ScoreTable.read(again / "scores.tsv")
    assert resumed.equals(table)
    copied = sorted(p.relative_to(again) for p in (again / "derivatives").rglob("*.nii.gz"))
    assert copied == sorted(
        p.relative_to(run_dir) for p in (run_dir / "derivatives").rglob("*.nii.gz")
    )


def test_two_process_scoring_equals_one(student_run: Path, folder: Path, tmp_path: Path) -> None:
    """trainer=ddp devices=2 (CPU, gloo): each rank scores its share; rank 0 merges."""
    common = [
        "experiment=score", f"data.root={folder}", f"score.student_ckpt={student_run}",
        "score.uncertainty=true", "score.maps=false", *SMALL,
    ]  # fmt: skip
    one = tmp_path / "one"
    res = run_cli(*common, f"hydra.run.dir={one}")
    assert res.returncode == 0, res.stderr[-3000:]
    backup = {k: os.environ.pop(k) for k in ("MASTER_PORT", "MASTER_ADDR") if k in os.environ}
    try:
        two = tmp_path / "two"
        res = run_cli(
            *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            f"hydra.run.dir={two}",
        )  # fmt: skip
    finally:
        os.environ.update(backup)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n_ok"] == 3
    assert not list(two.glob("scores.rank*.tsv"))  # merged into scores.tsv
    a, b = ScoreTable.read(one / "scores.tsv"), ScoreTable.read(two / "scores.tsv")
    assert list(a.scan_id) == list(b.scan_id)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)


def test_report_attributes_flagged_scans_to_kinds(tmp_path: Path) -> None:
    """Flagged scans get a card with per-kind variance bars scaled to their largest kind."""
    import re

    import pandas as pd

    from qcflow.qc.report import write_report

    (tmp_path / "thumbs").mkdir()
    (tmp_path / "thumbs" / "b.png").write_bytes(b"\x89PNG")
    table = pd.DataFrame(
        [
            {"scan_id": "a", "qc_decision": "pass", "artifact_variance_total": 0.2,
             "artifact_variance_noise": 0.1, "artifact_variance_blur": 0.1, "status": "ok"},
            {"scan_id": "b", "qc_decision": "fail", "artifact_variance_total": 0.6,
             "artifact_variance_noise": 0.5, "artifact_variance_blur": 0.1, "status": "ok"},
            {"scan_id": "c", "qc_decision": None, "artifact_variance_total": None,
             "artifact_variance_noise": None, "artifact_variance_blur": None, "status": "error"},
        ]
    )  # fmt: skip
    report = write_report(table, tmp_path, {"fail_tau": 0.03}, None, {"b": "thumbs/b.png"})
    check_report(report, ["a", "b", "c"])
    text = report.read_text()
    cards = re.findall(r"<div class='card'>(.*?)</div></div>", text)
    assert len(cards) == 1 and ">b" in cards[0] and "thumbs/b.png" in cards[0]
    bars = dict(re.findall(r"<span>(\w+)</span><i style=\"width:(\d+)px\">", cards[0]))
    assert bars == {"blur": "20", "noise": "100"}  # 0.1 / 0.5 of the largest kind
