"""The embedded synthetic dataset: layout, labels, cohorts, artifacts, determinism, atomicity."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qcflow.data import synth
from qcflow.data.synth import (
    ARTIFACT_KINDS,
    COHORTS,
    SEVERITY_RANGES,
    SPLITS,
    EmbeddedConfig,
    acquisition,
    artifacts,
    build,
    embedded_name,
    ensure_embedded,
)
from qcflow.errors import ConfigError

from .conftest import SMALL_EMBEDDED

#: a very small config for tests that build several datasets (4 mm, 13 scans)
TINY = {
    "spacing": 4.0,
    "n_subjects": 2,
    "n_test_clean": 1,
    "n_test_per_kind": 1,
    "artifact_fraction": 0.5,
    "n_cohorts": 4,
    "seed": 0,
    "progress": False,
}

LABEL_SUFFIXES = ("_label-GM_mask.nii.gz", "_label-GM_probseg.nii.gz", "_desc-brain_mask.nii.gz")


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def t1_path(split_root: Path, pid: str) -> Path:
    return split_root / pid / "anat" / f"{pid}_T1w.nii.gz"


def label_path(split_root: Path, pid: str, suffix: str) -> Path:
    return split_root / "derivatives" / "labels" / pid / "anat" / f"{pid}{suffix}"


def canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(), dtype=np.float64)


def all_arrays(root: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(root)): np.asarray(nib.load(p).dataobj)
        for p in sorted(root.rglob("*.nii.gz"))
    }


# ----------------------------------------------------------------------------- layout


def test_layout_and_naming(small_embedded: Path) -> None:
    root = small_embedded
    assert (root / "dataset_complete.json").is_file()
    assert re.fullmatch(r"mni4mm_n8_s0_[0-9a-f]{8}", root.name)
    seen: set[str] = set()
    for split in SPLITS:
        sroot = root / split
        for f in ("dataset_description.json", "participants.tsv", "artifacts.tsv"):
            assert (sroot / f).is_file(), f"{split}/{f}"
        desc = json.loads((sroot / "dataset_description.json").read_text())
        assert desc["DatasetType"] == "raw" and "BIDSVersion" in desc
        deriv = json.loads((sroot / "derivatives/labels/dataset_description.json").read_text())
        assert deriv["DatasetType"] == "derivative"
        rows = read_tsv(sroot / "participants.tsv")
        assert rows and list(rows[0]) == ["participant_id", "cohort"]
        expected = set()
        for row in rows:
            pid = row["participant_id"]
            assert re.fullmatch(r"sub-[0-9A-Za-z]+", pid), pid
            assert pid not in seen, f"{pid} appears in two splits"
            seen.add(pid)
            expected.add(t1_path(sroot, pid))
            expected.update(label_path(sroot, pid, s) for s in LABEL_SUFFIXES)
        assert set(sroot.rglob("*.nii.gz")) == expected
        # label types: binary uint8 masks, float32 probability
        pid = rows[0]["participant_id"]
        gm = nib.load(label_path(sroot, pid, LABEL_SUFFIXES[0]))
        prob = nib.load(label_path(sroot, pid, LABEL_SUFFIXES[1]))
        brain = nib.load(label_path(sroot, pid, LABEL_SUFFIXES[2]))
        assert gm.get_data_dtype() == np.uint8 and brain.get_data_dtype() == np.uint8
        assert prob.get_data_dtype() == np.float32
        assert set(np.unique(np.asarray(gm.dataobj))) <= {0, 1}
        p = np.asarray(prob.dataobj)
        assert p.min() >= 0.0 and p.max() <= 1.0
        t1 = nib.load(t1_path(sroot, pid))
        assert t1.header["qform_code"] > 0 and t1.header["sform_code"] > 0
        for img in (gm, prob, brain):
            assert img.shape == t1.shape and np.allclose(img.affine, t1.affine)
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp folders left"


def test_participants_have_four_cohorts(small_embedded: Path) -> None:
    rows = read_tsv(small_embedded / "train" / "participants.tsv")
    assert len(rows) == SMALL_EMBEDDED["n_subjects"]
    assert len({r["cohort"] for r in rows}) >= 4
    assert {r["cohort"] for r in rows} <= {c.name for c in COHORTS}
    for split in ("test_clean", "test_artifact"):  # test sets use the same cohorts
        cohorts = {r["cohort"] for r in read_tsv(small_embedded / split / "participants.tsv")}
        assert cohorts <= {r["cohort"] for r in rows}


def test_artifacts_tsv(small_embedded: Path) -> None:
    for split in SPLITS:
        sroot = small_embedded / split
        arts = read_tsv(sroot / "artifacts.tsv")
        parts = read_tsv(sroot / "participants.tsv")
        assert [a["participant_id"] for a in arts] == [p["participant_id"] for p in parts]
        assert list(arts[0]) == ["participant_id", "kind", "severity", "severity_value", "params"]
        for a in arts:
            params = json.loads(a["params"])
            assert "subject" in params
            sev = int(a["severity"])
            value = float(a["severity_value"])
            if a["kind"] == "none":
                assert sev == 0 and "artifact" not in params
            else:
                assert a["kind"] in ARTIFACT_KINDS and sev in (1, 2, 3)
                lo, hi = SEVERITY_RANGES[a["kind"]][sev]
                assert lo <= abs(value) <= hi
                assert "artifact" in params
    train = read_tsv(small_embedded / "train" / "artifacts.tsv")
    n_bad = round(SMALL_EMBEDDED["artifact_fraction"] * SMALL_EMBEDDED["n_subjects"])
    assert sum(a["kind"] != "none" for a in train) == n_bad
    assert all(a["kind"] == "none" for a in read_tsv(small_embedded / "test_clean/artifacts.tsv"))
    test = read_tsv(small_embedded / "test_artifact" / "artifacts.tsv")
    assert len(test) == SMALL_EMBEDDED["n_test_per_kind"] * len(ARTIFACT_KINDS)
    assert {a["kind"] for a in test} == set(ARTIFACT_KINDS)


# ----------------------------------------------------------------------------- content


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def test_labels_aligned_and_t1_ordering(small_embedded: Path) -> None:
    checked = 0
    for split in SPLITS:
        sroot = small_embedded / split
        for a in read_tsv(sroot / "artifacts.tsv"):
            pid, kind = a["participant_id"], a["kind"]
            if kind not in ("none", "t2_contrast"):
                continue
            img = canonical(t1_path(sroot, pid))
            gm = canonical(label_path(sroot, pid, LABEL_SUFFIXES[0])) > 0.5
            prob = canonical(label_path(sroot, pid, LABEL_SUFFIXES[1]))
            brain = canonical(label_path(sroot, pid, LABEL_SUFFIXES[2])) > 0.5
            assert dice(gm, prob > 0.5) >= 0.9
            assert gm.sum() > 100 and (gm & ~brain).sum() <= 0.05 * gm.sum()
            # mostly WM (plus a little CSF): brain voxels with hardly any GM
            wmish = brain & (prob < 0.05)
            gm_mean, wm_mean = np.median(img[gm]), np.median(img[wmish])
            if kind == "none":
                assert wm_mean > 1.1 * gm_mean, (pid, wm_mean, gm_mean)
            else:  # T2-like: CSF > GM > WM
                assert gm_mean > 1.02 * wm_mean, (pid, wm_mean, gm_mean)
            checked += 1
    assert checked >= SMALL_EMBEDDED["n_subjects"] // 2


def test_file_matches_generator_in_ras(small_embedded: Path) -> None:
    """A non-RAS cohort's file, canonicalised, is the generator's RAS array and affine."""
    cfg = EmbeddedConfig(dir=str(small_embedded.parent), **SMALL_EMBEDDED)
    specs = [s for s in synth.plan_scans(cfg)["train"] if s.cohort.orientation not in ("RAS",)]
    assert {s.cohort.orientation for s in specs} >= {"LPS", "PIL"}
    for spec in specs[:2]:
        out = synth.synthesize_scan(spec, cfg.spacing)
        sroot = small_embedded / "train"
        img = nib.as_closest_canonical(nib.load(label_path(sroot, spec.participant_id,
                                                            LABEL_SUFFIXES[1])))  # fmt: skip
        assert nib.aff2axcodes(nib.load(t1_path(sroot, spec.participant_id)).affine) == tuple(
            spec.cohort.orientation
        )
        np.testing.assert_allclose(img.affine, out["affine"], atol=1e-4)
        np.testing.assert_allclose(img.get_fdata(), out["probseg"], atol=1e-3)
        gm = nib.as_closest_canonical(
            nib.load(label_path(sroot, spec.participant_id, LABEL_SUFFIXES[0]))
        )
        np.testing.assert_array_equal(np.asarray(gm.dataobj), out["gm"])


def test_cohorts_differ(small_embedded: Path) -> None:
    sroot = small_embedded / "train"
    rows = read_tsv(sroot / "artifacts.tsv")
    cohort_of = {r["participant_id"]: r["cohort"] for r in read_tsv(sroot / "participants.tsv")}
    seen: dict[str, dict] = {}
    for r in rows:
        if r["kind"] != "none" or cohort_of[r["participant_id"]] in seen:
            continue
        img = nib.load(t1_path(sroot, r["participant_id"]))
        data = np.asarray(img.get_fdata())
        brain = canonical(label_path(sroot, r["participant_id"], LABEL_SUFFIXES[2])) > 0.5
        can = canonical(t1_path(sroot, r["participant_id"]))
        level = float(np.median(can[brain]))
        # background: the outer shell of the canonical grid without exact zeros (padding)
        shell = np.concatenate([can[:2].ravel(), can[-2:].ravel()])
        shell = shell[shell != 0]
        seen[cohort_of[r["participant_id"]]] = {
            "shape": img.shape,
            "axcodes": nib.aff2axcodes(img.affine),
            "dtype": str(img.get_data_dtype()),
            "level": level,
            "noise": float(np.mean(shell)) / level if shell.size else 0.0,
            "zeros": float(np.mean(data == 0)),
        }
    assert len(seen) >= 3
    vals = list(seen.values())
    assert len({v["shape"] for v in vals}) >= 3
    assert len({v["axcodes"] for v in vals}) >= 3
    assert len({v["dtype"] for v in vals}) >= 2
    levels = sorted(v["level"] for v in vals)
    assert levels[-1] > 3 * levels[0]  # scanner scales differ
    assert any(v["zeros"] > 0.1 for v in vals)  # a zero-padded cohort
    assert len({round(v["noise"], 3) for v in vals}) >= 3


# ----------------------------------------------------------------------------- build logic


def test_determinism(tmp_path: Path) -> None:
    a = ensure_embedded({**TINY, "dir": str(tmp_path / "a")})
    b = ensure_embedded({**TINY, "dir": str(tmp_path / "b")})
    c = ensure_embedded({**TINY, "dir": str(tmp_path / "c"), "seed": 1})
    assert a.name == b.name != c.name
    arr_a, arr_b, arr_c = all_arrays(a), all_arrays(b), all_arrays(c)
    assert arr_a.keys() == arr_b.keys() and len(arr_a) == 4 * 13
    for key in arr_a:
        np.testing.assert_array_equal(arr_a[key], arr_b[key], err_msg=key)
    for split in SPLITS:
        assert (a / split / "artifacts.tsv").read_text() == (
            b / split / "artifacts.tsv"
        ).read_text()
    key = "train/sub-001/anat/sub-001_T1w.nii.gz"
    assert arr_a[key].shape != arr_c[key].shape or not np.array_equal(arr_a[key], arr_c[key])


def test_interrupted_build_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {**TINY, "dir": str(tmp_path)}
    calls = {"n": 0}
    real = build.write_scan

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "write_scan", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_embedded(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing trusted, temp folder removed
    # a crash that leaves a half-written folder under the final name (no marker): rebuilt
    name = embedded_name(EmbeddedConfig.from_mapping(cfg))
    (tmp_path / name / "train").mkdir(parents=True)
    monkeypatch.setattr(build, "write_scan", real)
    root, info = ensure_embedded(cfg, return_info=True)
    assert root.name == name and not info["reused"]
    assert (root / "dataset_complete.json").is_file()
    assert len(list(root.rglob("*_T1w.nii.gz"))) == 13


def test_reuse_does_not_rebuild(small_embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(build, "build_embedded", boom)
    cfg = OmegaConf.create({"dir": str(small_embedded.parent), **SMALL_EMBEDDED})
    t0 = time.perf_counter()
    root, info = ensure_embedded(cfg, return_info=True)
    assert time.perf_counter() - t0 < 1.0
    assert root == small_embedded and info["reused"] is True
    assert info["counts"]["train"] == SMALL_EMBEDDED["n_subjects"]
    assert info["build_seconds"] > 0
    json.dumps(info)  # serialisable


def test_spacing_2mm(tmp_path: Path) -> None:
    cfg = {**TINY, "dir": str(tmp_path), "spacing": 2.0, "n_subjects": 1, "n_test_clean": 0,
           "n_test_per_kind": 0, "n_cohorts": 1}  # fmt: skip
    root = ensure_embedded(cfg)
    assert root.name.startswith("mni2mm_n1_s0_")
    img = nib.load(t1_path(root / "train", "sub-001"))
    assert np.allclose(img.header.get_zooms()[:3], 2.0)
    assert img.shape == tuple(int(round(f / 2.0)) for f in COHORTS[0].fov_mm)


def test_config_validation_and_naming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {**TINY, "dir": str(tmp_path)}
    for bad in ({"n_cohorts": len(COHORTS) + 1}, {"spacing": 0.0}, {"artifact_fraction": 1.5},
                {"n_subjects": 0}, {"colour": "red"}, {"dir": None}):  # fmt: skip
        with pytest.raises(ConfigError):
            EmbeddedConfig.from_mapping({**base, **bad})
    # DictConfig with interpolations is resolved
    dc = OmegaConf.create({"root": str(tmp_path), "e": {**TINY, "dir": "${root}/x"}})
    assert EmbeddedConfig.from_mapping(dc.e).dir == str(tmp_path / "x")
    cfg = EmbeddedConfig.from_mapping(base)
    name = embedded_name(cfg)
    assert name.startswith("mni4mm_n2_s0_")
    assert embedded_name(EmbeddedConfig.from_mapping({**base, "artifact_fraction": 0.1})) != name
    assert embedded_name(EmbeddedConfig.from_mapping({**base, "spacing": 1.5})).startswith(
        "mni1p5mm_"
    )
    assert embedded_name(EmbeddedConfig.from_mapping({**base, "progress": True})) == name
    monkeypatch.setattr(build, "GENERATOR_VERSION", "test")
    assert embedded_name(cfg) != name


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("kind", ARTIFACT_KINDS)
def test_sample_artifact(kind: str) -> None:
    for sev in (1, 2, 3):
        p1 = synth.sample_artifact(kind, sev, np.random.default_rng(5), COHORTS[0])
        p2 = synth.sample_artifact(kind, sev, np.random.default_rng(5), COHORTS[0])
        assert p1 == p2
        lo, hi = SEVERITY_RANGES[kind][sev]
        assert lo <= abs(p1["value"]) <= hi
        json.dumps(p1)
    # severity ranges increase in badness and do not overlap
    r = SEVERITY_RANGES[kind]
    assert r[1][1] < r[2][0] <= r[2][1] < r[3][0] or r[1][0] > r[2][1] >= r[2][0] > r[3][1]
    with pytest.raises(ValueError):
        synth.sample_artifact(kind, 4, np.random.default_rng(0), COHORTS[0])


def test_kinds_derive_from_kspace() -> None:
    """Every kind trained on is in the test set; the rest are the never-simulated ones (the
    opt-in kinds, ghosting and anisotropy, are off in every shipped config: never trained on)."""
    from qcflow.kspace import KINDS, OPT_IN_KINDS

    assert set(KINDS) - set(OPT_IN_KINDS) <= set(ARTIFACT_KINDS)
    assert synth.UNSIMULATED_KINDS == ("ghosting", "missing_side", "misregistration", "t2_contrast")
    assert set(SEVERITY_RANGES) == set(ARTIFACT_KINDS) == set(artifacts._DRAWS)


def test_kspace_acquire_noise_and_identity() -> None:
    rng = np.random.default_rng(0)
    img = torch.rand(16, 20, 24) + 0.5
    same = acquisition.kspace_acquire(img, (1.0, 1.0, 1.0), 0.0, rng)
    torch.testing.assert_close(same, img, atol=1e-5, rtol=1e-5)
    noise = acquisition.kspace_acquire(torch.zeros(32, 32, 32), (1.0, 1.0, 1.0), 2.0, rng)
    assert noise.mean().item() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.03)  # Rayleigh
    # truncation keeps the image-domain noise level
    low = acquisition.kspace_acquire(torch.zeros(32, 32, 32), (1.0, 1.0, 0.5), 2.0, rng)
    assert low.mean().item() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.05)


def test_fold_conserves_signal() -> None:
    x = torch.rand(10, 30, 6)
    out = artifacts.fold(x, 1, 5, 20)
    assert out.shape == (10, 20, 6)
    torch.testing.assert_close(out.sum(), x.sum())
    torch.testing.assert_close(out[:, :, :], x[:, 5:25] + torch.cat(
        [x[:, 25:30], torch.zeros(10, 10, 6), x[:, 0:5]], dim=1))  # fmt: skip


def test_building_the_dataset_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """A run that builds the embedded data on first use starts from the same random state as
    one that finds it built (the build draws through TorchIO's global RNG)."""
    import random

    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from qcflow.data.synth import ensure_embedded
    from tests.conftest import SMALL_EMBEDDED

    cfg = OmegaConf.create({**SMALL_EMBEDDED, "dir": str(tmp_path / "e"), "n_subjects": 4})
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ensure_embedded(cfg)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all()
    assert got[2] == expected[2]
