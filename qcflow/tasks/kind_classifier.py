"""Train the patch-level artifact-kind classifier that starts a method-B student's context branch.

Self-supervised (no human labels): the simulation knows which kind it applied. A
:class:`~qcflow.models.unet.PatchContext` (the same small CNN as ``model.context``) learns the
classes ``none`` + ``classifier.kinds`` on random patches of the training volumes, each volume
corrupted once per kind by the ``augment.<kind>`` ranges (one kind per patch) and corrupted afresh
every ``classifier.redraw`` steps (new severities). The last ``classifier.holdout`` volumes are
held out for the patch accuracy. With ``classifier.eval_volumes > 0`` it also classifies whole
volumes of the evaluation split (``evaluate.split``; the evaluation's seeded samplers, clean + one
copy per kind): the softmax over the kinds (the split ``model.attribution`` uses, clean left
out) averaged over patch windows.

Outputs in the run folder: ``classifier.pt`` (``{"state_dict", "classes", "widths"}``, written
atomically; a student finds the latest one with ``uncertainty.context_init: latest``) and
``metrics.json`` (held-out patch accuracy, the volume-level confusion).

The loop is hand-written (no Lightning), so it keeps its own resumable state: every
``classifier.checkpoint_every`` steps (and after the last) ``checkpoints/last.ckpt`` gets the
network, the Adam state, the step, the global random state, the patch-drawing generator and the
k-space samplers' generators as they were when the volume bank was last corrupted (the bank is
rebuilt from them on resume instead of being stored). ``resume=true|auto|PATH`` continues from
it (:func:`qcflow.runs.resume.resume_plan`) and ends with the same classifier as an
uninterrupted run (tested); the file loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from qcflow.errors import ConfigError
from qcflow.models.unet import PatchContext
from qcflow.runs.folders import find_latest_run
from qcflow.runs.resume import prepare_resume, resume_results
from qcflow.tasks.common import required, seed_all
from qcflow.utils.io import atomic_path

__all__ = ["run", "volume_confusion", "classifier_path", "CLASSIFIER_FILE", "CHECKPOINT_KEYS"]

log = logging.getLogger(__name__)

#: the classifier's file in its run folder
CLASSIFIER_FILE = "classifier.pt"
#: what the loop's resumable checkpoint (``checkpoints/last.ckpt``) holds
CHECKPOINT_KEYS = ("step", "state_dict", "optimizer", "rng", "draw_rng", "bank_step", "bank_rng")


def classifier_path(cfg: DictConfig, value: str) -> Path:
    """``uncertainty.context_init``: a file, a run folder, or ``latest`` (the newest run of
    ``uncertainty.classifier_experiment``)."""
    if value == "latest":
        name = str(required(cfg.uncertainty, "classifier_experiment", "uncertainty"))
        return find_latest_run(cfg.paths.runs_dir, name, require=CLASSIFIER_FILE) / CLASSIFIER_FILE
    path = Path(value).expanduser()
    return path / CLASSIFIER_FILE if path.is_dir() else path


def _patch_starts(
    shape: tuple[int, ...], patch: int, name: str, margin: int = 0
) -> list[tuple[int, int]]:
    """Per axis, the half-open range of patch starts ``margin`` voxels (at most a quarter of
    the free space) away from the volume's faces; 0: anywhere, as the student's uniform patch
    sampler and the evaluation's sliding windows."""
    out = []
    for s in shape:
        if s < patch:
            raise ConfigError(
                f"{name}: volume {tuple(shape)} smaller than classifier.patch={patch}"
            )
        m = min(int(margin), (s - patch) // 4)
        out.append((m, s - patch - m + 1))
    return out


def _window_starts(lo: int, hi: int, stride: int) -> list[int]:
    """Starts ``lo, lo + stride, ...`` plus the last possible one (``hi - 1``): full coverage."""
    return sorted({*range(lo, hi, stride), hi - 1})


def volume_confusion(
    net: PatchContext,
    volumes: Any,
    samplers: dict[str, Any],
    kinds: list[str],
    n_volumes: int,
    patch: int,
    stride: int,
    margin: int = 0,
) -> dict[str, Any]:
    """Whole-volume kind decisions: rows ``none`` + kinds (true), columns kinds (decided).

    Each volume (clean, and one copy per kind from ``samplers``) is cut into ``patch``-sized
    windows at ``stride`` (``margin`` as in training; 0 covers the whole volume like the
    evaluation's sliding windows); the softmax over the kind logits (class ``none`` left out, as in
    ``model.attribution``) is averaged over the windows and its argmax is the decision.
    """
    net.eval()
    rows = ["none", *kinds]
    counts = np.zeros((len(rows), len(kinds)), dtype=int)
    share = np.zeros((len(rows), len(kinds)))
    n = min(n_volumes, len(volumes))
    for v in range(n):
        clean = volumes[v]["image"].float()
        for r, kind in enumerate(rows):
            img = clean if kind == "none" else samplers[kind](clean)[0].float()
            ranges = _patch_starts(tuple(img.shape[1:]), patch, f"evaluation volume {v}", margin)
            starts = [_window_starts(lo, hi, stride) for lo, hi in ranges]
            xs = [img[:, a : a + patch, b : b + patch, c : c + patch]
                  for a in starts[0] for b in starts[1] for c in starts[2]]  # fmt: skip
            with torch.no_grad():
                p = net.logits(torch.stack(xs))[:, 1:].softmax(1).mean(0).numpy()
            counts[r, p.argmax()] += 1
            share[r] += p / max(n, 1)
    own = sum(int(counts[r + 1].argmax() == r) for r in range(len(kinds)))
    return {
        "volume_counts": {
            row: dict(zip(kinds, map(int, counts[r]), strict=True)) for r, row in enumerate(rows)
        },
        "volume_share": {
            row: dict(zip(kinds, map(float, share[r]), strict=True)) for r, row in enumerate(rows)
        },
        "volume_own_kind": own,
        "volume_n": n,
    }


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run(cfg: DictConfig) -> dict[str, Any]:
    from qcflow.lit.resume import collect_rng_states, set_rng_states
    from qcflow.tasks.uncertainty_evaluate import _sampler, evaluation_volumes, kind_samplers

    resume = prepare_resume(cfg, keys=CHECKPOINT_KEYS)  # may point output_dir at the run
    seed = seed_all(cfg)
    c = cfg.classifier
    kinds = [str(k) for k in c.kinds]
    patch, batch, steps = int(c.patch), int(c.batch), int(c.steps)
    redraw, holdout = int(c.redraw), int(c.holdout)
    margin = int(required(c, "margin", "classifier"))
    every = int(required(c, "checkpoint_every", "classifier"))
    if steps < 1 or batch < 1 or redraw < 0 or holdout < 1 or every < 0:
        raise ConfigError(
            f"classifier: need steps >= 1, batch >= 1, redraw >= 0, holdout >= 1, "
            f"checkpoint_every >= 0; got {steps}, {batch}, {redraw}, {holdout}, {every}"
        )
    rng = np.random.default_rng(seed)
    volumes = evaluation_volumes(cfg, split=str(cfg.data.split))
    n = min(int(c.volumes), len(volumes))
    if n <= holdout:
        raise ConfigError(
            f"classifier: {n} training volumes available, need more than holdout={holdout}"
        )
    samplers = {k: _sampler(cfg, k, seed + 7 + i) for i, k in enumerate(kinds)}
    bank: list[list[torch.Tensor]] = []
    # the samplers' generators when the bank was last drawn: a resume redraws it from them
    bank_rng: dict[str, torch.Tensor] = {}

    def corrupt() -> None:
        bank.clear()
        bank_rng.update({k: s._generator(None).get_state() for k, s in samplers.items()})
        for v in range(n):
            clean = volumes[v]["image"].float()
            bank.append([clean] + [samplers[k](clean)[0].float() for k in kinds])

    def draw(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(batch):
            k = int(rng.integers(len(kinds) + 1))
            img = bank[ids[int(rng.integers(len(ids)))]][k]
            ranges = _patch_starts(img.shape[1:], patch, "volume", margin)
            lo = [int(rng.integers(a, b)) for a, b in ranges]
            xs.append(img[:, lo[0] : lo[0] + patch, lo[1] : lo[1] + patch, lo[2] : lo[2] + patch])
            ys.append(k)
        return torch.stack(xs), torch.tensor(ys)

    t0 = time.perf_counter()
    corrupt()
    widths = [int(w) for w in c.widths]
    net = PatchContext(1, len(kinds) + 1, widths=widths)
    opt = torch.optim.Adam(net.parameters(), lr=float(c.lr))
    train, test = list(range(n - holdout)), list(range(n - holdout, n))
    accuracy, final_loss, bank_step, first = float("nan"), float("nan"), 0, 1
    out_dir = Path(str(cfg.paths.output_dir))
    ckpt_path = out_dir / "checkpoints" / "last.ckpt"
    if resume is not None:
        saved = torch.load(resume.checkpoint, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(saved["state_dict"])
            opt.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"resume: {resume.checkpoint} does not match this classifier ({err})"
            ) from err
        bank_step = int(saved["bank_step"])
        if bank_step > 0:  # redraw the bank the run was using, from the same generators
            for k, state in saved["bank_rng"].items():
                samplers[k]._generator(None).set_state(state)
            corrupt()
        set_rng_states(saved["rng"])
        rng.bit_generator.state = saved["draw_rng"]
        first = int(saved["step"]) + 1
        accuracy = float(saved.get("accuracy", accuracy))
        final_loss = float(saved.get("loss", final_loss))
        log.info("resume: kind classifier continues after step %d", first - 1)

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "state_dict": net.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": collect_rng_states(),
            "draw_rng": rng.bit_generator.state,
            "bank_step": bank_step,
            "bank_rng": dict(bank_rng),
            "accuracy": accuracy,
            "loss": final_loss,
            "classes": ["none", *kinds],
            "widths": widths,
        }
        _save_checkpoint(ckpt_path, state)

    for step in range(first, steps + 1):
        if redraw and step % redraw == 0:
            corrupt()
            bank_step = step
        net.train()
        x, y = draw(train)
        loss = F.cross_entropy(net.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % int(c.log_every) == 0 or step == steps:
            net.eval()
            with torch.no_grad():
                accuracy = float(
                    np.mean(
                        [
                            float((net.logits(x).argmax(1) == y).float().mean())
                            for x, y in (draw(test) for _ in range(20))
                        ]
                    )
                )
            log.info("step %d loss %.3f held-out patch accuracy %.3f", step, loss.item(), accuracy)
        final_loss = float(loss.item())
        if (every and step % every == 0) or step == steps:
            checkpoint(step)
    classes = ["none", *kinds]
    with atomic_path(out_dir / CLASSIFIER_FILE) as tmp:
        torch.save({"state_dict": net.state_dict(), "classes": classes, "widths": widths}, tmp)
    results: dict[str, Any] = {
        "classes": classes,
        "steps": steps,
        "heldout_patch_accuracy": accuracy,
        "final_loss": final_loss,
        "classifier": str(out_dir / CLASSIFIER_FILE),
        "checkpoint": str(ckpt_path),
        "fit_seconds": round(time.perf_counter() - t0, 2),
        **resume_results(resume),
    }
    if int(c.eval_volumes) > 0:
        bank.clear()
        conf = volume_confusion(
            net,
            evaluation_volumes(cfg),
            kind_samplers(cfg, kinds),
            kinds,
            int(c.eval_volumes),
            patch,
            int(c.eval_stride),
            margin,
        )
        results.update(conf)
        log.info(
            "whole evaluation volumes: own kind decided for %d/%d kinds (%d volumes)",
            conf["volume_own_kind"],
            len(kinds),
            conf["volume_n"],
        )
    return results
