"""Run folders: find the latest run of an experiment so a later stage can use it."""

from __future__ import annotations

from pathlib import Path

from qcflow.errors import ConfigError

__all__ = ["find_latest_run"]


def find_latest_run(runs_dir: str | Path, experiment_name: str, require: str | None = None) -> Path:
    """Return the newest finished run folder of ``experiment_name``.

    Run folders are ``<runs_dir>/<experiment_name>/<YYYY-mm-dd_HH-MM-SS>_<id>`` (multirun jobs
    one level deeper); a run counts as finished when it holds ``metrics.json``.

    Args:
        runs_dir: the root of all runs (``paths.runs_dir``).
        experiment_name: which experiment's runs to search.
        require: a file (glob) the run must also contain, e.g. ``"checkpoints/*.ckpt"``.

    Raises:
        ConfigError: when no finished run exists, naming the folder searched.
    """
    base = Path(runs_dir) / experiment_name
    candidates = [p.parent for p in base.glob("*/metrics.json")]
    candidates += [p.parent for p in base.glob("multirun_*/*/metrics.json")]
    if require:
        candidates = [c for c in candidates if any(c.glob(require))]
    if not candidates:
        what = f" with {require}" if require else ""
        raise ConfigError(
            f"{base}: no finished '{experiment_name}' run{what}; run "
            f"`python -m qcflow experiment={experiment_name}` first or give a path explicitly"
        )
    return max(candidates, key=lambda p: ((p / "metrics.json").stat().st_mtime, str(p)))
