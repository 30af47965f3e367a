"""Method A encoder: the paper's loss, the negative pool, the contrastive items."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from qcflow.data.contrastive import (
    ContrastiveSliceDataset,
    NegativeBank,
    axial_stack,
    corrupt_slice,
    corrupt_volume,
)
from qcflow.data.datamodule import VolumeDataModule
from qcflow.data.datasets import ORIENTATIONS, central_indices, fit_square
from qcflow.kspace import RandomArtifacts
from qcflow.lit.contrastive import ContrastiveEncoder, build_pool
from qcflow.models.encoder import (
    ArtifactEncoder,
    EncoderEnsemble,
    contrastive_loss,
    volume_code,
)
from tests.helpers import compose_cfg

TINY = {"init_features": 4, "growth_rate": 2, "block_config": [1, 1], "bn_size": 1}


def _hand_loss(q, p, negs) -> float:
    """-log( e^{q.p} / (e^{q.p} + mean_i e^{q.n_i}) ) with plain Python floats."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    pos = math.exp(dot(q, p))
    mean_neg = sum(math.exp(dot(q, n)) for n in negs) / len(negs)
    return -math.log(pos / (pos + mean_neg))


def test_loss_matches_hand_computation() -> None:
    q = [[0.5, -1.0], [2.0, 0.3]]
    p = [[0.4, -0.8], [1.0, 1.0]]
    negs = [[[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0]], [[0.2, 0.2], [3.0, -1.0], [0.0, 0.0]]]
    got = contrastive_loss(torch.tensor(q), torch.tensor(p), torch.tensor(negs))
    want = sum(_hand_loss(q[b], p[b], negs[b]) for b in range(2)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_loss_mask_keeps_only_listed_negatives() -> None:
    q, p = torch.tensor([[1.0, 0.5]]), torch.tensor([[0.2, 0.1]])
    pool = torch.tensor([[1.0, 1.0], [9.0, 9.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, False, True]])
    got = contrastive_loss(q, p, pool, mask)
    want = _hand_loss([1.0, 0.5], [0.2, 0.1], [[1.0, 1.0], [-1.0, 0.0]])
    assert got.item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="no negative"):
        contrastive_loss(q, p, pool, torch.zeros(1, 3, dtype=torch.bool))


def test_pool_excludes_own_volume_but_keeps_own_corrupted_copies() -> None:
    b, k, d = 3, 2, 2
    index = torch.tensor([7, 7, 9])  # items 0 and 1 come from the same volume
    q, p, c = torch.randn(b, d), torch.randn(b, d), torch.randn(b, k, d)
    pool, owner, mask = build_pool(q, p, c, index)
    assert pool.shape == (b * (2 + k), d)
    assert torch.equal(pool[:b], q) and torch.equal(pool[b : 2 * b], p)
    assert owner.tolist() == [7, 7, 9, 7, 7, 9, 7, 7, 7, 7, 9, 9]
    # item 0: other volumes (entries of volume 9) + its own corrupted copies (6, 7)
    assert mask[0].nonzero().flatten().tolist() == [2, 5, 6, 7, 10, 11]
    assert mask[1].nonzero().flatten().tolist() == [2, 5, 8, 9, 10, 11]
    assert mask[2].nonzero().flatten().tolist() == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    assert not mask[0, 0] and not mask[0, 3]  # never its own query or positive
    # extension: of other volumes, only their corrupted copies (+ own corrupted copies)
    _, _, mask_c = build_pool(q, p, c, index, negatives="corrupted")
    assert mask_c[0].nonzero().flatten().tolist() == [6, 7, 10, 11]
    assert mask_c[2].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]
    assert bool((mask_c <= mask).all())
    with pytest.raises(ValueError, match="negatives"):
        build_pool(q, p, c, index, negatives="some")


