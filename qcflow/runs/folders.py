"""Run folders: find an earlier run, tell whether it finished, pick its checkpoint.

A run folder is ``<runs_dir>/<experiment_name>/<YYYY-mm-dd_HH-MM-SS>_<id>`` (multirun jobs one
level deeper, ``multirun_*/<job>``). It is

* **finished** when it holds ``metrics.json`` (written by the CLI after the task returned);
* **unfinished** when it holds a checkpoint (``checkpoints/*.ckpt``, or Lightning's SLURM
  ``hpc_ckpt_*.ckpt``) but no ``metrics.json``: the run was killed, crashed, or is still running.
  ``python -m qcflow experiment=E resume=<run>`` continues it (:mod:`qcflow.runs.resume`).

"The latest run" is the newest finished one, except that a newer unfinished run is never
skipped silently: the lookup refuses with one line naming it and the command that resumes it
(an explicit path is always accepted). A run's saved settings are read from Hydra's
``<run>/.hydra/config.yaml`` (:func:`saved_config`, :func:`checkpoint_data_config`).
"""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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
    "run_of_checkpoint",
    "resolve_checkpoint",
    "newest_checkpoint",
    "run_artifact",
    "saved_config",
    "checkpoint_data_config",
    "METRICS_FILE",
]

log = logging.getLogger(__name__)

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


def run_of_checkpoint(path: Path) -> Path | None:
    """The run folder of ``<run>/checkpoints/*.ckpt`` or ``<run>/hpc_ckpt_<n>.ckpt``."""
    if path.parent.name == "checkpoints":
        return path.parent.parent
    if path.name.startswith("hpc_ckpt_"):
        return path.parent
    return None


def newest_checkpoint(run: Path) -> Path:
    """``<run>/checkpoints/last.ckpt``, else the last ``checkpoints/*.ckpt`` by name."""
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    return sorted((run / "checkpoints").glob("*.ckpt"))[-1]


def resolve_checkpoint(runs_dir: str | Path, explicit: str | Path | None, experiment: str) -> Path:
    """An explicit checkpoint path (or run folder), else ``last.ckpt`` of the latest finished
    run of ``experiment``.

    An explicit path to an unfinished run's checkpoint is used as given (with a warning); the
    latest-run lookup refuses a newer unfinished run (:func:`find_latest_run`).

    Raises:
        ConfigError: the explicit file does not exist, no finished run has a checkpoint, or the
            newest run of ``experiment`` did not finish.
    """
    if explicit:
        path = Path(str(explicit)).expanduser()
        if path.is_dir():  # a run folder was given
            path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise ConfigError(f"{path}: checkpoint not found")
        run = run_of_checkpoint(path)
        if run is not None and not is_finished(run):
            log.warning(
                "%s: run %s did not finish (no metrics.json); using its checkpoint as given",
                path,
                run,
            )
        return path
    run = find_latest_run(runs_dir, experiment, require="checkpoints/*.ckpt")
    return newest_checkpoint(run)


def run_artifact(run: Path) -> str | None:
    """The ``artifact`` a run was configured with: from its ``metrics.json`` when finished,
    else from its saved config (``.hydra/config.yaml``); ``None`` when unknown."""
    try:
        if (run / METRICS_FILE).is_file():
            value = json.loads((run / METRICS_FILE).read_text()).get("artifact")
        else:
            value = saved_config(run).get("artifact")  # type: ignore[union-attr]
    except Exception:  # missing or damaged file: the run cannot be attributed to a kind
        return None
    return None if value is None else str(value)


def saved_config(run: str | Path) -> Any:
    """The run's saved configuration (Hydra's ``<run>/.hydra/config.yaml``, unresolved), or
    ``None`` when the run has none. A damaged file raises OmegaConf's error."""
    from omegaconf import OmegaConf

    path = Path(run) / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


#: the ``data`` keys that fix preprocessing (and a method-B network's patch size)
PREPROCESS_KEYS = ("spacing", "fov_mm", "shape", "percentiles", "patch_size")


def checkpoint_data_config(ckpt: str | Path) -> dict[str, Any] | None:
    """The preprocessing part of the ``data`` config of the run that wrote ``ckpt``
    (``<run>/checkpoints/x.ckpt``, links resolved): :data:`PREPROCESS_KEYS` from
    ``<run>/.hydra/config.yaml``; ``None`` when the run folder has none or it is unreadable
    (one warning)."""
    from omegaconf import OmegaConf

    run = Path(ckpt).resolve().parent.parent
    cfg_file = run / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        data = saved_config(run).get("data")
        # interpolations to other sections (paths, seed) are not needed for preprocessing
        return {k: OmegaConf.to_container(data, resolve=False).get(k) for k in PREPROCESS_KEYS}
    except Exception as exc:
        log.warning("%s: unreadable run config (%s)", cfg_file, exc)
        return None
