"""Test instrumentation: a callback that records what each rank of a distributed run did."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["DDPProbe"]


class DDPProbe(pl.Callback):
    """Record what each rank trained on and what it ended with, to check a distributed run.

    Writes ``<folder>/rank<R>.json`` per rank at the end of training: ``world_size``,
    ``global_step``, one fingerprint per training batch (``scan_id@location`` of every patch or
    item when the batch has them, else a hash of the ``image``/``query`` tensor), the SHA-256 of
    all parameters (equal on every rank after a correct DDP run), the learning rates and, when
    the module has one, ``eps``. Add it from the command line, with the repository root on
    ``PYTHONPATH``: ``+callbacks.probe._target_=tests.ddp_probe.DDPProbe
    +callbacks.probe.folder=DIR``.

    Args:
        folder: where the JSON files go.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.batches: list[list[str]] = []

    @staticmethod
    def fingerprint(batch: Any) -> list[str]:
        """One string per item of a batch dict."""
        if isinstance(batch, Mapping) and "scan_id" in batch:
            loc = batch.get("location")
            ids = [str(s) for s in batch["scan_id"]]
            if loc is None:
                loc = batch.get("index", [None] * len(ids))
            return [f"{sid}@{torch.as_tensor(x).tolist()}" for sid, x in zip(ids, loc, strict=True)]
        key = next(
            (k for k in ("image", "query") if isinstance(batch, Mapping) and k in batch), None
        )
        tensors = batch[key] if key else batch
        return [hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest() for t in tensors]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(self.fingerprint(batch))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "params_sha256": digest.hexdigest(),
            "lr": [g["lr"] for opt in trainer.optimizers for g in opt.param_groups],
            "eps": float(pl_module.eps) if hasattr(pl_module, "eps") else None,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