@pytest.fixture(scope="module")
def volumes(small_embedded: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("vols")
    cfg = compose_cfg([f"data.root={small_embedded / 'train'}", "data.spacing=4.0"], out)
    dm = VolumeDataModule(cfg.data)
    dm.prepare()
    return dm.volumes(dm.scans[:3])


def test_items_positive_same_volume_other_orientation(volumes) -> None:
    sampler = RandomArtifacts(rate=1.0, noise={"p": 0.5}, motion={"p": 0.5}, seed=0)
    ds = ContrastiveSliceDataset(
        volumes, size=32, n_central=6, queries_per_volume=3, corrupt=sampler, n_corrupt=2,
        deterministic=True,
    )  # fmt: skip
    assert len(ds) == 3 * 3
    for idx in range(len(ds)):
        item = ds[idx]
        i = item["index"]
        assert i == idx // 3  # query and positive both from volume i
        vol = volumes.volume(i)["image"]
        assert item["positive_orientation"] in (ORIENTATIONS["coronal"], ORIENTATIONS["sagittal"])
        axis = item["positive_orientation"]
        assert item["positive_slice"] in central_indices(vol.shape[axis + 1], 6)
        assert item["query_slice"] in central_indices(vol.shape[3], 6)
        # the positive is exactly that slice of the same volume
        expected = vol.select(axis + 1, item["positive_slice"])
        torch.testing.assert_close(item["positive"], fit_square(expected, 32))
        assert item["query"].shape == (1, 32, 32) and item["corrupted"].shape == (2, 1, 32, 32)
        assert not torch.allclose(item["corrupted"][0], item["query"])
        assert item["corrupt_kind"].tolist() and all(k in (1, 2, 3) for k in item["corrupt_kind"])
    # deterministic items repeat
    assert torch.equal(ds[4]["corrupted"], ds[4]["corrupted"])


def test_positive_nuisance_changes_only_the_positive_and_is_off_in_the_paper(
    volumes, tmp_path: Path
) -> None:
    from qcflow.tasks.encoder_contrastive import _positive_nuisance

    sampler = RandomArtifacts(rate=1.0, noise={"p": 1.0}, seed=0)
    nuisance = RandomArtifacts(rate=1.0, noise={"p": 1.0, "snr_db": [30.0, 30.0]})
    kw = {"size": 32, "n_central": 6, "queries_per_volume": 2, "corrupt": sampler,
          "n_corrupt": 1, "deterministic": True}  # fmt: skip
    plain = ContrastiveSliceDataset(volumes, **kw)
    noisy = ContrastiveSliceDataset(volumes, positive_nuisance=nuisance, **kw)
    for idx in range(len(plain)):
        a, b = plain[idx], noisy[idx]
        assert (a["query_slice"], a["positive_slice"]) == (b["query_slice"], b["positive_slice"])
        torch.testing.assert_close(a["query"], b["query"])
        diff = (b["positive"] - a["positive"]).abs()
        # 30 dB: noise std ~3 % of the signal -- a nuisance, not an artifact
        assert 0.0 < float(diff.mean()) < 0.08
    cfg = compose_cfg(["experiment=encoder_contrastive_paper"], tmp_path)
    assert cfg.contrastive.positive_nuisance is None and _positive_nuisance(None) is None
    built = _positive_nuisance({"noise": {"p": 0.5, "snr_db": [28.0, 40.0]}})
    assert built.rate == 1.0
    # the main job's default (the best measured, issue 17): clean-range noise and bias
    main = compose_cfg(["experiment=encoder_contrastive"], tmp_path)
    default = _positive_nuisance(main.contrastive.positive_nuisance)
    assert default is not None and default.rate == 1.0
    from qcflow.errors import ConfigError

    with pytest.raises(ConfigError, match="positive_nuisance"):
        _positive_nuisance({"sparkle": {"p": 1.0}})


def test_zoom_slice_scales_content_about_the_centre() -> None:
    from qcflow.data.contrastive import zoom_slice

    x = torch.zeros(1, 40, 40)
    x[:, 15:25, 15:25] = 1.0  # a centred 10x10 square: area 100
    torch.testing.assert_close(zoom_slice(x, 1.0), x)
    for factor in (0.8, 1.25):
        z = zoom_slice(x, factor)
        assert z.shape == x.shape
        assert float(z.sum()) == pytest.approx(100.0 * factor**2, rel=0.05)
        # still centred: symmetric about the middle
        torch.testing.assert_close(z, z.flip(-1), atol=1e-5, rtol=0)


def test_positive_gamma_and_zoom_change_only_the_positive(volumes, tmp_path: Path) -> None:
    from qcflow.errors import ConfigError
    from qcflow.tasks.encoder_contrastive import _pair

    sampler = RandomArtifacts(rate=1.0, noise={"p": 1.0}, seed=0)
    kw = {"size": 32, "n_central": 6, "queries_per_volume": 2, "corrupt": sampler,
          "n_corrupt": 1, "deterministic": True}  # fmt: skip
    plain = ContrastiveSliceDataset(volumes, **kw)
    gamma = ContrastiveSliceDataset(volumes, positive_gamma=(0.5, 0.5), **kw)
    zoom = ContrastiveSliceDataset(volumes, positive_zoom=(0.8, 0.8), **kw)
    for idx in range(len(plain)):
        a, g, z = plain[idx], gamma[idx], zoom[idx]
        torch.testing.assert_close(a["query"], g["query"])
        torch.testing.assert_close(a["corrupted"], z["corrupted"])
        # x^0.5 is monotone: it brightens mid-range values and keeps the order of pixels
        base = a["positive"].clamp(min=0).flatten()
        torch.testing.assert_close(g["positive"].flatten(), base**0.5, atol=1e-4, rtol=1e-4)
        # zoom 0.8 shrinks the head: less signal in the slice
        assert float(z["positive"].sum()) < float(a["positive"].sum())
    ranged = ContrastiveSliceDataset(volumes, positive_gamma=(0.6, 1.6), **kw)
    assert ranged[0]["positive"].shape == (1, 32, 32)
    with pytest.raises(ValueError, match="positive_gamma"):
        ContrastiveSliceDataset(volumes, positive_gamma=(1.5, 0.5), **kw)
    cfg = compose_cfg(["experiment=encoder_contrastive_paper"], tmp_path)
    assert cfg.contrastive.positive_gamma is None and cfg.contrastive.positive_zoom is None
    assert _pair(None, "x") is None and _pair([0.6, 1.6], "x") == [0.6, 1.6]
    for bad in ([0.0, 1.0], [2.0, 1.0], "wide", [1.0]):
        with pytest.raises(ConfigError, match="contrastive.positive_zoom"):
            _pair(bad, "contrastive.positive_zoom")


def test_corrupt_slice_keeps_motion_in_plane() -> None:
    img = torch.zeros(1, 24, 24)
    img[:, 6:18, 8:16] = 0.8
    sampler = RandomArtifacts(rate=1.0, motion={"p": 1.0}, seed=1)
    y, record = corrupt_slice(sampler, img)
    assert y.shape == img.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    for deg, tra in zip(
        record["params"]["motion"]["degrees"],
        record["params"]["motion"]["translation"],
        strict=True,
    ):  # noqa: E501
        assert deg[0] == 0.0 and deg[1] == 0.0 and tra[2] == 0.0
    assert record["params"]["motion"]["pe_axis"] in (0, 1)


def test_encoder_shapes_and_volume_code(volumes) -> None:
    enc = ArtifactEncoder(latent_dim=2, **TINY).eval()
    slices = axial_stack(volumes.volume(0)["image"], 5, 32)
    assert slices.shape == (5, 1, 32, 32)
    m = volume_code(enc, slices, batch_size=2)
    assert m.shape == (2,)
    torch.testing.assert_close(m, enc(slices).mean(0).detach(), rtol=1e-5, atol=1e-6)


def test_retired_extensions_load_at_the_paper_value_and_refuse_otherwise(tmp_path) -> None:
    """Checkpoints saved before the cosine loss and the k-space channel were retired still
    carry ``temperature``/``normalize``/``encoder.fourier`` at the paper's values and load as
    the same network; one trained with an extension on is refused, not silently mis-loaded."""
    torch.manual_seed(0)
    module = ContrastiveEncoder(encoder={"latent_dim": 2, **TINY})
    legacy = {"encoder": {"latent_dim": 2, "fourier": False, "normalize": False, **TINY},
              "temperature": None, "normalize": False, "lr": 1e-3}  # fmt: skip
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": legacy,
            "pytorch-lightning_version": pl.__version__}  # fmt: skip
    torch.save(ckpt, tmp_path / "old.ckpt")
    from qcflow.errors import BadFileError
    from qcflow.utils.bundles import load_checkpoint  # the loader qcflow uses (weights_only)

    loaded = load_checkpoint(ContrastiveEncoder, tmp_path / "old.ckpt", "encoder checkpoint")
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    with pytest.raises(ValueError, match="retired"):
        ContrastiveEncoder(encoder={"latent_dim": 2, "fourier": True, **TINY})
    torch.save({**ckpt, "hyper_parameters": {**legacy, "normalize": True}}, tmp_path / "c.ckpt")
    with pytest.raises(BadFileError, match="retired"):
        load_checkpoint(ContrastiveEncoder, tmp_path / "c.ckpt", "encoder checkpoint")


