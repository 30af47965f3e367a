"""Benchmark qcflow's fused k-space artifact pipeline against TorchIO and MONAI (issue 3).

Question: is the fused, pruned torch pipeline (one forward FFT, every k-space edit, one inverse
FFT) clearly faster than TorchIO's and MONAI's one-transform-one-round-trip implementations of
the same artifacts, and how close does it get to a single FFT round trip?

Data: the MNI152 T1 1 mm template shipped with nilearn (no download), intensities in [0, 1],
cropped/padded to 160x192x160 and at its native 197x233x189. Every timing is the median of
``--runs`` runs after ``--warmup`` untimed runs; the competing implementations run interleaved
(ours, theirs, ours, ...) so background load hits both alike. Each of our runs applies a fresh
random draw from the default (paper) ranges; TorchIO/MONAI draw with ``torch.manual_seed(run)``.

Usage::

    python experiments/kspace_benchmark/run.py            # full: both sizes, 7 runs (~10 min)
    python experiments/kspace_benchmark/run.py --quick    # < 1 min: 160x192x160, key numbers
    python experiments/kspace_benchmark/run.py --threads 2

Writes ``results/benchmark.json`` (``benchmark_quick.json`` with --quick), ``artifacts.png``
(full runs, or ``--figure``), prints a Markdown table, and prints one JSON object as the last
line of output.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="160x192x160 only, key numbers, < 1 min")
    p.add_argument("--threads", type=int, default=1, help="torch and SimpleITK threads (1)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per measurement (7; 2 quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    p.add_argument("--figure", action="store_true", help="also draw artifacts.png in quick mode")
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="glibc mallopt: keep large buffers in the heap (no page faults per call); "
        "affects every library alike",
    )
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))
if ARGS.tune_malloc:  # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, 1 << 30)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
import torchio as tio  # noqa: E402
from monai import transforms as mt  # noqa: E402

from qcflow.kspace import (  # noqa: E402
    KINDS,
    OPT_IN_KINDS,
    ArtifactParams,
    BiasParams,
    BlurParams,
    MotionParams,
    NoiseParams,
    RandomArtifacts,
    SpikeParams,
    WrapParams,
    apply_artifacts,
    fft_roundtrip,
    smooth_size,
)

torch.set_num_threads(ARGS.threads)
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(ARGS.threads)

SIZE_160 = (160, 192, 160)
#: the kinds of qcflow.kspace.KINDS in the order of the TorchIO Compose that the README measured
#: (its seeded draws depend on the order)
TORCHIO_ORDER = ("spike", "noise", "blur", "wrap", "motion", "bias")
#: the kinds measured: every kind but the opt-in ones (ghosting, anisotropy: not timed yet)
BENCH_KINDS = tuple(k for k in KINDS if k not in OPT_IN_KINDS)
if sorted(TORCHIO_ORDER) != sorted(BENCH_KINDS):
    raise SystemExit(f"kspace_benchmark: TORCHIO_ORDER {TORCHIO_ORDER} must order {BENCH_KINDS}")
MOTION_RANGE = {"num_movements": [2, 2]}  # TorchIO RandomMotion's default: 2 movements


# ---------------------------------------------------------------------------------------------
# data and timing
# ---------------------------------------------------------------------------------------------
def load_template() -> torch.Tensor:
    """MNI152 T1 1 mm (197, 233, 189) in [0, 1], float32."""
    from nilearn import datasets

    img = datasets.load_mni152_template(resolution=1)
    v = torch.from_numpy(np.asarray(img.get_fdata(), dtype=np.float32))
    return (v - v.min()) / (v.max() - v.min())


def crop_or_pad(v: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    out = torch.zeros(shape)
    src, dst = [], []
    for n, m in zip(v.shape, shape, strict=True):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            s = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(s, s + n))
    out[tuple(dst)] = v[tuple(src)]
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: every timed run (ms), keyed "<label>/<name>", written to the results JSON
RAW: dict[str, list[float]] = {}


def interleaved(
    fns: dict[str, Callable[[int], object]],
    runs: int,
    warmup: int,
    device: str = "cpu",
    label: str = "",
) -> dict[str, float]:
    """Median milliseconds of each function, runs interleaved round-robin (all runs in RAW)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(-1 - i)
            sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(runs):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    for name, v in times.items():
        RAW[f"{label}/{name}"] = [round(t, 2) for t in v]
    return {k: statistics.median(v) for k, v in times.items()}


