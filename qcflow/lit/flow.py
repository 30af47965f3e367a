"""Fitting method A's density with Lightning: :class:`FlowFit` and :func:`fit_density`.

The density (:class:`~qcflow.models.flow.DensityFlow`, a zuko RealNVP or an equal mixture of
them) is fitted by maximum likelihood, minimising the mean negative log-density of the
standardised training codes x̃ = (m - μ) / s,

    L(θ) = -(1/B) Σ_b log p_θ(x̃_b),

with Adam (Zuo et al. 2023 fit a RealNVP to the codes of the unlabelled training volumes). With a
held-out fraction the parameters of the epoch with the lowest held-out NLL are kept (early
stopping by the best epoch: a flow on ~150 codes overfits into a jagged density otherwise):
Lightning's ``ModelCheckpoint`` (``monitor="val/nll"``) keeps that epoch's state and it is
restored after the fit. A mixture's flows are
the children of one :class:`FlowFit` and are fitted one after the other (one ``trainer.fit``
each), each on its own hold-out split; their losses reach every configured logger as
``flow/train_nll`` and ``flow/val_nll`` (``flow<k>/...`` for member k of a mixture).

The data order is the one of a plain loop: the hold-out split is one ``randperm`` of the codes
and every epoch visits the fitting codes in a fresh ``randperm``, both drawn from ``generator``
(:class:`_EpochPermutation`), so a fit is reproducible from its seed alone and equals, parameter
for parameter, the hand-written Adam loop it replaces (``tests/test_flow_density.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from qcflow.models.flow import DensityFlow

__all__ = ["FlowFit", "fit_density"]


class _EpochPermutation(Sampler[int]):
    """Indices ``0..n-1`` in a fresh ``torch.randperm(n, generator)`` order every epoch."""

    def __init__(self, n: int, generator: torch.Generator | None) -> None:
        self.n, self.generator = int(n), generator

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())

    def __len__(self) -> int:
        return self.n


def _rows(batch: list[tuple[Tensor]]) -> Tensor:
    """Collate: the codes of a batch as one ``(B, d)`` tensor."""
    return torch.stack([row[0] for row in batch])


class FlowFit(pl.LightningModule):
    """Maximum-likelihood fit of the flows of a :class:`DensityFlow` (one member at a time).

    Args:
        density: the model; its flows are this module's children (``self.density``).
        lr, weight_decay: Adam settings.
    """

    def __init__(self, density: DensityFlow, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.density = density
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.member = 0  #: the mixture member being fitted
        self.history: list[float] = []  #: per-epoch mean fitting NLL of the member
        self.val_history: list[float] = []  #: per-epoch held-out NLL of the member
        self._epoch_sum, self._epoch_n = 0.0, 0

    @property
    def flow(self) -> Any:
        return self.density.flows[self.member]

    def _name(self, what: str) -> str:
        prefix = "flow" if len(self.density.flows) == 1 else f"flow{self.member}"
        return f"{prefix}/{what}"

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:  # x: (B, d) standardised
        loss = -self.flow().log_prob(x).mean()
        self._epoch_sum += float(loss.detach()) * len(x)
        self._epoch_n += len(x)
        self.log(self._name("train_nll"), loss, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def on_train_epoch_end(self) -> None:
        self.history.append(self._epoch_sum / max(self._epoch_n, 1))
        self._epoch_sum, self._epoch_n = 0.0, 0

    def validation_step(self, x: Tensor, batch_idx: int) -> None:  # the whole held-out set
        v = -self.flow().log_prob(x).mean()
        self.val_history.append(float(v))
        self.log(self._name("val_nll"), v, on_epoch=True, batch_size=len(x))
        self.log("val/nll", v, on_epoch=True, batch_size=len(x), logger=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.flow.parameters(), lr=self.lr, weight_decay=self.weight_decay)


#: builds the Trainer of one member's fit: ``(max_epochs, callbacks, root_dir) -> Trainer``
TrainerFactory = Callable[[int, list[pl.Callback], Path], pl.Trainer]


def _default_trainer(epochs: int, callbacks: list[pl.Callback], root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


def fit_density(
    density: DensityFlow,
    m: Tensor,
    epochs: int = 300,
    lr: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    val_fraction: float = 0.0,
    generator: torch.Generator | None = None,
    trainer: TrainerFactory | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Standardise ``m`` and fit every flow of ``density`` by maximum likelihood (Lightning).

    Args:
        density: the model (its standardisation is set from all of ``m``).
        m: ``(N, d)`` training codes.
        epochs: passes over the fitting codes (``max_epochs`` of each member's fit).
        lr, weight_decay: Adam settings.
        batch_size: codes per step (the last batch of an epoch may be smaller).
        val_fraction: held-out fraction (0: none, the last epoch is kept); with fewer than 10
            codes nothing is held out.
        generator: RNG of the hold-out split and the epoch orders.
        trainer: builds each member's Trainer (the ``trainer`` group's loggers and settings
            in :mod:`qcflow.tasks.flow_density`); default a quiet single-CPU Trainer.
        checkpoint_dir: where ``ModelCheckpoint`` keeps the best epoch (default a temporary
            folder, removed after the fit).

    Returns:
        ``{"nll": final mean -log p_M over all of m, "val_nll", "best_epoch", "steps",
        "history": [per-epoch fitting nll], "val_history": [...]}`` -- with a mixture
        ``val_nll`` is the flows' mean, ``best_epoch``/``history``/``val_history`` are the
        first flow's, and ``"flows"`` lists each flow's ``val_nll`` and ``best_epoch``.
    """
    m = m.detach().float()
    density.set_standardization(m)
    x = density.standardize(m).detach()
    module = FlowFit(density, lr=lr, weight_decay=weight_decay)
    make = trainer or _default_trainer
    with tempfile.TemporaryDirectory(prefix="qcflow-flow-") as tmp:
        root = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tmp)
        fits = [
            _fit_member(module, k, x, int(epochs), batch_size, val_fraction, generator, make,
                        root / f"flow{k}")
            for k in range(len(density.flows))
        ]  # fmt: skip
    density.eval()
    with torch.no_grad():
        nll = float(-density.log_prob(m).mean())
    first = fits[0]
    return {
        "nll": nll,
        "val_nll": sum(f["val_nll"] for f in fits) / len(fits),
        "best_epoch": first["best_epoch"],
        "steps": sum(f["steps"] for f in fits),
        "history": first["history"],
        "val_history": first["val_history"],
        "flows": [{"val_nll": f["val_nll"], "best_epoch": f["best_epoch"]} for f in fits],
    }