def test_encoder_ensemble_concatenates_member_codes(volumes) -> None:
    torch.manual_seed(0)
    a = ArtifactEncoder(latent_dim=2, **TINY).eval()
    b = ArtifactEncoder(latent_dim=3, **TINY).eval()
    ens = EncoderEnsemble([a, b]).eval()
    assert ens.latent_dim == 5
    slices = axial_stack(volumes.volume(0)["image"], 4, 32)
    with torch.no_grad():
        codes = ens(slices)
        torch.testing.assert_close(codes, torch.cat([a(slices), b(slices)], 1))
        assert not torch.allclose(codes[:, :2], codes[:, 2:4])  # two different members
    m = volume_code(ens, slices, batch_size=3)  # the volume code of each member, side by side
    torch.testing.assert_close(m, torch.cat([volume_code(a, slices), volume_code(b, slices)]))
    with pytest.raises(ValueError, match="at least one"):
        EncoderEnsemble([])


def test_training_step_uses_the_loss(volumes) -> None:
    sampler = RandomArtifacts(rate=1.0, noise={"p": 1.0}, seed=0)
    ds = ContrastiveSliceDataset(
        volumes, size=32, n_central=4, queries_per_volume=2, corrupt=sampler
    )
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    module = ContrastiveEncoder(encoder={"latent_dim": 2, **TINY})
    loss, mq, mc = module._loss(batch)  # what training_step logs and returns
    assert mq.shape == (len(ds), 2) and mc.shape == (len(ds), 1, 2)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)


