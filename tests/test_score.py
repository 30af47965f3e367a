"""Scoring loop: every scan gets a row, bad ones named, resumable, valid after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcflow.data.discovery import discover_scans
from qcflow.data.preprocess import PreprocessConfig
from qcflow.lit.scoring import score_scans
from qcflow.qc.scoring import IQMScorer, Scorer, ScoreTable
from qcflow.testing import BAD_SCAN_KINDS, write_bad_scans, write_good_scan
from tests.helpers import check_report, compose_cfg, run_cli

PCFG = PreprocessConfig(spacing=2.0, shape=(32, 36, 32))


@pytest.fixture()
def mixed(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "mixed"
    for i in range(3):
        write_good_scan(folder / f"good{i}.nii.gz", seed=i)
    expected = write_bad_scans(folder / "bad")
    return folder, expected


class Counting(Scorer):
    """A scorer that counts calls and can fail or interrupt on a given call."""

    columns = ("mean_intensity",)
    identity = "counting-v1"

    def __init__(self, fail_at: int | None = None, interrupt_at: int | None = None) -> None:
        self.calls, self.fail_at, self.interrupt_at = 0, fail_at, interrupt_at

    def __call__(self, item):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.calls == self.fail_at:
            raise RuntimeError("boom\nsecond line")
        return {"mean_intensity": float(item["image"].mean())}


def test_every_scan_gets_a_row(mixed, tmp_path: Path) -> None:
    folder, expected = mixed
    scans = discover_scans(folder)
    table = score_scans(scans, [IQMScorer(), Counting(fail_at=2)], tmp_path / "s.tsv", PCFG)
    assert len(table) == len(scans)
    ok = table[table.status == "ok"]
    assert len(ok) == 2
    assert ok[["snr", "cnr", "cjv", "efc", "fber", "mean_intensity"]].notna().all().all()
    failed = table.set_index("scan_id").loc["good1"]
    assert failed.status == "error" and failed.error == "scoring failed: RuntimeError: boom"
    bad = table[table.path.str.contains("/bad/")]
    for _, row in bad.iterrows():
        assert row.status == "error"
        assert expected[Path(row.path).name] in row.error, row.error
    written = ScoreTable.read(tmp_path / "s.tsv")
    assert list(written.scan_id) == list(table.scan_id)


def test_resume_skips_unchanged_scans(mixed, tmp_path: Path) -> None:
    folder, _ = mixed
    scans = discover_scans(folder)
    first = Counting()
    score_scans(scans, [first], tmp_path / "a.tsv", PCFG)
    assert first.calls == 3
    previous = ScoreTable.read(tmp_path / "a.tsv")
    # one file changes: only it is scored again
    write_good_scan(folder / "good2.nii.gz", seed=7)
    second = Counting()
    table = score_scans(scans, [second], tmp_path / "b.tsv", PCFG, previous=previous)
    assert second.calls == 1
    assert len(table) == len(scans)
    # other models: everything is scored again
    third = Counting()
    third.identity = "counting-v2"
    score_scans(scans, [third], tmp_path / "c.tsv", PCFG, previous=previous)
    assert third.calls == 3


def test_one_scorer_protocol_decides_views_and_outputs(mixed, tmp_path: Path) -> None:
    """Preprocessing is decided once from the protocol: a ``reference_view`` scorer's own
    preprocessing becomes the table's (the IQMs read it), another scorer's own view stays its
    own; the score task reads thresholds and figures from the protocol, not the type."""
    from qcflow.qc.scoring import prepare_scoring, reference_preprocessing

    folder, _ = mixed
    scans = [s for s in discover_scans(folder) if "good" in s.scan_id]
    coarse = PreprocessConfig(spacing=4.0, shape=(16, 18, 16))
    finer = PreprocessConfig(spacing=3.0, shape=(20, 24, 20))

    class Shape(Counting):
        def __init__(self, name: str, pcfg=None, reference=False) -> None:
            super().__init__()
            self.columns, self.identity = (f"{name}_shape",), name
            self.preprocess, self.reference_view = pcfg, reference

        def __call__(self, item):
            return {self.columns[0]: "x".join(map(str, item["image"].shape[1:]))}

    own, ref = Shape("own", finer), Shape("ref", coarse, reference=True)
    assert reference_preprocessing([own, IQMScorer()], PCFG) is PCFG  # not a reference view
    assert reference_preprocessing([own, ref], PCFG) is coarse
    plan = prepare_scoring(scans, [own, ref, Shape("plain")], tmp_path / "x.tsv", PCFG)
    assert plan.views == [finer.key(), coarse.key(), coarse.key()]
    table = score_scans(scans, [own, ref, Shape("plain")], tmp_path / "s.tsv", PCFG)
    assert set(table.own_shape) == {"20x24x20"} and set(table.plain_shape) == {"16x18x16"}


def test_score_task_takes_thresholds_and_figures_from_the_protocol(
    mixed, tmp_path: Path, monkeypatch
) -> None:
    import qcflow.tasks.score as score_task

    folder, _ = mixed

    class Flagging(Counting):
        columns, identity, thresholds = ("qc_decision",), "flagging-v1", {"cut": 0.5}

        def __call__(self, item):
            return {"qc_decision": "review"}

        def finish(self, table, out_dir):
            path = out_dir / "figs" / "mine.png"
            path.parent.mkdir()
            path.write_bytes(b"png")
            return {"mine": path}

    monkeypatch.setattr(score_task, "build_scorers", lambda cfg, maps_dir=None: [Flagging()])
    over = ["experiment=score", f"data.root={folder / 'good0.nii.gz'}", "logger=none"]
    result = score_task.run(compose_cfg([*over, "score.progress=false"], tmp_path / "run"))
    assert result["thresholds"] == {"cut": 0.5} and result["decisions"]["review"] == 1
    refs = check_report(Path(result["report_html"]), ["good0"])
    assert "figs/mine.png" in refs and "thumbs/good0.png" in refs


def test_interrupt_leaves_valid_partial_table(mixed, tmp_path: Path) -> None:
    folder, _ = mixed
    scans = [s for s in discover_scans(folder) if "good" in s.scan_id]
    with pytest.raises(KeyboardInterrupt):
        score_scans(scans, [Counting(interrupt_at=3)], tmp_path / "p.tsv", PCFG, flush_every=100)
    partial = ScoreTable.read(tmp_path / "p.tsv")
    assert list(partial.scan_id) == ["good0", "good1"]
    assert (partial.status == "ok").all()


def test_score_task_cli(mixed, tmp_path: Path) -> None:
    folder, _ = mixed
    run_dir = tmp_path / "run"
    res = run_cli("experiment=score", f"data.root={folder}", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr
    table = ScoreTable.read(run_dir / "scores.tsv")
    bad = [
        k
        for k in BAD_SCAN_KINDS
        if (folder / "bad" / k).is_symlink() or (folder / "bad" / k).exists()
    ]
    assert len(table) == 3 + len(bad)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_ok"] == 3
    assert np.isfinite(table[table.status == "ok"].snr).all()
    check_report(run_dir / "report.html", list(table.scan_id))

    # resume from the latest score run: nothing is recomputed, same rows
    again = tmp_path / "again"
    res = run_cli(
        "experiment=score", f"data.root={folder}", "score.resume=true",
        f"score.resume_from={run_dir}", f"hydra.run.dir={again}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (
        f"resume: {len(table) - 1} of {len(table)} scans already scored" in res.stdout
    )  # not the missing file
    resumed = ScoreTable.read(again / "scores.tsv")
    assert resumed.drop(columns=["path"]).equals(table.drop(columns=["path"]))


def test_score_only_bad_files_exits_1(tmp_path: Path) -> None:
    write_bad_scans(tmp_path / "bad")
    res = run_cli(
        "experiment=score", f"data.root={tmp_path / 'bad'}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("qcflow: error:")
    assert (tmp_path / "r" / "scores.tsv").is_file()


def test_score_config_composes(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=score", "score.resume=true"], tmp_path)
    assert cfg.task == "score" and cfg.score.resume is True


def test_python_api_list_of_files(mixed, tmp_path: Path) -> None:
    import qcflow

    folder, _ = mixed
    files = [folder / "good0.nii.gz", folder / "bad" / "nan.nii.gz", folder / "good1.nii.gz"]
    table = qcflow.score(files, models=None, output=tmp_path / "api")
    assert list(table.scan_id) == ["good0", "nan", "good1"]
    assert list(table.status) == ["ok", "error", "ok"]
    assert "NaN" in table.error[1]
    assert ScoreTable.read(tmp_path / "api" / "scores.tsv").shape[0] == 3
    with pytest.raises(Exception, match="nothing to score"):
        qcflow.score(files, models=None, iqm=False)
