"""Evaluate method B's student (Shaw et al. 2021): does artifact variance predict Dice?

Held-out clean scans (``data.split``, default ``test_clean``) are each evaluated clean and
corrupted with every artifact kind at a random severity (the ``augment.<kind>`` ranges, one kind
per copy, ``evaluate.n_per_kind`` draws, seeded). For every (scan, corruption) the student
predicts the whole volume by sliding windows; we record Dice vs the ground-truth GM label, the
mean total *artifact* variance ``sum_i sigma_i^2`` (task term excluded, mean over the image),
every channel's mean variance, SNR and CNR (:mod:`qcflow.qc.iqm`, MRIQC definitions) of the
image the network saw, and the GM volume with its entropy error bar.

Outputs in the run folder: ``scans.tsv`` (one row per evaluated image), ``maps/`` (NIfTI maps +
JSON for ``evaluate.save_maps`` images per kind, in the scoring derivatives' layout:
:mod:`qcflow.qc.derivatives`), ``figures/`` and the returned metrics
(``metrics.json``): Spearman rho and p-value of each measure against Dice, the decoupling matrix
(rows: true kind, columns: predicted channel, entries: mean sigma^2) and how many kinds have
their own channel largest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from qcflow.data.datamodule import VolumeDataModule
from qcflow.kspace import KINDS
from qcflow.qc.derivatives import write_description, write_maps
from qcflow.qc.iqm import compute_iqms, head_mask
from qcflow.qc.segmentation import predict_volume, spearman, summarize_prediction
from qcflow.runs.folders import resolve_checkpoint
from qcflow.runs.stages import load_stage
from qcflow.tasks.common import required, seed_all
from qcflow.utils.wandb import log_images, log_table

__all__ = ["run", "severity_value", "decoupling_matrix", "evaluation_volumes", "kind_samplers"]

log = logging.getLogger(__name__)


def severity_value(kind: str, record: dict[str, Any]) -> float:
    """A kind's natural severity number: SNR dB (noise), max ratio (blur), else the record's."""
    params = record.get("params", {}).get(kind, {})
    if kind == "noise" and "snr_db" in params:
        return float(params["snr_db"])
    if kind == "blur" and "ratio" in params:
        return float(max(params["ratio"]))
    sev = record.get("severity", 0.0)
    return float(sev.get(kind, 0.0)) if isinstance(sev, dict) else float(sev or 0.0)


def decoupling_matrix(rows: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Mean predicted sigma^2 per channel (columns) for scans of each true kind (rows)."""
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (k != "none", k))
    matrix = {
        k: {
            s: float(np.mean([r[f"mean_var_{s}"] for r in rows if r["kind"] == k])) for s in sources
        }
        for k in kinds
    }
    artifact = [s for s in sources if s != "task"]
    own = {}
    for k in kinds:
        if k in artifact:
            row = matrix[k]
            own[k] = max(artifact, key=lambda s: row[s]) == k
    return {
        "rows": kinds,
        "columns": sources,
        "matrix": matrix,
        "own_largest": own,
        "n_own_largest": int(sum(own.values())),
        "n_kinds": len(own),
    }


