"""Building and caching the embedded dataset: the config, the plan of scans, the build.

:func:`ensure_embedded` returns the dataset's folder, building it on first use::

    <dir>/mni2mm_n150_s0_<hash8>/
      dataset_complete.json                 completion marker (+ config, counts, build time)
      cohorts.json                          the acquisition table used
      train/ test_clean/ test_artifact/     three BIDS datasets (qcflow.data.synth.bids)

Subject numbers continue across splits (``train`` 1..n, then ``test_clean``, then
``test_artifact``), so every ``participant_id`` is unique in the whole dataset. The folder name
hashes every generator parameter (:meth:`EmbeddedConfig.params`, with
:data:`GENERATOR_VERSION`; ``variation`` only when not ``cohort``). The build goes into a
temporary sibling folder renamed into place only when complete
(:func:`qcflow.utils.io.atomic_dir`) and ``dataset_complete.json`` is written last, so an
interrupted build is never trusted; a later call rebuilds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcflow.data.synth.acquisition import COHORTS
from qcflow.data.synth.artifacts import ARTIFACT_KINDS
from qcflow.data.synth.bids import write_scan, write_split_metadata
from qcflow.data.synth.scan import ScanSpec, synthesize_scan
from qcflow.data.synth.variation import VARIATIONS
from qcflow.errors import ConfigError
from qcflow.utils.io import atomic_dir, atomic_write_json

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "EmbeddedConfig",
    "embedded_name",
    "plan_scans",
    "build_embedded",
    "ensure_embedded",
]

log = logging.getLogger(__name__)

#: bump when the generated data changes for the same config (invalidates cached datasets)
GENERATOR_VERSION = "1"

#: the three BIDS datasets under the root, in build order
SPLITS: tuple[str, ...] = ("train", "test_clean", "test_artifact")


@dataclass(frozen=True)
class EmbeddedConfig:
    """Generator parameters (the ``data.embedded`` config block)."""

    dir: str
    spacing: float = 2.0
    n_subjects: int = 150
    n_test_clean: int = 40
    n_test_per_kind: int = 8
    artifact_fraction: float = 0.05
    n_cohorts: int = 4
    seed: int = 0
    variation: str = "cohort"
    progress: bool = True

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> EmbeddedConfig:
        """Build from a DictConfig or any mapping; validates every value (``ConfigError``)."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):  # resolve interpolations (paths from the environment)
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"data.embedded: expected a mapping, got {type(cfg).__name__}")
        cfg = dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ConfigError(f"data.embedded: unknown keys {unknown}; known: {sorted(names)}")
        if cfg.get("dir") in (None, ""):
            raise ConfigError("data.embedded.dir: must be set (the parent folder of the dataset)")
        out = cls(
            dir=str(cfg["dir"]),
            spacing=float(cfg.get("spacing", cls.spacing)),
            n_subjects=int(cfg.get("n_subjects", cls.n_subjects)),
            n_test_clean=int(cfg.get("n_test_clean", cls.n_test_clean)),
            n_test_per_kind=int(cfg.get("n_test_per_kind", cls.n_test_per_kind)),
            artifact_fraction=float(cfg.get("artifact_fraction", cls.artifact_fraction)),
            n_cohorts=int(cfg.get("n_cohorts", cls.n_cohorts)),
            seed=int(cfg.get("seed", cls.seed)),
            variation=cfg.get("variation", cls.variation),
            progress=bool(cfg.get("progress", cls.progress)),
        )
        out.validate()
        return out

    def validate(self) -> None:
        if not isinstance(self.variation, str) or self.variation not in VARIATIONS:
            raise ConfigError(
                f"data.embedded.variation: {self.variation!r} is not one of {list(VARIATIONS)}"
            )
        if not 0.5 <= self.spacing <= 8.0:
            raise ConfigError(f"data.embedded.spacing: {self.spacing} mm is outside [0.5, 8]")
        if self.n_subjects < 1:
            raise ConfigError(f"data.embedded.n_subjects: {self.n_subjects} must be >= 1")
        if self.n_test_clean < 0 or self.n_test_per_kind < 0:
            raise ConfigError("data.embedded: n_test_clean and n_test_per_kind must be >= 0")
        if not 0.0 <= self.artifact_fraction <= 1.0:
            raise ConfigError(
                f"data.embedded.artifact_fraction: {self.artifact_fraction} is not in [0, 1]"
            )
        if not 1 <= self.n_cohorts <= len(COHORTS):
            raise ConfigError(
                f"data.embedded.n_cohorts: {self.n_cohorts} is not in [1, {len(COHORTS)}]"
            )

    def params(self) -> dict[str, Any]:
        """Everything that determines the generated voxels (what the folder hash covers).

        ``variation`` is included only when it is not ``cohort``, so the default dataset keeps
        the folder (and hash) it had before the setting existed.
        """
        out = {
            "generator_version": GENERATOR_VERSION,
            "spacing": self.spacing,
            "n_subjects": self.n_subjects,
            "n_test_clean": self.n_test_clean,
            "n_test_per_kind": self.n_test_per_kind,
            "artifact_fraction": self.artifact_fraction,
            "n_cohorts": self.n_cohorts,
            "seed": self.seed,
        }
        if self.variation != "cohort":
            out["variation"] = self.variation
        return out


