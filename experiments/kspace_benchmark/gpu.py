"""qcflow's fused k-space pipeline on a GPU, against the FFT round trip in the same run.

The main benchmark (``run.py``) compares the pipeline with TorchIO and MONAI on the CPU; those
libraries are CPU (NumPy/SimpleITK) code, so on a GPU the peer is the floor any k-space
simulation pays: one ``rfftn`` + ``irfftn`` of the same volume on the same device. This script
imports nothing but torch and ``qcflow.kspace``, so it runs on a machine that has only PyTorch.

Usage:
    python experiments/kspace_benchmark/gpu.py --export DIR     # here: the MNI152 volumes as .npy
    python experiments/kspace_benchmark/gpu.py --volumes DIR    # on the GPU machine

The last output line is one JSON object; ``--out FILE`` also writes it with every timed run.
Timing: CUDA events around each call after ``--warmup`` calls, medians of ``--runs``, the
implementations interleaved; parameters are drawn beforehand (drawing is not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qcflow.kspace import RandomArtifacts, apply_artifacts, fft_roundtrip  # noqa: E402

SIZE_160 = (160, 192, 160)
MOTION_RANGE = {"num_movements": [2, 2]}  # as run.py: TorchIO RandomMotion's 2 movements


def export(folder: Path) -> None:
    """The MNI152 1 mm template (nilearn) in [0, 1], native and cropped to 160x192x160."""
    from nilearn import datasets

    v = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    v = (v - v.min()) / (v.max() - v.min())
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mni_native.npy", v.astype(np.float16))
    out = np.zeros(SIZE_160, np.float32)
    src = tuple(slice((n - m) // 2, (n - m) // 2 + m) if n >= m else slice(0, n)
                for n, m in zip(v.shape, SIZE_160, strict=True))  # fmt: skip
    dst = tuple(slice(0, m) if n >= m else slice((m - n) // 2, (m - n) // 2 + n)
                for n, m in zip(v.shape, SIZE_160, strict=True))  # fmt: skip
    out[dst] = v[src]
    np.save(folder / "mni_160.npy", out.astype(np.float16))
    print(f"wrote {folder}/mni_native.npy {v.shape} and mni_160.npy {SIZE_160}")


def timed(fns: dict[str, Callable[[int], object]], runs: int, warmup: int, device: str) -> dict:
    """Median ms of each function (interleaved), and every run."""
    for i in range(warmup):
        for fn in fns.values():
            fn(-1 - i)
    raw: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(runs):
        for name, fn in fns.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn(i)
                end.record()
                end.synchronize()
                raw[name].append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                fn(i)
                raw[name].append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": {k: statistics.median(v) for k, v in raw.items()},
            "raw_ms": {k: [round(t, 3) for t in v] for k, v in raw.items()}}  # fmt: skip


def bench(x: torch.Tensor, runs: int, warmup: int, device: str) -> dict:
    """One volume ``(1, D, H, W)``: round trip, 6 kinds, 5 kinds (no motion); batch of 8."""
    full = RandomArtifacts.paper(rate=1.0, motion=MOTION_RANGE)
    no_motion = RandomArtifacts.paper(rate=1.0, motion=None)
    n = runs + warmup
    p_full = {i: full.sample(torch.Generator().manual_seed(1000 + i)) for i in range(-n, n)}
    p_nom = {i: no_motion.sample(torch.Generator().manual_seed(1000 + i)) for i in range(-n, n)}
    fns = {
        "fft_roundtrip": lambda i: fft_roundtrip(x),
        "fused_full": lambda i: apply_artifacts(x, p_full[i]),
        "fused_no_motion": lambda i: apply_artifacts(x, p_nom[i]),
    }
    out = timed(fns, runs, warmup, device)
    xb = x[None].expand(8, *x.shape).contiguous()  # (8, 1, D, H, W)
    batches = {i: full.sample_batch(8, torch.Generator().manual_seed(2000 + i))
               for i in range(-n, n)}  # fmt: skip
    b = timed({"batch8_full": lambda i: apply_artifacts(xb, batches[i])}, runs, warmup, device)
    out["median_ms"].update(b["median_ms"])
    out["raw_ms"].update(b["raw_ms"])
    med = out["median_ms"]
    out["volumes_per_s_batch8"] = 8000.0 / med["batch8_full"]
    out["fused_no_motion_over_roundtrip"] = med["fused_no_motion"] / med["fft_roundtrip"]
    out["fused_full_over_roundtrip"] = med["fused_full"] / med["fft_roundtrip"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="write the MNI152 volumes here and stop")
    ap.add_argument("--volumes", type=Path, help="folder of mni_160.npy / mni_native.npy")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=0, help="also time the CPU (0: skip)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.export:
        export(args.export)
        return
    if not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device")
    torch.backends.cudnn.benchmark = False
    result: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "runs": args.runs,
        "warmup": args.warmup,
    }
    for name in ("mni_160", "mni_native"):
        v = torch.from_numpy(np.load(args.volumes / f"{name}.npy").astype(np.float32))[None]
        result[f"cuda_{name}"] = bench(v.cuda(), args.runs, args.warmup, "cuda")
        result[f"cuda_{name}"]["shape"] = list(v.shape[1:])
        if args.cpu_threads:
            torch.set_num_threads(args.cpu_threads)
            result[f"cpu{args.cpu_threads}_{name}"] = bench(v, max(3, args.runs // 3), 1, "cpu")
    gpu = result["cuda_mni_160"]
    summary = {
        "device": result["device"],
        "cuda_fft_roundtrip_ms": round(gpu["median_ms"]["fft_roundtrip"], 3),
        "cuda_fused_full_ms": round(gpu["median_ms"]["fused_full"], 3),
        "cuda_fused_no_motion_ms": round(gpu["median_ms"]["fused_no_motion"], 3),
        "cuda_fused_no_motion_over_roundtrip": round(gpu["fused_no_motion_over_roundtrip"], 2),
        "cuda_volumes_per_s_batch8": round(gpu["volumes_per_s_batch8"], 1),
    }
    cpu_key = f"cpu{args.cpu_threads}_mni_160"
    if cpu_key in result:
        cpu = result[cpu_key]["median_ms"]
        summary[f"speedup_cuda_vs_{cpu_key}_full"] = round(
            cpu["fused_full"] / gpu["median_ms"]["fused_full"], 1
        )
    result["summary"] = summary
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
