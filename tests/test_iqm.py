"""Classical IQMs: analytic cases and sanity on a noisy phantom."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcflow.qc import iqm


def _phantom(noise: float, seed: int = 0, air_noise: float = 0.0):
    """Nested spheres: WM (1.0) inside GM (0.6) inside CSF (0.2), in air (0), plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:48, :48, :48] - 23.5
    r = np.sqrt(x**2 + y**2 + z**2)
    img = np.zeros((48, 48, 48))
    img[r < 20] = 0.2
    img[r < 15] = 0.6
    img[r < 9] = 1.0
    truth = {"csf": (r < 20) & (r >= 15), "gm": (r < 15) & (r >= 9), "wm": r < 9}
    img = img + rng.normal(0, noise, img.shape) * (r < 20)
    img[r >= 20] = np.abs(rng.normal(0, air_noise, img.shape))[r >= 20] if air_noise else 0
    return img, truth


def test_snr_cnr_cjv_analytic_with_true_masks() -> None:
    img, truth = _phantom(noise=0.05, air_noise=0.02)
    head = np.zeros_like(img, bool)
    head[truth["csf"] | truth["gm"] | truth["wm"]] = True
    masks = {**truth, "head": head, "air": ~head}
    # SNR: mean of mu/sigma over tissues; sigma = 0.05 -> (0.2 + 0.6 + 1.0) / 3 / 0.05 = 12
    assert iqm.snr(img, masks) == pytest.approx(12.0, rel=0.05)
    sd_air = img[~head].std()
    expected_cnr = 0.4 / math.sqrt(sd_air**2 + 0.05**2 + 0.05**2)
    assert iqm.cnr(img, masks) == pytest.approx(expected_cnr, rel=0.05)
    assert iqm.cjv(img, masks) == pytest.approx(0.1 / 0.4, rel=0.05)


def test_efc_extremes() -> None:
    assert iqm.efc(np.ones((8, 8, 8))) == pytest.approx(1.0)
    one = np.zeros((8, 8, 8))
    one[3, 3, 3] = 5.0
    assert iqm.efc(one) == pytest.approx(0.0, abs=1e-9)


def test_fber_ratio() -> None:
    img = np.full((20, 20, 20), 0.1)
    head = np.zeros_like(img, bool)
    head[5:15, 5:15, 5:15] = True
    img[head] = 1.0
    assert iqm.fber(img, {"head": head, "air": ~head}) == pytest.approx(100.0)
    assert iqm.fber(np.where(head, 1.0, 0.0), {"head": head, "air": np.zeros_like(head)}) == (
        float("inf")
    )


def test_own_masks_recover_tissues() -> None:
    img, truth = _phantom(noise=0.03, air_noise=0.01)
    masks = iqm.tissue_masks(torch.as_tensor(img, dtype=torch.float32)[None])
    for t in ("gm", "wm"):
        inter = (masks[t] & truth[t]).sum()
        dice = 2 * inter / (masks[t].sum() + truth[t].sum())
        assert dice > 0.85, (t, dice)
    assert masks["head"][24, 24, 24] and not masks["head"][0, 0, 0]
    assert not (masks["air"] & masks["head"]).any()


def test_noise_lowers_snr_and_cnr_raises_cjv() -> None:
    clean, _ = _phantom(noise=0.02, air_noise=0.01)
    noisy, _ = _phantom(noise=0.1, air_noise=0.05)
    a, b = iqm.compute_iqms(clean), iqm.compute_iqms(noisy)
    assert set(a) == set(iqm.IQM_NAMES)
    assert b["snr"] < a["snr"] and b["cnr"] < a["cnr"] and b["cjv"] > a["cjv"]
    assert all(np.isfinite(v) for v in a.values())
