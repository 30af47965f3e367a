"""Model-based scorers for :func:`qcflow.lit.scoring.score_scans`.

* :class:`DensityScorer` (method A): artifact code ``m``, ``log p_M(m)``, its percentile among
  the training volumes and the pass/review/fail decision;
* :class:`UncertaintyScorer` (method B): the student's mean artifact variance per kind, its task
  variance and the GM volume with its entropy error bar; optionally the per-scan NIfTI maps.

Both follow the :class:`~qcflow.qc.scoring.Scorer` protocol and take *loaded* models
(:class:`DensityModel`, :class:`StudentModel`): finding and loading trained runs is
:mod:`qcflow.runs`' job (``load_density_model``, ``load_student_model``). Pure torch / NumPy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from qcflow.data.preprocess import PreprocessConfig
from qcflow.errors import ConfigError
from qcflow.qc.detection import tau_thresholds
from qcflow.qc.scoring import Scorer

__all__ = ["DensityModel", "DensityScorer", "StudentModel", "UncertaintyScorer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DensityModel:
    """A trained method-A model: encoder, density and the training volumes' codes.

    Attributes:
        encoder: maps ``(n, 1, s, s)`` slices to ``(n, d)`` codes (eval mode).
        density: a :class:`~qcflow.models.flow.DensityFlow` (``log_prob`` of ``(N, d)``
            codes, ``features``).
        n_central_slices, slice_size: the slicing of its training.
        train_ids, train_codes, train_logp: the training volumes' ids, ``(N, d)`` codes and
            ``(N,)`` log-densities (the run's ``codes_train.tsv``): the reference distribution.
        preprocess: the preprocessing the encoder was trained with (``None``: unknown).
        digest: hash of the model files (part of the scorer's identity).
        train_sites: ``scan_id -> site`` of the training volumes (``None``: not looked up;
            per-site thresholds need it).
    """

    encoder: nn.Module
    density: nn.Module
    n_central_slices: int | None
    slice_size: int
    train_ids: list[str]
    train_codes: np.ndarray
    train_logp: np.ndarray
    preprocess: PreprocessConfig | None
    digest: str
    train_sites: Mapping[str, str] | None = None


class DensityScorer(Scorer):
    """Method A: artifact code ``m``, ``log p_M(m)``, its training percentile and a decision.

    ``qc_decision`` is ``fail`` below the ``fail_tau`` density percentile of the unlabelled
    training volumes, ``review`` between ``fail_tau`` and ``review_tau``, else ``pass``
    (thresholds: :func:`~qcflow.qc.detection.tau_thresholds` of the training log-densities,
    the same reference the percentile is read from).

    Args:
        model: the loaded ``flow_density`` run.
        review_tau, fail_tau: fractions of the training distribution (0.05, 0.03).
        per_site: thresholds and percentiles within the scan's site, from the training volumes
            of that site (``model.train_sites``); a site with fewer than ``min_site_volumes``
            training volumes, or unknown in training, uses the global distribution (column
            ``threshold_scope`` says which).

    Raises:
        ConfigError: the taus are not ``0 < fail_tau <= review_tau < 1``.
        ValueError: ``per_site`` with a model loaded without its training sites.
    """

    reference_view = True  # qc_decision comes from here: thumbnails show what it saw

    def __init__(
        self,
        model: DensityModel,
        review_tau: float = 0.05,
        fail_tau: float = 0.03,
        per_site: bool = False,
        min_site_volumes: int = 10,
    ) -> None:
        if not 0 < fail_tau <= review_tau < 1:
            raise ConfigError(
                f"need 0 < score.fail_tau <= score.review_tau < 1, got {fail_tau}, {review_tau}"
            )
        self.encoder, self.density = model.encoder, model.density
        self.n_central, self.size = model.n_central_slices, int(model.slice_size)
        self.preprocess = model.preprocess
        self.train_codes = model.train_codes
        self.train_logp = np.sort(model.train_logp)
        self.review_thr, self.fail_thr = tau_thresholds(self.train_logp, [review_tau, fail_tau])
        self.review_thr, self.fail_thr = float(self.review_thr), float(self.fail_thr)
        d = int(self.density.features)
        self.columns = (*(f"m_{j + 1}" for j in range(d)), "log_density")
        self.columns += ("density_percentile", "qc_decision")
        self.identity = f"density-{model.digest[:12]}-{review_tau}-{fail_tau}"
        self.thresholds = {"review_tau": review_tau, "fail_tau": fail_tau}
        self.thresholds |= {"review_log_density": self.review_thr}
        self.thresholds |= {"fail_log_density": self.fail_thr}
        self.per_site = per_site
        self.site_logp: dict[str, np.ndarray] = {}
        self.site_thr: dict[str, tuple[float, float]] = {}  # site -> (review, fail)
        if per_site:
            self.columns += ("threshold_scope",)
            self.identity += f"-site{int(min_site_volumes)}"
            if model.train_sites is None:
                raise ValueError("per_site needs the model's training sites (train_sites)")
            sites = dict(model.train_sites)
            logp = dict(zip(model.train_ids, model.train_logp, strict=True))
            for site in sorted(set(sites.values())):
                vals = [logp[sid] for sid, st in sites.items() if st == site and sid in logp]
                if len(vals) >= int(min_site_volumes):
                    self.site_logp[site] = np.sort(np.asarray(vals, dtype=np.float64))
            for site, vals in self.site_logp.items():
                review, fail = (float(t) for t in tau_thresholds(vals, [review_tau, fail_tau]))
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

    def finish(self, table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
        """``density_contours.png``: contours of p_M(m) with the training codes and every
        scored scan on top (for d = 2 only)."""
        made = self.plot(table, Path(out_dir) / "density_contours.png")
        return {"density_contours": made} if made is not None else {}

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


@dataclass(frozen=True)
class StudentModel:
    """A trained method-B network with artifact channels (a student or a teacher).

    Attributes:
        net: a two-head network; ``net.predict`` maps ``(n, 1, *roi)`` to
            ``(n, 2 + K, *roi)`` (logits, then log-variances).
        sources: names of the K log-variance channels (``task`` first).
        preprocess: the preprocessing it was trained with (``None``: unknown).
        patch_size: its training patch size (``None``: unknown).
        digest: hash of the checkpoint (part of the scorer's identity).
    """

    net: nn.Module
    sources: list[str]
    preprocess: PreprocessConfig | None
    patch_size: list[int] | None
    digest: str


class UncertaintyScorer(Scorer):
    """Method B: the student network's artifact attribution for one scan.

    Columns: ``artifact_variance_total`` (mean over the image of ``sum_i sigma_i^2``, the
    task term excluded: the measure of the uncertainty study), ``artifact_variance_<kind>``
    (mean ``sigma_i^2``), ``task_variance`` (mean ``sigma_t^2``), ``gm_volume_ml`` and
    ``gm_volume_sd_ml`` (entropy error bar summed over the head mask).

    Args:
        model: the loaded student.
        roi_size: sliding-window size (default: the model's training patch size, else 64³).
        overlap, sw_batch_size: sliding-window settings.
        maps_dir: when set, write the per-scan NIfTI maps there
            (:func:`qcflow.qc.derivatives.write_maps`).
    """

    def __init__(
        self,
        model: StudentModel,
        roi_size: Sequence[int] | None = None,
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        maps_dir: str | Path | None = None,
    ) -> None:
        self.net = model.net
        self.sources = list(model.sources)
        self.kinds = [s for s in self.sources if s != "task"]
        self.preprocess = model.preprocess
        if roi_size is None:
            roi_size = list(model.patch_size or [64, 64, 64])
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
        self.identity = f"uncertainty-{model.digest[:12]}-{self.roi_size}-{self.overlap}"

    def to(self, device: torch.device | str) -> UncertaintyScorer:
        self.net.to(device)
        return self

    def start(self, out_dir: Path) -> None:
        """The maps folder's ``dataset_description.json`` (a failed write: one warning)."""
        if self.maps_dir is None:
            return
        from qcflow.qc.derivatives import write_description

        try:
            write_description(self.maps_dir)
        except OSError as exc:
            reason = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
            log.warning("%s: cannot write (%s)", self.maps_dir / "dataset_description.json", reason)

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
