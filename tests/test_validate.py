"""The ``validate`` task: called directly with the real configs, and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qcflow.errors import QCFlowError
from qcflow.tasks import validate
from qcflow.testing import write_bad_scans, write_good_scan
from tests.conftest import SMALL_EMBEDDED
from tests.helpers import compose_cfg, run_cli

GOOD = ("good_a.nii.gz", "site2/good_b.nii", "site2/deep/good_c.nii.gz")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Three good scans (one nested two levels down) and every kind of bad file."""
    root = tmp_path_factory.mktemp("mixed")
    for seed, name in enumerate(GOOD):
        write_good_scan(root / name, shape=(20, 22, 18), seed=seed)
    return root, write_bad_scans(root / "bad")


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("only_bad")
    write_bad_scans(root)
    return root


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def check_report(table: pd.DataFrame, root: Path, expected_bad: dict[str, str]) -> None:
    """Every file has a row; good ones are ok with shape and voxel size; bad ones say why."""
    assert list(table.columns) == [
        "scan_id",
        "path",
        "status",
        "reason",
        "shape",
        "voxel_size",
        "warning",
    ]
    rows = {
        Path(p).relative_to(root).as_posix(): row for p, row in table.set_index("path").iterrows()
    }
    assert set(rows) == set(GOOD) | {f"bad/{name}" for name in expected_bad}
    assert table["scan_id"].is_unique and list(table["scan_id"]) == sorted(table["scan_id"])
    for name in GOOD:
        row = rows[name]
        assert (row["status"], row["reason"]) == ("ok", "")
        assert (row["shape"], row["voxel_size"]) == ("20x22x18", "2.00x2.00x2.00")
    for name, reason in expected_bad.items():
        row = rows[f"bad/{name}"]
        assert row["status"] == "error" and reason in row["reason"], (name, row["reason"])
    assert rows["site2/deep/good_c.nii.gz"]["scan_id"] == "site2_deep_good_c"


def test_run_writes_validation_tsv(
    mixed_folder: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, expected_bad = mixed_folder
    cfg = compose_cfg(["experiment=validate", f"data.root={root}"], tmp_path / "out")
    assert cfg.task == "validate"
    result = validate.run(cfg)
    n_bad = len(expected_bad)
    assert result == {
        "n_scans": len(GOOD) + n_bad,
        "n_ok": len(GOOD),
        "n_error": n_bad,
        "n_warning": 0,
        "validation_tsv": str(tmp_path / "out" / "validation.tsv"),
    }
    check_report(read_tsv(Path(result["validation_tsv"])), root, expected_bad)
    out = capsys.readouterr().out
    assert f"{len(GOOD)} ok, {n_bad} error" in out
    assert "bad_nan: contains 12 NaN voxels" in out
    assert "bad_four_d: 4-D image with 3 volumes; expected one 3-D T1w volume" in out
    assert not list((tmp_path / "out").glob(".*tmp"))  # the atomic write left nothing behind


def test_run_parallel_matches_serial(
    mixed_folder: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, _ = mixed_folder
    serial = compose_cfg(["experiment=validate", f"data.root={root}"], tmp_path / "a")
    threads = compose_cfg(
        ["experiment=validate", f"data.root={root}", "data.num_workers=2"], tmp_path / "b"
    )
    validate.run(serial)
    validate.run(threads)
    assert read_tsv(tmp_path / "a/validation.tsv").equals(read_tsv(tmp_path / "b/validation.tsv"))


def test_run_with_only_bad_scans_raises_after_writing(bad_folder: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=validate", f"data.root={bad_folder}"], tmp_path)
    with pytest.raises(QCFlowError, match="no valid scan") as info:
        validate.run(cfg)
    assert str(bad_folder) in str(info.value) and "\n" not in str(info.value)
    table = read_tsv(tmp_path / "validation.tsv")
    assert len(table) > 10 and set(table["status"]) == {"error"}


def test_run_on_bids_reports_site(tmp_path: Path) -> None:
    root = tmp_path / "bids"
    write_good_scan(root / "sub-01/anat/sub-01_T1w.nii.gz", shape=(16, 18, 15))
    write_good_scan(root / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", shape=(16, 18, 15))
    (root / "participants.tsv").write_text("participant_id\tsite\nsub-01\tA\nsub-02\tB\n")
    cfg = compose_cfg(["experiment=validate", f"data.root={root}"], tmp_path / "out")
    result = validate.run(cfg)
    table = read_tsv(Path(result["validation_tsv"]))
    assert list(table["scan_id"]) == ["sub-01", "sub-02_ses-1"]
    assert list(table["site"]) == ["A", "B"]


def test_missing_root_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=validate", f"data.root={tmp_path / 'nope'}"], tmp_path)
    with pytest.raises(QCFlowError, match="no such file or folder"):
        validate.run(cfg)


def test_cli_mixed_folder_exits_0(
    mixed_folder: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, expected_bad = mixed_folder
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=validate", f"data.root={root}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{len(GOOD)} ok, {len(expected_bad)} error" in proc.stdout
    check_report(read_tsv(run_dir / "validation.tsv"), root, expected_bad)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_ok"] == len(GOOD) and metrics["n_error"] == len(expected_bad)


def test_cli_only_bad_files_exits_1(bad_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "experiment=validate", f"data.root={bad_folder}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qcflow: error:")]
    assert len(errors) == 1, proc.stderr
    assert str(bad_folder) in errors[0] and "no valid scan" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "validation.tsv").is_file()


def test_embedded_split(small_embedded: Path, tmp_path: Path) -> None:
    synth = pytest.importorskip("qcflow.data.synth")
    if not hasattr(synth, "ensure_embedded"):
        pytest.skip("qcflow.data.synth.ensure_embedded not available yet")
    overrides = [f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()]
    cfg = compose_cfg(["experiment=validate", "data.split=test_clean", *overrides], tmp_path)
    result = validate.run(cfg)
    assert result["n_scans"] == SMALL_EMBEDDED["n_test_clean"] == result["n_ok"]
    table = read_tsv(tmp_path / "validation.tsv")
    assert all(Path(p).is_relative_to(small_embedded / "test_clean") for p in table["path"])
