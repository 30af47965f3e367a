"""Method A's trained runs: the ``flow_density`` bundle, its codes table and its encoders.

A ``flow_density`` run folder holds

* ``flow.pt`` (:data:`FLOW_FILE`): the flow's state with standardisation and τ thresholds, its
  config, the encoder checkpoint(s) it was fitted with, the slicing settings and the run's
  ``data`` config. It holds only tensors, numbers and strings (configs as JSON text) and is read
  with ``weights_only=True`` (:mod:`qcflow.utils.bundles`): a crafted bundle is refused, never
  run. Bundles written before Dec 2026 (``data`` as a plain dict, no ``encoder_checkpoints``)
  load the same way;
* ``codes_train.tsv`` (:data:`CODES_FILE`): ``scan_id, m1..md, log_prob`` of every training
  volume -- the reference distribution of scoring's percentiles and thresholds.

:func:`load_density_model` gives the loaded :class:`~qcflow.qc.scorers.DensityModel` that a
:class:`~qcflow.qc.scorers.DensityScorer` scores with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from qcflow.data.preprocess import PreprocessConfig, file_digest
from qcflow.errors import BadFileError, ConfigError
from qcflow.models.encoder import EncoderEnsemble
from qcflow.models.flow import DensityFlow
from qcflow.qc.scorers import DensityModel
from qcflow.runs.folders import find_latest_run
from qcflow.utils.bundles import load_checkpoint, load_tensors
from qcflow.utils.io import atomic_path, atomic_write_text, open_regular

__all__ = [
    "FLOW_FILE",
    "CODES_FILE",
    "find_flow_run",
    "load_encoder",
    "bundle_checkpoints",
    "save_flow",
    "load_flow",
    "load_density_model",
    "training_sites",
    "write_codes",
    "read_codes",
]

log = logging.getLogger(__name__)

#: the flow bundle of a ``flow_density`` run
FLOW_FILE = "flow.pt"
#: the training volumes' codes and log-densities
CODES_FILE = "codes_train.tsv"


def find_flow_run(
    runs_dir: str | Path, given: str | Path | None = None, experiment: str = "flow_density"
) -> Path:
    """``given`` (a run folder), else the latest finished ``experiment`` run with ``flow.pt``.

    Raises:
        ConfigError: no such run, or a newer one did not finish
            (:func:`~qcflow.runs.folders.find_latest_run`).
    """
    if given:
        return Path(str(given)).expanduser()
    return find_latest_run(runs_dir, experiment, require=FLOW_FILE)


def load_encoder(ckpt: str | Path | Sequence[str | Path]) -> torch.nn.Module:
    """The encoder network of a ``ContrastiveEncoder`` checkpoint, on CPU, in eval mode.

    A sequence of checkpoints gives an :class:`EncoderEnsemble` of their encoders (in order).
    """
    from qcflow.lit.contrastive import ContrastiveEncoder

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


def write_codes(path: Path, ids: Sequence[str], codes: np.ndarray, logp: np.ndarray) -> None:
    """TSV: scan_id, m1..md, log_prob, at full precision (``repr``: every value reads back
    bit for bit, so the τ thresholds a scorer sets from this table are the bundle's own)."""
    d = codes.shape[1]
    lines = ["\t".join(["scan_id", *[f"m{j + 1}" for j in range(d)], "log_prob"])]
    for sid, c, lp in zip(ids, codes, logp, strict=True):
        lines.append("\t".join([sid, *[repr(float(v)) for v in c], repr(float(lp))]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_codes(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A :func:`write_codes` table: ``(scan ids, (N, d) codes, (N,) log-probs)``."""
    import pandas as pd

    with open_regular(path) as f:  # never a FIFO; exact floats
        table = pd.read_csv(f, sep="\t", dtype={"scan_id": str}, float_precision="round_trip")
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


def save_flow(
    run_dir: str | Path,
    density: DensityFlow,
    flow_config: dict[str, Any],
    ckpts: Sequence[str | Path],
    n_central_slices: int | None,
    slice_size: int,
    data: dict[str, Any],
) -> Path:
    """Write ``<run_dir>/flow.pt`` atomically: tensors, numbers and strings only (loadable with
    ``weights_only=True``); ``flow_config`` and ``data`` (the run's ``data`` config) as JSON."""
    bundle = {
        "state_dict": density.state_dict(),
        "flow_config": json.dumps(flow_config),
        "encoder_checkpoint": str(ckpts[0]),
        "encoder_checkpoints": [str(c) for c in ckpts],
        "n_central_slices": None if n_central_slices is None else int(n_central_slices),
        "slice_size": int(slice_size),
        "data": json.dumps(data, default=str),
    }
    path = Path(run_dir) / FLOW_FILE
    with atomic_path(path) as tmp:
        torch.save(bundle, tmp)
    return path


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


def load_density_model(run: str | Path, sites: bool = False) -> DensityModel:
    """A ``flow_density`` run, loaded for scoring: flow, encoder(s), training codes, the
    preprocessing its encoder was trained with, and the digest of its files.

    Args:
        run: the run folder.
        sites: also re-discover the training volumes' sites (for per-site thresholds).

    Raises:
        ConfigError: the folder has no ``flow.pt``, or an encoder checkpoint it names is gone.
        BadFileError: a file is damaged or not what it should be (:func:`load_flow`).
    """
    run = Path(run)
    if not (run / FLOW_FILE).is_file():
        raise ConfigError(f"{run}: no {FLOW_FILE} (not a flow_density run)")
    density, bundle = load_flow(run)
    ckpts = bundle_checkpoints(bundle)  # one encoder, or an ensemble's members
    for encoder_ckpt in ckpts:
        if not encoder_ckpt.is_file():
            raise ConfigError(f"{encoder_ckpt}: encoder checkpoint of {run} not found")
    encoder = load_encoder(ckpts)
    data = bundle.get("data") or {}
    ids, codes, logp = read_codes(run / CODES_FILE)
    return DensityModel(
        encoder=encoder,
        density=density,
        n_central_slices=bundle["n_central_slices"],
        slice_size=int(bundle["slice_size"]),
        train_ids=ids,
        train_codes=codes,
        train_logp=logp,
        preprocess=PreprocessConfig.from_data_cfg(OmegaConf.create(data)) if data else None,
        digest=file_digest(run / FLOW_FILE, *ckpts),
        train_sites=training_sites(data) if sites else None,
    )


def training_sites(data: dict[str, Any]) -> dict[str, str]:
    """``scan_id -> site`` of a run's training volumes, re-discovered from its ``data`` config
    (the bundle's); ``{}`` (one warning) when that data is gone."""
    from qcflow.data.discovery import discover_scans, resolve_data_root

    try:
        scans = discover_scans(resolve_data_root(OmegaConf.create(data)))
    except Exception as exc:  # training data moved: fall back to global thresholds
        log.warning("per-site thresholds unavailable (%s); using global ones", exc)
        return {}
    return {s.scan_id: s.site for s in scans if s.site}
