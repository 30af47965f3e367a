"""Shared test set-up: single-threaded torch, no W&B, every output under a temp QCFLOW_HOME."""

from __future__ import annotations

import os
from pathlib import Path

# before torch is imported anywhere: 2 threads are 15-100x slower under load (docs/pitfalls.md)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def qcflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All qcflow paths (data, runs, cache) live in one temp folder for the whole session."""
    home = tmp_path_factory.mktemp("qcflow_home")
    os.environ["QCFLOW_HOME"] = str(home)
    for var in ("QCFLOW_DATA_DIR", "QCFLOW_RUNS_DIR", "QCFLOW_CACHE_DIR"):
        os.environ.pop(var, None)
    return home


#: a small embedded dataset config shared by tests (4 mm voxels keep it fast)
SMALL_EMBEDDED = {
    "spacing": 4.0,
    "n_subjects": 8,
    "n_test_clean": 2,
    "n_test_per_kind": 1,
    "artifact_fraction": 0.25,
    "n_cohorts": 4,
    "seed": 0,
}


@pytest.fixture(scope="session")
def small_embedded(qcflow_home: Path) -> Path:
    """Root of a small embedded dataset (train/, test_clean/, test_artifact/), built once."""
    from qcflow.data.synth import ensure_embedded

    cfg = OmegaConf.create({"dir": str(qcflow_home / "data" / "embedded"), **SMALL_EMBEDDED})
    return ensure_embedded(cfg)


@pytest.fixture()
def data_cfg(small_embedded: Path, tmp_path: Path):
    """The real ``data`` config at 4 mm, pointed at the small embedded train split."""
    from tests.helpers import compose_cfg

    cfg = compose_cfg(
        [
            f"data.root={small_embedded / 'train'}",
            "data.spacing=4",
            "data.batch_size=4",
            "data.slice_size=64",
            "data.n_central_slices=5",
            "data.patch_size=[16,16,16]",
            "data.samples_per_volume=2",
            "data.queue_length=8",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.val_fraction=0.25",
        ],
        tmp_path,
    )
    return cfg.data