def mean_over_draws(
    x: torch.Tensor, sampler: RandomArtifacts, n: int, device: str = "cpu"
) -> float:
    """Mean milliseconds over ``n`` fresh draws (the cost distribution can be bimodal)."""
    apply_artifacts(x, sampler.sample(torch.Generator().manual_seed(4999)))
    total = 0.0
    for i in range(n):
        p = sampler.sample(torch.Generator().manual_seed(5000 + i))
        sync(device)
        t0 = time.perf_counter()
        apply_artifacts(x, p)
        sync(device)
        total += time.perf_counter() - t0
    return total / n * 1e3


def draws(sampler: RandomArtifacts, n: int) -> dict[int, ArtifactParams]:
    """Pre-drawn parameters for runs -n..n-1 (drawing is not part of the timed work)."""
    return {i: sampler.sample(torch.Generator().manual_seed(1000 + i)) for i in range(-n, n)}


def ours(x: torch.Tensor, sampler: RandomArtifacts, n: int) -> Callable[[int], object]:
    params = draws(sampler, n)
    return lambda i: apply_artifacts(x, params[i])


def theirs(transform: Callable, data: object) -> Callable[[int], object]:
    def run(i: int) -> object:
        torch.manual_seed(i + 10_000)
        return transform(data)

    return run


def single(kind: str) -> RandomArtifacts:
    return RandomArtifacts(rate=1.0, **{kind: MOTION_RANGE if kind == "motion" else True})


def torchio_kinds() -> dict[str, tio.Transform]:
    return {
        "spike": tio.RandomSpike(num_spikes=(1, 3), intensity=(1, 10)),
        "noise": tio.RandomNoise(),
        "blur": tio.RandomBlur(),
        "anisotropy": tio.RandomAnisotropy(downsampling=(2, 12)),
        "wrap": tio.RandomGhosting(),
        "motion": tio.RandomMotion(degrees=10, translation=10, num_transforms=2),
        "bias": tio.RandomBiasField(coefficients=0.5, order=3),
    }


