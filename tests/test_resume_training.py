"""Resuming training (``resume=true|auto|PATH``): a run killed with SIGKILL and resumed ends
with the same weights as an uninterrupted run; later stages refuse an unfinished latest run;
bad ``resume`` values are one-line errors; checkpoints load with ``weights_only=True``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from qcflow.errors import ConfigError
from tests.conftest import SMALL_EMBEDDED
from tests.helpers import compose_cfg, run_cli

REPO = Path(__file__).resolve().parent.parent

#: the small 4 mm embedded data, tiny slices
DATA = [
    *(f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()),
    "data.spacing=4.0",
    "data.slice_size=32",
    "data.n_central_slices=4",
    "data.batch_size=4",
    "threads=1",
]
#: and a tiny encoder: 3 training batches per epoch
TINY_ENCODER = [
    "experiment=encoder_contrastive",
    *DATA,
    "model.encoder.init_features=4",
    "model.encoder.growth_rate=2",
    "model.encoder.block_config=[1,1]",
    "model.encoder.bn_size=1",
    "contrastive.queries_per_volume=2",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=3",
]


class PauseAt(pl.Callback):
    """Test helper for the subprocess: at the start of ``epoch`` (so after the previous epoch's
    checkpoint), write ``marker`` and sleep until killed."""

    def __init__(self, epoch: int, marker: str) -> None:
        self.epoch, self.marker = int(epoch), marker

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(600)


def _popen_cli(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "qcflow", *args],
            cwd=REPO,  # `tests.test_resume_training.PauseAt` must be importable
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {path}:\n{log.read_text()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no {path} after {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("qcflow: error:")]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr
    return errors[0]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_killed_encoder_run_resumes_to_the_same_weights(
    small_embedded: Path, tmp_path: Path
) -> None:
    """(a) SIGKILL after the epoch-2 checkpoint, `resume=true`, same weights bit for bit;
    (b) a later stage refuses the unfinished run in between; (d) weights_only loading."""
    runs = tmp_path / "runs"
    base = runs / "encoder_contrastive"
    common = [*TINY_ENCODER, f"paths.runs_dir={runs}"]
    full, killed, marker = base / "full", base / "killed", tmp_path / "paused"
    pause = [
        "+callbacks.pause._target_=tests.test_resume_training.PauseAt",
        "+callbacks.pause.epoch=2",
        f"+callbacks.pause.marker={marker}",
    ]
    # a cold preprocessing cache draws from torch's global RNG (every TorchIO transform draws
    # its probability), so the two runs compared must both find it warm
    from qcflow.data.datamodule import ScanDataModule

    ScanDataModule(compose_cfg(common, tmp_path / "warm").data).prepare()
    # the uninterrupted run and the one to kill, side by side (one thread each)
    p_full = _popen_cli(*common, f"hydra.run.dir={full}", log=tmp_path / "full.log")
    p_kill = _popen_cli(*common, *pause, f"hydra.run.dir={killed}", log=tmp_path / "kill.log")
    _wait_for(marker, p_kill, tmp_path / "kill.log")
    os.kill(p_kill.pid, signal.SIGKILL)
    assert p_kill.wait(timeout=60) == -signal.SIGKILL
    assert p_full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]
    assert (killed / "checkpoints" / "last.ckpt").is_file()
    assert not (killed / "metrics.json").exists()
    assert _load(killed / "checkpoints" / "last.ckpt")["global_step"] == 6  # 2 epochs of 3

    # (b) the killed run is newer than the finished one: the latest-run lookup refuses it,
    # in one line naming the run and the command that resumes it; an explicit path is accepted
    os.utime(full / "metrics.json", (time.time() - 60,) * 2)
    from qcflow.runs.folders import resolve_checkpoint

    cfg = compose_cfg([*common], tmp_path / "lookup")
    with pytest.raises(ConfigError) as err:
        resolve_checkpoint(cfg.paths.runs_dir, None, "encoder_contrastive")
    msg = str(err.value)
    assert "\n" not in msg and f"run {killed} did not finish" in msg
    assert f"resume={killed}" in msg and "experiment=encoder_contrastive" in msg
    explicit = killed / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(cfg.paths.runs_dir, str(explicit), "encoder_contrastive") == explicit
    res = run_cli(
        "experiment=flow_density", *DATA, f"paths.runs_dir={runs}",
        f"hydra.run.dir={runs / 'flow_density' / 'refused'}", cwd=tmp_path,
    )  # fmt: skip
    assert f"run {killed} did not finish" in _one_error_line(res)

    # (a) resume the latest unfinished run; it continues in its own folder
    resumer = base / "resumer"
    res = run_cli(*common, "resume=true", f"hydra.run.dir={resumer}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(killed / "checkpoints" / "last.ckpt")
    assert metrics["checkpoint"] == str(killed / "checkpoints" / "last.ckpt")
    assert not (resumer / "metrics.json").exists()
    pointer = json.loads((resumer / "resume.json").read_text())
    assert pointer["resumed_run"] == str(killed)
    assert "resume: random state restored" in (killed / "cli.log").read_text()

    a, b = _load(full / "checkpoints" / "last.ckpt"), _load(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 9 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    adam_a, adam_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for key in adam_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(adam_a[key][name], adam_b[key][name]), (key, name)
    # the CSV log keeps the rows logged before the kill, and has no duplicates
    import pandas as pd

    rows_a = pd.read_csv(full / "csv" / "metrics.csv")
    rows_b = pd.read_csv(killed / "csv" / "metrics.csv")
    steps_a = sorted(zip(rows_a.epoch, rows_a.step, strict=True))
    assert steps_a == sorted(zip(rows_b.epoch, rows_b.step, strict=True))
    assert not (killed / "csv" / "metrics.before_resume.csv").exists()

    # (d) every checkpoint loads with weights_only=True and carries the random state
    for ckpt in [*full.glob("checkpoints/*.ckpt"), *killed.glob("checkpoints/*.ckpt")]:
        state = _load(ckpt)["callbacks"]["ResumeState"]
        assert {"rng", "loaders", "samplers"} <= set(state)
        assert isinstance(state["rng"]["torch"], torch.Tensor)

    # now finished: the lookup finds the resumed run, no "did not finish"
    assert resolve_checkpoint(cfg.paths.runs_dir, None, "encoder_contrastive") == explicit


def _run(folder: Path, *, metrics: bool, ckpt: bool, age: float, artifact: str | None = None,
         overrides: list[str] | None = None) -> Path:  # fmt: skip
    """A fake run folder whose files are ``age`` seconds old."""
    folder.mkdir(parents=True)
    files = []
    if ckpt:
        (folder / "checkpoints").mkdir()
        files.append(folder / "checkpoints" / "last.ckpt")
        files[-1].write_bytes(b"")
    if metrics:
        files.append(folder / "metrics.json")
        files[-1].write_text(json.dumps({"artifact": artifact}))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(f"artifact: {artifact or 'null'}\n")
    if overrides is not None:
        text = "".join(f"- {o}\n" for o in overrides)
        (folder / ".hydra" / "overrides.yaml").write_text(text)
    for f in files:
        os.utime(f, (time.time() - age,) * 2)
    return folder


def test_latest_run_lookups_refuse_a_newer_unfinished_run(tmp_path: Path) -> None:
    """(b) find_latest_run / latest_teacher_run / kind classifier lookup, with fake runs."""
    from qcflow.runs.folders import find_latest_run, resume_command
    from qcflow.runs.stages import latest_teacher_run
    from qcflow.tasks.kind_classifier import CLASSIFIER_FILE, classifier_path

    runs = tmp_path / "runs"
    done = _run(runs / "enc" / "a_done", metrics=True, ckpt=True, age=100)
    old_killed = _run(runs / "enc" / "b_old_killed", metrics=False, ckpt=True, age=200)
    _run(runs / "enc" / "c_no_ckpt", metrics=False, ckpt=False, age=10)  # failed before training
    assert find_latest_run(runs, "enc", require="checkpoints/*.ckpt") == done  # older: ignored
    killed = _run(runs / "enc" / "multirun_x" / "0", metrics=False, ckpt=True, age=50,
                  overrides=["experiment=enc", "seed=3", "hydra.run.dir=/somewhere"])  # fmt: skip
    with pytest.raises(ConfigError, match="did not finish") as err:
        find_latest_run(runs, "enc", require="checkpoints/*.ckpt")
    assert "\n" not in str(err.value) and str(killed) in str(err.value)
    assert resume_command(killed, "enc") == (
        f"python -m qcflow experiment=enc seed=3 resume={killed}"
    )
    assert str(old_killed) not in str(err.value)
    # no finished run at all, only an unfinished one: the same refusal (not "no finished run")
    _run(runs / "only" / "k", metrics=False, ckpt=True, age=1)
    with pytest.raises(ConfigError, match="did not finish"):
        find_latest_run(runs, "only")

    # teachers: an unfinished run blocks its own kind only (kind read from its saved config)
    t = "uncertainty_teacher"
    noise = _run(runs / t / "n1", metrics=True, ckpt=True, age=100, artifact="noise")
    blur_killed = _run(runs / t / "b2", metrics=False, ckpt=True, age=10, artifact="blur")
    blur = _run(runs / t / "b1", metrics=True, ckpt=True, age=100, artifact="blur")
    assert latest_teacher_run(runs, t, "noise") == noise
    with pytest.raises(ConfigError, match=f"run {blur_killed} did not finish"):
        latest_teacher_run(runs, t, "blur")
    os.utime(blur / "metrics.json")  # the finished one is now the newer: accepted
    assert latest_teacher_run(runs, t, "blur") == blur

    # the kind classifier's `latest`: an unfinished run has checkpoints/last.ckpt
    kc = _run(runs / "kind_classifier" / "done", metrics=True, ckpt=False, age=100)
    (kc / CLASSIFIER_FILE).write_bytes(b"")
    _run(runs / "kind_classifier" / "killed", metrics=False, ckpt=True, age=5)
    cfg = compose_cfg(["experiment=uncertainty_student", f"paths.runs_dir={runs}"], tmp_path / "s")
    with pytest.raises(ConfigError, match="did not finish"):
        classifier_path(cfg, "latest")


def test_resume_values_and_their_one_line_errors(tmp_path: Path) -> None:
    """(c) resume_plan: every value, and each bad one as a ConfigError of one line."""
    from qcflow.runs.resume import resume_plan

    runs = tmp_path / "runs"
    base = ["experiment=encoder_contrastive", f"paths.runs_dir={runs}"]

    def plan(value: str, out: Path | None = None):
        return resume_plan(compose_cfg([*base, f"resume={value}"], out or tmp_path / "new"))

    def error(value: str) -> str:
        with pytest.raises(ConfigError) as err:
            plan(value)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert resume_plan(compose_cfg(base, tmp_path / "fresh")) is None  # default: null
    assert plan("false") is None and plan("auto") is None  # auto, own folder empty: fresh
    assert "no unfinished 'encoder_contrastive' run" in error("true")
    assert "not found" in error(str(tmp_path / "nowhere"))
    (tmp_path / "empty_run").mkdir()
    assert "no checkpoint in" in error(str(tmp_path / "empty_run"))
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    assert "is not a loadable checkpoint" in error(str(tmp_path / "garbage.ckpt"))
    weights = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, weights)
    assert "cannot continue a training run (no loops, optimizer_states" in error(str(weights))

    # a real (minimal) Lightning training checkpoint in an unfinished run folder
    run = runs / "encoder_contrastive" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    good = {"state_dict": {}, "loops": {}, "optimizer_states": [], "global_step": 0}
    torch.save(good, run / "checkpoints" / "last.ckpt")
    for value in ("true", str(run), str(run / "checkpoints" / "last.ckpt")):
        p = plan(value)
        assert p.checkpoint == run / "checkpoints" / "last.ckpt" and p.run_dir == run, value
        assert p.in_place, value
    # Lightning's SLURM requeue checkpoint, when newer, wins over last.ckpt
    torch.save(good, run / "hpc_ckpt_1.ckpt")
    os.utime(run / "checkpoints" / "last.ckpt", (time.time() - 60,) * 2)
    assert plan(str(run)).checkpoint == run / "hpc_ckpt_1.ckpt"
    # auto: only this run's own folder
    assert plan("auto", out=run).checkpoint == run / "hpc_ckpt_1.ckpt"
    # a finished run is never modified: its checkpoint continues in the new folder
    (run / "metrics.json").write_text("{}")
    p = plan(str(run))
    assert p.run_dir == run and not p.in_place
    assert plan("auto", out=run) is None
    assert "no unfinished" in error("true")


def test_resume_cli_errors_are_one_line(tmp_path: Path) -> None:
    """(c) through the CLI: a missing path, and resume=true without an unfinished run."""
    runs = tmp_path / "runs"
    common = ["experiment=encoder_contrastive", f"paths.runs_dir={runs}"]
    res = run_cli(*common, f"resume={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'a'}")
    assert "qcflow: error: resume=" in _one_error_line(res) and "not found" in res.stderr
    res = run_cli(*common, "resume=true", f"hydra.run.dir={tmp_path / 'b'}")
    assert "no unfinished 'encoder_contrastive' run" in _one_error_line(res)


def test_checkpoint_interval_defaults_to_every_epoch(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = compose_cfg(["experiment=encoder_contrastive"], tmp_path)
    assert cfg.resume is None and cfg.callbacks.model_checkpoint.save_last is True
    ckpt = instantiate(cfg.callbacks.model_checkpoint)
    assert ckpt.every_n_epochs == 1 and ckpt._every_n_train_steps == 0
    steps = compose_cfg(
        ["experiment=encoder_contrastive", "callbacks.model_checkpoint.every_n_train_steps=50"],
        tmp_path,
    )
    ckpt = instantiate(steps.callbacks.model_checkpoint)
    assert ckpt.every_n_epochs == 0 and ckpt._every_n_train_steps == 50


def test_slurm_launcher_resumes_requeued_jobs() -> None:
    """launcher=slurm: a requeued job (same folder) continues (resume=auto), timeouts requeue."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from qcflow.api import _fresh_hydra
    from qcflow.cli import config_dir

    with _fresh_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=encoder_contrastive", "launcher=slurm"],
            return_hydra_config=True,
        )
    assert cfg.resume == "auto" and cfg.hydra.launcher.max_num_timeout == 3