def embedded_name(cfg: EmbeddedConfig) -> str:
    """Folder name: spacing, train size, seed and a hash of every generator parameter."""
    digest = hashlib.sha256(json.dumps(cfg.params(), sort_keys=True).encode()).hexdigest()[:8]
    spacing = f"{cfg.spacing:g}".replace(".", "p")
    return f"mni{spacing}mm_n{cfg.n_subjects}_s{cfg.seed}_{digest}"


def plan_scans(cfg: EmbeddedConfig) -> dict[str, list[ScanSpec]]:
    """Which scans each split holds: ids, cohorts (round robin), artifacts, seeds."""
    cohorts, v = COHORTS[: cfg.n_cohorts], cfg.variation
    n_art = cfg.n_test_per_kind * len(ARTIFACT_KINDS)
    total = cfg.n_subjects + cfg.n_test_clean + n_art
    width = max(3, len(str(total)))
    plan: dict[str, list[ScanSpec]] = {s: [] for s in SPLITS}
    number = 0

    def pid() -> str:
        nonlocal number
        number += 1
        return f"sub-{number:0{width}d}"

    # corrupted train subjects: a seeded draw of round(fraction * n), kinds cycled in a
    # seeded order, severities drawn
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 9000]))
    n_bad = int(round(cfg.artifact_fraction * cfg.n_subjects))
    bad = rng.choice(cfg.n_subjects, size=n_bad, replace=False) if n_bad else []
    kinds = [ARTIFACT_KINDS[i] for i in rng.permutation(len(ARTIFACT_KINDS))]
    corrupt = {
        int(b): (kinds[r % len(kinds)], int(rng.integers(1, 4))) for r, b in enumerate(sorted(bad))
    }
    for i in range(cfg.n_subjects):
        kind, sev = corrupt.get(i, ("none", 0))
        plan["train"].append(
            ScanSpec(pid(), "train", i, cohorts[i % len(cohorts)], kind, sev, (cfg.seed, 0, i), v)
        )
    for i in range(cfg.n_test_clean):
        plan["test_clean"].append(
            ScanSpec(
                pid(),
                "test_clean",
                i,
                cohorts[i % len(cohorts)],
                entropy=(cfg.seed, 1, i),
                variation=v,
            )  # fmt: skip
        )
    i = 0
    for kind in ARTIFACT_KINDS:
        for j in range(cfg.n_test_per_kind):
            cohort = cohorts[i % len(cohorts)]
            spec = ScanSpec(pid(), "test_artifact", i, cohort, kind, 1 + j % 3, (cfg.seed, 2, i), v)
            plan["test_artifact"].append(spec)
            i += 1
    return plan