def monai_kinds() -> dict[str, Callable]:
    return {
        "spike": mt.RandKSpaceSpikeNoise(prob=1.0),
        "blur": mt.RandGibbsNoise(prob=1.0, alpha=(0.0, 1.0)),
        "noise": mt.RandRicianNoise(prob=1.0, std=0.1),
        "bias": mt.RandBiasField(prob=1.0, coeff_range=(0.0, 0.5)),
    }


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def bench_size(vol: torch.Tensor, shape: tuple[int, ...], quick: bool, runs: int) -> dict:
    x = crop_or_pad(vol, shape)[None]  # (1, D, H, W)
    subject = tio.Subject(t1=tio.ScalarImage(tensor=x.clone(), affine=np.eye(4)))
    w = ARGS.warmup
    res: dict = {"shape": list(shape), "padded_shape": [smooth_size(n) for n in shape]}
    print(f"\n## {shape[0]}x{shape[1]}x{shape[2]}", flush=True)

    padded = torch.zeros(1, *res["padded_shape"])
    label = "x".join(str(v) for v in shape)
    rt = interleaved(
        {"native": lambda i: fft_roundtrip(x), "padded": lambda i: fft_roundtrip(padded)},
        runs,
        w,
        label=label,
    )
    res["fft_roundtrip_ms"] = rt["native"]
    res["fft_roundtrip_padded_ms"] = rt["padded"]
    print(f"fft round trip {rt['native']:.1f} ms (padded to smooth: {rt['padded']:.1f} ms)")

    tk = torchio_kinds()
    full = RandomArtifacts.paper(rate=1.0, motion=MOTION_RANGE)
    no_motion = RandomArtifacts.paper(rate=1.0, motion=None)
    compose_full = tio.Compose([tk[k] for k in TORCHIO_ORDER])
    compose_no_motion = tio.Compose([tk[k] for k in TORCHIO_ORDER if k != "motion"])
    fns = {
        "fused_full": ours(x, full, runs + w),
        "torchio_compose_full": theirs(compose_full, subject),
        "fused_no_motion": ours(x, no_motion, runs + w),
        "torchio_compose_no_motion": theirs(compose_no_motion, subject),
    }
    r = interleaved(fns, runs, w, label=label)
    res.update({f"{k}_ms": v for k, v in r.items()})
    n_draws = 8 if quick else 24
    res["fused_full_mean_ms"] = mean_over_draws(x, full, n_draws)
    res["fused_no_motion_mean_ms"] = mean_over_draws(x, no_motion, n_draws)
    res["mean_draws"] = n_draws
    res["torchio_compose_full_mean_ms"] = statistics.mean(RAW[f"{label}/torchio_compose_full"])
    res["speedup_full_vs_torchio_mean"] = (
        res["torchio_compose_full_mean_ms"] / res["fused_full_mean_ms"]
    )
    res["speedup_full_vs_torchio"] = r["torchio_compose_full"] / r["fused_full"]
    res["speedup_no_motion_vs_torchio"] = r["torchio_compose_no_motion"] / r["fused_no_motion"]
    res["fused_no_motion_over_roundtrip"] = r["fused_no_motion"] / rt["native"]
    print(
        f"full: ours {r['fused_full']:.0f} ms vs TorchIO Compose {r['torchio_compose_full']:.0f} ms"
        f" ({res['speedup_full_vs_torchio']:.1f}x); no motion: ours {r['fused_no_motion']:.0f} ms"
        f" vs {r['torchio_compose_no_motion']:.0f} ms ({res['speedup_no_motion_vs_torchio']:.1f}x)"
        f", {res['fused_no_motion_over_roundtrip']:.2f}x the round trip",
        flush=True,
    )
    if quick:
        return res

    kinds: dict[str, dict[str, float]] = {}
    mk = monai_kinds()
    data = x.clone()
    for kind in BENCH_KINDS:
        fns = {"qcflow": ours(x, single(kind), runs + w)}
        fns["torchio"] = theirs(tk[kind], subject)
        if kind == "blur":
            fns["torchio_anisotropy"] = theirs(tk["anisotropy"], subject)
        if kind in mk:
            fns["monai"] = theirs(mk[kind], data)
        kinds[kind] = interleaved(fns, runs, w, label=f"{label}/{kind}")
        print(kind, {k: round(v, 1) for k, v in kinds[kind].items()}, flush=True)
    res["kinds_ms"] = kinds
    return res


def bench_batch(vol: torch.Tensor, runs: int, device: str) -> dict:
    x = crop_or_pad(vol, SIZE_160)[None, None].expand(8, 1, *SIZE_160).contiguous().to(device)
    sampler = RandomArtifacts.paper(rate=1.0, motion=MOTION_RANGE)
    params = {
        i: sampler.sample_batch(8, torch.Generator().manual_seed(2000 + i))
        for i in range(-ARGS.warmup, runs)
    }
    fns = {"batch8": lambda i: apply_artifacts(x, params[i])}
    ms = interleaved(fns, runs, ARGS.warmup, device, label=device)["batch8"]
    return {"batch8_ms": ms, "volumes_per_s_batch8": 8000.0 / ms}


