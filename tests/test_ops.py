"""Experiment operations: loggers (W&B offline by default), multirun folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qcflow.tasks.common import build_loggers
from qcflow.testing import write_good_scan
from qcflow.utils import wandb as qc_wandb
from qcflow.utils.runs import find_latest_run
from tests.helpers import compose_cfg, run_cli


@pytest.mark.parametrize(
    ("env", "netrc", "offline"),
    [
        ({}, False, True),  # no key, nothing configured: offline
        ({"WANDB_API_KEY": "x" * 40}, False, False),  # key: online
        ({}, True, False),  # netrc key: online
        ({"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, False, True),
        ({"WANDB_MODE": "online"}, False, False),
        ({"WANDB_MODE": "disabled"}, True, True),
    ],
)
def test_wandb_offline_rule(
    env: dict, netrc: bool, offline: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password abc\n" if netrc else "")
    monkeypatch.setenv("NETRC", str(rc))
    assert qc_wandb.wandb_offline() is offline


@pytest.mark.parametrize("name", ["csv", "tensorboard", "wandb"])
def test_logger_configs_instantiate_and_log(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"logger={name}"], tmp_path)
    loggers = build_loggers(cfg)
    assert len(loggers) == 1
    loggers[0].log_metrics({"train/loss": 1.0}, step=0)
    loggers[0].log_hyperparams(OmegaConf.to_container(cfg.data, resolve=True))
    loggers[0].finalize("success")
    qc_wandb.finish_wandb()
    if name == "wandb":  # tests run with WANDB_MODE=disabled: nothing may be written or sent
        assert loggers[0]._offline is True or qc_wandb.wandb_offline()


def test_multirun_two_jobs_distinct_folders(tmp_path: Path) -> None:
    data = tmp_path / "scans"
    for i in range(2):
        write_good_scan(data / f"s{i}.nii.gz", seed=i)
    sweep = tmp_path / "sweep"
    res = run_cli(
        "-m",
        "experiment=validate",
        f"data.root={data}",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["n_ok"] == 2
        assert (job / "validation.tsv").is_file()
        assert OmegaConf.load(job / ".hydra" / "config.yaml").seed == int(job.name)


def test_default_sweep_folder_is_findable(tmp_path: Path, qcflow_home: Path) -> None:
    """Without hydra.sweep.dir, jobs land under runs/<experiment>/multirun_*/N and the latest
    finished one is found by experiment name."""
    data = tmp_path / "scans"
    write_good_scan(data / "a.nii.gz")
    res = run_cli("-m", "experiment=validate", f"data.root={data}", "seed=3,4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    latest = find_latest_run(qcflow_home / "runs", "validate")
    assert latest.parent.name.startswith("multirun_")
    assert (latest / "validation.tsv").is_file()


def test_slurm_launcher_one_task_per_device() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from qcflow.cli import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["launcher=slurm", "trainer=ddp", "trainer.devices=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4
    assert cfg.trainer.strategy == "ddp"
