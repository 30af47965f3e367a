"""Scoring throughput and memory on the embedded held-out sets at 2 mm and 1 mm (issue 6).

Question: how many scans per minute does ``python -m qcflow experiment=score`` score on this
2-core machine, NIfTI loading and preprocessing included (no preprocessing cache), with method A
alone (encoder + flow), with method B's student added, and with the classical measures alone;
and what is the peak memory of the whole process tree?

Data: the embedded ``test_clean`` + ``test_artifact`` sets (40 + 80 scans) built at 2 mm (the
default dataset) and at 1 mm (held-out sets only: ``n_subjects=2``; ~9 min to build once).
Both are scored with the same models, trained at 2 mm: 1 mm inputs are resampled to 2 mm by the
preprocessing, as a user's 1 mm scans would be.

Models: ``--flow-run`` / ``--student-run`` or the latest ``flow_density`` / ``uncertainty_student``
runs under ``$QCFLOW_HOME/runs``; when there are none, stand-ins with the configured
architectures are made first (a 2-step encoder + its flow; an untrained student): their speed
is that of trained ones, their scores are meaningless.

Each configuration runs the real CLI in a fresh subprocess (``data.cache=false``), timed by the
task itself (``score_seconds``: discovery, model loading and scoring), while a sampler sums the
resident memory of the process and its DataLoader workers every 50 ms.

Usage::

    python experiments/scoring_benchmark/run.py                 # both resolutions, all scans
    python experiments/scoring_benchmark/run.py --quick         # 2 mm, 12 scans, < 2 min
    python experiments/scoring_benchmark/run.py --threads 2 --workers 1

Writes ``results/benchmark.json`` (``benchmark_quick.json`` with --quick), prints a Markdown
table and, as the last line, a JSON object with ``scans_per_min_encoder_flow``,
``scans_per_min_with_uncertainty`` (2 mm; the 1 mm numbers under ``*_1mm``) and ``peak_rss_mb``
(largest over every configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

STANDIN = "benchmark_standin"  # run folder name of the stand-in models this script makes
TARGETS = {"encoder_flow_2mm": 60.0, "encoder_flow_1mm": 20.0, "peak_rss_mb": 3072.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 mm only, --max-scans 12")
    p.add_argument("--max-scans", type=int, default=None, help="scans per set (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the scorer (1)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (1)")
    p.add_argument("--flow-run", type=Path, default=None, help="a flow_density run folder")
    p.add_argument("--student-run", type=Path, default=None, help="an uncertainty_student run")
    p.add_argument("--resolutions", default="2,1", help="input resolutions in mm (2,1)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    return p.parse_args()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (MiB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total / 1024.0


def run_cli(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m qcflow ARGS``; returns the result and the peak tree RSS (MiB)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcflow", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if res.returncode != 0:
        raise RuntimeError(f"qcflow {' '.join(args)} failed:\n{err[-3000:]}")
    return res, peak[0]


def embedded_root(spacing: float, n_subjects: int | None) -> Path:
    """Build (once) and return the embedded dataset at ``spacing``."""
    from qcflow.api import compose_config
    from qcflow.data.synth import ensure_embedded

    ov = [f"data.spacing={spacing}"]
    if n_subjects is not None:
        ov.append(f"data.embedded.n_subjects={n_subjects}")
    cfg = compose_config(ov)
    t0 = time.perf_counter()
    root = ensure_embedded(cfg.data.embedded)
    print(f"embedded data {root} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    return Path(root)


def latest(runs: Path, experiment: str, require: str) -> Path | None:
    from qcflow.errors import ConfigError
    from qcflow.runs.folders import find_latest_run

    try:
        return find_latest_run(runs, experiment, require=require)
    except ConfigError:
        return None


def ensure_models(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The flow run and student run to benchmark (stand-ins made when there are none)."""
    from qcflow.api import compose_config

    runs = Path(compose_config().paths.runs_dir)
    flow = args.flow_run or latest(runs, "flow_density", "flow.pt")
    kinds = {"flow": "trained" if flow and flow.name != STANDIN else "stand-in"}
    if flow is None:
        enc = runs / "encoder_contrastive" / STANDIN
        run_cli(
            ["experiment=encoder_contrastive", "trainer.max_epochs=1",
             "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
             f"hydra.run.dir={enc}"], env,
        )  # fmt: skip
        flow = runs / "flow_density" / STANDIN
        run_cli(
            ["experiment=flow_density", f"flow.encoder_ckpt={enc}/checkpoints/last.ckpt",
             f"hydra.run.dir={flow}"], env,
        )  # fmt: skip
    student = args.student_run or latest(runs, "uncertainty_student", "checkpoints/*.ckpt")
    kinds["student"] = "trained" if student and student.name != STANDIN else "stand-in"
    if student is None:
        student = make_student_standin(runs / "uncertainty_student" / STANDIN)
    return {"flow_run": str(flow), "student_run": str(student), **kinds}


