"""Severity curriculum of the contrastive negatives: range interpolation, floor, schedule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qcflow.data.contrastive import NegativeBank
from qcflow.kspace import RandomArtifacts
from qcflow.kspace.sampler import interpolate_ranges
from qcflow.lit.curriculum import SeverityCurriculum
from qcflow.tasks.encoder_contrastive import curriculum_callbacks
from tests.helpers import compose_cfg

MILD = {
    "spike": {"intensity": [0.1, 3.0]},
    "noise": {"snr_db": [5.0, 20.0]},
    "motion": {"degrees": [-6.0, 6.0]},
}
FLOOR = {"noise": {"snr_db": 20.0}, "motion": {"degrees": 3.0}}


def _paper() -> RandomArtifacts:
    return RandomArtifacts(rate=1.0, spike=True, noise=True, motion=True, bias=True)


def test_interpolation_is_linear_and_t0_is_the_configured_ranges() -> None:
    start = _paper().ranges
    assert interpolate_ranges(start, MILD, 0.0, FLOOR) == start  # unchanged at t = 0
    half = interpolate_ranges(start, MILD, 0.5, FLOOR)
    assert half["spike"].intensity == pytest.approx((0.55, 6.5))  # (1, 10) -> (0.1, 3)
    assert half["noise"].snr_db == pytest.approx((-2.5, 25.0))  # (-10, 30) -> (5, 20)
    assert half["motion"].degrees == pytest.approx((-8.0, 8.0))  # (-10, 10) -> (-6, 6)
    assert half["motion"].translation == start["motion"].translation  # not named: kept
    assert half["bias"] == start["bias"] and half["blur"] is None  # other kinds untouched
    end = interpolate_ranges(start, MILD, 1.0, FLOOR)
    assert end["spike"].intensity == (0.1, 3.0) and end["noise"].snr_db == (5.0, 20.0)
    assert end["spike"].num_spikes == start["spike"].num_spikes  # counts are not strengths
    assert start["spike"].intensity == (1.0, 10.0)  # the input is not modified


def test_no_bound_gets_milder_than_the_floor() -> None:
    start = _paper().ranges
    # a mild end beyond the floor is clamped to it (SNR above 20 dB, a 1-degree motion)
    mild = {"noise": {"snr_db": [15.0, 35.0]}, "motion": {"degrees": [-1.0, 1.0]}}
    for t in torch.linspace(0, 1, 11).tolist():
        r = interpolate_ranges(start, mild, t, FLOOR)
        if t > 0:  # the paper's 30 dB upper bound (beyond the floor) moves to the floor
            assert r["noise"].snr_db[1] <= 30.0 - 10.0 * t + 1e-9
        assert r["noise"].snr_db[0] <= 20.0
        assert r["motion"].degrees[0] <= -3.0 and r["motion"].degrees[1] >= 3.0
    end = interpolate_ranges(start, mild, 1.0, FLOOR)
    assert end["noise"].snr_db == (15.0, 20.0) and end["motion"].degrees == (-3.0, 3.0)
    # a lower-is-milder field: the spike magnitude never goes under its floor
    low = interpolate_ranges(start, {"spike": {"intensity": [0.0, 0.5]}}, 1.0,
                             {"spike": {"intensity": 0.2}})  # fmt: skip
    assert low["spike"].intensity == (0.2, 0.5)


def test_interpolation_rejects_bad_fields_and_t() -> None:
    start = _paper().ranges
    with pytest.raises(ValueError, match="strength range"):
        interpolate_ranges(start, {"spike": {"num_spikes": [1, 1]}}, 0.5)
    with pytest.raises(ValueError, match="t must be"):
        interpolate_ranges(start, MILD, 1.5)


def test_with_ranges_draws_from_the_new_ranges_only() -> None:
    paper = RandomArtifacts(rate=1.0, noise=True, seed=0)
    mild = paper.with_ranges(interpolate_ranges(paper.ranges, MILD, 1.0))
    assert paper.ranges["noise"].snr_db == (-10.0, 30.0)  # the original is unchanged
    g = torch.Generator().manual_seed(1)
    snr = [mild.sample(g).noise.snr_db for _ in range(50)]
    assert min(snr) >= 5.0 and max(snr) <= 20.0
    assert mild.kinds == paper.kinds and mild.rate == paper.rate


def test_linear_and_loss_schedules() -> None:
    lin = SeverityCurriculum(MILD, FLOOR, warmup_epochs=3, ramp_epochs=4)
    assert [lin.level_at(e) for e in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    loss = SeverityCurriculum(MILD, FLOOR, schedule="loss", loss_threshold=0.01, step=0.4)
    assert not loss.update(0.02) and loss.level == 0.0  # loss not low enough
    assert loss.update(0.005) and loss.level == pytest.approx(0.4)
    assert loss.update(0.001) and loss.update(0.001) and loss.level == 1.0  # capped at 1
    assert not loss.update(0.0)
    with pytest.raises(ValueError, match="schedule"):
        SeverityCurriculum(MILD, schedule="cosine")
    with pytest.raises(ValueError, match="warmup_epochs"):
        SeverityCurriculum(MILD, warmup_epochs=0)
    with pytest.raises(ValueError, match="strength range"):
        SeverityCurriculum({"wrap": {"interval": [2, 4]}})


class _FakeData:
    """Stands in for ContrastiveDataModule: holds the training sampler."""

    def __init__(self, sampler: RandomArtifacts) -> None:
        self.train_corrupt = sampler
        self.calls = 0

    def set_train_corrupt(self, sampler: RandomArtifacts) -> None:
        self.train_corrupt = sampler
        self.calls += 1


def test_callback_changes_the_training_sampler_at_epoch_start() -> None:
    data = _FakeData(_paper())
    module = SimpleNamespace(log=lambda *a, **k: None)
    cb = SeverityCurriculum(MILD, FLOOR, warmup_epochs=2, ramp_epochs=2)
    snrs = []
    for epoch in range(5):
        cb.on_train_epoch_start(SimpleNamespace(current_epoch=epoch, datamodule=data), module)
        snrs.append(data.train_corrupt.ranges["noise"].snr_db)
    assert snrs[0] == snrs[1] == (-10.0, 30.0)  # warm-up: the configured ranges
    assert snrs[2] == pytest.approx((-2.5, 25.0)) and snrs[3] == snrs[4] == (5.0, 20.0)
    assert data.calls == 2 and cb.history == [(2, 0.5), (3, 1.0)]  # only on a change
    # levels always interpolate from the configured sampler, not the previous level's
    assert cb.base.ranges["noise"].snr_db == (-10.0, 30.0)


def test_changing_the_sampler_redraws_the_banked_negatives() -> None:
    from qcflow.data.contrastive import ContrastiveSliceDataset
    from qcflow.data.datasets import central_indices

    vol = torch.rand(1, 12, 12, 12)
    paper = RandomArtifacts(rate=1.0, noise={"snr_db": [-10.0, -10.0]})
    bank = NegativeBank(paper, size=1, reuse=100, spacing=(4.0,) * 3)
    g = torch.Generator().manual_seed(0)
    idx = central_indices(12, 4)
    strong, _, _ = bank.get(0, 0, vol, idx, g)
    ds = ContrastiveSliceDataset.__new__(ContrastiveSliceDataset)  # only the sampler parts
    ds.corrupt, ds.bank = paper, bank
    mild = paper.with_ranges({"noise": {"snr_db": [40.0, 40.0]}})
    ds.set_corrupt(mild)
    assert ds.corrupt is mild and bank.sampler is mild
    weak, _, _ = bank.get(0, 0, vol, idx, g)
    assert bank.drawn == 2  # redrawn although the copy had uses left
    clean = vol[..., idx]
    assert (weak - clean).abs().mean() < (strong - clean).abs().mean()


def test_curriculum_lives_in_its_study_experiment(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=encoder_contrastive"], tmp_path)
    assert "curriculum" not in cfg.contrastive
    assert curriculum_callbacks(cfg.contrastive) == []
    on = compose_cfg(["experiment=zuo_study_curriculum"], tmp_path)
    (cb,) = curriculum_callbacks(on.contrastive)
    assert isinstance(cb, SeverityCurriculum) and cb.schedule == "linear"
    assert cb.level_at(0) == 0.0


def test_fit_with_curriculum_moves_the_level(
    small_embedded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (tiny) fit: the levels change at the scheduled epochs, every 3-D negative drawn
    in an epoch comes from that epoch's ranges (the bank is redrawn), and the level is logged."""
    import qcflow.data.negatives as negatives
    from qcflow.tasks import encoder_contrastive
    from tests.test_iqc_pipeline import TINY, TINY_ENCODER

    events: list[object] = []  # ("epoch", e) markers and the noise range of every 3-D draw
    draw, start = negatives.corrupt_volume, SeverityCurriculum.on_train_epoch_start

    def recording_draw(sampler, *args, **kwargs):
        events.append(sampler.ranges["noise"].snr_db)
        return draw(sampler, *args, **kwargs)

    def marking_start(self, trainer, pl_module):
        events.append(("epoch", trainer.current_epoch))
        start(self, trainer, pl_module)

    monkeypatch.setattr(negatives, "corrupt_volume", recording_draw)  # the bank's draws
    monkeypatch.setattr(SeverityCurriculum, "on_train_epoch_start", marking_start)

    base = [*TINY, *TINY_ENCODER, "contrastive.negatives_3d=true", "augment=contrastive_all"]
    on = ["experiment=zuo_study_curriculum", "contrastive.curriculum.warmup_epochs=1",
          "contrastive.curriculum.ramp_epochs=2", "trainer.max_epochs=3"]  # fmt: skip
    results = encoder_contrastive.run(compose_cfg([*on, *base], tmp_path / "on"))
    assert results["curriculum_levels"] == [[1, 0.5], [2, 1.0]]
    assert results["train/curriculum_level"] == 1.0
    marks = [events.index(("epoch", e)) for e in range(3)]
    level = {1: (-2.5, 25.0), 2: (5.0, 20.0)}  # noise (-10, 30) -> (5, 20) at 0.5 and 1
    for e in (1, 2):
        drawn = events[marks[e] + 1 : marks[e + 1] if e + 1 < 3 else None]
        assert drawn and all(r == pytest.approx(level[e]) for r in drawn)
    assert all(r == (-10.0, 30.0) for r in events[: marks[1]] if r[0] != "epoch")
    monkeypatch.undo()
    off = ["experiment=encoder_contrastive", *base, "trainer.max_epochs=1"]
    off = encoder_contrastive.run(compose_cfg(off, tmp_path / "off"))
    assert "curriculum_levels" not in off and "train/curriculum_level" not in off
