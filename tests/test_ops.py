"""Experiment operations: loggers (W&B offline by default), multirun folders."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from qcflow.runs.folders import find_latest_run
from qcflow.tasks.common import build_loggers
from qcflow.testing import write_good_scan
from qcflow.utils import wandb as qc_wandb
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_env() -> dict[str, str]:
    """The test environment without any leftover rendezvous/rank variables, on a free port."""
    import os

    drop = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PL_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1")
    # the repository root, for test instrumentation (tests.ddp_probe) in the subprocess
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["MASTER_PORT"] = str(_free_port())
    return env


def _state_sha(state: dict) -> str:
    """SHA-256 of a state dict, as :class:`tests.ddp_probe.DDPProbe` computes it."""
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_segmentation_ddp_two_processes(small_embedded: Path, tmp_path: Path) -> None:
    """Method B's task U-Net with 2 CPU processes (gloo), in a subprocess on a free port: each
    rank trains on its own subjects, the replicas end identical (and equal to the checkpoint),
    the epsilon schedule halves on both at once, and only rank 0 writes the run's outputs."""
    import math
    import subprocess
    import sys

    import torch

    from tests.test_uncertainty_cli import TINY as TINY_UNET

    run_dir, probe, epochs = tmp_path / "run", tmp_path / "probe", 3
    cmd = [
        sys.executable, "-m", "qcflow", "experiment=uncertainty_task", *TINY_UNET,
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        # a plateau is declared at epoch 2 whatever the loss: both ranks must halve together
        "uncertainty.schedule.patience=1", "uncertainty.schedule.min_delta=10",
        "+callbacks.probe._target_=tests.ddp_probe.DDPProbe",
        f"+callbacks.probe.folder={probe}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, cwd=tmp_path, env=_ddp_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    steps = ranks[0]["global_step"]
    assert steps > 0 and ranks[1]["global_step"] == steps
    # the same weights, schedule state and learning rate on both ranks, and in the checkpoint
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert _state_sha(ckpt["state_dict"]) == ranks[0]["params_sha256"]
    assert ranks[0]["eps"] == ranks[1]["eps"] == 0.025  # halved once, at epoch 2
    assert ranks[0]["lr"] == ranks[1]["lr"]
    # different data: within every epoch the ranks' subjects are disjoint
    per_epoch = steps // epochs
    for e in range(epochs):
        subjects = [
            {item.split("@")[0] for batch in r["batches"][e * per_epoch : (e + 1) * per_epoch]
             for item in batch}
            for r in ranks
        ]  # fmt: skip
        assert subjects[0] and subjects[1] and not subjects[0] & subjects[1], (e, subjects)
    # the run's outputs come from rank 0 only
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"]) and metrics["global_step"] == steps
    assert "results written" in (run_dir / "cli.log").read_text()
    assert "results written" not in (run_dir / "train_ddp_process_1.log").read_text()
    assert [p.name for p in run_dir.rglob("metrics.csv")] == ["metrics.csv"]


def test_objective_value_for_optimizing_sweepers(tmp_path: Path) -> None:
    from qcflow.cli import objective_value
    from qcflow.errors import ConfigError

    results = {"val/loss": 0.5, "n": 3, "baselines": {"snr": {"auroc": 0.7}}, "kind": "x"}
    cfg = compose_cfg([], tmp_path)
    assert objective_value(cfg, results) is None  # no sweep=optuna: nothing to return
    for key, value in (("val/loss", 0.5), ("baselines.snr.auroc", 0.7), ("n", 3.0)):
        cfg = OmegaConf.create({"optimized_metric": key})
        assert objective_value(cfg, results) == value
    for key in ("auroc", "kind"):
        with pytest.raises(ConfigError, match="baselines.snr.auroc, n, val/loss"):
            objective_value(OmegaConf.create({"optimized_metric": key}), results)
    # a diverged trial is the worst trial, not a failed one (that would stop the sweep)
    cfg = OmegaConf.create({"optimized_metric": "val/loss"})
    assert objective_value(cfg, {"val/loss": float("nan")}) == float("inf")


def test_optuna_sweep_two_trials(small_embedded: Path, tmp_path: Path) -> None:
    """`sweep=optuna`: two encoder trials (one batch each); the sweeper gets each job's
    val/loss and reports the better one; the search space grows from the command line."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from tests.test_iqc_pipeline import TINY, TINY_ENCODER

    sweep = tmp_path / "optuna"
    res = run_cli(
        "-m", "experiment=encoder_contrastive", "sweep=optuna", "debug=smoke", *TINY,
        *TINY_ENCODER, "hydra.sweeper.n_trials=2", "contrastive.n_corrupt=choice(1,2)",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    losses = {}
    for job in ("0", "1"):
        overrides = dict(
            str(o).split("=", 1) for o in OmegaConf.load(sweep / job / ".hydra/overrides.yaml")
        )
        assert 1e-4 <= float(overrides["model.lr"]) <= 1e-2
        assert overrides["contrastive.n_corrupt"] in ("1", "2")
        losses[job] = json.loads((sweep / job / "metrics.json").read_text())["val/loss"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(losses.values()))
    assert set(best.best_params) == {"model.lr", "contrastive.n_corrupt"}
    assert len(pd.read_csv(sweep / "sweep_summary.csv")) == 2
