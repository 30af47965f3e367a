"""Model-based scorers for :func:`qcflow.qc.scoring.score_scans`.

* :class:`DensityScorer` (method A): artifact code ``m``, ``log p_M(m)``, its percentile among
  the training volumes and the pass/review/fail decision;
* :class:`UncertaintyScorer` (method B): the student's mean artifact variance per kind, its task
  variance and the GM volume with its entropy error bar; optionally the per-scan NIfTI maps.

Each scorer has ``columns``, ``identity`` (part of the resume key), ``preprocess`` (the
preprocessing its network was trained with) and ``to(device)``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from qcflow.data.preprocess import PreprocessConfig, file_digest
from qcflow.errors import BadFileError, ConfigError
from qcflow.utils.io import open_regular

__all__ = ["DensityScorer", "UncertaintyScorer", "stage_data_config"]

log = logging.getLogger(__name__)


class DensityScorer:
    """Method A: artifact code ``m``, ``log p_M(m)``, its training percentile and a decision.

    ``qc_decision`` is ``fail`` below the ``fail_tau`` density percentile of the unlabelled
    training volumes, ``review`` between ``fail_tau`` and ``review_tau``, else ``pass``.

    Args:
        flow_run: a ``flow_density`` run folder (``flow.pt`` + ``codes_train.tsv``); its bundle
            names the encoder checkpoint and the slice settings used in training.
        review_tau, fail_tau: fractions of the training distribution (0.05, 0.03).
        per_site: thresholds and percentiles within the scan's site, from the training volumes
            of that site (``site`` column of ``participants.tsv``); a site with fewer than
            ``min_site_volumes`` training volumes, or unknown in training, uses the global
            distribution (column ``threshold_scope`` says which).
    """

    def __init__(
        self,
        flow_run: str | Path,
        review_tau: float = 0.05,
        fail_tau: float = 0.03,
        per_site: bool = False,
        min_site_volumes: int = 10,
    ):
        from qcflow.tasks.flow_density import (
            FLOW_FILE,
            bundle_checkpoints,
            load_encoder,
            load_flow,
            read_codes,
        )

        run = Path(flow_run)
        if not (run / FLOW_FILE).is_file():
            raise ConfigError(f"{run}: no {FLOW_FILE} (not a flow_density run)")
        if not 0 < fail_tau <= review_tau < 1:
            raise ConfigError(
                f"need 0 < score.fail_tau <= score.review_tau < 1, got {fail_tau}, {review_tau}"
            )
        self.density, bundle = load_flow(run)
        ckpts = bundle_checkpoints(bundle)  # one encoder, or an ensemble's members
        for encoder_ckpt in ckpts:
            if not encoder_ckpt.is_file():
                raise ConfigError(f"{encoder_ckpt}: encoder checkpoint of {run} not found")
        self.encoder = load_encoder(ckpts)
        self.n_central = bundle["n_central_slices"]
        self.size = int(bundle["slice_size"])
        self.data = bundle.get("data") or {}
        #: the preprocessing the encoder was trained with (None: the caller's)
        self.preprocess = (
            PreprocessConfig.from_data_cfg(OmegaConf.create(self.data)) if self.data else None
        )
        train_ids, self.train_codes, train_logp = read_codes(run / "codes_train.tsv")
        self.train_logp = np.sort(train_logp)
        self.review_thr = float(np.quantile(self.train_logp, review_tau))
        self.fail_thr = float(np.quantile(self.train_logp, fail_tau))
        d = int(self.density.features)
        self.columns = (*(f"m_{j + 1}" for j in range(d)), "log_density")
        self.columns += ("density_percentile", "qc_decision")
        # SHA-1 of the bundle's and the encoders' bytes, read in chunks from regular files
        digest = hashlib.sha1()
        for file in (run / FLOW_FILE, *ckpts):
            with open_regular(file) as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        self.identity = f"density-{digest.hexdigest()[:12]}-{review_tau}-{fail_tau}"
        self.thresholds = {"review_tau": review_tau, "fail_tau": fail_tau}
        self.thresholds |= {"review_log_density": self.review_thr}
        self.thresholds |= {"fail_log_density": self.fail_thr}
        self.per_site = per_site
        self.site_logp: dict[str, np.ndarray] = {}
        self.site_thr: dict[str, tuple[float, float]] = {}  # site -> (review, fail)
        if per_site:
            self.columns += ("threshold_scope",)
            self.identity += f"-site{int(min_site_volumes)}"
            sites = self._training_sites()
            logp = dict(zip(train_ids, train_logp, strict=True))
            for site in sorted(set(sites.values())):
                vals = [logp[sid] for sid, st in sites.items() if st == site and sid in logp]
                if len(vals) >= int(min_site_volumes):
                    self.site_logp[site] = np.sort(np.asarray(vals, dtype=np.float64))
            for site, vals in self.site_logp.items():
                review = float(np.quantile(vals, review_tau))
                fail = float(np.quantile(vals, fail_tau))
                self.site_thr[site] = (review, fail)
                self.thresholds[f"review_log_density[{site}]"] = review
                self.thresholds[f"fail_log_density[{site}]"] = fail

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def to(self, device: torch.device | str) -> DensityScorer:
        """Move the encoder and the flow (scoring runs on the trainer's device)."""
        self.encoder.to(device)
        self.density.to(device)
        return self

    def _training_sites(self) -> dict[str, str]:
        """``scan_id -> site`` of the training volumes (re-discovered from the model's data)."""
        from qcflow.data.discovery import discover_scans, resolve_data_root

        try:
            scans = discover_scans(resolve_data_root(OmegaConf.create(self.data)))
        except Exception as exc:  # training data moved: fall back to global thresholds
            log.warning("per-site thresholds unavailable (%s); using global ones", exc)
            return {}
        return {s.scan_id: s.site for s in scans if s.site}

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        from qcflow.data.contrastive import axial_stack
        from qcflow.models.encoder import volume_code

        slices = axial_stack(item["image"], self.n_central, self.size)
        m = volume_code(self.encoder, slices)
        logp = float(self.density.log_prob(m[None].float())[0].cpu())
        site = item["scan"].site if item.get("scan") is not None else None
        ref = self.site_logp.get(site) if self.per_site and site else None
        if ref is None:
            ref, review_thr, fail_thr = self.train_logp, self.review_thr, self.fail_thr
        else:
            review_thr, fail_thr = self.site_thr[site]
        pct = 100.0 * float(np.searchsorted(ref, logp, side="right")) / len(ref)
        decision = "fail" if logp < fail_thr else "review" if logp < review_thr else "pass"
        row = {f"m_{j + 1}": float(v) for j, v in enumerate(m.cpu().tolist())}
        row.update(log_density=logp, density_percentile=pct, qc_decision=decision)
        if self.per_site:
            row["threshold_scope"] = f"site:{site}" if ref is not self.train_logp else "global"
        return row

    def plot(self, table: pd.DataFrame, path: Path) -> Path | None:
        """Density contours of p_M(m) with the training codes and every scored scan on top."""
        from qcflow.qc.plots import density_contours

        cols = [f"m_{j + 1}" for j in range(int(self.density.features))]
        ok = table[table["status"] == "ok"]
        if len(cols) != 2 or ok.empty:
            return None  # contours are drawn for d = 2 only

        def log_prob(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
                return self.density.log_prob(x).cpu().numpy()

        return density_contours(
            log_prob,
            self.train_codes,
            ok[cols].to_numpy(dtype=np.float64),
            list(ok["qc_decision"]),
            path,
            thresholds={"review": self.review_thr, "fail": self.fail_thr},
        )


def stage_data_config(ckpt: Path) -> dict[str, Any] | None:
    """The ``data`` config of the run that wrote ``ckpt`` (``<run>/checkpoints/x.ckpt``), read
    from Hydra's ``<run>/.hydra/config.yaml``; ``None`` when the run folder has none."""
    cfg_file = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        data = OmegaConf.load(cfg_file).get("data")
        # interpolations to other sections (paths, seed) are not needed for preprocessing
        keys = ("spacing", "fov_mm", "shape", "percentiles", "patch_size")
        return {k: OmegaConf.to_container(data, resolve=False).get(k) for k in keys}
    except Exception as exc:
        log.warning("%s: unreadable run config (%s)", cfg_file, exc)
        return None


class UncertaintyScorer:
    """Method B: the student network's artifact attribution for one scan.

    Columns: ``artifact_variance_total`` (mean over the image of ``sum_i sigma_i^2``, the
    task term excluded: the measure of the uncertainty study), ``artifact_variance_<kind>``
    (mean ``sigma_i^2``), ``task_variance`` (mean ``sigma_t^2``), ``gm_volume_ml`` and
    ``gm_volume_sd_ml`` (entropy error bar summed over the head mask).

    Args:
        checkpoint: an ``uncertainty_student`` (or teacher) checkpoint.
        roi_size: sliding-window size (default: the training patch size of its run).
        overlap, sw_batch_size: sliding-window settings.
        maps_dir: when set, write the per-scan NIfTI maps there
            (:func:`qcflow.qc.derivatives.write_maps`).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        roi_size: list[int] | None = None,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        maps_dir: str | Path | None = None,
    ) -> None:
        from qcflow.utils.stages import load_stage

        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError(f"{path}: uncertainty checkpoint not found")
        try:
            module = load_stage(path)
        except BadFileError:  # one line naming the file already
            raise
        except Exception as exc:
            raise ConfigError(f"{path}: not a qcflow uncertainty checkpoint ({exc})") from exc
        if module.role == "task":
            raise ConfigError(
                f"{path}: a task network has no artifact channels; give an uncertainty_student "
                "checkpoint (score.student_ckpt)"
            )
        self.net = module.net
        self.sources = list(module.sources)
        self.kinds = [s for s in self.sources if s != "task"]
        data = stage_data_config(path) or {}
        self.preprocess = PreprocessConfig.from_data_cfg(OmegaConf.create(data)) if data else None
        if roi_size is None:
            roi_size = list(data.get("patch_size") or [64, 64, 64])
        self.roi_size = [int(r) for r in roi_size]
        self.overlap, self.sw_batch_size = float(overlap), int(sw_batch_size)
        self.maps_dir = Path(maps_dir) if maps_dir is not None else None
        self.columns = (
            "artifact_variance_total",
            *(f"artifact_variance_{k}" for k in self.kinds),
            "task_variance",
            "gm_volume_ml",
            "gm_volume_sd_ml",
        )
        digest = file_digest(path)[:12]
        self.identity = f"uncertainty-{digest}-{self.roi_size}-{self.overlap}"

    def to(self, device: torch.device | str) -> UncertaintyScorer:
        self.net.to(device)
        return self

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        from qcflow.qc.iqm import head_mask
        from qcflow.qc.segmentation import predict_volume, summarize_prediction

        image = item["image"]
        pred = predict_volume(
            self.net.predict,
            image,
            self.sources,
            self.roi_size,
            overlap=self.overlap,
            sw_batch_size=self.sw_batch_size,
        )
        pred = {k: v.cpu() for k, v in pred.items()}
        affine = np.asarray(item["affine"], dtype=np.float64)
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
        mask = head_mask(image[0].cpu())
        summary = summarize_prediction(pred, self.sources, voxel_ml, volume_mask=mask)
        row = {
            "artifact_variance_total": summary["mean_var_artifact"],
            **{f"artifact_variance_{k}": summary[f"mean_var_{k}"] for k in self.kinds},
            "task_variance": summary["mean_var_task"],
            "gm_volume_ml": summary["gm_volume_ml"],
            "gm_volume_sd_ml": summary["gm_volume_std_ml"],
        }
        if self.maps_dir is not None and item.get("scan") is not None:
            from qcflow.qc.derivatives import write_maps

            write_maps(self.maps_dir, item["scan"], pred, self.sources, affine, row)
        return row
