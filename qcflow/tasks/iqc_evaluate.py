"""Task ``iqc_evaluate``: unsupervised pass/fail of method A on held-out sets, with baselines.

Loads the latest (or given) ``flow_density`` run -- its flow, thresholds and the encoder
checkpoint it used --, embeds every scan of the evaluation sets (default: the embedded
``test_clean`` and ``test_artifact`` splits), and reports against the ground truth
(``artifacts.tsv`` when the set has one, else the set's ``label``):

* contingency table, sensitivity and specificity at each τ; AUROC of -log p_M(m);
* detection rate per artifact kind and per severity at each τ; the mean over kinds the
  encoder's negatives never simulate (``evaluate.simulated_kinds``; ``null`` reads the kinds
  from the encoder run's own ``augment`` config, :func:`simulated_kinds_of`);
* classical IQM baselines (:mod:`qcflow.qc.iqm`: SNR, CNR, CJV, EFC, FBER), each thresholded
  at the same τ percentile of its distribution over the training volumes (one- or two-sided,
  ``evaluate.baselines``), with their own AUROC;
* figures (``figures/``): density contours of p_M(m) with test volumes by kind, scatter of
  z = f(m), ROC curves; and ``scores.tsv`` (one row per test scan).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from qcflow.data.datamodule import VolumeDataModule
from qcflow.data.discovery import resolve_data_root
from qcflow.models.flow import tau_key
from qcflow.qc import detection as det
from qcflow.runs.flow import (
    CODES_FILE,
    bundle_checkpoints,
    find_flow_run,
    load_encoder,
    load_flow,
    read_codes,
)
from qcflow.runs.folders import saved_config
from qcflow.tasks.common import set_threads, skipped_report
from qcflow.tasks.flow_density import embed_volumes
from qcflow.utils.wandb import log_images, log_table

__all__ = [
    "run",
    "read_artifact_table",
    "simulated_kinds_of",
    "evaluation_data_cfg",
    "load_evaluation_set",
]

log = logging.getLogger(__name__)


def read_artifact_table(root: str | Path) -> dict[str, dict[str, Any]]:
    """``artifacts.tsv`` of a dataset root as ``{participant_id: {"kind", "severity"}}``."""
    path = Path(str(root)) / "artifacts.tsv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["participant_id"]: {"kind": r["kind"], "severity": int(r["severity"])} for r in rows}


def simulated_kinds_of(encoder_checkpoint: str | Path) -> list[str] | None:
    """Artifact kinds the encoder's corrupted negatives used, from its run's saved config.

    Reads ``<run>/.hydra/config.yaml`` of the run that holds ``encoder_checkpoint``
    (``<run>/checkpoints/*.ckpt``): every kind of its ``augment`` sampler that is enabled with a
    non-zero ``p``. ``None`` when the config cannot be found.
    """
    from qcflow.kspace import KINDS

    saved = saved_config(Path(str(encoder_checkpoint)).resolve().parent.parent)
    if saved is None:
        return None
    augment = saved.get("augment")
    if not augment or float(augment.get("rate", 1.0)) <= 0.0:
        return [] if augment is not None else None
    kinds = []
    for kind in KINDS:
        value = augment.get(kind)
        if value is None or value is False:
            continue
        if value is True or float(value.get("p", 1.0)) > 0.0:
            kinds.append(kind)
    return kinds


def evaluation_data_cfg(cfg: DictConfig, split: str | None, root: str | None) -> DictConfig:
    """``cfg.data`` resolved, for one evaluation set: ``root`` (``None``: the embedded data),
    its ``split`` when given, and no validation part (every scan is evaluated)."""
    data = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    with open_dict(data):
        data.root = root
        if split:
            data.split = split
        data.val_fraction = 0.0
    return data


def load_evaluation_set(
    cfg: DictConfig, split: str | None, root: str | None, label: int
) -> dict[str, Any]:
    """One evaluation set: its data module (prepared) and, per usable scan, the artifact kind,
    severity and label (0 clean, 1 artifact) from the set's ``artifacts.tsv``.

    Scans missing from the table are ``none``/0 in a clean set (``label=0``) and
    ``unknown``/-1 otherwise.

    Returns:
        ``{"dm": VolumeDataModule, "kinds": [...], "severity": [...], "labels": [...]}``.
    """
    data = evaluation_data_cfg(cfg, split, root)
    dm = VolumeDataModule(data)
    dm.prepare()
    table = read_artifact_table(resolve_data_root(data))
    kinds, sev, labels = [], [], []
    for scan in dm.scans:
        row = table.get(f"sub-{scan.subject}") if scan.subject else None
        row = row or table.get(scan.scan_id)
        kind = row["kind"] if row else ("none" if label == 0 else "unknown")
        kinds.append(kind)
        sev.append(row["severity"] if row else (0 if label == 0 else -1))
        labels.append(0 if kind == "none" else 1)
    return {"dm": dm, "kinds": kinds, "severity": sev, "labels": labels}


def _plain(value: Any) -> Any:
    """Codes and IQM rows as tensors and Python numbers (storable without pickled objects)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


class _VolumeCache:
    """Per-volume results (codes, IQMs) keyed by the preprocessing cache key of each scan, in
    one file of the flow run: a τ sweep re-evaluates without re-embedding. The file holds only
    tensors and numbers with a content hash, read without unpickling
    (:func:`qcflow.utils.bundles.load_checked`); a damaged or altered file is rebuilt."""

    KEY = "iqc_evaluate-volumes"

    def __init__(self, path: Path | None) -> None:
        from qcflow.utils.bundles import load_checked

        self.path = path
        stored = load_checked(path, self.KEY) if path is not None else None
        self.store: dict[str, Any] = stored if isinstance(stored, dict) else {}
        self.dirty = False

    def get(self, volumes: Any, what: str, compute: Any) -> list[Any]:
        out = []
        for i, scan in enumerate(volumes.scans):
            key = f"{what}|{volumes.cache.key(scan, False)}"
            if key not in self.store:
                self.store[key] = _plain(compute(volumes.volume(i)["image"]))
                self.dirty = True
            value = self.store[key]
            out.append(value.numpy() if isinstance(value, torch.Tensor) else value)
        return out

    def save(self) -> None:
        if self.path is not None and self.dirty:
            from qcflow.utils.bundles import save_checked

            save_checked(self.path, self.KEY, self.store)


def _iqms(volumes: Any, cache: _VolumeCache | None = None) -> dict[str, np.ndarray]:
    from qcflow.qc.iqm import compute_iqms

    def one(image: Any) -> dict[str, float]:
        return compute_iqms(image[0].numpy())

    rows = (
        cache.get(volumes, "iqm", one)
        if cache
        else [one(volumes.volume(i)["image"]) for i in range(len(volumes))]
    )
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]} if rows else {}


def _detector_metrics(
    flags: dict[float, np.ndarray], score: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    out: dict[str, Any] = {"auroc": det.auroc(score, labels)}
    for tau, f in flags.items():
        table = det.contingency(f, labels)
        sens, spec = det.sensitivity_specificity(table)
        key = tau_key(tau)
        out[f"sensitivity_{key}"] = sens
        out[f"specificity_{key}"] = spec
        out[f"contingency_{key}"] = table
    return out


class _OneVolume:
    """The minimal VolumeDataset interface :func:`embed_volumes` needs, for one image."""

    def __init__(self, image: Any) -> None:
        self.image = image

    def __len__(self) -> int:
        return 1

    def volume(self, index: int) -> dict[str, Any]:
        return {"image": self.image}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; returns the metrics named in the method-A issue (see module docstring)."""
    t0 = time.perf_counter()
    set_threads(cfg)
    out = Path(cfg.paths.output_dir)
    ecfg = cfg.evaluate
    flow_run = find_flow_run(
        cfg.paths.runs_dir, ecfg.get("flow_run"), str(ecfg.get("flow_experiment", "flow_density"))
    )
    density, bundle = load_flow(flow_run)
    ckpts = bundle_checkpoints(bundle)  # one encoder, or an ensemble's members
    encoder = load_encoder(ckpts)
    n_central, size = bundle["n_central_slices"], int(bundle["slice_size"])
    if ecfg.get("tau") is not None and not ecfg.get("taus"):  # one tau (sweep=tau)
        with open_dict(ecfg):
            ecfg.taus = [float(ecfg.tau)]
    if ecfg.get("taus"):  # other operating points: thresholds from the training codes, no refit
        _, m_train, _ = read_codes(flow_run / CODES_FILE)
        density.set_thresholds(torch.as_tensor(m_train, dtype=torch.float32), list(ecfg.taus))
    taus = [float(t) for t in density.taus.tolist()]
    vcache = _VolumeCache(flow_run / "eval_cache.pt" if ecfg.get("cache", True) else None)

    sets = [
        load_evaluation_set(cfg, s.get("split"), s.get("root"), int(s.get("label", 1)))
        for s in ecfg.sets
    ]
    scans = [scan for s in sets for scan in s["dm"].scans]
    kinds = [k for s in sets for k in s["kinds"]]
    severity = [v for s in sets for v in s["severity"]]
    labels = np.array([v for s in sets for v in s["labels"]], dtype=int)

    def code(image: Any) -> np.ndarray:
        return embed_volumes(encoder, _OneVolume(image), n_central, size)[0]

    codes = np.stack(
        [c for s in sets for c in vcache.get(s["dm"].volumes(s["dm"].scans), "code", code)]
    )
    m = torch.as_tensor(codes, dtype=torch.float32)
    with torch.no_grad():
        logp = density.log_prob(m).double().numpy()
        z = density.to_latent(m).numpy()
    flags = {tau: logp < density.threshold(tau) for tau in taus}
    results: dict[str, Any] = _detector_metrics(flags, -logp, labels)
    if ecfg.get("simulated_kinds") is not None:
        simulated = set(ecfg.simulated_kinds)
    else:  # what the encoder's negatives actually used (default: the paper's noise + motion)
        found = [simulated_kinds_of(c) for c in ckpts]  # an ensemble: any member's kinds
        known = [set(f) for f in found if f is not None]
        simulated = set().union(*known) if known else {"noise", "motion"}
    results["simulated_kinds"] = sorted(simulated)
    for tau, f in flags.items():
        key = tau_key(tau)
        per_kind = det.detection_rates(f, kinds)
        suffix = "" if key == "tau05" else f"_{key}"
        results[f"detection_rates{suffix}"] = {k: v["rate"] for k, v in per_kind.items()}
        results[f"detection_by_severity{suffix}"] = {
            k: v["rate"] for k, v in det.detection_rates(f, severity).items()
        }
        unseen = [
            v["rate"] for k, v in per_kind.items() if k not in simulated | {"none", "unknown"}
        ]
        results[f"unseen_kind_detection{suffix}"] = (
            float(np.mean(unseen)) if unseen else float("nan")
        )
    results["n_clean"] = int((labels == 0).sum())
    results["n_artifact"] = int((labels == 1).sum())

    # ---------------------------------------------------------------- IQM baselines
    baselines: dict[str, Any] = {}
    curves = {"p_M(m) flow": (*det.roc(-logp, labels), results["auroc"])}
    if ecfg.get("baselines"):
        train = load_evaluation_set(
            cfg, ecfg.get("train_split", "train"), ecfg.get("train_root"), 0
        )
        iqm_train = _iqms(train["dm"].volumes(train["dm"].scans), vcache)
        iqm_test: dict[str, list[np.ndarray]] = {}
        for s in sets:
            for k, v in _iqms(s["dm"].volumes(s["dm"].scans), vcache).items():
                iqm_test.setdefault(k, []).append(v)
        for name, side in ecfg.baselines.items():
            values = np.concatenate(iqm_test[name])
            bflags = {
                tau: det.apply_thresholds(
                    values, det.percentile_thresholds(iqm_train[name], tau, side)
                )
                for tau in taus
            }
            score = det.anomaly_score(values, iqm_train[name], side)
            metrics = _detector_metrics(bflags, score, labels)
            metrics["side"] = side
            metrics["detection_rates"] = {
                k: v["rate"] for k, v in det.detection_rates(bflags[taus[0]], kinds).items()
            }
            baselines[name] = metrics
            curves[name] = (*det.roc(score, labels), metrics["auroc"])
    results["baselines"] = baselines
    vcache.save()
    results["auroc_above_all_baselines"] = bool(
        all(results["auroc"] > b["auroc"] for b in baselines.values())
    )

    # ---------------------------------------------------------------- outputs
    lines = ["scan_id\tkind\tseverity\tlabel\tlog_prob\t" + "\t".join(
        [f"m{j + 1}" for j in range(codes.shape[1])] + [f"fail_{tau_key(t)}" for t in taus]
    )]  # fmt: skip
    for i, scan in enumerate(scans):
        fields = [scan.scan_id, kinds[i], str(severity[i]), str(labels[i]), f"{logp[i]:.6g}"]
        fields += [f"{v:.6g}" for v in codes[i]] + [str(int(flags[t][i])) for t in taus]
        lines.append("\t".join(fields))
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.tsv").write_text("\n".join(lines) + "\n")
    if ecfg.get("figures", True) and codes.shape[1] == 2:
        _figures(out / "figures", density, flow_run, codes, z, kinds, curves)
    elif ecfg.get("figures", True):  # d != 2 (an ensemble, d = 4...): no 2-D maps, the ROC
        from qcflow.qc import plots

        plots.roc_curves(curves, out / "figures" / "roc.png")
    # logger=wandb: the figures and the per-scan table on the dashboard (else a no-op)
    log_images(cfg, {f"eval/{p.stem}": p for p in sorted((out / "figures").glob("*.png"))})
    log_table(cfg, "eval/scores", out / "scores.tsv")
    results["flow_run"] = str(flow_run)
    results["skipped"] = [r for s in sets for r in skipped_report(s["dm"])]
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    sens, spec = results.get("sensitivity_tau05"), results.get("specificity_tau05")
    log.info("AUROC %.3f, sens/spec at 5%%: %s/%s", results["auroc"], sens, spec)
    return results


def _figures(
    folder: Path, density: Any, flow_run: Path, codes: np.ndarray, z: np.ndarray,
    kinds: list[str], curves: dict[str, Any],
) -> None:  # fmt: skip
    from qcflow.qc import plots

    _, train, _ = read_codes(flow_run / CODES_FILE)
    m_train = torch.as_tensor(train, dtype=torch.float32)
    with torch.no_grad():
        z_train = density.to_latent(m_train).numpy()

    def log_prob(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return density.log_prob(torch.as_tensor(x, dtype=torch.float32)).numpy()

    thr = {f"τ={t:.0%}": density.threshold(t) for t in density.taus.tolist()}
    plots.density_contours(log_prob, train, codes, kinds, folder / "density_contours.png", thr)
    k = len(density.flows)  # a mixture has no single latent: its first flow's
    title = "z = f(m)" if k == 1 else f"z = f(m), first of {k} flows in the mixture"
    plots.latent_scatter(z_train, z, kinds, folder / "latent_z.png", title)
    plots.roc_curves(curves, folder / "roc.png")
