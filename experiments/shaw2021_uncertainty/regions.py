"""Mean predicted variance per channel inside regions, clean vs each artifact kind.

The study's decoupling matrix averages sigma^2 over the whole image; this script splits it into
the whole image, the head mask (``qcflow.qc.iqm.head_mask`` of the image the network saw) and
the GM label, for the first N held-out clean scans and one copy per kind -- the same copies
``uncertainty_evaluate`` makes (same samplers and seeds)::

    python experiments/shaw2021_uncertainty/regions.py RUN_OR_CKPT [--scans 2]

``RUN_OR_CKPT`` is a student (or teacher) checkpoint or its run folder. Prints one table per
region (rows: true kind, columns: channels; ``OWN`` marks rows whose largest artifact channel
is the true kind).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from qcflow.api import compose_config
    from qcflow.errors import ConfigError
    from qcflow.qc.iqm import head_mask
    from qcflow.qc.segmentation import predict_volume
    from qcflow.runs.folders import resolve_checkpoint
    from qcflow.runs.stages import load_stage
    from qcflow.tasks.uncertainty_evaluate import evaluation_volumes, kind_samplers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--scans", type=int, default=2)
    args = parser.parse_args()
    cfg = compose_config(["experiment=uncertainty_evaluate"])
    try:
        ckpt = resolve_checkpoint(cfg.paths.runs_dir, args.checkpoint, "uncertainty_student")
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    torch.set_num_threads(1)

    module = load_stage(ckpt)
    sources = list(module.sources)
    kinds = list(module.kinds)
    volumes = evaluation_volumes(cfg)
    samplers = kind_samplers(cfg, kinds)
    roi = [int(p) for p in cfg.data.patch_size]

    means: dict[tuple[str, str], list[list[float]]] = {}
    for idx in range(min(args.scans, len(volumes))):
        item = volumes[idx]
        clean, label = item["image"].float(), torch.as_tensor(np.asarray(item["label"][0]))
        for kind in ["none", *kinds]:
            image = clean if kind == "none" else samplers[kind](clean)[0].float()
            pred = predict_volume(module.net.predict, image, sources, roi)
            regions = {
                "image": torch.ones_like(label, dtype=torch.bool),
                "head": torch.as_tensor(np.asarray(head_mask(image[0]))).bool(),
                "gm": label > 0,
            }
            for name, mask in regions.items():
                row = [float(pred[f"var_{s}"][mask].mean()) for s in sources]
                means.setdefault((name, kind), []).append(row)

    for name in ("image", "head", "gm"):
        print(f"{name:8s}", " ".join(f"{s:>7s}" for s in sources))
        for kind in ["none", *kinds]:
            v = np.mean(means[(name, kind)], axis=0)
            own = kind != "none" and sources[1 + int(np.argmax(v[1:]))] == kind
            print(f"  {kind:6s}", " ".join(f"{x:7.4f}" for x in v), "OWN" if own else "")


if __name__ == "__main__":
    main()
