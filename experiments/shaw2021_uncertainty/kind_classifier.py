"""Can the ``PatchContext`` branch learn the artifact kind at all? A stand-alone check.

Trains a ``qcflow.models.unet.PatchContext`` (the same small CNN that ``model.context`` adds) as a
6-way classifier (clean / spike / noise / blur / wrap / motion) on 32^3 patches of training
volumes, each corrupted once per kind at a random severity by the evaluation's samplers
(``uncertainty_evaluate``: the ``augment.<kind>`` ranges), one kind per patch, patches drawn at
random from the central part of the volume; volumes 0..N-11 train, the last 10 test::

    python experiments/shaw2021_uncertainty/kind_classifier.py [--volumes 40] [--steps 600]
        [--batch 8] [--lr 3e-3] [--redraw 0] [--save classifier.pt] [--eval-volumes 10]
        [--load classifier.pt]

Prints the training loss and the held-out accuracy (chance 1/6) every 100 steps. ``--redraw N``
corrupts the training volumes afresh every N steps (new severities; 0: each volume is corrupted
once per kind, as in the fourth session's numbers). ``--eval-volumes N`` then classifies whole
volumes of the evaluation split (``evaluate.split``, the evaluation's seeded samplers, clean +
one copy per kind): the softmax over the five kinds (the split that ``model.attribution`` uses)
averaged over 32^3 windows at stride 16, printed as a confusion matrix. ``--load`` evaluates a
saved classifier without training. A network
trained with ``uncertainty.kind_aux_weight`` sees far fewer patches (batch 2, 300-600 steps) and
several kinds per volume. ``--save`` writes ``{"state_dict", "classes", "widths"}`` for
``uncertainty.context_init`` (a teacher's / student's context branch then starts from it).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 32


def main() -> None:
    from qcflow.api import compose_config
    from qcflow.models.unet import PatchContext
    from qcflow.tasks.uncertainty_evaluate import _sampler, evaluation_volumes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=40)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--redraw", type=int, default=0, help="re-corrupt every N steps")
    parser.add_argument("--save", default=None, help="write the trained classifier here")
    parser.add_argument("--eval-volumes", type=int, default=0, help="volume-level confusion")
    parser.add_argument("--load", default=None, help="evaluate this classifier, no training")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    cfg = compose_config(["experiment=uncertainty_evaluate"])
    kinds = ["spike", "noise", "blur", "wrap", "motion"]
    volumes = evaluation_volumes(cfg, split="train")
    samplers = {k: _sampler(cfg, k, 7 + i) for i, k in enumerate(kinds)}
    n = min(args.volumes, len(volumes)) if args.load is None else 0
    bank: list[list[torch.Tensor]] = []

    def corrupt() -> None:
        bank.clear()
        for v in range(n):
            clean = volumes[v]["image"].float()
            bank.append([clean] + [samplers[k](clean)[0].float() for k in kinds])

    corrupt()

    def draw(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(args.batch):
            k = int(rng.integers(6))
            img = bank[ids[int(rng.integers(len(ids)))]][k]
            lo = [int(rng.integers(16, s - PATCH - 16)) for s in img.shape[1:]]
            xs.append(img[:, lo[0] : lo[0] + PATCH, lo[1] : lo[1] + PATCH, lo[2] : lo[2] + PATCH])
            ys.append(k)
        return torch.stack(xs), torch.tensor(ys)

    net = PatchContext(1, 6, max_offset=1e6)  # unbounded logits
    if args.load is not None:
        net.load_state_dict(torch.load(args.load, weights_only=True)["state_dict"])
        args.steps = 0
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    train, test = list(range(n - 10)), list(range(n - 10, n))
    for step in range(1, args.steps + 1):
        if args.redraw and step % args.redraw == 0:
            corrupt()
        x, y = draw(train)
        loss = F.cross_entropy(net.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                acc = np.mean(
                    [
                        float((net.logits(x).argmax(1) == y).float().mean())
                        for x, y in (draw(test) for _ in range(20))
                    ]
                )
            print(f"step {step} loss {loss.item():.3f} held-out accuracy {acc:.3f}", flush=True)
    if args.save:
        classes = ["none", *kinds]
        torch.save(
            {"state_dict": net.state_dict(), "classes": classes, "widths": [16, 32, 32]}, args.save
        )
        print(f"classifier written to {args.save}")
    if args.eval_volumes:
        volume_confusion(net, cfg, kinds, args.eval_volumes)


def volume_confusion(net: torch.nn.Module, cfg, kinds: list[str], n_volumes: int) -> None:
    """Whole-volume kind decisions on the evaluation split (see the module docstring)."""
    from qcflow.tasks.uncertainty_evaluate import evaluation_volumes, kind_samplers

    net.eval()
    volumes = evaluation_volumes(cfg)
    samplers = kind_samplers(cfg, kinds)
    rows = ["none", *kinds]
    counts = np.zeros((len(rows), len(kinds)), dtype=int)
    share = np.zeros((len(rows), len(kinds)))
    n = min(n_volumes, len(volumes))
    for v in range(n):
        clean = volumes[v]["image"].float()
        for r, kind in enumerate(rows):
            img = clean if kind == "none" else samplers[kind](clean)[0].float()
            d, h, w = img.shape[1:]
            xs = [img[:, a : a + PATCH, b : b + PATCH, c : c + PATCH]
                  for a in range(8, d - PATCH - 8, 16) for b in range(8, h - PATCH - 8, 16)
                  for c in range(8, w - PATCH - 8, 16)]  # fmt: skip
            with torch.no_grad():
                p = net.logits(torch.stack(xs))[:, 1:].softmax(1).mean(0).numpy()
            counts[r, p.argmax()] += 1
            share[r] += p / n
    own = sum(int(counts[r + 1].argmax() == r) for r in range(len(kinds)))
    print(f"volume-level decisions on {n} evaluation volumes (rows: true kind; columns: kind)")
    print("        " + " ".join(f"{k:>7s}" for k in kinds) + "   mean share")
    for r, kind in enumerate(rows):
        cells = " ".join(f"{c:7d}" for c in counts[r])
        print(f"{kind:7s} {cells}   " + " ".join(f"{s:.3f}" for s in share[r]))
    print(f"own kind the most frequent decision for {own}/{len(kinds)} kinds")


if __name__ == "__main__":
    main()
