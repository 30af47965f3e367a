"""The generalisation benchmark's cohort builder on a small synthetic ellipsoid "head" (no network).

Checks determinism, the truth.tsv format, that every artifact kind changes the scan, severity
monotonicity (noise, blur, missing_half), the storage orientation/dtype round trip and that GM
labels stay aligned with their images.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "generalisation"))

import cohorts  # noqa: E402
from artifacts import distance  # noqa: E402
from bids_io import reorient  # noqa: E402
from variation import prepare_template  # noqa: E402

TINY = cohorts.Counts(pool=3, pool_artifacts=1, test_clean=2, severities=(3,), per_cell=1)


def ellipsoid_head(shape=(30, 36, 32), spacing=4.0) -> tuple[np.ndarray, np.ndarray]:
    """A bright-shell ellipsoid with a darker core and a 'ventricle' (4 mm voxels), RAS."""
    idx = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((idx / np.array([0.7, 0.8, 0.75])[:, None, None, None]) ** 2).sum(0))
    data = np.where(r < 1.0, 600.0, 0.0) + np.where(r < 0.85, 300.0, 0.0)
    data -= np.where(np.sqrt((idx[:2] ** 2).sum(0) + (idx[2] * 2) ** 2) < 0.2, 700.0, 0.0)
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    return np.clip(data, 0, None).astype(np.float32), affine


@pytest.fixture(scope="module")
def template():
    torch.set_num_threads(1)
    return prepare_template(*ellipsoid_head(), coverage_cut_mm=10.0)


@pytest.fixture(scope="module")
def coarse(template, monkeypatch_module):
    return template


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    import variation

    mp.setattr(variation, "VOXELS", ((4.0, 4.0, 4.0), (4.0, 4.0, 5.0)))
    yield mp
    mp.undo()


def _read_truth(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_determinism_and_truth(tmp_path, coarse):
    for run in ("a", "b"):
        cohorts.build_cohort("real-toy", tmp_path / run, coarse, 3, TINY, {"source": "toy"})
    ta, tb = (tmp_path / r / "real-toy" / "truth.tsv" for r in "ab")
    assert ta.read_bytes() == tb.read_bytes()
    rows = _read_truth(ta)
    assert tuple(rows[0]) == cohorts.TRUTH_COLUMNS
    n_test = TINY.test_clean + len(cohorts.KINDS) * len(TINY.severities) * TINY.per_cell
    assert sum(r["split"] == "pool" for r in rows) == TINY.pool
    assert sum(r["split"] == "test" for r in rows) == n_test
    assert sum(r["split"] == "pool" and r["kind"] != "none" for r in rows) == 1
    assert {r["kind"] for r in rows if r["split"] == "test"} == {"none", *cohorts.KINDS}
    assert len({r["participant_id"] for r in rows}) == len(rows)
    for r in rows:
        assert (r["kind"] == "none") == (r["severity"] == "0")
        json.loads(r["params"])
        a, b = (tmp_path / x / "real-toy" / r["path"] for x in "ab")
        assert a.read_bytes() == b.read_bytes()
    root = tmp_path / "a" / "real-toy"
    parts = (root / "test" / "participants.tsv").read_text().split()
    assert parts[0] == "participant_id" and len(parts) == n_test + 1
    assert (root / "pool" / "dataset_description.json").is_file()
    assert json.loads((root / "cohort.json").read_text())["counts"]["pool"] == TINY.pool
    # the global torch RNG is untouched by the build
    torch.manual_seed(5)
    state = torch.get_rng_state()
    cohorts.make_scan(coarse, "ghosting", 2, np.random.SeedSequence([1]))
    assert torch.equal(torch.get_rng_state(), state)


def _scan(source, kind, sev, seed=11):
    return cohorts.make_scan(source, kind, sev, np.random.SeedSequence([seed]))


def test_every_kind_changes_the_scan(coarse):
    clean = _scan(coarse, "none", 0)
    for kind in cohorts.KINDS:
        art = _scan(coarse, kind, 2)
        assert art["params"]["subject"] == clean["params"]["subject"]
        same = art["image"].shape == clean["image"].shape
        assert not same or not np.allclose(art["image"], clean["image"]), kind


@pytest.mark.parametrize("kind", ["noise", "blur", "missing_half"])
def test_severity_monotonic(coarse, kind):
    clean = torch.from_numpy(_scan(coarse, "none", 0)["image"])
    dist = [distance(torch.from_numpy(_scan(coarse, kind, s)["image"]), clean) for s in (1, 2, 3)]
    assert dist[0] < dist[1] < dist[2], dist


def test_orientation_dtype_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 1000, size=(5, 6, 7)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 1.5, 1.0])
    affine[:3, 3] = [-3, 4, 5]
    for codes in ("RAS", "LAS", "LPS", "RPI"):
        for dtype in ("float32", "int16"):
            scan = {"image": arr, "gm": (arr > 500).astype(np.uint8), "affine": affine,
                    "params": {"storage": {"orientation": codes, "dtype": dtype}}}  # fmt: skip
            path, gm_path = tmp_path / f"{codes}{dtype}.nii.gz", tmp_path / f"{codes}gm.nii.gz"
            cohorts.store_scan(scan, path, gm_path)
            img = nib.load(path)
            assert nib.aff2axcodes(img.affine) == tuple(codes)
            assert img.get_data_dtype() == np.dtype(dtype)
            back = nib.as_closest_canonical(img)
            np.testing.assert_allclose(back.affine, affine, atol=1e-5)
            ref = np.rint(arr) if dtype == "int16" else arr
            np.testing.assert_allclose(np.asarray(back.dataobj), ref, atol=1e-3)
            gm = nib.as_closest_canonical(nib.load(gm_path))
            np.testing.assert_array_equal(np.asarray(gm.dataobj), scan["gm"])
    moved, aff = reorient(arr, affine, "LPS")
    assert moved.shape == arr.shape and not np.allclose(aff, affine)


def test_labels_follow_geometric_artifacts(coarse):
    """A GM-like label carried through the pipeline stays on the anatomy (synthetic stand-in)."""
    from variation import ScanState

    gm = (coarse.image > 0.8).to(torch.uint8)
    aff = coarse.affine
    for kind in ("rotation", "missing_half", "foldover"):
        state = ScanState(coarse.image.clone(), coarse.head > 0.5, gm.clone(), aff.copy())
        cohorts.object_artifact(kind, 3, state, np.random.default_rng(2), 4)
        assert state.gm.shape == state.image.shape
        bright = state.image > 0.8
        inter = (bright & (state.gm > 0)).sum().item()
        dice = 2 * inter / max(1, bright.sum().item() + (state.gm > 0).sum().item())
        assert dice > 0.6 if kind != "foldover" else state.gm.sum() <= gm.sum(), (kind, dice)
