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
checkpoint(s) used, the slicing settings) and ``codes_train.tsv``; their format and loading are
:mod:`qcflow.runs.flow`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from qcflow.data.contrastive import axial_stack
from qcflow.data.datamodule import VolumeDataModule
from qcflow.data.datasets import VolumeDataset
from qcflow.errors import ConfigError
from qcflow.lit.flow import fit_density
from qcflow.models.encoder import volume_code
from qcflow.models.flow import DensityFlow, tau_key
from qcflow.runs.flow import CODES_FILE, load_encoder, save_flow, write_codes
from qcflow.runs.folders import resolve_checkpoint
from qcflow.tasks.common import seed_all, set_threads, skipped_report
from qcflow.utils.wandb import log_table

__all__ = ["run", "embed_volumes", "flow_settings"]

log = logging.getLogger(__name__)


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


def flow_settings(mcfg: Any, features: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(DensityFlow kwargs, fit_density kwargs)`` of a flow config (``conf/model/flow.yaml``).

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


def _flow_trainer(cfg: DictConfig) -> Any:
    """Each flow's Trainer from the ``trainer`` group and its loggers (curves reach CSV,
    TensorBoard and W&B): one device, no sanity check, every epoch logged."""
    from hydra.utils import instantiate

    from qcflow.tasks.common import build_loggers

    loggers = build_loggers(cfg)

    def make(epochs: int, callbacks: list[Any], root: Path) -> Any:
        return instantiate(
            cfg.trainer,
            max_epochs=epochs,
            callbacks=callbacks,
            logger=loggers or False,
            default_root_dir=str(root),
            devices=1,
            num_nodes=1,
            strategy="auto",
            sync_batchnorm=False,
            fast_dev_run=False,
            limit_train_batches=1.0,
            limit_val_batches=1.0,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            enable_checkpointing=True,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    return make


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
        ckpts = [resolve_checkpoint(cfg.paths.runs_dir, str(c), experiment) for c in given]
    else:
        ckpts = [resolve_checkpoint(cfg.paths.runs_dir, given, experiment)]
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
    fit = fit_density(
        density,
        m,
        generator=torch.Generator().manual_seed(seed),
        trainer=_flow_trainer(cfg),
        **fit_kwargs,
    )
    thresholds = density.set_thresholds(m)
    with torch.no_grad():
        logp = density.log_prob(m).double().numpy()
    ids = [s.scan_id for s in dm.scans]
    write_codes(out / CODES_FILE, ids, codes, logp)
    log_table(cfg, "flow/codes_train", out / CODES_FILE)  # logger=wandb, else a no-op
    data = OmegaConf.to_container(cfg.data, resolve=True)
    save_flow(out, density, flow_config, ckpts, n_central, size, data)  # type: ignore[arg-type]
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
