"""W&B dashboards: figures, artifact examples, per-scan tables and summaries reach an offline
run; ``WANDB_MODE=disabled`` and other loggers make every helper a no-op."""

from __future__ import annotations

import json
import math
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qcflow.cli import run_task
from qcflow.lit.wandb_media import artifact_examples
from qcflow.utils import wandb as qc_wandb
from tests.helpers import compose_cfg
from tests.test_iqc_pipeline import TINY, TINY_ENCODER
from tests.test_uncertainty_cli import TINY as TINY_UNET
from tests.test_uncertainty_cli import _save_stage

#: one training and one validation batch: the cheapest run with a validation figure
ONE_BATCH = [
    "trainer.max_epochs=1",
    "++trainer.limit_train_batches=1",
    "++trainer.limit_val_batches=1",
]


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "offline"),
        ({"WANDB_API_KEY": "x" * 40}, "online"),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "dryrun"}, "offline"),
        ({"WANDB_MODE": "online"}, "online"),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "disabled"}, "disabled"),
    ],
)
def test_wandb_mode_and_model_upload_only_online(
    env: dict, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    assert qc_wandb.wandb_mode() == mode
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    assert cfg.logger.wandb.mode == mode
    assert cfg.logger.wandb.log_model is (mode == "online")  # checkpoints: artifacts online only
    assert cfg.logger.wandb.offline is False  # Lightning's flag would rewrite WANDB_MODE


def test_artifact_examples_grids() -> None:
    g = torch.Generator().manual_seed(0)
    contrastive = {
        "query": torch.rand(3, 1, 8, 8, generator=g),
        "corrupted": torch.rand(3, 2, 1, 8, 8, generator=g),
        "corrupt_kind": torch.tensor([[1, 2], [0, 3], [4, 1]]),
    }
    grid, caption = artifact_examples(contrastive, max_items=2)
    assert grid.shape == (2 * 8 + 2, 3 * 8 + 2 * 2)  # 2 rows: query + 2 negatives each
    assert grid.min() >= 0.0 and grid.max() <= 1.0
    assert "noise/motion" in caption and "clean/motion+noise" in caption

    clean = torch.rand(4, 1, 6, 6, 6, generator=g)
    corrupted = clean.clone()
    corrupted[1] += 0.5  # only item 1 was corrupted
    grid, caption = artifact_examples({"image": corrupted, "image_clean": clean})
    assert grid.shape == (6, 3 * 6 + 2 * 2)  # one row: clean, corrupted, |difference|
    assert "difference" in caption
    assert artifact_examples({"image": clean, "image_clean": clean}) is None  # clean training
    assert artifact_examples({"x": clean}) is None


def test_helpers_are_noops_without_wandb_logger(tmp_path: Path) -> None:
    cfg = compose_cfg(["logger=csv"], tmp_path)
    png = tmp_path / "a.png"
    png.write_bytes(b"")
    assert qc_wandb.active_run(cfg) is None
    assert qc_wandb.log_images(cfg, {"eval/a": png}) is False
    assert qc_wandb.log_table(cfg, "eval/t", [{"scan_id": "a", "x": 1.0}]) is False
    assert qc_wandb.log_summary(cfg, {"auroc": 0.5}) is False
    assert qc_wandb.log_images(None, {"eval/a": png}) is False  # no active run
    assert not (tmp_path / "wandb").exists()


def _records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-*.wandb`` file (LevelDB log format: 7-byte file header,
    32 KiB blocks, each chunk ``<crc:u32><length:u16><type:u8>``; types full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, i, buf = path.read_bytes(), 7, b""
    while i + 7 <= len(data):
        left = 32768 - i % 32768
        if left < 7:  # block trailer padding
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + 7])
        chunk, i = data[i + 7 : i + 7 + length], i + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _run_contents(run: Path, timeout: float = 30.0) -> tuple[dict[str, Any], set[str]]:
    """``(summary, config keys)`` of an offline run, read from its ``.wandb`` file once the
    W&B service has written the run's exit record (``wandb.finish`` may return before)."""
    deadline = time.monotonic() + timeout
    while True:
        summary: dict[str, Any] = {}
        config: set[str] = set()
        kinds = set()
        for record in _records(next(run.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            kinds.add(kind)
            if kind == "summary":
                for item in record.summary.update:
                    summary[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "config":
                config.update(i.key or ".".join(i.nested_key) for i in record.config.update)
        if "exit" in kinds or time.monotonic() > deadline:
            return summary, config
        time.sleep(0.2)


def _offline_run(out: Path) -> Path:
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def _media(run: Path, kind: str, key: str) -> list[Path]:
    """Files W&B wrote for ``key`` (``eval/roc`` -> ``media/images/eval/roc_<step>_<hash>.png``)."""
    folder = run / "files" / "media" / kind / Path(key).parent
    return sorted(folder.glob(f"{Path(key).name}_*"))


@pytest.fixture
def wandb_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline W&B with every W&B folder inside the test's temp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    yield
    qc_wandb.finish_wandb()


def test_offline_run_has_figures_examples_config_and_summary(
    small_embedded: Path, tmp_path: Path, wandb_offline_env: None
) -> None:
    """Encoder training with logger=wandb: the validation embedding scatter, the artifact
    examples of the first batch, the resolved config and the task's results reach the run."""
    out = tmp_path / "enc"
    cfg = compose_cfg(
        ["experiment=encoder_contrastive", "logger=wandb", *TINY, *TINY_ENCODER, *ONE_BATCH], out
    )
    results = run_task(cfg)
    assert math.isfinite(results["train/loss"])
    assert (out / "figures" / "embedding_epoch000.png").is_file()
    run = _offline_run(out)
    assert _media(run, "images", "figures/embedding"), "embedding scatter not logged"
    assert _media(run, "images", "examples/artifacts"), "artifact examples not logged"
    summary, config = _run_contents(run)
    assert summary["n_train_volumes"] == results["n_train_volumes"]  # run_task's log_summary
    assert math.isfinite(summary["train/loss"]) and math.isfinite(summary["val/loss"])
    assert {"experiment_name", "data", "trainer", "contrastive"} <= config  # resolved config
    assert not list(run.rglob("*.ckpt"))  # offline: no model artifact


def test_offline_evaluation_logs_tables_and_figures(
    small_embedded: Path, tmp_path: Path, wandb_offline_env: None
) -> None:
    """A task without a Trainer (uncertainty_evaluate) starts its own run from the config and
    logs its per-scan table and its figures (Dice vs measures, uncertainty slices)."""
    student = _save_stage(tmp_path / "student.ckpt", "student", ["noise", "blur"])
    out = tmp_path / "eval"
    cfg = compose_cfg(
        ["experiment=uncertainty_evaluate", "logger=wandb", *TINY_UNET,
         f"evaluate.student_ckpt={student}", "evaluate.max_scans=1", "evaluate.kinds=[noise]"],
        out,
    )  # fmt: skip
    results = run_task(cfg)
    run = _offline_run(out)
    tables = _media(run, "table", "eval/scans")
    assert tables, "per-scan table not logged"
    table = json.loads(tables[0].read_text())
    assert "dice" in table["columns"] and len(table["data"]) == results["n_images"] == 2
    for fig in ("dice_vs_measures", "maps_per_kind", "gm_volume_errorbars"):
        assert _media(run, "images", f"eval/{fig}"), fig
    summary, config = _run_contents(run)
    assert summary["n_images"] == 2 and "decoupling.n_kinds" in summary
    assert {"experiment_name", "evaluate"} <= config


def test_disabled_mode_runs_and_writes_nothing(small_embedded: Path, tmp_path: Path) -> None:
    """The test default, WANDB_MODE=disabled: training and evaluation with logger=wandb run,
    the helpers accept everything, no W&B folder appears and WANDB_MODE is left alone."""
    assert os.environ["WANDB_MODE"] == "disabled"
    task = tmp_path / "task"
    cfg = compose_cfg(["experiment=uncertainty_task", "logger=wandb", *TINY_UNET, *ONE_BATCH], task)
    assert run_task(cfg)["global_step"] == 1
    student = _save_stage(tmp_path / "student.ckpt", "student", ["noise"])
    ev = tmp_path / "eval"
    cfg = compose_cfg(
        ["experiment=uncertainty_evaluate", "logger=wandb", *TINY_UNET,
         f"evaluate.student_ckpt={student}", "evaluate.max_scans=1"],
        ev,
    )  # fmt: skip
    assert run_task(cfg)["n_images"] == 2
    assert (ev / "figures" / "maps_per_kind.png").is_file()
    assert not list(tmp_path.rglob("wandb")), "disabled W&B wrote files"
    assert os.environ["WANDB_MODE"] == "disabled"
