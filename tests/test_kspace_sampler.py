"""RandomArtifacts: rates, seeding, records, and the conf/augment configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import qcflow.cli
from qcflow.kspace import KINDS, OPT_IN_KINDS, ArtifactParams, RandomArtifacts, apply_artifacts
from tests.test_kspace import phantom

#: the kinds that RandomArtifacts.paper() and the shipped configs enable
PAPER_KINDS = tuple(k for k in KINDS if k not in OPT_IN_KINDS)


def test_same_seed_same_result_different_seed_different() -> None:
    x = phantom()
    a = RandomArtifacts.paper(rate=1.0, seed=7)
    b = RandomArtifacts.paper(rate=1.0, seed=7)
    c = RandomArtifacts.paper(rate=1.0, seed=8)
    ya, ra = a(x)
    yb, rb = b(x)
    yc, rc = c(x)
    assert ra == rb and torch.equal(ya, yb)
    assert ra != rc and not torch.equal(ya, yc)
    # an explicit generator overrides the sampler's own
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert a.sample(g1) == c.sample(g2)


def test_global_rng_seeding_when_seed_is_none() -> None:
    aug = RandomArtifacts.paper(rate=1.0)
    torch.manual_seed(11)
    first = aug.sample()
    torch.manual_seed(11)
    assert aug.sample() == first


def test_records_are_json_and_replay_exactly() -> None:
    x = phantom()
    aug = RandomArtifacts.paper(rate=1.0, seed=0)
    for _ in range(5):
        y, record = aug(x)
        text = json.dumps(record)  # plain JSON: the teachers' and evaluations' labels
        back = json.loads(text)
        params = ArtifactParams.from_record(back)
        assert list(params.kinds) == back["kinds"] == list(back["params"])
        assert set(back["severity"]) == set(back["kinds"])
        assert all(0.0 <= s <= 1.0 for s in back["severity"].values())
        assert torch.equal(apply_artifacts(x, params), y)


def test_shaw2021_kinds_are_every_kind_but_bias() -> None:
    from qcflow.kspace import SHAW2021_KINDS

    assert len(set(SHAW2021_KINDS)) == len(SHAW2021_KINDS)
    assert set(SHAW2021_KINDS) == set(KINDS) - {"bias"} - set(OPT_IN_KINDS)
    assert OPT_IN_KINDS == ("ghosting", "anisotropy")


def test_every_kind_applied_with_rate_one() -> None:
    aug = RandomArtifacts.paper(rate=1.0, seed=1)
    assert aug.kinds == PAPER_KINDS  # the opt-in kinds stay off
    for _ in range(3):
        assert aug.sample().kinds == PAPER_KINDS
    every = RandomArtifacts.paper(rate=1.0, seed=1, ghosting=True, anisotropy=True)
    assert every.kinds == KINDS and every.sample().kinds == KINDS


def test_opt_in_kinds_leave_the_draws_of_the_other_kinds_unchanged() -> None:
    # disabled kinds draw nothing, so adding kinds to KINDS changed no existing stream
    a = RandomArtifacts.paper(rate=0.7, seed=4)
    b = RandomArtifacts.paper(rate=0.7, seed=4, ghosting=None, anisotropy=False)
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]


def test_rate_and_per_kind_probabilities() -> None:
    aug = RandomArtifacts(rate=0.5, noise={"p": 0.5}, blur={"p": 0.5}, seed=2)
    draws = [aug.sample() for _ in range(600)]
    corrupted = [d for d in draws if d]
    assert abs(len(corrupted) / len(draws) - 0.5) < 0.07
    # every corrupted image shows at least one kind; each kind appears in most of them
    assert all(d.kinds for d in corrupted)
    frac_noise = sum("noise" in d.kinds for d in corrupted) / len(corrupted)
    assert 0.55 < frac_noise < 0.8  # p=0.5, plus the fallback when neither was drawn
    none = RandomArtifacts(rate=0.0, noise=True)
    assert not any(none.sample() for _ in range(20))


def test_exclusive_gives_exactly_one_kind_in_proportion_to_p() -> None:
    aug = RandomArtifacts(
        rate=0.5, noise={"p": 0.6}, blur={"p": 0.2}, wrap={"p": 0.2}, exclusive=True, seed=3
    )
    draws = [aug.sample() for _ in range(1000)]
    corrupted = [d for d in draws if d]
    assert abs(len(corrupted) / len(draws) - 0.5) < 0.06
    assert all(len(d.kinds) == 1 for d in corrupted)
    frac = {k: sum(d.kinds == (k,) for d in corrupted) / len(corrupted) for k in aug.kinds}
    assert abs(frac["noise"] - 0.6) < 0.07 and abs(frac["blur"] - 0.2) < 0.06
    # without exclusive, p = 0.6/0.2/0.2 gives multi-kind images
    mixed = RandomArtifacts(rate=1.0, noise={"p": 0.6}, blur={"p": 0.6}, seed=3)
    assert any(len(mixed.sample().kinds) == 2 for _ in range(50))
    assert not RandomArtifacts(rate=1.0, noise={"p": 0.0}, exclusive=True).sample()


def test_ranges_are_respected() -> None:
    aug = RandomArtifacts(
        rate=1.0,
        noise={"snr_db": [0, 20]},
        blur={"ratio": [2, 3], "num_axes": [2, 2]},
        spike={"num_spikes": [2, 2], "intensity": [1, 2]},
        motion={"num_movements": [2, 2], "degrees": 5, "translation": [0, 1], "pe_axes": [1]},
        wrap={"modes": ["regular"], "interval": [3, 3], "axes": [2]},
        bias={"order": 2},
        seed=4,
    )
    for _ in range(10):
        p = aug.sample()
        assert 0.0 <= p.noise.snr_db <= 20.0
        assert sum(r > 1.0 for r in p.blur.ratio) == 2 and max(p.blur.ratio) <= 3.0
        assert len(p.spike.positions) == 2 and all(1 <= i <= 2 for i in p.spike.intensity)
        assert p.motion.num_movements == 2 and p.motion.pe_axis == 1
        assert all(abs(d) <= 5 for row in p.motion.degrees for d in row)
        assert all(0 <= t <= 1 for row in p.motion.translation for t in row)
        assert p.wrap.axis == 2 and p.wrap.mode == "regular" and p.wrap.interval == 3
        assert p.bias.order == 2 and len(p.bias.coefficients) == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 1.5},
        {"noise": {"snr": [0, 1]}},
        {"noise": {"snr_db": [10, 0]}},
        {"blur": {"ratio": [0.5, 2]}},
        {"wrap": {"modes": ["zigzag"]}},
        {"motion": {"num_movements": [0, 2]}},
        {"spike": {"p": -0.1}},
        {"device": "gpu"},
        {"strategy": "fastest"},
        {"spacing": [1.0, 1.0]},
    ],
)
def test_bad_sampler_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RandomArtifacts(**kwargs)


def test_batch_call_returns_one_record_per_sample() -> None:
    x = torch.stack([phantom(), phantom()])
    y, records = RandomArtifacts.paper(rate=1.0, seed=5)(x)
    assert y.shape == x.shape and len(records) == 2
    assert records[0] != records[1]


def test_severity_orders_strength() -> None:
    from qcflow.kspace import BlurParams, NoiseParams, SpikeParams, WrapParams

    assert NoiseParams(30).severity() == 0.0 and NoiseParams(-10).severity() == 1.0
    assert NoiseParams(math.inf).severity() == 0.0
    assert BlurParams((1, 1, 1)).severity() == 0.0 < BlurParams((2, 1, 1)).severity()
    assert BlurParams((2, 1, 1)).severity() < BlurParams((1, 12, 1)).severity()
    assert WrapParams(0, interval=1).severity() == 0.0 < WrapParams(0, interval=4).severity()
    low = SpikeParams(((0.1, 0.2, 0.3),), (1.0,)).severity()
    assert 0.0 < low < SpikeParams(((0.1, 0.2, 0.3),), (10.0,)).severity() == 1.0


# ---------------------------------------------------------------------------------------------
# conf/augment
# ---------------------------------------------------------------------------------------------
AUGMENT_DIR = qcflow.cli.config_dir() / "augment"
EXPECTED = {
    "spike": ("spike",),
    "noise": ("noise",),
    "blur": ("blur",),
    "wrap": ("wrap",),
    "motion": ("motion",),
    "motion_strong": ("motion",),
    "bias": ("bias",),
    "ghosting": ("ghosting",),
    "anisotropy": ("anisotropy",),
    "all": PAPER_KINDS,
    "paper_contrastive": ("motion", "noise"),
    "contrastive_all": ("bias", "motion", "spike", "noise", "blur", "wrap"),
    "contrastive_mild": ("bias", "motion", "spike", "noise", "blur", "wrap"),
    "contrastive_graded": ("bias", "motion", "spike", "noise", "blur", "wrap"),
    "contrastive_full": (
        "bias",
        "motion",
        "ghosting",
        "spike",
        "noise",
        "blur",
        "wrap",
        "anisotropy",
    ),
    "none": (),
}


def test_every_augment_config_is_tested() -> None:
    assert {p.stem for p in Path(AUGMENT_DIR).glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_augment_config_composes_and_instantiates(name: str) -> None:
    with initialize_config_dir(config_dir=str(qcflow.cli.config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"+augment={name}"])
    aug = instantiate(cfg.augment)
    assert isinstance(aug, RandomArtifacts)
    assert aug.kinds == EXPECTED[name]
    assert aug.device == cfg.augment.device == "loader"
    y, record = aug(phantom(), generator=torch.Generator().manual_seed(0))
    assert y.shape == phantom().shape
    assert set(record["kinds"]) <= set(EXPECTED[name])
    json.dumps(record)


def test_contrastive_graded_spans_mild_to_severe_and_keeps_noise_below_clean_snr() -> None:
    def ranges(name: str) -> dict:
        with initialize_config_dir(config_dir=str(qcflow.cli.config_dir()), version_base="1.3"):
            return instantiate(compose("config", overrides=[f"+augment={name}"]).augment).ranges

    graded, paper, mild = (
        ranges("contrastive_graded"),
        ranges("contrastive_all"),
        ranges("contrastive_mild"),
    )
    for kind, field in (("spike", "intensity"), ("blur", "ratio"), ("wrap", "keep_fraction")):
        lo, hi = getattr(graded[kind], field)
        for other in (paper, mild):  # the union of the paper's and the mild ranges
            assert lo <= getattr(other[kind], field)[0] and hi >= getattr(other[kind], field)[1]
    assert graded["noise"].snr_db == (-10.0, 20.0)  # below the clean scans' SNR (26-32 dB)
    assert graded["motion"] == paper["motion"] and graded["bias"] == paper["bias"]


def test_augment_ranges_are_overridable() -> None:
    with initialize_config_dir(config_dir=str(qcflow.cli.config_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "+augment=all",
                "augment.noise.snr_db=[0,20]",
                "augment.rate=1.0",
                "augment.device=batch",
            ],
        )
    aug = instantiate(cfg.augment)
    assert aug.ranges["noise"].snr_db == (0.0, 20.0)
    assert aug.rate == 1.0 and aug.device == "batch"


class _Draws(torch.utils.data.Dataset):
    def __init__(self, sampler: RandomArtifacts) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> str:
        return json.dumps(self.sampler.sample().to_record())


def test_dataloader_workers_draw_different_parameters() -> None:
    sampler = RandomArtifacts.paper(rate=1.0, seed=0)
    sampler.sample()  # the parent's stream has started: workers must not replay it
    loader = torch.utils.data.DataLoader(_Draws(sampler), batch_size=1, num_workers=2)
    torch.manual_seed(0)
    epoch1 = [batch[0] for batch in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1
    epoch2 = [batch[0] for batch in loader]
    torch.manual_seed(0)
    replay = [batch[0] for batch in loader]
    assert len(set(epoch1)) == 4  # workers do not duplicate each other
    assert set(epoch1).isdisjoint(epoch2)  # a new epoch draws new artifacts
    assert replay == epoch1  # and the main-process seed reproduces them
