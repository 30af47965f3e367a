"""Hydra callback: one summary table (CSV) and plot for a whole multirun sweep.

After every job of a sweep has finished, :class:`SweepSummary` reads each job's
``metrics.json`` and the overrides that made it, and writes ``sweep_summary.csv`` (one row per
job: the overrides, then every scalar metric) and ``sweep_summary.png`` (metrics against the
swept value ``x``) into the sweep folder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qcflow.utils.io import atomic_path, flatten_scalars

__all__ = ["SweepSummary", "summarize_sweep"]

log = logging.getLogger(__name__)

#: metrics drawn against the swept value when present
PLOT_METRICS = ("sensitivity", "specificity", "auroc", "val/loss", "train/loss")


def _tau_metrics(metrics: dict[str, Any], tau: Any) -> dict[str, Any]:
    """``sensitivity``/``specificity`` of the job's own tau (its metric names carry the tau)."""
    try:
        key = f"tau{round(float(tau) * 100):02d}"
    except (TypeError, ValueError):
        return {}
    return {
        name: metrics[f"{name}_{key}"]
        for name in ("sensitivity", "specificity")
        if f"{name}_{key}" in metrics
    }


def summarize_sweep(sweep_dir: str | Path, x: str | None = None) -> pd.DataFrame:
    """Collect ``<sweep_dir>/<job>/metrics.json`` (+ overrides) into a table; write CSV + PNG."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: p.parent.name):
        job = metrics_path.parent
        row: dict[str, Any] = {"job": job.name}
        overrides = job / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            for item in OmegaConf.load(overrides):
                key, _, value = str(item).lstrip("+~").partition("=")
                row[key] = value
        metrics = json.loads(metrics_path.read_text())
        if x and x in row:
            row.update(_tau_metrics(metrics, row[x]))
        row.update(flatten_scalars(metrics))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        log.warning("%s: no finished job to summarise", sweep_dir)
        return table
    with atomic_path(sweep_dir / "sweep_summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    if x and x in table:
        _plot(table, x, sweep_dir / "sweep_summary.png")
    log.info("sweep summary: %s", sweep_dir / "sweep_summary.csv")
    return table


def _plot(table: pd.DataFrame, x: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = pd.to_numeric(table[x], errors="coerce")
    order = xs.argsort()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in PLOT_METRICS:
        if name in table:
            ys = pd.to_numeric(table[name], errors="coerce")
            if ys.notna().any() and not all(math.isnan(v) for v in ys):
                ax.plot(xs.iloc[order], ys.iloc[order], marker="o", label=name)
    ax.set(xlabel=x, title="sweep summary")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks``) writing the sweep summary at the end of a multirun.

    Args:
        x: the swept config key plotted on the x axis (e.g. ``evaluate.tau``).
    """

    def __init__(self, x: str | None = None) -> None:
        self.x = x

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(config.hydra.sweep.dir, self.x)
