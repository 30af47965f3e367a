"""Run folders: find the latest run of an experiment so a later stage can use it.

A run folder is ``<runs_dir>/<experiment_name>/<YYYY-mm-dd_HH-MM-SS>_<id>`` (multirun jobs one
level deeper, ``multirun_*/<job>``). It is

* **finished** when it holds ``metrics.json`` (written by the CLI after the task returned);
* **unfinished** when it holds a checkpoint (``checkpoints/*.ckpt``, or Lightning's SLURM
  ``hpc_ckpt_*.ckpt``) but no ``metrics.json``: the run was killed, crashed, or is still running.
  ``python -m qcflow experiment=E resume=<run>`` continues it (see ``qcflow.tasks.common``).

"The latest run" is the newest finished one, except that a newer unfinished run is never
skipped silently: the lookup refuses with one line naming it and the command that resumes it
(an explicit path is always accepted).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

from qcflow.errors import ConfigError

__all__ = [
    "find_latest_run",
    "run_folders",
    "is_finished",
    "run_checkpoints",
    "resume_checkpoint",
    "unfinished_runs",
    "last_activity",
    "resume_command",
    "check_no_newer_unfinished",
    "METRICS_FILE",
]

#: what makes a run finished
METRICS_FILE = "metrics.json"


def run_folders(runs_dir: str | Path, experiment_name: str) -> list[Path]:
    """Every run folder of ``experiment_name`` (single runs and multirun jobs)."""
    base = Path(runs_dir) / experiment_name
    if not base.is_dir():
        return []
    out = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith("multirun_")]
    for sweep in base.glob("multirun_*"):
        if sweep.is_dir():
            out += [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return out


def is_finished(run: str | Path) -> bool:
    """Whether the run's task returned (``metrics.json`` exists)."""
    return (Path(run) / METRICS_FILE).is_file()


def run_checkpoints(run: str | Path) -> list[Path]:
    """The run's checkpoints: ``checkpoints/*.ckpt`` and Lightning's ``hpc_ckpt_*.ckpt``."""
    run = Path(run)
    return sorted([*run.glob("checkpoints/*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")])


def resume_checkpoint(run: str | Path) -> Path | None:
    """The checkpoint a resume of ``run`` continues from: the newer of ``checkpoints/last.ckpt``
    and Lightning's SLURM requeue checkpoint ``hpc_ckpt_<n>.ckpt``; without either, the newest
    ``checkpoints/*.ckpt``; ``None`` when the run has no checkpoint."""
    run = Path(run)
    preferred = [p for p in [run / "checkpoints" / "last.ckpt", *run.glob("hpc_ckpt_*.ckpt")]
                 if p.is_file()]  # fmt: skip
    candidates = preferred or run_checkpoints(run)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime, str(p)))


def last_activity(run: str | Path) -> float:
    """When the run last wrote a checkpoint or its ``metrics.json`` (mtime, seconds)."""
    run = Path(run)
    times = [p.stat().st_mtime for p in run_checkpoints(run)]
    if is_finished(run):
        times.append((run / METRICS_FILE).stat().st_mtime)
    return max(times, default=run.stat().st_mtime)


def unfinished_runs(
    runs_dir: str | Path, experiment_name: str, where: Callable[[Path], bool] | None = None
) -> list[Path]:
    """Unfinished runs of ``experiment_name`` (a checkpoint, no ``metrics.json``), newest
    activity first; ``where`` filters them (e.g. by the artifact a teacher learns)."""
    found = [
        r
        for r in run_folders(runs_dir, experiment_name)
        if not is_finished(r) and run_checkpoints(r) and (where is None or where(r))
    ]
    return sorted(found, key=lambda r: (last_activity(r), str(r)), reverse=True)


def resume_command(run: str | Path, experiment_name: str) -> str:
    """The command line that resumes ``run``: its own overrides (``.hydra/overrides.yaml``,
    Hydra's own left out) plus ``resume=<run>``."""
    overrides = [f"experiment={experiment_name}"]
    path = Path(run) / ".hydra" / "overrides.yaml"
    if path.is_file():
        try:
            from omegaconf import OmegaConf

            saved = [str(o) for o in OmegaConf.load(path)]  # type: ignore[union-attr]
            kept = [o for o in saved if not o.lstrip("+~").startswith(("hydra.", "resume="))]
            if any(o.startswith("experiment=") for o in kept):
                overrides = kept
        except Exception:  # a damaged file: fall back to the experiment name
            pass
    return shlex.join(["python", "-m", "qcflow", *overrides, f"resume={run}"])


def check_no_newer_unfinished(
    picked: Path | None,
    runs_dir: str | Path,
    experiment_name: str,
    where: Callable[[Path], bool] | None = None,
) -> None:
    """Refuse to use ``picked`` (the newest finished run, or ``None``) while a newer unfinished
    run of the same experiment exists.

    Raises:
        ConfigError: naming the unfinished run and the command that resumes it.
    """
    newer = unfinished_runs(runs_dir, experiment_name, where)
    if not newer:
        return
    run = newer[0]
    if picked is not None and last_activity(run) <= (picked / METRICS_FILE).stat().st_mtime:
        return
    raise ConfigError(
        f"run {run} did not finish (checkpoints but no {METRICS_FILE}: killed, crashed or still "
        f"running); resume it with `{resume_command(run, experiment_name)}`, or give a run or "
        "checkpoint path explicitly"
    )


def _newest(runs: Iterable[Path]) -> Path | None:
    runs = list(runs)
    if not runs:
        return None
    return max(runs, key=lambda p: ((p / METRICS_FILE).stat().st_mtime, str(p)))


def find_latest_run(runs_dir: str | Path, experiment_name: str, require: str | None = None) -> Path:
    """Return the newest finished run folder of ``experiment_name``.

    Args:
        runs_dir: the root of all runs (``paths.runs_dir``).
        experiment_name: which experiment's runs to search.
        require: a file (glob) the run must also contain, e.g. ``"checkpoints/*.ckpt"``.

    Raises:
        ConfigError: when no finished run exists, naming the folder searched, or when an
            unfinished run (a checkpoint but no ``metrics.json``) is newer than the newest
            finished one (see :func:`check_no_newer_unfinished`).
    """
    base = Path(runs_dir) / experiment_name
    candidates = [r for r in run_folders(runs_dir, experiment_name) if is_finished(r)]
    if require:
        candidates = [c for c in candidates if any(c.glob(require))]
    picked = _newest(candidates)
    check_no_newer_unfinished(picked, runs_dir, experiment_name)
    if picked is None:
        what = f" with {require}" if require else ""
        raise ConfigError(
            f"{base}: no finished '{experiment_name}' run{what}; run "
            f"`python -m qcflow experiment={experiment_name}` first or give a path explicitly"
        )
    return picked
