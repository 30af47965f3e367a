"""Benchmark: embedded-dataset build time and preprocessing throughput (vs MONAI).

Usage:
    python experiments/data_pipeline/run.py            # default dataset (150 + 40 + 80 scans, 2 mm)
    python experiments/data_pipeline/run.py --quick    # small dataset, < 1 minute

Builds the embedded dataset into a fresh temporary folder (timed), then on its training split
times, in one run and interleaved per scan:
  * qcflow preprocessing (validated NIfTI load + TorchIO canonical/resample/scale/crop), cold;
  * the same from the on-disk cache (warm);
  * MONAI's equivalent dictionary pipeline (LoadImage, Orientation RAS, Spacing, percentile
    scaling with clipping, ResizeWithPadOrCrop) as the peer.
Writes ``results/metrics.json`` (``results/metrics_quick.json`` with --quick) and prints one JSON
line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qcflow.data.discovery import discover_scans  # noqa: E402
from qcflow.data.preprocess import PreprocessCache, PreprocessConfig, resolve_shape  # noqa: E402
from qcflow.data.synth import ensure_embedded  # noqa: E402

HERE = Path(__file__).resolve().parent


def monai_pipeline(spacing: float, shape: tuple[int, int, int]):
    from monai import transforms as mt

    return mt.Compose(
        [
            mt.LoadImage(image_only=True, ensure_channel_first=True),
            mt.Orientation(axcodes="RAS"),
            mt.Spacing(pixdim=(spacing,) * 3, mode="bilinear"),
            mt.ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True),
            mt.ResizeWithPadOrCrop(shape),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small dataset, < 1 minute")
    parser.add_argument("--spacing", type=float, default=2.0, help="preprocessing target (mm)")
    parser.add_argument(
        "--data-spacing",
        type=float,
        default=None,
        help="embedded data voxel size (default: --spacing)",
    )
    parser.add_argument("--n-subjects", type=int, default=150, help="training subjects built")
    parser.add_argument("--n-timed", type=int, default=30, help="scans timed per method")
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = OmegaConf.create(
        {
            "spacing": args.data_spacing or args.spacing,
            "n_subjects": args.n_subjects,
            "n_test_clean": 40,
            "n_test_per_kind": 8,
            "artifact_fraction": 0.05,
            "n_cohorts": 4,
            "seed": 0,
        }
    )
    if args.quick:
        cfg.update(
            {"n_subjects": min(12, args.n_subjects), "n_test_clean": 2, "n_test_per_kind": 1}
        )
        args.n_timed = min(args.n_timed, 8)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.dir = str(Path(tmp) / "embedded")
        t0 = time.perf_counter()
        root, info = ensure_embedded(cfg, return_info=True)
        build_s = time.perf_counter() - t0
        n_built = sum(1 for _ in Path(root).glob("*/sub-*/anat/*_T1w.nii.gz"))

        scans = discover_scans(Path(root) / "train")[: args.n_timed]
        shape = resolve_shape(args.spacing, (192, 224, 192))
        pcfg = PreprocessConfig(spacing=args.spacing, shape=shape)
        cache = PreprocessCache(Path(tmp) / "cache", pcfg)
        peer = monai_pipeline(args.spacing, shape)
        cold, warm, monai = [], [], []
        for scan in scans:  # interleaved so machine load affects all three alike
            t = time.perf_counter()
            out = cache.load(scan, with_label=False)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            cache.load(scan, with_label=False)
            warm.append(time.perf_counter() - t)
            t = time.perf_counter()
            ref = peer(str(scan.path))
            monai.append(time.perf_counter() - t)
            assert out["image"].shape == tuple(ref.shape), (out["image"].shape, ref.shape)

    med = {k: statistics.median(v) for k, v in (("cold", cold), ("warm", warm), ("monai", monai))}
    result = {
        "spacing_mm": args.spacing,
        "data_spacing_mm": args.data_spacing or args.spacing,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "n_scans_built": n_built,
        "build_s": round(build_s, 2),
        "build_scans_per_s": round(n_built / build_s, 2),
        "n_timed": len(scans),
        "preprocess_volumes_per_s": round(1 / med["cold"], 2),
        "cached_volumes_per_s": round(1 / med["warm"], 2),
        "monai_volumes_per_s": round(1 / med["monai"], 2),
        "speedup_preprocess_vs_monai": round(med["monai"] / med["cold"], 2),
        "median_ms": {k: round(1000 * v, 1) for k, v in med.items()},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if args.spacing != 2.0 or (args.data_spacing or args.spacing) != args.spacing:
        suffix += f"_{args.data_spacing or args.spacing:g}to{args.spacing:g}mm"
    (out_dir / f"metrics{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
