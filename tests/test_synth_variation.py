"""``data.embedded.variation``: the default (``cohort``) data is unchanged, ``wide`` varies
contrast, anatomy, acquisition and coverage per subject with aligned labels."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from qcflow.data.synth import EmbeddedConfig, embedded_name, ensure_embedded, plan_scans
from qcflow.data.synth.scan import synthesize_scan
from qcflow.data.synth.variation import VARIATIONS
from qcflow.errors import ConfigError

#: a small default-variation build whose content was recorded before ``variation`` existed
RECORDED = {
    "spacing": 4.0,
    "n_subjects": 4,
    "n_test_clean": 1,
    "n_test_per_kind": 1,
    "artifact_fraction": 0.25,
    "n_cohorts": 4,
    "seed": 0,
    "progress": False,
}
RECORDED_NAME = "mni4mm_n4_s0_8019537a"
#: SHA-1 over (relative path, content) of every file but dataset_complete.json, sorted by path,
#: .nii.gz files decompressed (so the digest does not depend on the zlib build)
RECORDED_DIGEST = "1986c14913bf075c29ff9187a1add6871b2aea2d"
#: the default config's folder name before ``variation`` existed
DEFAULT_NAME = "mni2mm_n150_s0_e4767deb"


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "dataset_complete.json":
            data = p.read_bytes()
            if p.name.endswith(".gz"):
                data = gzip.decompress(data)
            h.update(p.relative_to(root).as_posix().encode())
            h.update(data)
    return h.hexdigest()


def _scans(variation: str, n: int = 16) -> list[tuple]:
    cfg = EmbeddedConfig(
        dir="unused", spacing=4.0, n_subjects=n, n_test_clean=0, n_test_per_kind=0,
        artifact_fraction=0.0, variation=variation,
    )  # fmt: skip
    return [(s, synthesize_scan(s, 4.0)) for s in plan_scans(cfg)["train"]]


@pytest.fixture(scope="module")
def cohort_scans() -> list[tuple]:
    return _scans("cohort")


@pytest.fixture(scope="module")
def wide_scans() -> list[tuple]:
    return _scans("wide")


def test_default_is_bit_identical(tmp_path: Path) -> None:
    """``variation: cohort`` (explicit or absent) builds what the code built before it."""
    assert embedded_name(EmbeddedConfig(dir="x")) == DEFAULT_NAME
    assert embedded_name(EmbeddedConfig(dir="x", variation="cohort")) == DEFAULT_NAME
    assert "variation" not in EmbeddedConfig(dir="x").params()
    root = ensure_embedded({**RECORDED, "dir": str(tmp_path), "variation": "cohort"})
    assert root.name == RECORDED_NAME
    assert _digest(root) == RECORDED_DIGEST


def test_wide_is_deterministic_and_hashed(tmp_path: Path) -> None:
    cfg = {**RECORDED, "n_subjects": 2, "artifact_fraction": 0.5, "variation": "wide"}
    a = ensure_embedded({**cfg, "dir": str(tmp_path / "a")})
    b = ensure_embedded({**cfg, "dir": str(tmp_path / "b")})
    assert (
        a.name
        == b.name
        != embedded_name(EmbeddedConfig.from_mapping({**cfg, "dir": "x", "variation": "cohort"}))
    )
    assert EmbeddedConfig.from_mapping({**cfg, "dir": "x"}).params()["variation"] == "wide"
    assert _digest(a) == _digest(b)
    rows = (a / "test_artifact" / "artifacts.tsv").read_text().splitlines()[1:]
    assert len(rows) == 10  # every artifact kind runs under wide
    assert all(json.loads(r.split("\t")[4])["subject"]["variation"] == "wide" for r in rows)


@pytest.mark.parametrize("bad", ["wild", "", 3, None, "Cohort"])
def test_invalid_variation(bad: object) -> None:
    with pytest.raises(ConfigError, match="data.embedded.variation") as err:
        EmbeddedConfig.from_mapping({"dir": "x", "variation": bad})
    assert "\n" not in str(err.value)
    assert VARIATIONS == ("cohort", "wide")


def test_wide_contrast_spans_its_ranges(wide_scans: list[tuple]) -> None:
    subj = [out["params"]["subject"] for _, out in wide_scans]
    gm = np.array([p["tissue_means"]["gm"] for p in subj])
    csf = np.array([p["tissue_means"]["csf"] for p in subj])
    # strictly inside the benchmark's held-out contrasts (gm 0.50 / 0.74, csf 0.15 / 0.38)
    assert gm.min() >= 0.55 and gm.max() <= 0.70 and np.ptp(gm) > 0.1
    assert csf.min() >= 0.18 and csf.max() <= 0.33 and np.ptp(csf) > 0.1
    assert all(p["tissue_means"]["wm"] == 1.0 for p in subj)
    # within a cohort the contrast varies too (cohort mode: ±3 % of the cohort's)
    by_cohort: dict[str, list[float]] = {}
    for (spec, _), g in zip(wide_scans, gm, strict=True):
        by_cohort.setdefault(spec.cohort.name, []).append(float(g))
    assert max(np.ptp(v) for v in by_cohort.values()) > 0.05
    for p in subj:
        assert 24.0 <= p["snr_db"] <= 36.0 and 1.1 <= p["bias_ratio"] <= 1.8
        assert 200.0 <= p["scale"] <= 4000.0 and 0.7 <= p["head_thickness"] <= 1.5
        assert 0.0 <= p["atrophy"] <= 0.25 and 0.8 <= p["other_tissue_factor"] <= 1.2
        assert sum(a > 1.5 for a in p["acq_mm"]) <= 1
        assert all(-15 <= r <= 15 for r in p["rotation_deg"])
        assert all(0.85 <= s <= 1.15 for s in p["scales"])
    assert len({p["scale"] for p in subj}) == len(subj)
    assert any(max(p["acq_mm"]) > 1.5 for p in subj)


def test_wide_varies_anatomy_and_coverage(
    cohort_scans: list[tuple], wide_scans: list[tuple]
) -> None:
    def cv(scans: list[tuple]) -> float:
        vol = np.array([out["brain"].sum() for _, out in scans], dtype=float)
        return float(vol.std() / vol.mean())

    assert cv(wide_scans) > 1.5 * cv(cohort_scans)
    cut = [(s, out) for s, out in wide_scans if out["params"]["subject"]["fov_cut"]]
    assert cut and len(cut) < len(wide_scans)
    for spec, out in cut:
        rec = out["params"]["subject"]["fov_cut"]
        full = round(spec.cohort.fov_mm[2] / 4.0) + 2 * round(spec.cohort.pad_mm[2] / 4.0)
        assert out["image"].shape[2] == full - rec["slices"] < full
        # the head reaches the cut edge: foreground in the last (top) or first (bottom) slice
        edge = out["image"][:, :, -1 if rec["side"] == "top" else 0]
        scale = out["params"]["subject"]["scale"]
        assert (edge > 0.3 * scale).mean() > 0.02
    for spec, out in cohort_scans:  # cohort mode: the cohort's full field of view
        assert "fov_cut" not in out["params"]["subject"]
        assert out["image"].shape[2] == round(spec.cohort.fov_mm[2] / 4) + 2 * round(
            spec.cohort.pad_mm[2] / 4
        )


def test_wide_labels_follow_the_image(wide_scans: list[tuple]) -> None:
    """The GM label lies where the image has the subject's GM intensity."""
    measured, drawn = [], []
    for _, out in wide_scans:
        p = out["params"]["subject"]
        means = p["tissue_means"]
        image = out["image"] / p["scale"]
        gm = out["gm"] > 0
        assert gm.shape == image.shape == out["brain"].shape == out["probseg"].shape
        assert gm.sum() > 100 and not (gm & (out["brain"] == 0)).any()
        in_gm = float(image[gm].mean())
        assert means["csf"] < in_gm < means["wm"]
        assert abs(in_gm - means["gm"]) < 0.06
        measured.append(in_gm)
        drawn.append(means["gm"])
    assert np.corrcoef(measured, drawn)[0, 1] > 0.8