def _dataset_3d(volumes, sampler, **kwargs) -> ContrastiveSliceDataset:
    args = {"size": 32, "n_central": 6, "queries_per_volume": 3, "n_corrupt": 2}
    return ContrastiveSliceDataset(
        volumes, corrupt=sampler, negatives_3d=True, bank_size=3, spacing=4.0, **args | kwargs
    )


def test_3d_negatives_are_the_query_slice_of_the_corrupted_volume(volumes) -> None:
    # a negligible artifact (noise at 200 dB SNR) leaves the query: same volume, same slice
    faint = RandomArtifacts(rate=1.0, noise={"snr_db": [200.0, 200.0]}, seed=0)
    ds = _dataset_3d(volumes, faint, deterministic=True)
    for idx in range(len(ds)):
        item = ds[idx]
        assert item["corrupted"].shape == (2, 1, 32, 32)
        for copy in item["corrupted"]:
            torch.testing.assert_close(copy, item["query"], atol=2e-2, rtol=0)
    # real artifacts: copies differ from the query and from each other (distinct bank slots)
    strong = RandomArtifacts(rate=1.0, noise={"p": 0.5}, motion={"p": 0.5}, seed=0)
    ds = _dataset_3d(volumes, strong, deterministic=True)
    item = ds[4]
    assert item["index"] == 1
    assert not torch.allclose(item["corrupted"][0], item["query"], atol=1e-3)
    assert not torch.equal(item["corrupted"][0], item["corrupted"][1])
    assert all(k in (1, 2, 3) for k in item["corrupt_kind"].tolist())
    assert float(item["corrupted"].min()) >= 0.0 and float(item["corrupted"].max()) <= 1.0
    with pytest.raises(ValueError, match="bank_size"):
        _dataset_3d(volumes, strong, n_corrupt=4)