def make_student_standin(run: Path) -> Path:
    """An untrained student with the configured architecture, saved like a finished run."""
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf

    from qcflow.api import compose_config
    from qcflow.tasks.uncertainty_train import instantiate_module

    cfg = compose_config(["experiment=uncertainty_student"])
    module = instantiate_module(cfg)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(
        OmegaConf.create({"data": OmegaConf.to_container(cfg.data)}), run / ".hydra" / "config.yaml"
    )
    return run


def score(
    name: str, glob: str, models: dict[str, str], extra: list[str], args, env, tmp: Path
) -> dict:
    """One configuration: run the CLI once, return its numbers."""
    run_dir = tmp / name
    cli = [
        "experiment=score", f"data.root={glob}", "data.cache=false",
        f"data.num_workers={args.workers}", f"threads={args.threads}", "score.progress=false",
        f"score.flow_run={models['flow_run']}", f"score.student_ckpt={models['student_run']}",
        "logger=none", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    if args.max_scans:
        cli.append(f"score.max_scans={args.max_scans}")
    t0 = time.perf_counter()
    _, peak = run_cli(cli, env)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n = int(metrics["n_ok"])
    sec = float(metrics["score_seconds"])
    row = {
        "config": name,
        "n_scans": n,
        "n_error": int(metrics["n_error"]),
        "score_seconds": round(sec, 2),
        "process_seconds": round(wall, 2),
        "scans_per_min": round(60.0 * n / sec, 1),
        "seconds_per_scan": round(sec / max(n, 1), 3),
        "peak_rss_mb": round(peak, 0),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    args = parse_args()
    if args.quick:
        args.max_scans = args.max_scans or 12
        args.resolutions = "2"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "WANDB_MODE": "disabled",
    }
    import tempfile

    models = ensure_models(args, env)
    print(f"models: {models}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcflow-bench-") as tmp:
        for res in [float(r) for r in args.resolutions.split(",")]:
            root = embedded_root(res, None if res == 2 else 2)
            glob = f"{root}/test_*/sub-*/anat/*_T1w.nii.gz"
            tag = f"{res:g}mm"
            configs = {
                f"encoder_flow_{tag}": ["score.uncertainty=false", "score.iqm=false"],
                f"with_uncertainty_{tag}": [
                    "score.uncertainty=true",
                    "score.iqm=false",
                    "score.maps=true",
                ],  # fmt: skip
                f"iqm_{tag}": ["score.density=false", "score.uncertainty=false"],
            }
            for name, extra in configs.items():
                row = score(name, glob, models, extra, args, env, Path(tmp))
                rows.append({**row, "resolution_mm": res})
    by = {r["config"]: r for r in rows}
    summary = {
        "scans_per_min_encoder_flow": by.get("encoder_flow_2mm", {}).get("scans_per_min"),
        "scans_per_min_with_uncertainty": by.get("with_uncertainty_2mm", {}).get("scans_per_min"),
        "scans_per_min_encoder_flow_1mm": by.get("encoder_flow_1mm", {}).get("scans_per_min"),
        "scans_per_min_with_uncertainty_1mm": by.get("with_uncertainty_1mm", {}).get(
            "scans_per_min"
        ),
        "seconds_per_scan_iqm_2mm": by.get("iqm_2mm", {}).get("seconds_per_scan"),
        "seconds_per_scan_iqm_1mm": by.get("iqm_1mm", {}).get("seconds_per_scan"),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
    }
    result = {
        "summary": summary,
        "targets": TARGETS,
        "rows": rows,
        "models": models,
        "settings": {
            "threads": args.threads,
            "workers": args.workers,
            "max_scans": args.max_scans,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "benchmark_quick.json" if args.quick else "benchmark.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| config | scans | s/scan | scans/min | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['config']} | {r['n_scans']} | {r['seconds_per_scan']} | {r['scans_per_min']} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
