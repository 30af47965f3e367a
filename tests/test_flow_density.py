"""Method A density: zuko RealNVP with standardisation, thresholds, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcflow.lit.flow import fit_density
from qcflow.models.flow import DensityFlow, tau_key


@pytest.fixture(scope="module")
def fitted() -> tuple[DensityFlow, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # anisotropic, shifted codes: the standardisation matters
    m = torch.randn(400, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -2.0])
    density = DensityFlow(features=2, transforms=6, hidden_features=(16, 16))
    fit_density(density, m, epochs=15, lr=3e-3, batch_size=128, generator=g)
    return density, m


def test_paper_setting_is_six_coupling_layers() -> None:
    density = DensityFlow()
    assert len(density.flow.transform.transforms) == 6


def test_density_integrates_to_one_in_code_space(fitted) -> None:
    density, m = fitted
    # grid over the codes' support (+- 6 std), in m-space: the standardisation Jacobian counts
    xs = torch.linspace(5.0 - 18.0, 5.0 + 18.0, 300)
    ys = torch.linspace(-2.0 - 3.0, -2.0 + 3.0, 300)
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    with torch.no_grad():
        p = density.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)).exp()
    integral = float(p.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert integral == pytest.approx(1.0, abs=0.03)


def test_flow_inverts(fitted) -> None:
    density, m = fitted
    with torch.no_grad():
        z = density.to_latent(m[:50])
        back = density.from_latent(z)
    torch.testing.assert_close(back, m[:50], rtol=1e-4, atol=1e-4)


def test_thresholds_are_the_stated_percentiles(fitted) -> None:
    density, m = fitted
    thr = density.set_thresholds(m, taus=(0.05, 0.03))
    with torch.no_grad():
        logp = density.log_prob(m).double().numpy()
    assert thr.tolist() == pytest.approx(np.quantile(logp, [0.05, 0.03]).tolist())
    assert density.threshold(0.05) == pytest.approx(np.percentile(logp, 5))
    assert float(density.flag(m, 0.05).double().mean()) == pytest.approx(0.05, abs=1 / len(m))
    assert float(density.flag(m, 0.03).double().mean()) == pytest.approx(0.03, abs=1 / len(m))
    with pytest.raises(KeyError):
        density.threshold(0.1)
    assert tau_key(0.05) == "tau05" and tau_key(0.03) == "tau03"


def test_state_dict_round_trip_keeps_standardisation_and_thresholds(fitted, tmp_path) -> None:
    density, m = fitted
    density.set_thresholds(m)
    torch.save(density.state_dict(), tmp_path / "flow.pt")
    other = DensityFlow(features=2, transforms=6, hidden_features=(16, 16))
    other.load_state_dict(torch.load(tmp_path / "flow.pt"))
    torch.testing.assert_close(other.mean, density.mean)
    torch.testing.assert_close(other.thresholds, density.thresholds)
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(m[:10]), density.log_prob(m[:10]))


def _reference_fit(flow, x, epochs, lr, batch_size, val_fraction, generator):  # noqa: ANN001
    """The hand-written Adam loop :func:`fit_density` replaced (kept here as the reference)."""
    n_val = int(round(val_fraction * len(x))) if len(x) >= 10 else 0
    order = torch.randperm(len(x), generator=generator)
    x_val, x_fit = x[order[:n_val]], x[order[n_val:]]
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    best, history, val_history = (float("inf"), -1, None), [], []
    for epoch in range(epochs):
        perm = torch.randperm(len(x_fit), generator=generator)
        total = 0.0
        for i in range(0, len(x_fit), batch_size):
            xb = x_fit[perm[i : i + batch_size]]
            loss = -flow().log_prob(xb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(xb)
        history.append(total / len(x_fit))
        if n_val:
            with torch.no_grad():
                v = float(-flow().log_prob(x_val).mean())
            val_history.append(v)
            if v < best[0]:
                best = (v, epoch, {k: t.detach().clone() for k, t in flow.state_dict().items()})
    if best[2] is not None:
        flow.load_state_dict(best[2])
    return {"val_nll": best[0] if n_val else float("nan"), "best_epoch": best[1],
            "history": history, "val_history": val_history}  # fmt: skip


@pytest.mark.parametrize(("mixture", "val_fraction"), [(1, 0.2), (2, 0.25), (1, 0.0)])
def test_lightning_fit_equals_the_hand_written_loop(mixture: int, val_fraction: float) -> None:
    """Same seed, same numbers: every parameter, the best epoch, the held-out NLL, the curves."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(120, 3, generator=g) * torch.tensor([2.0, 0.5, 1.0]) + 1.0

    def fresh() -> DensityFlow:
        torch.manual_seed(7)
        return DensityFlow(features=3, transforms=3, hidden_features=(16,), mixture=mixture)

    ours, ref = fresh(), fresh()
    fit = fit_density(ours, m, epochs=12, lr=3e-3, batch_size=32, val_fraction=val_fraction,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    ref.set_standardization(m)
    x, gen = ref.standardize(m), torch.Generator().manual_seed(0)
    expected = [_reference_fit(f, x, 12, 3e-3, 32, val_fraction, gen) for f in ref.flows]
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), k
    assert fit["history"] == expected[0]["history"]
    assert fit["val_history"] == expected[0]["val_history"]
    if val_fraction:
        assert [f["best_epoch"] for f in fit["flows"]] == [e["best_epoch"] for e in expected]
        assert fit["val_nll"] == pytest.approx(np.mean([e["val_nll"] for e in expected]), abs=0)
        assert 0 <= fit["best_epoch"] < 11  # a real choice, not the last epoch by default