KIND_TINY = [
    "experiment=kind_classifier",
    "data.spacing=4",
    *[f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()],
    "classifier.patch=16",
    "classifier.steps=4",
    "classifier.batch=3",
    "classifier.volumes=4",
    "classifier.holdout=1",
    "classifier.redraw=2",
    "classifier.log_every=2",
    "classifier.checkpoint_every=2",
    "classifier.eval_volumes=0",
]


def test_interrupted_kind_classifier_resumes_to_the_same_classifier(
    small_embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-written loop: interrupted in step 3 (after the step-2 checkpoint, and after the
    bank was redrawn at step 2), resumed, equal to an uninterrupted run."""
    from qcflow.cli import run_task
    from qcflow.tasks import kind_classifier

    runs = tmp_path / "runs"
    common = [*KIND_TINY, f"paths.runs_dir={runs}"]
    # warm preprocessing cache for both runs compared (a cold one draws from torch's RNG)
    from qcflow.tasks.uncertainty_evaluate import evaluation_volumes

    evaluation_volumes(compose_cfg(common, tmp_path / "warm"), split="train")
    full = runs / "kind_classifier" / "full"
    run_task(compose_cfg(common, full))

    class Stop(Exception):
        pass

    real = kind_classifier.F.cross_entropy
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # training step 3
            raise Stop
        return real(*args, **kwargs)

    killed = runs / "kind_classifier" / "killed"
    with monkeypatch.context() as m:
        m.setattr(kind_classifier.F, "cross_entropy", interrupted)
        with pytest.raises(Stop):
            run_task(compose_cfg(common, killed))
    assert not (killed / "metrics.json").exists() and not (killed / "classifier.pt").exists()
    assert _load(killed / "checkpoints" / "last.ckpt")["step"] == 2

    results = run_task(compose_cfg([*common, "resume=true"], runs / "kind_classifier" / "again"))
    assert results["resumed_from"] == str(killed / "checkpoints" / "last.ckpt")
    assert (killed / "metrics.json").is_file()
    a, b = _load(full / "classifier.pt"), _load(killed / "classifier.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    want = json.loads((full / "metrics.json").read_text())
    assert results["heldout_patch_accuracy"] == want["heldout_patch_accuracy"]
    assert results["final_loss"] == want["final_loss"]


def test_uncertainty_stage_resumes_in_its_own_folder(small_embedded: Path, tmp_path: Path) -> None:
    """Method B's stages take resume= too: the run continues (steps, epsilon schedule) in its
    own folder. (Not bit-identical: TorchIO's patch queue is rebuilt, see qcflow.lit.resume.)"""
    from qcflow.cli import run_task
    from qcflow.tasks import uncertainty_train

    runs = tmp_path / "runs"
    common = [
        "experiment=uncertainty_task",
        *(f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()),
        "data.spacing=4",
        "data.patch_size=[16,16,16]",
        "data.samples_per_volume=2",
        "data.queue_length=4",
        "data.batch_size=2",
        "model.filters=[4,8,16]",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        f"paths.runs_dir={runs}",
    ]
    first = runs / "uncertainty_task" / "first"
    # a run that stopped after one epoch without finishing (no metrics.json: run() directly)
    uncertainty_train.run(compose_cfg([*common, "trainer.max_epochs=1"], first))
    assert not (first / "metrics.json").exists()
    again = runs / "uncertainty_task" / "again"
    results = run_task(compose_cfg([*common, "trainer.max_epochs=2", "resume=true"], again))
    assert results["global_step"] == 4 and results["resumed_from"].startswith(str(first))
    assert (first / "metrics.json").is_file() and not (again / "metrics.json").exists()
    assert _load(first / "checkpoints" / "last.ckpt")["global_step"] == 4


class _Noisy(torch.utils.data.Dataset):
    """Items drawn from torch's global RNG (as the contrastive slices and k-space draws are)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(4) + i


class _Toy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.drop = torch.nn.Dropout(0.3)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.drop(self.lin(batch)).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val", self.lin(batch).mean() + torch.rand(()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _toy_fit(
    out: Path, max_epochs: int, max_steps: int, ckpt: Path | None, state: bool
) -> tuple[dict, int]:
    from qcflow.lit.resume import ResumeState

    pl.seed_everything(0, verbose=False)
    model = _Toy()
    save = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True, monitor=None)
    trainer = pl.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", logger=False,
        callbacks=[save, *([ResumeState()] if state else [])], limit_val_batches=2,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip

    def loader() -> torch.utils.data.DataLoader:  # as ScanDataModule._loader: own generator
        gen = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(_Noisy(), batch_size=4, shuffle=True, generator=gen)

    trainer.fit(model, loader(), loader(), ckpt_path=ckpt, weights_only=True)
    return model.state_dict(), trainer.global_step


@pytest.mark.parametrize("max_steps", [-1, 20])
def test_resume_state_makes_an_end_of_epoch_resume_exact(tmp_path: Path, max_steps: int) -> None:
    """Lightning alone (no ResumeState) resumes with another data stream (and, step-limited,
    one batch off: it ends at max_epochs short of max_steps); with it the weights equal an
    uninterrupted run's, also for step-limited training (max_steps)."""
    full, steps = _toy_fit(tmp_path / "full", 4, max_steps, None, state=True)
    assert steps == 20  # 4 epochs of 5 batches
    for state in (True, False):
        part = tmp_path / f"part_{state}"
        _toy_fit(part, 2, max_steps, None, state=state)  # stops after the epoch-2 checkpoint
        resumed, steps = _toy_fit(part, 4, max_steps, part / "last.ckpt", state=state)
        same = all(torch.equal(full[k], resumed[k]) for k in full)
        assert same == state and (steps == 20) == (state or max_steps == -1)
