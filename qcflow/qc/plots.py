"""Figures of method A: code scatters, the flow's z scatter, density contours, ROC curves.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["embedding_scatter", "latent_scatter", "density_contours", "roc_curves"]

_CORRUPT_NAMES = {0: "clean query", 1: "noise", 2: "motion", 3: "motion+noise", 4: "other"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _by_group(ax: Any, xy: np.ndarray, groups: Sequence[Any], **kw: Any) -> None:
    groups = np.asarray([str(g) for g in groups])
    names = sorted(set(groups.tolist()) - {"none", "clean query"})
    cmap = _plt().get_cmap("tab10" if len(names) <= 10 else "tab20")
    for name in ("none", "clean query"):  # clean first, in black, with its own marker
        sel = groups == name
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=kw.get("s", 14), color="k", marker="x",
                       label=name, linewidths=0.8)  # fmt: skip
    fixed = {"pass": "tab:green", "review": "tab:orange", "fail": "tab:red"}  # QC decisions
    for i, name in enumerate(names):
        sel = groups == name
        color = fixed.get(name, cmap(i % cmap.N))
        ax.scatter(xy[sel, 0], xy[sel, 1], s=kw.get("s", 14), color=color, label=name,
                   edgecolors="k", linewidths=0.3)  # fmt: skip


def embedding_scatter(codes: np.ndarray, kinds: np.ndarray, path: str | Path) -> Path:
    """Scatter of 2-D codes ``(N, 2)`` coloured by corruption kind codes (validation)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    names = [_CORRUPT_NAMES.get(int(k), str(k)) for k in kinds]
    _by_group(ax, np.asarray(codes)[:, :2], names, s=8)
    ax.set(xlabel="m1", ylabel="m2", title="validation codes")
    ax.legend(fontsize=7)
    return _save(fig, path)


def latent_scatter(
    z_train: np.ndarray,
    z_test: np.ndarray,
    test_kinds: Sequence[str],
    path: str | Path,
    title: str = "z = f(m)",
) -> Path:
    """Scatter of the flow's latent z: training volumes (grey) and test volumes by kind."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(z_train[:, 0], z_train[:, 1], s=6, color="0.7", label="train (unlabelled)")
    _by_group(ax, np.asarray(z_test), test_kinds)
    ax.set(xlabel="z1", ylabel="z2", title=title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def density_contours(
    log_prob: Callable[[np.ndarray], np.ndarray],
    m_train: np.ndarray,
    m_test: np.ndarray,
    test_kinds: Sequence[str],
    path: str | Path,
    thresholds: Mapping[str, float] | None = None,
    grid: int = 120,
) -> Path:
    """Contours of p_M(m) with training codes and test codes coloured by kind on top.

    Args:
        log_prob: ``(N, 2)`` codes -> ``(N,)`` log densities.
        thresholds: ``{label: log-density}`` drawn as red contour lines (the τ cut-offs).
    """
    plt = _plt()
    allm = np.concatenate([m_train, m_test])
    lo, hi = np.quantile(allm, 0.0, axis=0), np.quantile(allm, 1.0, axis=0)
    pad = 0.15 * (hi - lo + 1e-6)
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    xx, yy = np.meshgrid(xs, ys)
    lp = log_prob(np.stack([xx.ravel(), yy.ravel()], 1)).reshape(grid, grid)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cs = ax.contourf(xx, yy, np.exp(lp), levels=20, cmap="Blues")
    fig.colorbar(cs, ax=ax, label="p_M(m)")
    if thresholds:
        for i, (name, thr) in enumerate(thresholds.items()):
            c = ax.contour(xx, yy, lp, levels=[thr], colors=["red"], linestyles=["-", "--"][i % 2])
            ax.clabel(c, fmt={thr: name}, fontsize=7)
    ax.scatter(m_train[:, 0], m_train[:, 1], s=5, color="0.4", label="train")
    _by_group(ax, np.asarray(m_test), test_kinds)
    ax.set(xlabel="m1", ylabel="m2", title="density of artifact codes")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | Path
) -> Path:
    """ROC curves ``{name: (fpr, tpr, auroc)}`` on one plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test_clean + test_artifact)")
    ax.legend(fontsize=7)
    return _save(fig, path)