def test_flow_fit_logs_its_curves(tmp_path) -> None:
    """The member's losses reach a configured logger (here CSV) through Lightning."""
    import pandas as pd
    import pytorch_lightning as pl

    loggers = [pl.loggers.CSVLogger(str(tmp_path), name="flow")]

    def make(epochs, callbacks, root):  # noqa: ANN001, ANN202
        return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=loggers, devices=1,
                          accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,
                          enable_model_summary=False, log_every_n_steps=1,
                          default_root_dir=str(root))  # fmt: skip

    m = torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    density = DensityFlow(features=2, transforms=2, hidden_features=(8,), mixture=2)
    fit_density(density, m, epochs=4, val_fraction=0.25, trainer=make,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    loggers[0].save()
    rows = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    for col in ("flow0/train_nll", "flow0/val_nll", "flow1/train_nll", "flow1/val_nll"):
        assert rows[col].notna().sum() == 4, col


@pytest.fixture(scope="module")
def mixture() -> tuple[DensityFlow, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(300, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -2.0])
    density = DensityFlow(features=2, transforms=6, hidden_features=(16, 16), mixture=3)
    fit = fit_density(density, m, epochs=15, lr=3e-3, batch_size=128, val_fraction=0.2, generator=g)
    return density, m, fit


def test_single_flow_state_dict_is_unchanged_by_the_mixture_option() -> None:
    keys = set(DensityFlow(hidden_features=(8,)).state_dict())
    assert not any(k.startswith("others.") for k in keys)  # old flow.pt bundles still load
    assert keys < set(DensityFlow(hidden_features=(8,), mixture=2).state_dict())
    with pytest.raises(ValueError, match="mixture"):
        DensityFlow(mixture=0)


def test_mixture_is_the_mean_of_its_flows_densities(mixture) -> None:
    density, m, fit = mixture
    assert len(density.flows) == 3 and len(fit["flows"]) == 3
    with torch.no_grad():
        x = density.standardize(m[:20])
        per = torch.stack([f().log_prob(x).exp() for f in density.flows])  # (3, 20)
        expected = (per.mean(0) / density.std.prod()).log()
        torch.testing.assert_close(density.log_prob(m[:20]), expected, rtol=1e-4, atol=1e-5)
        # each flow was fitted from its own start on its own hold-out split: they differ
        assert not torch.allclose(per[0], per[1], rtol=1e-3)
    assert fit["val_nll"] == pytest.approx(np.mean([f["val_nll"] for f in fit["flows"]]))


def test_mixture_density_integrates_to_one(mixture) -> None:
    density, _, _ = mixture
    xs = torch.linspace(5.0 - 18.0, 5.0 + 18.0, 300)
    ys = torch.linspace(-2.0 - 3.0, -2.0 + 3.0, 300)
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    with torch.no_grad():
        p = density.log_prob(torch.stack([xx.ravel(), yy.ravel()], 1)).exp()
    assert float(p.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])) == pytest.approx(1.0, abs=0.03)


def test_mixture_round_trips_and_thresholds_are_its_percentiles(mixture, tmp_path) -> None:
    density, m, _ = mixture
    thr = density.set_thresholds(m, taus=(0.05,))
    with torch.no_grad():
        logp = density.log_prob(m).double().numpy()
    assert float(thr[0]) == pytest.approx(float(np.quantile(logp, 0.05)))
    torch.save(density.state_dict(), tmp_path / "flow.pt")
    other = DensityFlow(2, 6, (16, 16), taus=(0.05,), mixture=3)
    other.load_state_dict(torch.load(tmp_path / "flow.pt"))
    with torch.no_grad():
        torch.testing.assert_close(other.log_prob(m[:10]), density.log_prob(m[:10]))


def test_flow_settings_read_the_model_config() -> None:
    """The task and the study's diagnosis scripts build the flow from one reading of the config."""
    from qcflow.api import compose_config
    from qcflow.errors import ConfigError
    from qcflow.tasks.flow_density import flow_settings

    model = compose_config(
        ["experiment=flow_density", "model.mixture=3", "model.hidden_features=[8]"]
    ).model
    flow_config, fit_kwargs = flow_settings(model, 6)
    assert flow_config == {
        "features": 6,
        "transforms": 6,
        "hidden_features": [8],
        "taus": [0.05, 0.03],
        "mixture": 3,
    }
    assert fit_kwargs == {
        "epochs": 300,
        "lr": 1e-3,
        "batch_size": 256,
        "weight_decay": 0.0,
        "val_fraction": 0.2,
    }
    density = DensityFlow(**flow_config)
    assert density.features == 6 and len(density.flows) == 3
    bad = compose_config(["experiment=flow_density", "model.mixture=0"]).model
    with pytest.raises(ConfigError, match="model.mixture"):
        flow_settings(bad, 2)


def test_codes_table_round_trips_bit_for_bit(tmp_path) -> None:
    """codes_train.tsv holds full precision: thresholds from it are the bundle's own."""
    from qcflow.qc.detection import tau_thresholds
    from qcflow.runs.flow import read_codes, write_codes

    rng = np.random.default_rng(0)
    codes = rng.normal(size=(50, 3)).astype(np.float32) * 1e3
    logp = rng.normal(size=50) * np.array([1e-300, 1e-7, 1.0, 1e5, 1e300] * 10)
    write_codes(tmp_path / "c.tsv", [f"{i:03d}" for i in range(50)], codes, logp)
    ids, m, lp = read_codes(tmp_path / "c.tsv")
    assert ids[:2] == ["000", "001"]  # ids stay strings
    assert (m == codes.astype(np.float64)).all() and (lp == logp).all()
    assert tau_thresholds(lp, [0.05]) == tau_thresholds(logp, [0.05])
