"""Task ``encoder_contrastive``: train the contrastive artifact encoder (method A, step 1).

Wiring only: the embedded/user data (bad scans skipped with their reason) ->
:class:`~qcflow.data.contrastive.ContrastiveDataModule` with the k-space sampler of
``cfg.augment`` for the corrupted negatives -> :class:`~qcflow.lit.contrastive.ContrastiveEncoder`
from ``cfg.model`` -> ``Trainer.fit``. The checkpoint lands in ``<run>/checkpoints/last.ckpt``,
where ``flow_density`` finds it. ``resume=true|auto|PATH`` continues a run from its checkpoint
(:func:`qcflow.runs.resume.resume_plan`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from qcflow.data.contrastive import ContrastiveDataModule
from qcflow.runs.resume import fit, prepare_resume, resume_results
from qcflow.tasks.common import (
    build_trainer,
    seed_all,
    set_threads,
    skipped_report,
    trainer_metrics,
)

__all__ = ["run", "curriculum_callbacks"]

log = logging.getLogger(__name__)


def curriculum_callbacks(ccfg: Any) -> list[Any]:
    """``[SeverityCurriculum(**contrastive.curriculum)]`` where an experiment sets one (the
    study's ``conf/experiment/zuo_study_curriculum.yaml``), else ``[]``."""
    cur = ccfg.get("curriculum") if ccfg else None
    if not cur:
        return []
    from omegaconf import OmegaConf

    from qcflow.lit.curriculum import SeverityCurriculum

    kwargs = OmegaConf.to_container(cur, resolve=True) if isinstance(cur, DictConfig) else cur
    return [SeverityCurriculum(**dict(kwargs))]


def _positive_nuisance(spec: Any) -> Any:
    """``contrastive.positive_nuisance``: ``None`` or ``RandomArtifacts`` keyword arguments."""
    if not spec:
        return None
    from omegaconf import OmegaConf

    from qcflow.errors import ConfigError
    from qcflow.kspace import RandomArtifacts

    kwargs = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
    try:
        return RandomArtifacts(**{"rate": 1.0, **dict(kwargs)})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"contrastive.positive_nuisance: {err}") from err


def _pair(value: Any, name: str) -> list[float] | None:
    """A ``[lo, hi]`` config range (``null``: off); anything else is a one-line error."""
    from qcflow.data.contrastive import log_range
    from qcflow.errors import ConfigError

    try:
        pair = log_range(value, name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return None if pair is None else list(pair)


def _samplers(dm: ContrastiveDataModule) -> dict[str, Any]:
    """The k-space samplers training draws from (saved with a checkpoint when seeded) and the
    3-D negatives' bank (its copies' seeds and use counts)."""
    return {
        "corrupt": dm.train_corrupt,
        "positive_nuisance": dm.positive_nuisance,
        "negative_bank": dm.train_bank,
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the encoder; returns final losses, sizes, timing and skipped scans."""
    t0 = time.perf_counter()
    resume = prepare_resume(cfg)  # first: may point paths.output_dir at the resumed run
    seed_all(cfg)
    set_threads(cfg)
    out = Path(cfg.paths.output_dir)
    sampler = instantiate(cfg.augment) if cfg.get("augment") else None
    ccfg = cfg.get("contrastive") or {}
    dm = ContrastiveDataModule(
        cfg.data,
        corrupt=sampler,
        queries_per_volume=int(ccfg.get("queries_per_volume", 4)),
        n_corrupt=int(ccfg.get("n_corrupt", 1)),
        val_queries_per_volume=int(ccfg.get("val_queries_per_volume", 2)),
        negatives_3d=bool(ccfg.get("negatives_3d", False)),
        bank_size=int(ccfg.get("bank_size", 4)),
        bank_reuse=int(ccfg.get("bank_reuse", 16)),
        positive_nuisance=_positive_nuisance(ccfg.get("positive_nuisance")),
        positive_gamma=_pair(ccfg.get("positive_gamma"), "contrastive.positive_gamma"),
        positive_zoom=_pair(ccfg.get("positive_zoom"), "contrastive.positive_zoom"),
    )
    dm.prepare()
    t_data = time.perf_counter() - t0
    model = instantiate(cfg.model, figure_dir=str(out / "figures"), _convert_="all")
    curriculum = curriculum_callbacks(ccfg)
    trainer = build_trainer(cfg, callbacks=curriculum, samplers=lambda: _samplers(dm))
    fit(trainer, model, dm, resume)
    results: dict[str, Any] = trainer_metrics(trainer)
    ckpt = out / "checkpoints" / "last.ckpt"
    results.update(
        {
            "n_train_volumes": len(dm.train_scans),
            "n_val_volumes": len(dm.val_scans),
            "skipped": skipped_report(dm),
            "data_seconds": round(t_data, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "torch_threads": torch.get_num_threads(),
            "checkpoint": str(ckpt) if ckpt.is_file() else None,
            **resume_results(resume),
        }
    )
    if curriculum:  # (epoch, level) at every change of the negatives' ranges
        results["curriculum_levels"] = [list(h) for h in curriculum[0].history]
    log.info("encoder trained in %.1f s (%s)", results["total_seconds"], results.get("val/loss"))
    return results
