"""Zuo et al. 2023 study on the embedded data: train -> flow -> evaluate, one command.

Runs the three method-A experiments through the CLI (each in its own process, each in its own
run folder under ``<runs_dir>``; every stage finds the previous one by experiment name) and
collects the evaluation into ``results/metrics.json`` and ``results/*.png``.

Usage::

    python experiments/zuo2023_iqc/run.py                 # the documented study size
    python experiments/zuo2023_iqc/run.py --quick         # a 2-epoch smoke version
    python experiments/zuo2023_iqc/run.py -- model=encoder_densenet121   # extra overrides

Environment: ``QCFLOW_HOME`` (or ``QCFLOW_RUNS_DIR``...) as for every qcflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: the study size (README): the main job's encoder on full-resolution 112 px slices (2 mm
#: axial slices are 96 x 112, so nothing is downsampled), 12 epochs, default data
STUDY = {
    "encoder_contrastive": ["data.slice_size=112", "trainer.max_epochs=12"],
    "flow_density": [],
    "iqc_evaluate": [],
}
QUICK = {"encoder_contrastive": ["trainer.max_epochs=2"], "flow_density": ["model.epochs=50"]}

#: what results/metrics.json keeps from the evaluation (the issue's keys first)
KEYS = (
    "sensitivity_tau05",
    "specificity_tau05",
    "sensitivity_tau03",
    "specificity_tau03",
    "auroc",
    "detection_rates",
    "detection_rates_tau03",
    "detection_by_severity",
    "unseen_kind_detection",
    "auroc_above_all_baselines",
    "contingency_tau05",
    "contingency_tau03",
    "n_clean",
    "n_artifact",
)


def _stage(name: str, stamp: str, extra: list[str], threads: int) -> tuple[Path, dict, float]:
    runs = Path(
        os.environ.get("QCFLOW_RUNS_DIR")
        or Path(os.environ.get("QCFLOW_HOME", Path.home() / "qcflow")) / "runs"
    )  # noqa: E501
    run_dir = runs / name / f"{stamp}_study"
    cmd = [sys.executable, "-m", "qcflow", f"experiment={name}", f"threads={threads}",
           f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-epoch smoke version")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    plan = QUICK if args.quick else STUDY
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    timings, stages = {}, {}
    for name in ("encoder_contrastive", "flow_density", "iqc_evaluate"):
        run_dir, metrics, seconds = _stage(
            name, stamp, [*plan.get(name, []), *args.overrides], args.threads
        )  # noqa: E501
        timings[name] = round(seconds, 1)
        stages[name] = (run_dir, metrics)
    ev_dir, ev = stages["iqc_evaluate"]
    result = {k: ev[k] for k in KEYS if k in ev}
    result["baselines"] = {
        name: {k: b[k] for k in ("auroc", "sensitivity_tau05", "specificity_tau05", "side")}
        for name, b in ev["baselines"].items()
    }
    enc = stages["encoder_contrastive"][1]
    result["study"] = {
        "quick": args.quick,
        "overrides": {k: [*plan.get(k, []), *args.overrides] for k in STUDY},
        "seconds": timings,
        "threads": args.threads,
        "encoder_val_loss": enc.get("val/loss"),
        "n_train_volumes": enc.get("n_train_volumes"),
        "flow_train_nll": stages["flow_density"][1].get("train/nll"),
        "runs": {k: str(v[0]) for k, v in stages.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "metrics_quick.json" if args.quick else "metrics.json"
    (args.out / name).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if not args.quick:
        for fig in (ev_dir / "figures").glob("*.png"):
            shutil.copy(fig, args.out / fig.name)
        last = sorted((stages["encoder_contrastive"][0] / "figures").glob("embedding_*.png"))
        if last:
            shutil.copy(last[-1], args.out / "val_embedding.png")
    print(json.dumps({k: result[k] for k in KEYS[:5]}, indent=2))


if __name__ == "__main__":
    main()
