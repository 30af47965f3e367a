"""W&B without an account or a network, and what the dashboard shows.

Mode: ``wandb_mode()`` is ``online`` only when ``WANDB_MODE=online``, or when an API key is
available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and ``WANDB_MODE`` does
not say otherwise; ``disabled`` when ``WANDB_MODE=disabled`` (tests); else ``offline``. An
offline decision is also written to ``WANDB_MODE`` (when unset) before W&B starts: passing
``mode="offline"`` to ``wandb.init`` alone leaves W&B's process-wide settings online, and its
telemetry exporter (``wandb.analytics.opentelemetry``) then resolves ``api.forge.coreweave.com``
-- one DNS lookup per process, measured with strace on wandb 0.31; with the variable set there is
no network call at all. Offline runs are synced later with
``wandb sync <run>/wandb/offline-run-*``; checkpoints are uploaded as model artifacts only online
(``conf/logger/wandb.yaml``).

Dashboard content: Lightning logs losses and metrics; :class:`qcflow.lit.wandb_media.WandbMedia`
adds the resolved config, new figures of ``<run>/figures`` and a grid of artifact examples from
the first training batch; tasks without a Trainer call :func:`log_images`, :func:`log_table` and
(via the CLI) :func:`log_summary`. Every helper takes a ``source`` -- a ``pl.Trainer``, a
``WandbLogger``, the composed config, or ``None`` (the active W&B run) -- and is a no-op
returning ``False`` when that source has no W&B logger, off rank 0, or without ``wandb``
installed, so tasks call them unconditionally.

Example:
    >>> log_images(cfg, {"eval/roc": out / "figures" / "roc.png"})  # doctest: +SKIP
    >>> log_table(cfg, "eval/scores", scores_dataframe)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import netrc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcflow.utils.io import flatten_scalars

__all__ = [
    "wandb_mode",
    "wandb_offline",
    "run_group",
    "finish_wandb",
    "global_rank",
    "active_run",
    "log_images",
    "log_table",
    "log_summary",
]

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return rc.authenticators("api.wandb.ai") is not None


def wandb_mode() -> str:
    """``online``, ``offline`` or ``disabled`` (see the module docstring for the rule)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return "disabled"
    if mode == "online":
        return "online"
    if mode in ("offline", "dryrun"):
        return "offline"
    if _has_api_key():
        return "online"
    # W&B's process-wide settings must say offline too, or its telemetry looks up its server
    os.environ["WANDB_MODE"] = "offline"
    return "offline"


def wandb_offline() -> bool:
    """True unless W&B is explicitly online or an API key is configured."""
    return wandb_mode() != "online"


def run_group(experiment_name: str) -> str:
    """W&B group: the multirun folder name in a sweep (so its jobs share a group), else the
    experiment name."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return f"{experiment_name}/{Path(hc.sweep.dir).name}"
    except Exception:
        pass
    return experiment_name


def finish_wandb() -> None:
    """Close the current W&B run, if any (each multirun job must get its own run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def global_rank() -> int:
    """This process's rank: Lightning's once it set it (DDP), else from the launcher's
    environment (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``), else 0."""
    module = sys.modules.get("lightning_fabric.utilities.rank_zero")
    rank = getattr(getattr(module, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _is_wandb_logger(obj: Any) -> bool:
    return type(obj).__name__ == "WandbLogger" and hasattr(obj, "experiment")


def _wandb_logger_cfg(cfg: Any) -> Any | None:
    """The ``cfg.logger`` entry that instantiates a ``WandbLogger``, if any."""
    loggers = cfg.get("logger") if hasattr(cfg, "get") else None
    for entry in (loggers or {}).values():
        if entry is not None and str(entry.get("_target_", "")).endswith("WandbLogger"):
            return entry
    return None


def active_run(source: Any = None) -> Any | None:
    """The W&B run that ``source`` logs to, started if needed; ``None`` when there is none.

    Args:
        source: a ``pl.Trainer`` (its W&B logger), a ``WandbLogger``, the composed config (the
            active run, else a run started from its ``logger`` group with the resolved config
            attached -- for tasks without a Trainer), or ``None`` (the active run only).
    """
    if global_rank() != 0:
        return None
    if source is None or not (hasattr(source, "loggers") or _is_wandb_logger(source)):
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is not None or source is None:
            return run
        entry = _wandb_logger_cfg(source)
        if entry is None:
            return None
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        logger = instantiate(entry)
        logger.log_hyperparams(OmegaConf.to_container(source, resolve=True))
        return logger.experiment
    loggers = source.loggers if hasattr(source, "loggers") else [source]
    for logger in loggers:
        if _is_wandb_logger(logger):
            return logger.experiment
    return None


def _log(run: Any, payload: dict[str, Any], step: int | None) -> None:
    if step is not None:  # WandbLogger's x axis (its metrics use the same key)
        payload["trainer/global_step"] = int(step)
    run.log(payload)


def log_images(
    source: Any, images: Mapping[str, Any], step: int | None = None, caption: str = ""
) -> bool:
    """Log figures as W&B images, one dashboard panel per key.

    Args:
        source: see :func:`active_run`.
        images: ``{key: image}``, e.g. ``{"eval/roc": run / "figures/roc.png"}``; an image is a
            PNG/JPEG path (missing files are skipped with a warning) or an ``(H, W[, C])``
            array in [0, 1].
        step: ``trainer/global_step`` to attach (training figures), or ``None``.
        caption: caption of every image (default: the file name).

    Returns:
        Whether a W&B run received the images.
    """
    run = active_run(source)
    if run is None:
        return False
    import wandb

    payload: dict[str, Any] = {}
    for key, image in images.items():
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                log.warning("%s: figure not found, not logged to W&B", path)
                continue
            payload[key] = wandb.Image(str(path), caption=caption or path.name)
        else:
            payload[key] = wandb.Image(image, caption=caption or None)
    if payload:
        _log(run, payload, step)
    return bool(payload)


def _to_frame(table: Any) -> Any:
    import pandas as pd

    if isinstance(table, (str, Path)):
        path = Path(table)
        return pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t")
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    frame = frame.copy()
    for col in frame.columns:  # W&B tables take scalars: lists/dicts become their text
        if frame[col].dtype == object:
            frame[col] = [v if v is None or isinstance(v, str) else str(v) for v in frame[col]]
    return frame


def log_table(source: Any, name: str, table: Any) -> bool:
    """Log a table (one row per scan) as a ``wandb.Table``: sortable, filterable, plottable.

    Args:
        source: see :func:`active_run`.
        name: the panel's key, e.g. ``"eval/scores"`` or ``"score/scores"``.
        table: a ``pandas.DataFrame``, a list of row dicts, or a TSV/CSV file (``.csv`` is
            comma-separated, anything else tab-separated).

    Returns:
        Whether a W&B run received the table.
    """
    run = active_run(source)
    if run is None:
        return False
    import wandb

    _log(run, {name: wandb.Table(dataframe=_to_frame(table))}, None)
    return True


def log_summary(source: Any, results: Mapping[str, Any]) -> bool:
    """Put a task's results (nested dicts flattened to ``a.b`` keys, scalars only) into the
    run's summary, the numbers the W&B runs table shows and compares across a sweep."""
    run = active_run(source)
    if run is None:
        return False
    run.summary.update(flatten_scalars(results, finite=True))
    return True
