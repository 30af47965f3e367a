"""Exact resumption: the random state that Lightning's ``trainer.fit(ckpt_path=...)`` leaves out.

Lightning restores the weights, the optimizer, the loops' progress and every callback's
``state_dict`` from a checkpoint, but not the global random generators nor the generator of the
training DataLoader. :class:`ResumeState` puts them into every checkpoint the trainer writes
(under ``checkpoint["callbacks"]``) and puts them back when a fit resumes:

* Python's ``random``, NumPy's global ``RandomState``, torch's CPU generator (and the CUDA
  generators when CUDA is in use) -- what the datasets, TorchIO's queue, the k-space sampler
  (``seed=None``) and dropout draw from;
* the generator of each training DataLoader (its shuffle order and its workers' base seed);
* the generator of every seeded k-space sampler (``augment.seed``) the task hands over.

Everything is stored as tensors, ints, strings and lists, so checkpoints stay loadable with
``torch.load(..., weights_only=True)``.

When: the saved state is the one at the moment the checkpoint is written. The globals are set
back in ``on_train_start`` (after Lightning's sanity check, which runs under ``isolate_rng``,
and before the first training batch), and the training DataLoader's iterator -- created by
Lightning before ``on_train_start`` from a freshly seeded generator -- is recreated from the
restored generator, as the uninterrupted run creates it at the start of every epoch. So a run
resumed from an **end-of-epoch** checkpoint on one CPU thread with ``data.num_workers=0``
continues bit for bit like the uninterrupted run (tested). Not covered, so not bit-identical
(but still a correct continuation): checkpoints written in the middle of an epoch
(``every_n_train_steps``; Lightning restarts the epoch's data from a fresh iterator and warns),
DataLoader worker processes (their own RNG states live in the workers), the state a dataset
keeps between epochs (TorchIO's patch queue of method B and the encoder's bank of 3-D negatives,
``contrastive.negatives_3d``, are rebuilt empty), and per-rank differences under DDP (every rank
gets rank 0's state).

Step-limited training (``trainer.max_steps``) resumed from an end-of-epoch checkpoint: Lightning
2.6 treats it as "restarting" inside the finished epoch (one extra batch, shifted epochs);
:meth:`ResumeState.on_load_checkpoint` hides ``max_steps`` while the loops are restored so it
resumes at the next epoch like epoch-limited training (tested against an uninterrupted run).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["ResumeState", "collect_rng_states", "set_rng_states"]

log = logging.getLogger(__name__)


def collect_rng_states(include_cuda: bool = True) -> dict[str, Any]:
    """The global random states as ``weights_only``-loadable values (tensors, ints, lists)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [int(version), list(internal), gauss],
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if include_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(
        (str(kind), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "resume: %d CUDA generator states saved, %d devices now; CUDA draws differ",
                len(cuda),
                torch.cuda.device_count(),
            )


def _train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training DataLoaders Lightning iterates (after its own processing)."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    if combined is not None:
        return list(combined.flattened)
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return [loaders]


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct generators a DataLoader draws from (its own, its sampler's)."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _mid_epoch(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a Lightning checkpoint was written inside an epoch (not at its end)."""
    try:
        epoch = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
        return not epoch["ready"] == epoch["started"] == epoch["processed"]
    except (KeyError, TypeError):
        return True  # unknown layout: leave Lightning's own logic alone


class ResumeState(pl.Callback):
    """Saves the random state in every checkpoint and restores it when a fit resumes.

    Args:
        samplers: returns the task's k-space samplers by name (``None`` entries allowed); the
            generator of a seeded one (``RandomArtifacts(seed=...)``) is saved and restored,
            and an entry with ``state_dict``/``load_state_dict`` (the encoder's
            :class:`~qcflow.data.negatives.NegativeBank`) is saved and restored through them. A
            callable, because a schedule may swap the samplers during training.
    """

    def __init__(self, samplers: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.samplers = samplers
        self._pending: dict[str, Any] | None = None
        #: whether the last fit restored a saved random state (for logs and tests)
        self.restored = False
        self._max_steps: int | None = None

    def _sampler_map(self) -> dict[str, Any]:
        if self.samplers is None:
            return {}
        return {k: v for k, v in dict(self.samplers()).items() if v is not None}

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        loaders = []
        if trainer is not None:
            for loader in _train_loaders(trainer):
                loaders.append([g.get_state() for g in _loader_generators(loader)])
        samplers, stateful = {}, {}
        for name, sampler in self._sampler_map().items():
            if callable(getattr(sampler, "state_dict", None)):  # e.g. a NegativeBank
                stateful[name] = sampler.state_dict()
                continue
            gen = getattr(sampler, "_gen", None)
            if (
                isinstance(gen, torch.Generator)
                and getattr(sampler, "_gen_pid", None) == os.getpid()
            ):
                samplers[name] = gen.get_state()
        return {
            "rng": collect_rng_states(),
            "loaders": loaders,
            "samplers": samplers,
            "stateful": stateful,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning treats every resume of step-limited training (max_steps set) as "restarting"
        # (FitLoop.restarting), and for an end-of-epoch checkpoint that replays the finished
        # epoch's last batch position: one extra batch, the epoch numbering shifted by one batch
        # (measured with 2.6.6). Without max_steps the same checkpoint resumes at the start of
        # the next epoch. So while the loops are restored (after this hook), hide max_steps when
        # the checkpoint ends an epoch; on_train_start puts it back before the first batch.
        self._max_steps = None
        if trainer.max_steps == -1 or _mid_epoch(checkpoint):
            return
        self._max_steps = trainer.max_steps
        trainer.fit_loop.epoch_loop.max_steps = -1

    # -- hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument

    def _restore_max_steps(self, trainer: pl.Trainer) -> None:
        if self._max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps = self._max_steps
            self._max_steps = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_max_steps(trainer)  # in case the fit ended before on_train_start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_max_steps(trainer)
        self.restored = False
        state, self._pending = self._pending, None
        if state is None:
            if trainer.ckpt_path:
                log.warning(
                    "%s holds no random state (written by an older qcflow): training continues "
                    "from its weights and optimizer, but the data stream differs from an "
                    "uninterrupted run",
                    trainer.ckpt_path,
                )
            return
        loaders = _train_loaders(trainer)
        saved = state.get("loaders") or []
        if len(saved) != len(loaders):
            log.warning("resume: %d training loaders saved, %d now; their order is not restored",
                        len(saved), len(loaders))  # fmt: skip
            saved = []
        for loader, states in zip(loaders, saved, strict=False):
            gens = _loader_generators(loader)
            for g, s in zip(gens, states, strict=False):
                g.set_state(s)
        for name, sampler in self._sampler_map().items():
            if name in state.get("stateful", {}):
                sampler.load_state_dict(state["stateful"][name])
                continue
            s = state.get("samplers", {}).get(name)
            if s is not None:
                gen = torch.Generator()
                gen.set_state(s)
                sampler._gen, sampler._gen_pid = gen, os.getpid()
        set_rng_states(state["rng"])
        # Lightning created this epoch's iterator in FitLoop.setup_data, from the freshly seeded
        # generator; the uninterrupted run creates it at the start of the epoch, from the
        # generator as it was saved. Recreate it (persistent workers keep theirs: only the
        # shuffle order, drawn when the next epoch starts, follows the restored generator).
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        persistent = any(
            getattr(dl, "persistent_workers", False) and getattr(dl, "num_workers", 0) > 0
            for dl in loaders
        )
        if saved and fetcher is not None and not persistent:
            iter(fetcher)
        self.restored = True
        log.info("resume: random state restored from %s", trainer.ckpt_path)