def build_embedded(cfg: EmbeddedConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every split into ``out_dir`` (no atomicity here; see :func:`ensure_embedded`).

    Returns:
        counts per split and the number of corrupted train scans.
    """
    plan = plan_scans(cfg)
    total = sum(len(v) for v in plan.values())
    bar = None
    if cfg.progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="embedded dataset", unit="scan", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    counts: dict[str, Any] = {}
    # one writer thread overlaps gzip (which releases the GIL) with the next scan's synthesis;
    # at most two scans wait in memory, and a writer error surfaces at the next submit
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-writer") as writer:
        pending: list[Future] = []
        for split in SPLITS:
            counts[split] = _build_split(
                cfg, out_dir / split, split, plan[split], writer, pending, bar
            )
        for fut in pending:
            fut.result()
    if bar is not None:
        bar.close()
    counts["train_corrupted"] = sum(s.kind != "none" for s in plan["train"])
    atomic_write_json(
        out_dir / "cohorts.json",
        [dataclasses.asdict(c) for c in COHORTS[: cfg.n_cohorts]],
    )
    return counts


def _build_split(
    cfg: EmbeddedConfig,
    split_root: Path,
    split: str,
    specs: list[ScanSpec],
    writer: ThreadPoolExecutor,
    pending: list[Future],
    bar: Any,
) -> int:
    split_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        out = synthesize_scan(spec, cfg.spacing)
        while len(pending) >= 2:
            pending.pop(0).result()
        pending.append(writer.submit(write_scan, split_root, spec, out))
        rows.append(
            {
                "participant_id": spec.participant_id,
                "cohort": spec.cohort.name,
                "kind": spec.kind,
                "severity": spec.severity,
                "severity_value": f"{out['value']:.6g}",
                "params": json.dumps(out["params"], sort_keys=True, separators=(",", ":")),
            }
        )
        if bar is not None:
            bar.update(1)
    write_split_metadata(split_root, split, rows)
    return len(rows)


_MARKER = "dataset_complete.json"


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Global torch / NumPy / Python random states as they were before the block.

    The build draws through TorchIO (global torch RNG) and seeds what it needs itself; without
    this, a run that builds the dataset on first use would start its model initialisation and
    data order from another random state than a run that finds the dataset built.
    """
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def ensure_embedded(
    cfg: Mapping[str, Any] | Any, return_info: bool = False
) -> Path | tuple[Path, dict[str, Any]]:
    """Return the embedded dataset's root, building it on first use.

    Args:
        cfg: the ``data.embedded`` block (DictConfig or mapping): ``dir``, ``spacing``,
            ``n_subjects``, ``n_test_clean``, ``n_test_per_kind``, ``artifact_fraction``,
            ``n_cohorts``, ``seed``, ``variation`` (``cohort`` | ``wide``,
            :mod:`qcflow.data.synth.variation`) and optional ``progress``.
        return_info: also return a JSON-serialisable dict (name, counts, build seconds,
            ``reused``).

    Returns:
        ``<dir>/<name>`` (and the info dict). A folder holding ``dataset_complete.json`` is
        reused as is; anything else is rebuilt into a temporary sibling and renamed into place.
    """
    ecfg = cfg if isinstance(cfg, EmbeddedConfig) else EmbeddedConfig.from_mapping(cfg)
    name = embedded_name(ecfg)
    root = Path(ecfg.dir).expanduser() / name
    t0 = time.perf_counter()
    marker = root / _MARKER
    reused = marker.is_file()
    if not reused:
        if root.exists():  # a folder without the marker was not produced by a finished build
            log.warning("%s: no %s, rebuilding", root, _MARKER)
            stale = root.with_name(f".{name}.stale-{os.getpid()}-{time.time_ns()}")
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building embedded dataset %s (first use)", root)
        with atomic_dir(root) as tmp, _isolated_rng():
            counts = build_embedded(ecfg, tmp)
            seconds = time.perf_counter() - t0
            atomic_write_json(
                tmp / _MARKER,
                {
                    "name": name,
                    "params": ecfg.params(),
                    "counts": counts,
                    "build_seconds": round(seconds, 3),
                    "torch_threads": torch.get_num_threads(),
                    "artifact_kinds": list(ARTIFACT_KINDS),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        log.info("embedded dataset built in %.1f s: %s", seconds, root)
    meta = json.loads(marker.read_text())
    info = {
        "name": name,
        "reused": reused,
        "build_seconds": meta.get("build_seconds"),
        "elapsed_seconds": round(time.perf_counter() - t0, 3),
        "counts": meta.get("counts"),
        "params": meta.get("params"),
    }
    return (root, info) if return_info else root
