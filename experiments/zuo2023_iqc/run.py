"""Zuo et al. 2023 study on the embedded data: train -> flow -> evaluate, one command.

Runs the three method-A experiments through the CLI (each in its own process, each in its own
run folder under ``<runs_dir>``; every stage finds the previous one by experiment name) and
collects the evaluation into ``results/metrics.json`` and ``results/*.png``.

Usage::

    python experiments/zuo2023_iqc/run.py                 # the documented study size
    python experiments/zuo2023_iqc/run.py --quick         # a 2-epoch smoke version
    python experiments/zuo2023_iqc/run.py -- model=encoder_densenet121   # extra overrides
    python experiments/zuo2023_iqc/run.py --no-baselines --tag neg3d --out /tmp/x \
        --enc contrastive.negatives_3d=true   # exploration: no IQM baselines (~2.5 min less)
    python experiments/zuo2023_iqc/run.py --encoder-run RUN   # flow + evaluation only

Each stage is handed the previous stage's run folder explicitly (``flow.encoder_ckpt``,
``evaluate.flow_run``), so two studies can run side by side.

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
#: axial slices are 96 x 112, so nothing is downsampled), 12 epochs, default data; negatives
#: corrupted in 3-D (then sliced) by all six k-space kinds, and of the other volumes only their
#: corrupted copies count as negatives (README: "what was tried")
STUDY = {
    "encoder_contrastive": [
        "data.slice_size=112",
        "trainer.max_epochs=12",
        "contrastive.negatives_3d=true",
        "augment=contrastive_all",
        "model.negatives=corrupted",
    ],
    # the flow embeds at the encoder's slice size (evaluation reads it from the flow run)
    "flow_density": ["data.slice_size=112"],
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
    "simulated_kinds",
    "auroc_above_all_baselines",
    "contingency_tau05",
    "contingency_tau03",
    "n_clean",
    "n_artifact",
)


def _stage(
    name: str, stamp: str, extra: list[str], threads: int, tag: str = "study"
) -> tuple[Path, dict, float]:
    runs = Path(
        os.environ.get("QCFLOW_RUNS_DIR")
        or Path(os.environ.get("QCFLOW_HOME", Path.home() / "qcflow")) / "runs"
    )  # noqa: E501
    run_dir = runs / name / f"{stamp}_{tag}"
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
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the IQM baselines (exploration runs)"
    )
    parser.add_argument("--tag", default="study", help="run-folder suffix (<stamp>_<tag>)")
    for stage, flag in (("encoder", "--enc"), ("flow", "--flow"), ("evaluation", "--eval")):
        parser.add_argument(
            flag, action="append", default=[], metavar="OVERRIDE",
            help=f"a Hydra override for the {stage} stage only (repeatable)",
        )  # fmt: skip
    parser.add_argument(
        "--encoder-run", type=Path, help="reuse this encoder_contrastive run (no training)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    plan = QUICK if args.quick else STUDY
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    timings, stages = {}, {}
    linked: dict[str, list[str]] = {
        "encoder_contrastive": args.enc,
        "flow_density": list(args.flow),
        "iqc_evaluate": [*(["evaluate.baselines=null"] if args.no_baselines else []), *args.eval],
    }
    if args.encoder_run is not None:
        run_dir = args.encoder_run.resolve()
        stages["encoder_contrastive"] = (
            run_dir,
            json.loads((run_dir / "metrics.json").read_text()),
        )
        timings["encoder_contrastive"] = None
    for name in ("encoder_contrastive", "flow_density", "iqc_evaluate"):
        if name in stages:  # reused
            continue
        if name == "flow_density":  # the previous stage's run, not the latest of any study
            linked[name].append(f"flow.encoder_ckpt={stages['encoder_contrastive'][0]}")
        if name == "iqc_evaluate":
            linked[name].append(f"evaluate.flow_run={stages['flow_density'][0]}")
        run_dir, metrics, seconds = _stage(
            name, stamp, [*plan.get(name, []), *linked[name], *args.overrides], args.threads,
            args.tag,
        )  # fmt: skip
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
        "overrides": {k: [*plan.get(k, []), *linked[k], *args.overrides] for k in STUDY},
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