def _fit_member(
    module: FlowFit,
    k: int,
    x: Tensor,
    epochs: int,
    batch_size: int,
    val_fraction: float,
    generator: torch.Generator | None,
    make: TrainerFactory,
    root: Path,
) -> dict[str, Any]:
    """One ``trainer.fit`` of member ``k`` on its own hold-out split (see :func:`fit_density`)."""
    module.member, module.history, module.val_history = k, [], []
    n_val = int(round(val_fraction * len(x))) if len(x) >= 10 else 0
    order = torch.randperm(len(x), generator=generator)
    x_val, x_fit = x[order[:n_val]], x[order[n_val:]]
    train = DataLoader(
        TensorDataset(x_fit),
        batch_size=int(batch_size),
        sampler=_EpochPermutation(len(x_fit), generator),
        collate_fn=_rows,
    )
    callbacks: list[pl.Callback] = []
    best = None
    val: Sequence[Tensor] | DataLoader | None = None
    if n_val:
        best = pl.callbacks.ModelCheckpoint(
            dirpath=str(root), monitor="val/nll", mode="min", save_top_k=1, save_last=False,
            filename="best-{epoch:04d}", auto_insert_metric_name=False, save_weights_only=True,
        )  # fmt: skip
        callbacks.append(best)
        val = DataLoader(TensorDataset(x_val), batch_size=len(x_val), collate_fn=_rows)
    fitter = make(epochs, callbacks, root)
    fitter.fit(module, train_dataloaders=train, val_dataloaders=val)
    steps = int(fitter.global_step)
    best_epoch = epochs - 1 if not n_val else -1
    val_nll = float("nan")
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
        prefix = f"density.{_member_prefix(k)}"
        saved = state["state_dict"]
        module.flow.load_state_dict(
            {k[len(prefix) :]: t for k, t in saved.items() if k.startswith(prefix)}
        )
        val_nll = min(module.val_history)
        best_epoch = int(module.val_history.index(min(module.val_history)))
    module.flow.eval()
    return {
        "val_nll": val_nll,
        "best_epoch": best_epoch,
        "steps": steps,
        "history": list(module.history),
        "val_history": list(module.val_history),
    }


def _member_prefix(k: int) -> str:
    """State-dict prefix of member ``k`` inside :class:`DensityFlow` (``flow.`` / ``others.i.``)."""
    return "flow." if k == 0 else f"others.{k - 1}."