def bench_cuda(vol: torch.Tensor, runs: int) -> dict:
    x = crop_or_pad(vol, SIZE_160)[None].cuda()
    full = RandomArtifacts.paper(rate=1.0, motion=MOTION_RANGE)
    no_motion = RandomArtifacts.paper(rate=1.0, motion=None)
    fns = {
        "fft_roundtrip": lambda i: fft_roundtrip(x),
        "fused_full": ours(x, full, runs + ARGS.warmup),
        "fused_no_motion": ours(x, no_motion, runs + ARGS.warmup),
    }
    r = interleaved(fns, runs, ARGS.warmup, "cuda", label="cuda")
    out = {f"{k}_ms": v for k, v in r.items()}
    out.update(bench_batch(vol, runs, "cuda"))
    out["device_name"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------------------------
def severity_levels() -> dict[str, list[ArtifactParams]]:
    g = torch.Generator().manual_seed(0)
    coeffs = (torch.rand(20, generator=g) * 2 - 1).tolist()
    move = ((3.0, -2.0, 4.0), (-4.0, 2.0, -3.0))
    shift = ((3.0, -2.0, 2.0), (-2.0, 3.0, -3.0))
    levels: dict[str, list[ArtifactParams]] = {}
    levels["spike"] = [
        ArtifactParams(spike=SpikeParams(((0.62, 0.7, 0.5),), (a,))) for a in (1.0, 4.0, 10.0)
    ]
    levels["noise"] = [ArtifactParams(noise=NoiseParams(s, seed=0)) for s in (25.0, 10.0, -5.0)]
    levels["blur"] = [ArtifactParams(blur=BlurParams((r, r, 1.0))) for r in (2.0, 5.0, 12.0)]
    levels["wrap"] = [
        ArtifactParams(wrap=WrapParams(1, mode="random", keep_fraction=0.7, seed=0)),
        ArtifactParams(wrap=WrapParams(1, mode="random", keep_fraction=0.4, seed=0)),
        ArtifactParams(wrap=WrapParams(1, mode="regular", interval=3)),
    ]
    levels["motion"] = [
        ArtifactParams(
            motion=MotionParams(
                (0.35, 0.7),
                tuple(tuple(s * v for v in row) for row in move),
                tuple(tuple(s * v for v in row) for row in shift),
                pe_axis=1,
            )
        )
        for s in (0.5, 1.5, 3.0)
    ]
    levels["bias"] = [
        ArtifactParams(bias=BiasParams(tuple(s * c for c in coeffs))) for s in (0.15, 0.35, 0.7)
    ]
    return levels


def draw_figure(vol: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = crop_or_pad(vol, SIZE_160)[None]
    z = SIZE_160[2] // 2 + 8  # an axial slice through the ventricles
    levels = severity_levels()
    fig, axes = plt.subplots(len(levels), 4, figsize=(8.4, 2.6 * len(levels)))
    for row, (kind, plist) in enumerate(levels.items()):
        axes[row, 0].imshow(x[0, :, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[row, 0].set_title("clean", fontsize=8)
        axes[row, 0].set_ylabel(kind, fontsize=10)
        for col, (name, p) in enumerate(
            zip(("low", "medium", "high"), plist, strict=True), start=1
        ):
            y = apply_artifacts(x, p)
            sev = p.severity()[kind]
            axes[row, col].imshow(y[0, :, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            axes[row, col].set_title(f"{name} (severity {sev:.2f})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("qcflow k-space artifacts on the MNI152 1 mm template (axial slice)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = []
    for s in result["sizes"]:
        shape = "x".join(str(v) for v in s["shape"])
        lines.append(
            f"\n### {shape} (padded for FFTs to {'x'.join(str(v) for v in s['padded_shape'])})\n"
        )
        lines.append(
            "| measurement | qcflow (ms) | TorchIO (ms) | MONAI (ms) | speed-up vs TorchIO |"
        )
        lines.append("| --- | ---: | ---: | ---: | ---: |")
        lines.append(f"| FFT round trip (rfftn+irfftn) | {s['fft_roundtrip_ms']:.1f} | | | |")
        lines.append(
            f"| full: 6 kinds vs Compose(Spike, Noise, Blur, Ghosting, Motion, BiasField) "
            f"| {s['fused_full_ms']:.0f} | {s['torchio_compose_full_ms']:.0f} | "
            f"| {s['speedup_full_vs_torchio']:.1f}x |"
        )
        lines.append(
            f"| full, means ({s['mean_draws']} draws for qcflow) | {s['fused_full_mean_ms']:.0f} "
            f"| {s['torchio_compose_full_mean_ms']:.0f} | "
            f"| {s['speedup_full_vs_torchio_mean']:.1f}x |"
        )
        lines.append(
            f"| no motion: 5 kinds vs Compose without Motion | {s['fused_no_motion_ms']:.0f} "
            f"| {s['torchio_compose_no_motion_ms']:.0f} | "
            f"| {s['speedup_no_motion_vs_torchio']:.1f}x |"
        )
        for kind, r in s.get("kinds_ms", {}).items():
            tio_ms = r["torchio"]
            extra = (
                f" (Anisotropy {r['torchio_anisotropy']:.0f})" if "torchio_anisotropy" in r else ""
            )
            mon = f"{r['monai']:.0f}" if "monai" in r else ""
            ratio = tio_ms / r["qcflow"]
            ours_ms = r["qcflow"]
            lines.append(
                f"| {kind} alone | {ours_ms:.0f} | {tio_ms:.0f}{extra} | {mon} | {ratio:.1f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    runs = ARGS.runs or (2 if ARGS.quick else 7)
    t_start = time.perf_counter()
    vol = load_template()
    sizes = [SIZE_160] if ARGS.quick else [SIZE_160, tuple(vol.shape)]
    result: dict = {
        "meta": {
            "threads": ARGS.threads,
            "runs": runs,
            "warmup": ARGS.warmup,
            "quick": ARGS.quick,
            "tune_malloc": ARGS.tune_malloc,
            "torch": torch.__version__,
            "torchio": tio.__version__,
            "monai": __import__("monai").__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "sizes": [bench_size(vol, s, ARGS.quick, runs) for s in sizes],
    }
    result["batch_cpu"] = bench_batch(vol, 1 if ARGS.quick else max(3, runs // 2), "cpu")
    print(f"batch 8 on CPU: {result['batch_cpu']['volumes_per_s_batch8']:.2f} volumes/s")
    if torch.cuda.is_available():
        result["cuda"] = bench_cuda(vol, runs)
        print("cuda", result["cuda"])
    ARGS.out.mkdir(parents=True, exist_ok=True)
    if not ARGS.quick or ARGS.figure:
        draw_figure(vol, HERE / "artifacts.png")
    main160 = result["sizes"][0]
    summary = {
        "speedup_full_vs_torchio": round(main160["speedup_full_vs_torchio"], 2),
        "speedup_no_motion_vs_torchio": round(main160["speedup_no_motion_vs_torchio"], 2),
        "fused_no_motion_ms": round(main160["fused_no_motion_ms"], 1),
        "fused_full_ms": round(main160["fused_full_ms"], 1),
        "fused_full_mean_ms": round(main160["fused_full_mean_ms"], 1),
        "fused_no_motion_mean_ms": round(main160["fused_no_motion_mean_ms"], 1),
        "speedup_full_vs_torchio_mean": round(main160["speedup_full_vs_torchio_mean"], 2),
        "fft_roundtrip_ms": round(main160["fft_roundtrip_ms"], 1),
        "fused_no_motion_over_roundtrip": round(main160["fused_no_motion_over_roundtrip"], 2),
        "torchio_compose_full_ms": round(main160["torchio_compose_full_ms"], 1),
        "torchio_compose_no_motion_ms": round(main160["torchio_compose_no_motion_ms"], 1),
        "volumes_per_s_batch8": round(result["batch_cpu"]["volumes_per_s_batch8"], 2),
        "threads": ARGS.threads,
        "shape": list(SIZE_160),
    }
    if len(result["sizes"]) > 1:
        mm1 = result["sizes"][1]
        summary["speedup_full_vs_torchio_1mm"] = round(mm1["speedup_full_vs_torchio"], 2)
        summary["speedup_no_motion_vs_torchio_1mm"] = round(mm1["speedup_no_motion_vs_torchio"], 2)
        summary["fused_no_motion_over_roundtrip_1mm"] = round(
            mm1["fused_no_motion_over_roundtrip"], 2
        )
    if "cuda" in result:
        summary["cuda_fused_full_ms"] = round(result["cuda"]["fused_full_ms"], 2)
        summary["cuda_volumes_per_s_batch8"] = round(result["cuda"]["volumes_per_s_batch8"], 1)
    summary["targets_met"] = {
        "full_ge_3x": summary["speedup_full_vs_torchio"] >= 3.0,
        "no_motion_ge_4x": summary["speedup_no_motion_vs_torchio"] >= 4.0,
        "no_motion_within_2_5x_roundtrip": summary["fused_no_motion_over_roundtrip"] <= 2.5,
    }
    result["summary"] = summary
    result["raw_ms"] = RAW
    result["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    name = "benchmark_quick" if ARGS.quick else "benchmark"
    if ARGS.tune_malloc:
        name += "_tuned_malloc"
    if ARGS.threads != 1:
        name += f"_{ARGS.threads}threads"
    (ARGS.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwall time {result['meta']['wall_s']} s; results in {ARGS.out / (name + '.json')}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
