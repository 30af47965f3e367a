"""Linear probe: do a trained network's features tell the artifact kinds apart?

The variance heads of ``TwoHeadUNet`` are 1x1x1 convolutions on the last decoder features, i.e.
linear per voxel. If a logistic regression on those features cannot tell which kind corrupted
the image (clean / spike / noise / blur / wrap / motion), no variance head on them can decouple
the kinds. The script takes the first N held-out clean scans, one copy per kind (the same copies
``uncertainty_evaluate`` makes), 6 random 32^3 patches per scan centred in the head, runs the
network on each patch and fits four probes on scans 0..0.6N-1, tested on the rest:

* ``voxel final`` -- the last decoder features at 200 head voxels per patch (what the heads see);
* ``voxel hyper`` -- the bottleneck and every decoder level upsampled to the patch (hypercolumn);
* ``patch final`` / ``patch hyper`` -- the same features pooled over the patch (mean and std).

    python experiments/shaw2021_uncertainty/linear_probe.py RUN_OR_CKPT [--scans 10]

Prints the test accuracy (chance 1/6) and the recall per kind. For a network with a patch-context
branch (``model.context``: the student's frozen kind classifier, whose outputs are each kind's
log-odds against clean) it also prints the mean sigmoid of those outputs per true kind on all
patches. (The fourth session's numbers for that table came from students trained with a
kind-presence loss, retired since: README, "Switches".)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PATCH = 32
PATCHES_PER_SCAN = 6
VOXELS_PER_PATCH = 200


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from qcflow.api import compose_config
    from qcflow.errors import ConfigError
    from qcflow.kspace import SHAW2021_KINDS
    from qcflow.qc.iqm import head_mask
    from qcflow.runs.folders import resolve_checkpoint
    from qcflow.runs.stages import load_stage
    from qcflow.tasks.uncertainty_evaluate import evaluation_volumes, kind_samplers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--scans", type=int, default=10)
    args = parser.parse_args()
    cfg = compose_config(["experiment=uncertainty_evaluate"])
    try:
        ckpt = resolve_checkpoint(cfg.paths.runs_dir, args.checkpoint, "uncertainty_student")
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    torch.set_num_threads(1)

    two_head = load_stage(ckpt).net
    unet, context = two_head.net, two_head.context
    presence: dict[str, list] = {}
    kinds = list(SHAW2021_KINDS)
    feats: dict[str, torch.Tensor] = {}
    unet.bottleneck.register_forward_hook(lambda m, i, o: feats.__setitem__("b", o))
    for j, up in enumerate(unet.upsamples):
        up.register_forward_hook(lambda m, i, o, j=j: feats.__setitem__(f"u{j}", o))

    volumes = evaluation_volumes(cfg)
    samplers = kind_samplers(cfg, kinds)
    rng = np.random.default_rng(0)
    data: dict[str, list] = {k: [] for k in ("final", "hyper", "pfinal", "phyper")}
    labels: dict[str, list] = {"voxel": [], "voxel_scan": [], "patch": [], "patch_scan": []}
    n_scans = min(args.scans, len(volumes))
    for idx in range(n_scans):
        clean = volumes[idx]["image"].float()
        head = np.asarray(head_mask(clean[0]))
        inside = np.argwhere(head)
        centres = inside[rng.choice(len(inside), PATCHES_PER_SCAN, replace=False)]
        for ki, kind in enumerate(["none", *kinds]):
            image = clean if kind == "none" else samplers[kind](clean)[0].float()
            for c in centres:
                lo = [
                    max(0, min(int(c[d]) - PATCH // 2, image.shape[1 + d] - PATCH))
                    for d in range(3)
                ]
                sl = tuple(slice(s, s + PATCH) for s in lo)
                patch = image[(slice(None), *sl)][None]
                with torch.no_grad():
                    unet(patch)
                    if context is not None:
                        prob = torch.sigmoid(context.logits(patch))[0].numpy()
                        presence.setdefault(kind, []).append(prob)
                maps = [feats["b"]] + [feats[f"u{j}"] for j in range(len(unet.upsamples))]
                hyper = torch.cat(
                    [F.interpolate(m, size=(PATCH,) * 3, mode="trilinear") for m in maps], 1
                )[0]
                final = maps[-1][0]
                vox = torch.nonzero(torch.as_tensor(head[sl]))
                if len(vox) < 50:
                    continue
                pick = vox[
                    torch.as_tensor(
                        rng.choice(len(vox), VOXELS_PER_PATCH, replace=len(vox) < VOXELS_PER_PATCH)
                    )
                ]
                at = (slice(None), pick[:, 0], pick[:, 1], pick[:, 2])
                data["final"].append(final[at].T.numpy())
                data["hyper"].append(hyper[at].T.numpy())
                data["pfinal"].append(
                    torch.cat([final.mean((1, 2, 3)), final.std((1, 2, 3))]).numpy()[None]
                )
                pooled = [m[0].mean((1, 2, 3)) for m in maps] + [m[0].std((1, 2, 3)) for m in maps]
                data["phyper"].append(torch.cat(pooled).numpy()[None])
                labels["voxel"] += [ki] * len(pick)
                labels["voxel_scan"] += [idx] * len(pick)
                labels["patch"].append(ki)
                labels["patch_scan"].append(idx)
        print(f"scan {idx + 1}/{n_scans}", flush=True)

    split = int(0.6 * n_scans)
    print(f"train scans 0..{split - 1}, test scans {split}..{n_scans - 1}; chance 0.167")
    for name, key, level in [
        ("voxel final", "final", "voxel"),
        ("voxel hyper", "hyper", "voxel"),
        ("patch final", "pfinal", "patch"),
        ("patch hyper", "phyper", "patch"),
    ]:
        x = np.concatenate(data[key])
        y, scan = np.asarray(labels[level]), np.asarray(labels[f"{level}_scan"])
        tr, te = scan < split, scan >= split
        scaler = StandardScaler().fit(x[tr])
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(x[tr]), y[tr])
        pred = clf.predict(scaler.transform(x[te]))
        recall = " ".join(
            f"{k} {float((pred[y[te] == i] == i).mean()):.2f}"
            for i, k in enumerate(["none", *kinds])
        )
        print(
            f"{name:12s} dim {x.shape[1]:4d} accuracy {float((pred == y[te]).mean()):.3f}  {recall}"
        )

    if presence:
        print("context classifier: mean P(kind applied), rows = true kind, columns = its outputs")
        print("        " + " ".join(f"{k:>7s}" for k in kinds))
        for kind in ["none", *kinds]:
            row = np.mean(presence[kind], axis=0)
            print(f"  {kind:6s}" + " ".join(f"{v:7.3f}" for v in row))


if __name__ == "__main__":
    main()
