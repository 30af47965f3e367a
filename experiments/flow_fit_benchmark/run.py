"""How long does the Lightning flow fit take against the hand-written Adam loop it replaced?

``qcflow.lit.flow.fit_density`` (Lightning: one ``trainer.fit`` per mixture member, the best
held-out epoch kept by ``ModelCheckpoint``) replaced a plain Adam loop. Both give the same
parameters on the same seed (``tests/test_flow_density.py``); this times them on the study's
flow setting (RealNVP, 6 couplings, hidden [32, 32], 300 epochs, 20 % held out) on synthetic
codes of the study's size, interleaved, 1 thread.
Prints one JSON line; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from qcflow.lit.flow import fit_density
from qcflow.models.flow import DensityFlow


def loop_fit(density: DensityFlow, m: torch.Tensor, epochs: int, val: float, gen) -> None:  # noqa: ANN001
    """The replaced loop: each flow on its own hold-out split, best held-out epoch kept."""
    density.set_standardization(m)
    x = density.standardize(m).detach()
    for flow in density.flows:
        n_val = int(round(val * len(x)))
        order = torch.randperm(len(x), generator=gen)
        x_val, x_fit = x[order[:n_val]], x[order[n_val:]]
        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
        best, state = float("inf"), None
        for _ in range(epochs):
            perm = torch.randperm(len(x_fit), generator=gen)
            for i in range(0, len(x_fit), 256):
                loss = -flow().log_prob(x_fit[perm[i : i + 256]]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                v = float(-flow().log_prob(x_val).mean())
            if v < best:
                best, state = v, {k: t.detach().clone() for k, t in flow.state_dict().items()}
        flow.load_state_dict(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codes", type=int, default=150, help="training codes (the study: ~150)")
    ap.add_argument("--dim", type=int, default=6, help="code dimension (3 encoders x 2)")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m = torch.randn(args.codes, args.dim, generator=torch.Generator().manual_seed(0)) * 2 + 1
    result: dict = {"codes": args.codes, "dim": args.dim, "epochs": args.epochs, "threads": 1}
    for mixture in (1, 3):
        times: dict[str, list[float]] = {"loop": [], "lightning": []}
        for r in range(args.repeats):
            for name in times:  # interleaved
                torch.manual_seed(r)
                d = DensityFlow(features=args.dim, transforms=6, hidden_features=(32, 32),
                                mixture=mixture)  # fmt: skip
                gen = torch.Generator().manual_seed(r)
                t0 = time.perf_counter()
                if name == "loop":
                    loop_fit(d, m, args.epochs, 0.2, gen)
                else:
                    fit_density(d, m, epochs=args.epochs, val_fraction=0.2, generator=gen)
                times[name].append(time.perf_counter() - t0)
        loop, lit = statistics.median(times["loop"]), statistics.median(times["lightning"])
        result[f"mixture{mixture}_loop_s"] = round(loop, 2)
        result[f"mixture{mixture}_lightning_s"] = round(lit, 2)
        result[f"mixture{mixture}_ratio"] = round(lit / loop, 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
