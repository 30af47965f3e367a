"""W&B without an account or a network: offline unless the user configured otherwise.

``wandb_offline()`` decides the logger's mode: online only when ``WANDB_MODE=online``, or when
an API key is available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) and
``WANDB_MODE`` does not say otherwise. ``WANDB_MODE=disabled`` (tests) always wins inside wandb.
Offline runs are synced later with ``wandb sync <run>/wandb/offline-run-*``.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path

__all__ = ["wandb_offline", "run_group", "finish_wandb"]


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return rc.authenticators("api.wandb.ai") is not None


def wandb_offline() -> bool:
    """True unless W&B is explicitly online or an API key is configured."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "online":
        return False
    if mode in ("offline", "dryrun", "disabled"):
        return True
    return not _has_api_key()


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