def _relative(path: str | Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it, else just its file name."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return path.name


def _sampler(cfg: DictConfig, kind: str, seed: int) -> Any:
    from hydra.utils import instantiate

    aug = OmegaConf.to_container(cfg.augment, resolve=True)
    assert isinstance(aug, dict)
    for k in KINDS:  # every kind but the evaluated one off
        if k != kind:
            aug[k] = None
    aug[kind]["p"] = 1.0
    aug.update(rate=1.0, device="loader", seed=seed, spacing=[float(cfg.data.spacing)] * 3)
    return instantiate(aug)


def evaluation_volumes(cfg: DictConfig, split: str | None = None) -> Any:
    """The labelled volumes of ``split`` (default ``evaluate.split``), all of them (no val part)."""
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.split = str(split or cfg.evaluate.split)
        data_cfg.val_fraction = 0.0
    dm = VolumeDataModule(data_cfg, with_label=True)
    dm.prepare()
    return dm.volumes(dm.scans)


def kind_samplers(cfg: DictConfig, kinds: list[str]) -> dict[str, Any]:
    """One seeded single-kind sampler per kind (``cfg.seed + 101 * i`` for the i-th kind)."""
    return {k: _sampler(cfg, k, int(cfg.seed) + 101 * i) for i, k in enumerate(kinds)}


def run(cfg: DictConfig) -> dict[str, Any]:
    seed_all(cfg)
    ecfg = cfg.evaluate
    out_dir = Path(cfg.paths.output_dir)
    path = resolve_checkpoint(
        cfg.paths.runs_dir, ecfg.get("student_ckpt"), str(ecfg.stage_experiment)
    )
    module = load_stage(path)
    sources, kinds = list(module.sources), list(module.kinds)
    eval_kinds = [str(k) for k in (ecfg.get("kinds") or kinds)]
    log.info("evaluating %s (%s) on kinds %s", path, module.role, eval_kinds)

    volumes = evaluation_volumes(cfg)
    n_scans = min(len(volumes), int(ecfg.max_scans)) if ecfg.get("max_scans") else len(volumes)
    spacing = float(cfg.data.spacing)
    voxel_ml = spacing**3 / 1000.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    roi = [int(p) for p in (ecfg.get("roi_size") or cfg.data.patch_size)]
    samplers = kind_samplers(cfg, eval_kinds)
    predictor = module.net.predict

    rows: list[dict[str, Any]] = []
    examples: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, int] = {}
    saved_any = False
    t0 = time.perf_counter()
    for idx in range(n_scans):
        item = volumes[idx]
        clean, label = item["image"].float(), item["label"][0]
        variants: list[tuple[str, torch.Tensor, dict[str, Any]]] = [("none", clean, {})]
        for kind in eval_kinds:
            for _ in range(int(ecfg.n_per_kind)):
                y, record = samplers[kind](clean)
                variants.append((kind, y.float(), record))
        for v, (kind, image, record) in enumerate(variants):
            pred = predict_volume(
                predictor,
                image,
                sources,
                roi,
                overlap=float(ecfg.overlap),
                sw_batch_size=int(ecfg.sw_batch_size),
            )
            mask = head_mask(image[0])
            summ = summarize_prediction(pred, sources, voxel_ml, label=label, volume_mask=mask)
            iqm = compute_iqms(image[0])
            row = {
                "scan_id": item["scan_id"],
                "variant": v,
                "kind": kind,
                "severity": severity_value(kind, record) if kind != "none" else 0.0,
                "snr": iqm["snr"],
                "cnr": iqm["cnr"],
                **summ,
            }
            rows.append(row)
            if saved.get(kind, 0) < int(ecfg.save_maps):
                saved[kind] = saved.get(kind, 0) + 1
                if not saved_any:
                    write_description(out_dir / "maps")
                    saved_any = True
                scan = replace(volumes.scans[idx], scan_id=f"{item['scan_id']}_{kind}{v}")
                write_maps(out_dir / "maps", scan, pred, sources, affine, row)
                if kind not in examples:
                    z = image.shape[-1] // 2
                    examples[kind] = {
                        "image": image[0, :, :, z].numpy(),
                        "seg": pred["segmentation"][:, :, z].numpy(),
                        "label": label[:, :, z].numpy(),
                        "entropy": pred["entropy"][:, :, z].numpy(),
                        **{f"var_{s}": pred[f"var_{s}"][:, :, z].numpy() for s in sources},
                    }
        log.info("scan %d/%d done (%.0f s)", idx + 1, n_scans, time.perf_counter() - t0)

    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "scans.tsv", sep="\t", index=False)
    log_table(cfg, "eval/scans", table)  # logger=wandb: on the dashboard (else a no-op)
    dices = [r["dice"] for r in rows]
    results: dict[str, Any] = {
        # relative to the runs folder (absolute paths would not open on a reader's machine)
        "checkpoint": _relative(path, Path(cfg.paths.runs_dir)),
        "role": module.role,
        "sources": sources,
        "n_images": len(rows),
        "n_scans": n_scans,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }
    for name, key in (
        ("artifact_variance", "mean_var_artifact"),
        ("snr", "snr"),
        ("cnr", "cnr"),
        ("task_variance", f"mean_var_{sources[0]}"),
        ("entropy", "mean_entropy"),
    ):
        rho, p = spearman([r[key] for r in rows], dices)
        results[f"spearman_{name}_dice"] = rho
        results[f"spearman_{name}_dice_p"] = p
    results["dice_mean"] = float(np.mean(dices))
    results["dice_by_kind"] = {
        k: float(np.mean([r["dice"] for r in rows if r["kind"] == k]))
        for k in sorted({r["kind"] for r in rows})
    }
    results["decoupling"] = decoupling_matrix(rows, sources)
    if required(ecfg, "figures", "evaluate"):
        figures = save_figures(rows, examples, sources, out_dir / "figures")
        results["figures"] = [_relative(f, out_dir) for f in figures]
        log_images(cfg, {f"eval/{Path(f).stem}": f for f in figures})
    return results


