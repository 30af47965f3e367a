"""LightningModule of the contrastive artifact encoder (Zuo et al. 2023, method A).

Per batch of B items (see :class:`qcflow.data.contrastive.ContrastiveSliceDataset`) the
encoder embeds the B queries, B positives and B·K corrupted copies. For query b:

* positive: its own positive (same volume, coronal/sagittal slice);
* negatives: every slice of *other volumes* in the (all-gathered, under DDP) batch -- their
  queries, positives and corrupted copies -- plus b's own K corrupted copies;

and the loss is :func:`qcflow.models.encoder.contrastive_loss` (mean over negatives, no
temperature). Extension (``negatives='corrupted'``, off by default): of the other volumes,
only their corrupted copies are negatives, so nothing pushes two uncorrupted volumes apart and
the codes need not encode volume identity (anatomy, site).

Validation logs ``val/loss`` and saves a scatter of the codes coloured by the corruption each
slice got (``<run>/figures/embedding_epochNNN.png``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from qcflow.models.encoder import ArtifactEncoder, contrastive_loss

__all__ = ["ContrastiveEncoder", "build_pool"]

log = logging.getLogger(__name__)

#: retired extensions (measured no gain: README of experiments/zuo2023_iqc, "Switches") with
#: the paper's value: a checkpoint that still carries one at that value loads as before
RETIRED_LOSS = {"temperature": None, "normalize": False}
RETIRED_ENCODER = {"normalize": False, "fourier": False}


def _current_encoder_kwargs(encoder: dict[str, Any] | None) -> dict[str, Any]:
    """The network's keyword arguments without retired ones left at the paper's value (older
    checkpoints save ``fourier``/``normalize``); a retired extension switched on is an error."""
    kwargs = dict(encoder or {})
    for key, paper in RETIRED_ENCODER.items():
        if key in kwargs and kwargs.pop(key) != paper:
            raise ValueError(
                f"encoder.{key} was a retired extension (measured no gain) and is no longer "
                "supported; this checkpoint or config sets it: retrain without it"
            )
    return kwargs


def build_pool(
    query: Tensor, positive: Tensor, corrupted: Tensor, index: Tensor, negatives: str = "all"
) -> tuple[Tensor, Tensor, Tensor]:
    """Negative pool and mask for a batch of codes.

    Args:
        query: ``(B, d)`` query codes.
        positive: ``(B, d)`` positive codes.
        corrupted: ``(B, K, d)`` codes of the corrupted query copies.
        index: ``(B,)`` volume index of each item (unique per volume across ranks).
        negatives: ``'all'`` (paper): every entry of other volumes; ``'corrupted'``: only
            the corrupted copies of other volumes (their queries and positives are left out).

    Returns:
        ``pool`` ``(M, d)`` with ``M = B (2 + K)`` (queries, positives, corrupted), ``owner``
        ``(M,)`` the volume of each pool entry, and ``mask`` ``(B, M)``: True for entries of
        other volumes (``negatives``) and for the query's own corrupted copies.
    """
    if negatives not in ("all", "corrupted"):
        raise ValueError(f"negatives must be 'all' or 'corrupted', got {negatives!r}")
    b, k = corrupted.shape[:2]
    pool = torch.cat([query, positive, corrupted.reshape(b * k, -1)])
    owner = torch.cat([index, index, index.repeat_interleave(k)])
    item = torch.arange(b, device=index.device)
    source = torch.cat([item, item, item.repeat_interleave(k)])  # which item made the entry
    is_corrupt = torch.zeros(len(pool), dtype=torch.bool, device=index.device)
    is_corrupt[2 * b :] = True
    other_volume = owner[None, :] != index[:, None]
    if negatives == "corrupted":
        other_volume = other_volume & is_corrupt[None, :]
    own_corrupted = is_corrupt[None, :] & (source[None, :] == item[:, None])
    return pool, owner, other_volume | own_corrupted


class ContrastiveEncoder(pl.LightningModule):
    """Contrastive training of :class:`~qcflow.models.encoder.ArtifactEncoder`.

    Args:
        encoder: the network's keyword arguments (``latent_dim``, ``init_features``, ...).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        gather: gather negatives across ranks under DDP (``self.all_gather``).
        negatives: extension, ``'all'`` (paper) or ``'corrupted'`` (see :func:`build_pool`).
        figure_dir: where validation scatter plots go (``None``: not saved).
    """

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gather: bool = True,
        negatives: str = "all",
        figure_dir: str | None = None,
    ) -> None:
        if negatives not in ("all", "corrupted"):
            raise ValueError(f"negatives must be 'all' or 'corrupted', got {negatives!r}")
        super().__init__()
        self.save_hyperparameters()
        self.encoder = ArtifactEncoder(**_current_encoder_kwargs(encoder))
        self._val_codes: list[Tensor] = []
        self._val_kinds: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 1, S, S)`` -> ``(B, d)``."""
        return self.encoder(x)

    def _gather(self, x: Tensor) -> Tensor:
        trainer = self._trainer  # None outside a Trainer (unit tests, embedding)
        if not self.hparams.gather or trainer is None or trainer.world_size <= 1:
            return x
        g = self.all_gather(x, sync_grads=True)  # (W, B, ...)
        return g.reshape(-1, *x.shape[1:])

    def _codes(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        q, p, c = batch["query"], batch["positive"], batch["corrupted"]  # c: (B, K, 1, S, S)
        b, k = c.shape[:2]
        m = self.encoder(torch.cat([q, p, c.reshape(b * k, *c.shape[2:])]))
        return m[:b], m[b : 2 * b], m[2 * b :].reshape(b, k, -1)

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        mq, mp, mc = self._codes(batch)
        index = torch.as_tensor(batch["index"], device=mq.device)
        gq, gp, gc, gi = (self._gather(t) for t in (mq, mp, mc, index))
        pool, _, mask = build_pool(gq, gp, gc, gi, self.hparams.get("negatives", "all"))
        # rows of this rank's items within the gathered batch
        offset = self.global_rank * len(mq) if len(gq) > len(mq) else 0
        rows = torch.arange(offset, offset + len(mq), device=mq.device)
        return contrastive_loss(mq, mp, pool, mask[rows]), mq, mc

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["query"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, mq, mc = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["query"]), sync_dist=True)
        kinds = batch["corrupt_kind"]  # (B, K)
        self._val_codes.append(torch.cat([mq, mc.reshape(-1, mq.shape[1])]).detach().cpu())
        self._val_kinds.append(
            torch.cat([torch.zeros(len(mq), dtype=torch.long), kinds.reshape(-1).cpu()])
        )
        return loss

    def on_validation_epoch_end(self) -> None:
        codes, kinds = self._val_codes, self._val_kinds
        self._val_codes, self._val_kinds = [], []
        if not codes or self.hparams.figure_dir is None or self.global_rank != 0:
            return
        if self._trainer is not None and self._trainer.sanity_checking:
            return
        from qcflow.qc.plots import embedding_scatter

        out = Path(self.hparams.figure_dir) / f"embedding_epoch{self.current_epoch:03d}.png"
        embedding_scatter(torch.cat(codes).numpy(), torch.cat(kinds).numpy(), out)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with a retired loss extension (Lightning drops unknown
        hyperparameters silently, so ``temperature``/``normalize`` would otherwise load as the
        paper's loss with weights trained for another)."""
        hparams = checkpoint.get("hyper_parameters") or {}
        for key, paper in RETIRED_LOSS.items():
            if key in hparams and hparams[key] != paper:
                raise ValueError(
                    f"checkpoint trained with {key}={hparams[key]!r}, a retired extension "
                    "(measured no gain): retrain the encoder without it"
                )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