def test_3d_negatives_are_seeded_and_validation_never_redraws(volumes) -> None:
    sampler = RandomArtifacts(rate=1.0, noise={"p": 0.5}, motion={"p": 0.5})
    torch.manual_seed(3)
    a = [_dataset_3d(volumes, sampler)[i]["corrupted"] for i in (0, 5)]
    torch.manual_seed(3)
    b = [_dataset_3d(volumes, sampler)[i]["corrupted"] for i in (0, 5)]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    val = _dataset_3d(volumes, sampler, deterministic=True, seed=1)
    first = [val[i]["corrupted"] for i in range(len(val))]
    again = [val[i]["corrupted"] for i in range(len(val))]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert val.bank is not None and val.bank.drawn <= 3 * len(volumes)  # drawn once per slot
    other = _dataset_3d(volumes, sampler, deterministic=True, seed=1)
    assert torch.equal(other[2]["corrupted"], first[2])


def test_negative_bank_redraws_after_reuse_and_keeps_the_slab(volumes) -> None:
    vol = volumes.volume(0)["image"]
    sampler = RandomArtifacts(rate=1.0, noise={"p": 1.0})
    bank = NegativeBank(sampler, size=2, reuse=2, spacing=(4.0,) * 3)
    g = torch.Generator().manual_seed(0)
    idx = central_indices(vol.shape[3], 4)
    s1, where, code = bank.get(0, 1, vol, idx, g)
    assert s1.shape == (*vol.shape[:3], 4) and where == idx and code == 1
    s2, _, _ = bank.get(0, 1, vol, idx, g)
    assert s2 is s1 and bank.drawn == 1  # reused
    s3, _, _ = bank.get(0, 1, vol, idx, g)
    assert bank.drawn == 2 and not torch.equal(s3, s1)  # used twice: redrawn
    with pytest.raises(ValueError, match="must be >= 1"):
        NegativeBank(sampler, size=0)


def test_negative_bank_state_restores_the_same_stream(volumes) -> None:
    """A bank restored from its state (a resumed fit) hands out the same copies, and draws
    from the caller's generator exactly when the uninterrupted bank does."""
    import json

    vol = volumes.volume(0)["image"]
    idx = central_indices(vol.shape[3], 4)
    sampler = RandomArtifacts(rate=1.0, noise={"p": 1.0}, blur={"p": 0.5})
    plan = [(0, 0), (0, 1), (0, 0), (0, 1), (0, 0), (0, 1), (0, 0)]  # reuse=2: redraws

    def stream(bank, g, steps):
        return [bank.get(i, j, vol, idx, g)[0] for i, j in steps]

    ref_bank = NegativeBank(sampler, size=2, reuse=2, spacing=(4.0,) * 3)
    g_ref = torch.Generator().manual_seed(3)
    ref = stream(ref_bank, g_ref, plan)
    bank = NegativeBank(sampler, size=2, reuse=2, spacing=(4.0,) * 3)
    g = torch.Generator().manual_seed(3)
    first = stream(bank, g, plan[:3])
    state = json.loads(json.dumps(bank.state_dict()))  # what a checkpoint keeps
    g_state = g.get_state()
    resumed = NegativeBank(sampler, size=2, reuse=2, spacing=(4.0,) * 3)
    resumed.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(g_state)
    rest = stream(resumed, g2, plan[3:])
    for a, b in zip(ref, first + rest, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g_ref.get_state(), g2.get_state())  # same draws from the caller
    assert resumed.state_dict() == ref_bank.state_dict()