def save_figures(
    rows: list[dict[str, Any]],
    examples: dict[str, dict[str, np.ndarray]],
    sources: list[str],
    fig_dir: Path,
) -> list[str]:
    """The paper-like figures: Dice vs each measure, maps per kind, GM-volume error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    files = []
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (k != "none", k))
    colors = {k: plt.cm.tab10(i) for i, k in enumerate(kinds)}
    # 1. Dice against each measure
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, name) in zip(
        axes,
        [("mean_var_artifact", "mean artifact variance"), ("snr", "SNR"), ("cnr", "CNR")],
        strict=True,
    ):
        for k in kinds:
            sel = [r for r in rows if r["kind"] == k]
            ax.scatter(
                [r[key] for r in sel], [r["dice"] for r in sel], s=14, color=colors[k], label=k
            )
        rho, _ = spearman([r[key] for r in rows], [r["dice"] for r in rows])
        ax.set(xlabel=name, ylabel="Dice (GM)", title=f"Spearman rho = {rho:.3f}")
        values = [r[key] for r in rows if r[key] > 0]
        if key == "mean_var_artifact" and values and max(values) > 10 * min(values):
            ax.set_xscale("log")  # only for a wide range (log ticks overlap on a narrow one)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.append(str(fig_dir / "dice_vs_measures.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)
    # 2. maps for one image per kind
    if examples:
        cols = ["image", "label", "seg", "entropy", *[f"var_{s}" for s in sources]]
        fig, axes = plt.subplots(
            len(examples), len(cols), figsize=(1.6 * len(cols), 1.8 * len(examples)), squeeze=False
        )
        for i, (k, ex) in enumerate(examples.items()):
            for j, c in enumerate(cols):
                ax = axes[i, j]
                ax.imshow(
                    np.rot90(ex[c]), cmap="gray" if c in ("image", "label", "seg") else "magma"
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(c.replace("var_", "σ² "), fontsize=8)
            axes[i, 0].set_ylabel(k, fontsize=8)
        fig.tight_layout()
        files.append(str(fig_dir / "maps_per_kind.png"))
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    # 3. GM volume +- error bar against noise level and blur ratio
    panels = [
        (k, x)
        for k, x in (("noise", "SNR (dB)"), ("blur", "downsampling ratio"))
        if any(r["kind"] == k for r in rows)
    ]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (k, xlabel) in zip(axes[0], panels, strict=True):
            sel = [r for r in rows if r["kind"] == k]
            ax.errorbar(
                [r["severity"] for r in sel],
                [r["gm_volume_ml"] for r in sel],
                yerr=[r["gm_volume_std_ml"] for r in sel],
                fmt="o",
                ms=3,
                capsize=2,
            )
            ax.set(xlabel=xlabel, ylabel="GM volume (ml) ± entropy error bar", title=k)
        fig.tight_layout()
        files.append(str(fig_dir / "gm_volume_errorbars.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files
