"""Task ``flow_density``: embed the training volumes and fit the RealNVP density (method A).

The encoder comes from ``flow.encoder_ckpt`` (a checkpoint or run folder) or the latest
``encoder_contrastive`` run; a *list* of checkpoints/run folders is an encoder ensemble
(extension, :class:`~qcflow.models.encoder.EncoderEnsemble`: the code is the concatenation of
the members' codes and the flow is fitted in ``sum_e d_e`` dimensions). Every usable scan of
the data (default: the embedded ``train`` split, unlabelled) is represented by the mean code of
its central axial slices; the flow is fitted on the standardised codes and the τ thresholds are
set on the same codes (``model.mixture > 1``: an equal mixture of that many flows, each
from its own start and hold-out split -- an extension, off by default). Outputs in the run
folder: ``flow.pt`` (flow state with standardisation and thresholds, its config, the encoder
checkpoint(s) used, the slicing settings) and ``codes_train.tsv``.

``flow.pt`` holds only tensors, numbers and strings (its configs as JSON text) and is read with
``weights_only=True`` (:mod:`qcflow.utils.bundles`): a crafted bundle is refused, never run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from qcflow.data.contrastive import axial_stack
from qcflow.data.datamodule import VolumeDataModule
from qcflow.data.datasets import VolumeDataset
from qcflow.errors import BadFileError, ConfigError
from qcflow.lit.contrastive import ContrastiveEncoder
from qcflow.models.encoder import EncoderEnsemble, volume_code
from qcflow.models.flow import DensityFlow, fit_flow, tau_key
from qcflow.tasks.common import resolve_checkpoint, seed_all
from qcflow.tasks.encoder_contrastive import set_threads, skipped_report
from qcflow.utils.bundles import load_checkpoint, load_tensors
from qcflow.utils.io import atomic_path
from qcflow.utils.wandb import log_table

__all__ = [
    "run",
    "load_encoder",
    "bundle_checkpoints",
    "embed_volumes",
    "load_flow",
    "flow_settings",
    "write_codes",
    "read_codes",
]

log = logging.getLogger(__name__)

FLOW_FILE = "flow.pt"


def load_encoder(ckpt: str | Path | Sequence[str | Path]) -> torch.nn.Module:
    """The encoder network of a ``ContrastiveEncoder`` checkpoint, on CPU, in eval mode.

    A sequence of checkpoints gives an :class:`EncoderEnsemble` of their encoders (in order).
    """
    if isinstance(ckpt, (str, Path)):
        module = load_checkpoint(ContrastiveEncoder, ckpt, "encoder checkpoint")
        return module.encoder.eval()
    if len(ckpt) == 1:
        return load_encoder(ckpt[0])
    return EncoderEnsemble([load_encoder(c) for c in ckpt]).eval()


def bundle_checkpoints(bundle: dict[str, Any]) -> list[Path]:
    """The encoder checkpoint(s) a flow bundle was fitted with (one, or an ensemble's)."""
    many = bundle.get("encoder_checkpoints")
    return [Path(str(c)) for c in (many or [bundle["encoder_checkpoint"]])]


@torch.no_grad()
def embed_volumes(
    encoder: torch.nn.Module,
    volumes: VolumeDataset,
    n_central: int | None,
    size: int,
    batch_size: int = 64,
) -> np.ndarray:
    """``(N, d)`` volume codes: mean code of each volume's central axial slices."""
    codes = []
    for i in range(len(volumes)):
        slices = axial_stack(volumes.volume(i)["image"], n_central, size)
        codes.append(volume_code(encoder, slices, batch_size))
    return torch.stack(codes).numpy() if codes else np.zeros((0, 0), np.float32)


def write_codes(path: Path, ids: Sequence[str], codes: np.ndarray, logp: np.ndarray) -> None:
    """TSV: scan_id, m1..md, log_prob."""
    d = codes.shape[1]
    lines = ["\t".join(["scan_id", *[f"m{j + 1}" for j in range(d)], "log_prob"])]
    for sid, c, lp in zip(ids, codes, logp, strict=True):
        lines.append("\t".join([sid, *[f"{v:.6g}" for v in c], f"{lp:.6g}"]))
    path.write_text("\n".join(lines) + "\n")


def read_codes(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A :func:`write_codes` table: ``(scan ids, (N, d) codes, (N,) log-probs)``."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype={"scan_id": str})
    m_cols = [c for c in table.columns if c.startswith("m") and c[1:].isdigit()]
    return (
        list(table["scan_id"]),
        table[m_cols].to_numpy(dtype=np.float64),
        table["log_prob"].to_numpy(dtype=np.float64),
    )


#: keys of a flow bundle and the types they must have (``data`` is JSON text or, in bundles
#: written before Dec 2026, a plain dict)
_BUNDLE_TYPES: dict[str, tuple[type, ...]] = {
    "state_dict": (dict,),
    "flow_config": (dict, str),
    "encoder_checkpoint": (str,),
    "n_central_slices": (int, type(None)),
    "slice_size": (int,),
}


def _json_field(bundle: dict[str, Any], key: str, path: Path) -> Any:
    value = bundle.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise BadFileError(path, f"malformed flow bundle ('{key}' is not JSON)") from None
    return value


def load_flow(run_dir: str | Path) -> tuple[DensityFlow, dict[str, Any]]:
    """The fitted :class:`DensityFlow` of a ``flow_density`` run and its saved bundle.

    The bundle is read without unpickling and checked key by key; its ``flow_config`` and
    ``data`` come back as dicts whatever the bundle's age.

    Raises:
        BadFileError: ``flow.pt`` is missing, not a plain tensor file (a crafted pickle is
            refused, not run), lacks a key, or does not match the flow it describes.
    """
    path = Path(run_dir) / FLOW_FILE
    bundle = load_tensors(path, "flow bundle")
    if not isinstance(bundle, dict):
        raise BadFileError(path, f"malformed flow bundle (a {type(bundle).__name__}, not a dict)")
    for key, types in _BUNDLE_TYPES.items():
        if key not in bundle:
            raise BadFileError(path, f"malformed flow bundle (no '{key}')")
        if not isinstance(bundle[key], types):
            raise BadFileError(
                path, f"malformed flow bundle ('{key}' is a {type(bundle[key]).__name__})"
            )
    bundle = dict(bundle)
    bundle["flow_config"] = _json_field(bundle, "flow_config", path)
    bundle["data"] = _json_field(bundle, "data", path) or {}
    try:
        density = DensityFlow(**bundle["flow_config"])
        density.load_state_dict(bundle["state_dict"])
    except Exception as exc:  # unknown arguments, missing or mis-shaped tensors
        text = " ".join(str(exc).split())[:200]
        raise BadFileError(path, f"malformed flow bundle (flow does not load: {text})") from None
    return density.eval(), bundle


def flow_settings(mcfg: Any, features: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(DensityFlow kwargs, fit_flow kwargs)`` of a flow model config (``conf/model/flow.yaml``).

    One reading of the config for the task and the study's diagnosis scripts. ``features`` is the
    code dimension the encoder gives (``model.features`` is only checked against it).

    Raises:
        ConfigError: ``model.mixture < 1``.
    """
    flow_config = {
        "features": int(features),
        "transforms": int(mcfg.get("transforms", 6)),
        "hidden_features": [int(h) for h in mcfg.get("hidden_features", [32, 32])],
        "taus": [float(t) for t in mcfg.get("taus", [0.05, 0.03])],
        "mixture": int(mcfg.get("mixture", 1)),
    }
    if flow_config["mixture"] < 1:
        raise ConfigError(
            f"model.mixture must be >= 1 (flows in the mixture), got {mcfg.get('mixture')}"
        )
    if mcfg.get("features") is not None and int(mcfg.get("features")) != features:
        log.warning(
            "model.features=%s but the encoder gives d=%d; using d", mcfg.features, features
        )
    fit_kwargs = {
        "epochs": int(mcfg.get("epochs", 300)),
        "lr": float(mcfg.get("lr", 1e-3)),
        "batch_size": int(mcfg.get("batch_size", 256)),
        "weight_decay": float(mcfg.get("weight_decay", 0.0)),
        "val_fraction": float(mcfg.get("val_fraction", 0.0)),
    }
    return flow_config, fit_kwargs


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the flow; returns NLL, thresholds, sizes and the skipped scans."""
    t0 = time.perf_counter()
    seed = seed_all(cfg)
    set_threads(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fcfg = cfg.get("flow") or {}
    given = fcfg.get("encoder_ckpt")
    experiment = str(fcfg.get("encoder_experiment", "encoder_contrastive"))
    if isinstance(given, (list, ListConfig)):  # an encoder ensemble (extension)
        if not given:
            raise ConfigError("flow.encoder_ckpt is an empty list: give one or more checkpoints")
        ckpts = [resolve_checkpoint(cfg, str(c), experiment) for c in given]
    else:
        ckpts = [resolve_checkpoint(cfg, given, experiment)]
    ckpt = ckpts[0]
    encoder = load_encoder(ckpts)
    dm = VolumeDataModule(cfg.data)
    dm.prepare()
    volumes = dm.volumes(dm.scans)  # every usable scan: the unlabelled training volumes
    n_central = cfg.data.get("n_central_slices", 20)
    size = int(cfg.data.get("slice_size", 128))
    codes = embed_volumes(encoder, volumes, n_central, size, int(fcfg.get("batch_size", 64)))
    m = torch.as_tensor(codes, dtype=torch.float32)

    flow_config, fit_kwargs = flow_settings(cfg.model, int(m.shape[1]))
    density = DensityFlow(**flow_config)
    if cfg.get("trainer", {}).get("fast_dev_run", False):  # debug=fast: one epoch
        fit_kwargs["epochs"] = 1
    fit = fit_flow(density, m, generator=torch.Generator().manual_seed(seed), **fit_kwargs)
    thresholds = density.set_thresholds(m)
    with torch.no_grad():
        logp = density.log_prob(m).double().numpy()
    ids = [s.scan_id for s in dm.scans]
    write_codes(out / "codes_train.tsv", ids, codes, logp)
    log_table(cfg, "flow/codes_train", out / "codes_train.tsv")  # logger=wandb, else a no-op
    bundle = {  # tensors, numbers and strings only: loadable with weights_only=True
        "state_dict": density.state_dict(),
        "flow_config": json.dumps(flow_config),
        "encoder_checkpoint": str(ckpt),
        "encoder_checkpoints": [str(c) for c in ckpts],
        "n_central_slices": None if n_central is None else int(n_central),
        "slice_size": size,
        "data": json.dumps(OmegaConf.to_container(cfg.data, resolve=True), default=str),
    }
    with atomic_path(out / FLOW_FILE) as tmp:
        torch.save(bundle, tmp)
    results: dict[str, Any] = {
        "train/nll": fit["nll"],
        "val/nll": fit["val_nll"],
        "best_epoch": fit["best_epoch"],
        "flow_mixture": flow_config["mixture"],
        "n_volumes": len(ids),
        "encoder_checkpoint": str(ckpt),
        "encoder_checkpoints": [str(c) for c in ckpts],
        "skipped": skipped_report(dm),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    for tau, thr in zip(flow_config["taus"], thresholds.tolist(), strict=True):
        results[f"threshold_{tau_key(tau)}"] = thr
        results[f"train_flagged_{tau_key(tau)}"] = float((logp < thr).mean())
    return results
