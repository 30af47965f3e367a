"""Command line: ``python -m qcflow experiment=NAME [overrides]`` (Hydra).

The CLI only composes the config and dispatches ``cfg.task`` to ``qcflow.tasks.<task>.run``,
a plain ``run(cfg) -> dict`` function that tests call directly. The returned dict is written
to ``metrics.json`` in the run folder; with ``optimized_metric`` set (``sweep=optuna``) the
job returns that metric to the sweeper. A :class:`~qcflow.errors.QCFlowError` is printed as one
line and exits with status 1 (in a multirun it is re-raised so Hydra reports the failed job).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from qcflow.errors import ConfigError, QCFlowError
from qcflow.utils.io import atomic_write_json, flatten_scalars
from qcflow.utils.wandb import finish_wandb, log_summary

__all__ = ["main", "run_task", "objective_value", "config_dir", "available_tasks", "TASKS"]

log = logging.getLogger("qcflow")


def available_tasks() -> tuple[str, ...]:
    """Task names the CLI can dispatch to: the modules of ``qcflow.tasks`` (``run(cfg)``)."""
    import pkgutil

    import qcflow.tasks

    return tuple(
        sorted(
            m.name
            for m in pkgutil.iter_modules(qcflow.tasks.__path__)
            if not m.name.startswith("_") and m.name != "common"
        )
    )


#: tasks the CLI can dispatch to (module names under qcflow/tasks)
TASKS = available_tasks()


def config_dir() -> Path:
    """Folder holding ``config.yaml``: ``qcflow/conf`` in a wheel, else the repo's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def _experiments_help() -> str:
    """One line per ``conf/experiment/*.yaml``: name and its first descriptive comment."""
    lines = []
    for path in sorted((config_dir() / "experiment").glob("*.yaml")):
        comment = ""
        for line in path.read_text().splitlines():
            text = line.strip()
            if text.startswith("#") and "@package" not in text and text.lstrip("# "):
                comment = text.lstrip("# ")
                break
        lines.append(f"  {path.stem:<24} {comment}")
    return "\n".join(lines)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("qcflow_uid"):
        # resolved once per run/sweep folder: keeps folders unique within one second
        OmegaConf.register_new_resolver("qcflow_uid", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("qcflow_experiments"):
        OmegaConf.register_new_resolver("qcflow_experiments", _experiments_help)
    if not OmegaConf.has_resolver("qcflow_wandb_mode"):
        from qcflow.utils.wandb import run_group, wandb_mode, wandb_offline

        OmegaConf.register_new_resolver("qcflow_wandb_offline", wandb_offline)
        OmegaConf.register_new_resolver("qcflow_wandb_mode", wandb_mode)
        # checkpoints become model artifacts only online (offline they cannot be uploaded)
        OmegaConf.register_new_resolver("qcflow_wandb_log_model", lambda mode: mode == "online")
        OmegaConf.register_new_resolver("qcflow_run_group", run_group)


_register_resolvers()


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.task`` and write its results to ``<paths.output_dir>/metrics.json``."""
    task = str(cfg.get("task"))
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    module = importlib.import_module(f"qcflow.tasks.{task}")
    data = cfg.get("data") or {}
    if data.get("max_scan_mb") is not None:  # the NIfTI reader's cap, in every worker too
        os.environ["QCFLOW_MAX_SCAN_MB"] = str(float(data.get("max_scan_mb")))
    try:
        results = module.run(cfg) or {}
        log_summary(cfg, results)  # W&B runs table: the task's numbers (a no-op without W&B)
    finally:
        finish_wandb()  # every (multirun) job gets its own W&B run
    from pytorch_lightning.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:  # other DDP ranks share the run folder
        out_dir = Path(cfg.paths.output_dir)
        atomic_write_json(out_dir / "metrics.json", results)
        log.info("results written to %s", out_dir / "metrics.json")
    return results


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def objective_value(cfg: DictConfig, results: dict[str, Any]) -> float | None:
    """The number an optimizing sweeper (``sweep=optuna``) minimizes or maximizes.

    ``cfg.optimized_metric`` names a key of the task's results (``metrics.json``); nested
    results are addressed with dots (``baselines.snr.auroc``). ``None`` when no metric is set.
    A diverged trial (NaN or infinite metric) gets the worst value, ``+inf`` when minimizing and
    ``-inf`` when maximizing (``hydra.sweeper.direction``), so the study goes on (Optuna fails
    a trial on NaN, and the sweeper then stops the whole sweep).

    Raises:
        ConfigError: the metric is not among the results or is not a number.
    """
    key = cfg.get("optimized_metric")
    if not key:
        return None

    values = flatten_scalars(results)
    numbers = sorted(k for k, v in values.items() if isinstance(v, (int, float)))
    if key not in values or not isinstance(values[key], (int, float)):
        raise ConfigError(
            f"optimized_metric={key}: not a number in the task's results; "
            f"choose one of {', '.join(numbers)}"
        )
    value = float(values[key])
    if math.isfinite(value):
        return value
    direction = "minimize"
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = str(HydraConfig.get().sweeper.get("direction", direction))
    except Exception:  # not under Hydra (tests) or a sweeper without a direction
        pass
    log.warning("optimized_metric=%s is %s: the trial gets the worst value", key, value)
    return -math.inf if direction == "maximize" else math.inf


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return objective_value(cfg, run_task(cfg))
    except QCFlowError as exc:
        if _is_multirun():
            raise
        print(f"qcflow: error: {exc}", file=sys.stderr)
        sys.exit(1)


def _module_keys() -> set[str]:
    """Method B's stage arguments: the keys of ``conf/uncertainty_module/*.yaml`` that are not
    also pipeline keys of ``uncertainty`` in an experiment (``kinds``, ``task_ckpt``...)."""
    import yaml

    keys: set[str] = set()
    for path in (config_dir() / "uncertainty_module").glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        keys |= {str(k) for k in data if k != "defaults"}
    for path in (config_dir() / "experiment").glob("*.yaml"):
        block = (yaml.safe_load(path.read_text()) or {}).get("uncertainty") or {}
        keys -= {str(k) for k in block if k != "module"}
    return keys


def renamed_override(args: list[str]) -> str | None:
    """One line for a command-line override in a form that was renamed, else ``None``.

    Method B's stage arguments moved from ``uncertainty.<key>`` to ``uncertainty.module.<key>``
    (the module is built from that node), and ``uncertainty.role`` is gone (the experiment's
    class is the role). Hydra alone would answer with a multi-line struct error.
    """
    import re

    from qcflow.lit.retired import RETIRED_OVERRIDES  # plain data: no torch at start-up

    moved = None
    for arg in args:
        path = re.sub(r"=.*$", "", arg.lstrip("+~"))
        retired = [r for r in RETIRED_OVERRIDES if path in (r, r.replace(".module.", ".", 1))]
        if retired:
            return (
                f"{arg}: {retired[0]} was retired (measured no gain; README of "
                "experiments/shaw2021_uncertainty, Switches)"
            )
        match = re.match(r"^[+~]*uncertainty\.([A-Za-z_]\w*)(=|$)", arg)
        if not match:
            continue
        key = match.group(1)
        if key == "role":
            return (
                f"{arg}: uncertainty.role is gone; the experiment chooses the stage "
                "(experiment=uncertainty_task|uncertainty_teacher|uncertainty_student)"
            )
        if moved is None:
            moved = _module_keys()
        if key in moved:
            new = arg.replace(f"uncertainty.{key}", f"uncertainty.module.{key}", 1)
            return f"{arg}: method B's stage arguments moved; use {new}"
    return None


def main() -> None:
    """Console entry point (``qcflow`` and ``python -m qcflow``)."""
    message = renamed_override(sys.argv[1:])
    if message:
        print(f"qcflow: error: {message}", file=sys.stderr)
        sys.exit(1)
    _hydra_main()
