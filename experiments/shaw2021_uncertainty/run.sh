#!/usr/bin/env bash
# Shaw et al. 2021 study on the embedded data: task -> 5 teachers -> kind classifier -> student
# -> evaluate.
# Usage: experiments/shaw2021_uncertainty/run.sh [extra hydra overrides for every stage]
# Size knobs (environment): TASK_EPOCHS, EPOCHS (teachers), STUDENT_EPOCHS, STEPS (batches per
# epoch), MAX_SCANS (held-out clean scans evaluated, each clean + one copy per kind).
# Reuse earlier stages (latest runs): SKIP_TASK=1, SKIP_TEACHERS=1, SKIP_CLASSIFIER=1.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
TASK_EPOCHS="${TASK_EPOCHS:-32}"
EPOCHS="${EPOCHS:-12}"
STUDENT_EPOCHS="${STUDENT_EPOCHS:-12}"
STEPS="${STEPS:-25}"
MAX_SCANS="${MAX_SCANS:-10}"
COMMON=("trainer.enable_progress_bar=false" "trainer.limit_train_batches=$STEPS" "$@")
PY="${PYTHON:-python}"

if [ -z "${SKIP_TASK:-}" ]; then  # SKIP_TASK=1 reuses the latest uncertainty_task run
  $PY -m qcflow experiment=uncertainty_task trainer.max_epochs="$TASK_EPOCHS" "${COMMON[@]}"
fi
# the task network's full-volume Dice on the same held-out clean scans (reference for the student)
$PY -m qcflow experiment=uncertainty_evaluate experiment_name=uncertainty_evaluate_task \
  evaluate.stage_experiment=uncertainty_task evaluate.max_scans="$MAX_SCANS" \
  evaluate.figures=false evaluate.save_maps=0 "$@"
if [ -z "${SKIP_TEACHERS:-}" ]; then  # SKIP_TEACHERS=1 reuses the latest teacher per kind
  $PY -m qcflow -m experiment=uncertainty_teacher artifact=spike,noise,blur,wrap,motion \
    trainer.max_epochs="$EPOCHS" "${COMMON[@]}"
fi
# the patch-level kind classifier that starts the student's context branch (context_init: latest)
if [ -z "${SKIP_CLASSIFIER:-}" ]; then  # SKIP_CLASSIFIER=1 reuses the latest kind_classifier run
  $PY -m qcflow experiment=kind_classifier "$@"
fi
$PY -m qcflow experiment=uncertainty_student trainer.max_epochs="$STUDENT_EPOCHS" "${COMMON[@]}"
$PY -m qcflow experiment=uncertainty_evaluate evaluate.max_scans="$MAX_SCANS" "$@"

# copy the evaluation's results next to this script
RUNS="${QCFLOW_RUNS_DIR:-${QCFLOW_HOME:-$HOME/qcflow}/runs}"
LATEST="$(ls -td "$RUNS"/uncertainty_evaluate/*/ | head -1)"
mkdir -p "$HERE/results/figures"
cp "$LATEST/metrics.json" "$HERE/results/metrics.json"
TASK_EVAL="$(ls -td "$RUNS"/uncertainty_evaluate_task/*/ | head -1)"
cp "$TASK_EVAL/metrics.json" "$HERE/results/task_metrics.json"
CLF="$(ls -td "$RUNS"/kind_classifier/*/ | head -1)"
cp "$CLF/metrics.json" "$HERE/results/kind_classifier_metrics.json"
cp "$LATEST/scans.tsv" "$HERE/results/scans.tsv"
cp "$LATEST"/figures/*.png "$HERE/results/figures/"
echo "results copied from $LATEST"