def test_corrupt_volume_keeps_through_plane_motion() -> None:
    vol = torch.zeros(1, 20, 20, 20)
    vol[:, 5:15, 6:14, 4:16] = 0.8
    sampler = RandomArtifacts(rate=1.0, motion={"degrees": [5.0, 5.0], "translation": 0}, seed=1)
    y, record = corrupt_volume(sampler, vol, spacing=(2.0, 2.0, 2.0))
    assert y.shape == vol.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # rotations about the in-plane axes (through-plane motion) stay, unlike corrupt_slice
    assert all(d[0] == 5.0 and d[1] == 5.0 for d in record["params"]["motion"]["degrees"])
    assert not torch.allclose(y, vol, atol=1e-2)


def test_densenet121_setting_is_monais_densenet121() -> None:
    """The paper experiment's network (DenseNet-121, a GPU setting) is MONAI's DenseNet-121 --
    same layers and parameter count -- mapping slices to d = 2 codes."""
    from hydra.utils import instantiate
    from monai.networks.nets import DenseNet121

    from qcflow.api import compose_config

    cfg = compose_config(["experiment=encoder_contrastive_paper"])
    module = instantiate(cfg.model, _convert_="all")  # as the task builds it
    net = module.encoder.net
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    layers = [type(m).__name__ for m in list(net.modules())[1:]]  # [0]: the class itself
    assert layers == [type(m).__name__ for m in list(reference.modules())[1:]]
    assert layers.count("_DenseLayer") == 6 + 12 + 24 + 16
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(p.numel() for p in reference.parameters())
    assert 6.9e6 < n_params < 7.0e6  # DenseNet-121's ~6.96 M (1 input channel, 2 outputs)
    with torch.no_grad():
        assert module.encoder.eval()(torch.rand(2, 1, 64, 64)).shape == (2, 2)


def test_paper_experiment_pins_the_paper_and_the_main_job_the_measured_best(tmp_path) -> None:
    """encoder_contrastive_paper keeps Zuo et al.'s setting whatever the main job's defaults;
    the main job's defaults are the generalisation benchmark's best (issue 17)."""
    paper = compose_cfg(["experiment=encoder_contrastive_paper"], tmp_path)
    assert paper.model.encoder.latent_dim == 2 and paper.model.negatives == "all"
    assert paper.model.encoder.block_config == [6, 12, 24, 16]  # DenseNet-121
    assert set(paper.augment) >= {"noise", "motion"} and "ghosting" not in paper.augment
    assert not paper.contrastive.negatives_3d and paper.contrastive.positive_nuisance is None
    assert paper.contrastive.positive_gamma is None and paper.contrastive.positive_zoom is None
    assert paper.data.embedded.variation == "cohort" and paper.data.slice_size == 128
    main = compose_cfg(["experiment=encoder_contrastive"], tmp_path)
    assert main.model.encoder.latent_dim == 16 and main.model.negatives == "corrupted"
    assert main.contrastive.negatives_3d and main.data.embedded.variation == "wide"
    assert {"ghosting", "anisotropy", "motion", "wrap"} <= set(main.augment)
    assert main.augment.motion.magnitude  # motion at real corrupted-scan strengths
    assert list(main.contrastive.positive_gamma) == [0.6, 1.6]
