"""Method A experiments: fast_dev_run of each, and train -> flow -> evaluate via the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import SMALL_EMBEDDED
from tests.helpers import check_report, compose_cfg, run_cli

#: the small 4 mm embedded data, tiny slices and a tiny DenseNet
TINY = [
    *(f"data.embedded.{k}={v}" for k, v in SMALL_EMBEDDED.items()),
    "data.spacing=4.0",
    "data.slice_size=32",
    "data.n_central_slices=4",
    "data.batch_size=4",
    "data.embedded.variation=cohort",  # the small dataset of the fixture, for every stage
    "threads=1",
]
TINY_ENCODER = [
    "model.encoder.init_features=4",
    "model.encoder.growth_rate=2",
    "model.encoder.block_config=[1,1]",
    "model.encoder.bn_size=1",
    "model.encoder.latent_dim=2",  # d = 2: the density-contour and latent figures exist
    "contrastive.queries_per_volume=2",
    "trainer.enable_progress_bar=false",
]
TINY_FLOW = ["model.hidden_features=[8]", "model.epochs=3"]


@pytest.fixture(scope="module")
def encoder_run(small_embedded: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch encoder run (a real checkpoint), in process."""
    from qcflow.tasks import encoder_contrastive

    out = tmp_path_factory.mktemp("enc")
    overrides = ["experiment=encoder_contrastive", *TINY, *TINY_ENCODER, "trainer.max_epochs=1"]
    results = encoder_contrastive.run(compose_cfg(overrides, out))
    assert Path(results["checkpoint"]).is_file()
    return out


def test_encoder_fast_dev_run(small_embedded: Path, tmp_path: Path) -> None:
    from qcflow.tasks import encoder_contrastive

    cfg = compose_cfg(
        ["experiment=encoder_contrastive", *TINY, *TINY_ENCODER, "debug=fast"], tmp_path
    )
    assert {"motion", "noise", "ghosting", "anisotropy"} <= set(cfg.augment)  # eight kinds
    results = encoder_contrastive.run(cfg)
    assert math.isfinite(results["train/loss"]) and math.isfinite(results["val/loss"])
    assert results["n_train_volumes"] + results["n_val_volumes"] == SMALL_EMBEDDED["n_subjects"]
    assert results["skipped"] == []


def test_flow_and_evaluate_fast_dev_run(encoder_run: Path, tmp_path: Path) -> None:
    from qcflow.tasks import flow_density, iqc_evaluate

    flow_dir = tmp_path / "flow"
    cfg = compose_cfg(
        [
            "experiment=flow_density",
            *TINY,
            *TINY_FLOW,
            "debug=fast",
            f"flow.encoder_ckpt={encoder_run}",
        ],
        flow_dir,
    )
    res = flow_density.run(cfg)
    assert res["n_volumes"] == SMALL_EMBEDDED["n_subjects"]
    assert res["threshold_tau03"] <= res["threshold_tau05"]
    assert (flow_dir / "flow.pt").is_file() and (flow_dir / "codes_train.tsv").is_file()

    cfg = compose_cfg(
        ["experiment=iqc_evaluate", *TINY, "debug=fast", f"evaluate.flow_run={flow_dir}"],
        tmp_path / "eval",
    )
    res = iqc_evaluate.run(cfg)
    n_art = SMALL_EMBEDDED["n_test_per_kind"] * 10
    assert res["n_clean"] == SMALL_EMBEDDED["n_test_clean"] and res["n_artifact"] == n_art
    for key in ("sensitivity_tau05", "specificity_tau05", "sensitivity_tau03", "specificity_tau03"):
        assert 0.0 <= res[key] <= 1.0
    table = res["contingency_tau05"]
    assert table["tp"] + table["fn"] == n_art and table["tn"] + table["fp"] == 2
    assert set(res["baselines"]) == {"snr", "cnr", "cjv", "efc", "fber"}
    assert set(res["detection_rates"]) >= {"noise", "motion", "t2_contrast", "none"}
    assert set(res["detection_by_severity"]) == {"0", "1"}  # n_test_per_kind=1: severity 1
    for fig in ("density_contours.png", "latent_z.png", "roc.png"):
        assert (tmp_path / "eval" / "figures" / fig).stat().st_size > 0


def test_flow_mixture_is_saved_evaluated_and_scored(encoder_run: Path, tmp_path: Path) -> None:
    """model.mixture=3: the bundle keeps every flow; evaluation and scoring use the mixture."""
    import numpy as np
    import torch

    from qcflow.qc.scorers import DensityScorer
    from qcflow.runs.flow import load_density_model, load_flow, read_codes
    from qcflow.tasks import flow_density, iqc_evaluate

    flow_dir = tmp_path / "flow"
    cfg = compose_cfg(["experiment=flow_density", *TINY, *TINY_FLOW, "model.mixture=3",
                       f"flow.encoder_ckpt={encoder_run}"], flow_dir)  # fmt: skip
    res = flow_density.run(cfg)
    assert res["flow_mixture"] == 3
    density, bundle = load_flow(flow_dir)
    assert bundle["flow_config"]["mixture"] == 3 and len(density.flows) == 3
    _, codes, logp = read_codes(flow_dir / "codes_train.tsv")
    with torch.no_grad():
        mixed = density.log_prob(torch.as_tensor(codes, dtype=torch.float32)).double().numpy()
        first = (
            density.flow()
            .log_prob(density.standardize(torch.as_tensor(codes, dtype=torch.float32)))
            .double()
            .numpy()
            - density.std.log().sum().item()
        )
    np.testing.assert_allclose(mixed, logp, rtol=1e-4, atol=1e-4)  # the table is the mixture's
    assert not np.allclose(mixed, first, atol=1e-3)  # ... not its first flow's
    assert float((logp < res["threshold_tau05"]).mean()) == res["train_flagged_tau05"]
    scorer = DensityScorer(load_density_model(flow_dir))
    assert len(scorer.density.flows) == 3

    cfg = compose_cfg(
        ["experiment=iqc_evaluate", *TINY, "debug=fast", f"evaluate.flow_run={flow_dir}",
         "evaluate.baselines=null"],
        tmp_path / "eval",
    )  # fmt: skip
    assert 0.0 <= iqc_evaluate.run(cfg)["auroc"] <= 1.0
    assert (tmp_path / "eval" / "figures" / "latent_z.png").stat().st_size > 0

    cfg = compose_cfg(["experiment=flow_density", *TINY, "model.mixture=0",
                       f"flow.encoder_ckpt={encoder_run}"], tmp_path / "x")  # fmt: skip
    with pytest.raises(ValueError, match="model.mixture"):
        flow_density.run(cfg)


def test_flow_evaluate_and_score_with_an_encoder_ensemble(
    encoder_run: Path, tmp_path: Path
) -> None:
    """flow.encoder_ckpt as a list: concatenated codes, a 2d-dimensional flow, all members kept."""

    from qcflow.qc.scorers import DensityScorer
    from qcflow.runs.flow import load_density_model, load_flow
    from qcflow.tasks import flow_density, iqc_evaluate

    flow_dir = tmp_path / "flow"
    ckpt = encoder_run / "checkpoints" / "last.ckpt"
    ensemble = f"flow.encoder_ckpt=['{encoder_run}','{ckpt}']"  # a run folder and a file
    cfg = compose_cfg(["experiment=flow_density", *TINY, *TINY_FLOW, "debug=fast", ensemble],
                      flow_dir)  # fmt: skip
    res = flow_density.run(cfg)
    assert res["encoder_checkpoints"] == [str(ckpt), str(ckpt)]
    codes = pd.read_csv(flow_dir / "codes_train.tsv", sep="\t")
    assert [c for c in codes.columns if c.startswith("m")] == ["m1", "m2", "m3", "m4"]
    # the same encoder twice: each member's code is the single encoder's code
    assert (codes[["m1", "m2"]].to_numpy() == codes[["m3", "m4"]].to_numpy()).all()
    _, bundle = load_flow(flow_dir)
    assert bundle["flow_config"]["features"] == 4 and len(bundle["encoder_checkpoints"]) == 2

    cfg = compose_cfg(
        ["experiment=iqc_evaluate", *TINY, "debug=fast", f"evaluate.flow_run={flow_dir}",
         "evaluate.baselines=null"],
        tmp_path / "eval",
    )  # fmt: skip
    ev = iqc_evaluate.run(cfg)
    assert 0.0 <= ev["auroc"] <= 1.0
    assert set(ev["simulated_kinds"]) == {"noise", "motion"}  # read from the members' runs
    assert (tmp_path / "eval" / "figures" / "roc.png").stat().st_size > 0  # no 2-D maps at d=4
    scorer = DensityScorer(load_density_model(flow_dir))
    assert scorer.columns[:4] == ("m_1", "m_2", "m_3", "m_4")

    cfg = compose_cfg(["experiment=flow_density", *TINY, "flow.encoder_ckpt=[]"], tmp_path / "x")
    with pytest.raises(ValueError, match="empty list"):
        flow_density.run(cfg)


def test_a_previous_layout_flow_bundle_still_loads_and_scores(
    encoder_run: Path, tmp_path: Path
) -> None:
    """flow.pt written before Dec 2026 (configs as dicts, one encoder_checkpoint) loads through
    qcflow.runs and gives the same scorer as the bundle of today."""
    import json

    import torch

    from qcflow.qc.scorers import DensityScorer
    from qcflow.runs.flow import FLOW_FILE, load_density_model
    from qcflow.tasks import flow_density

    new = tmp_path / "new"
    cfg = compose_cfg(["experiment=flow_density", *TINY, *TINY_FLOW, "debug=fast",
                       f"flow.encoder_ckpt={encoder_run}"], new)  # fmt: skip
    flow_density.run(cfg)
    old = tmp_path / "old"
    old.mkdir()
    bundle = torch.load(new / FLOW_FILE, weights_only=True)
    bundle["flow_config"] = json.loads(bundle["flow_config"])
    bundle["data"] = json.loads(bundle["data"])
    del bundle["encoder_checkpoints"]
    torch.save(bundle, old / FLOW_FILE)
    (old / "codes_train.tsv").write_bytes((new / "codes_train.tsv").read_bytes())
    scorers = [DensityScorer(load_density_model(run)) for run in (new, old)]
    assert scorers[0].thresholds == scorers[1].thresholds
    item = {"image": torch.rand(1, 16, 20, 16), "scan": None}
    assert scorers[0](item) == scorers[1](item)


def test_train_flow_evaluate_cli(small_embedded: Path, tmp_path: Path) -> None:
    """Three subprocesses; each later stage finds the earlier stage's latest run by name."""
    runs = tmp_path / "runs"
    common = [*TINY, f"paths.runs_dir={runs}"]

    def stage(name: str, *extra: str) -> dict:
        run_dir = runs / name / "2026-01-01_00-00-00_test"
        res = run_cli(
            f"experiment={name}", *common, *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())

    enc = stage("encoder_contrastive", *TINY_ENCODER, "trainer.max_epochs=1")
    assert Path(enc["checkpoint"]).is_file()
    flow = stage("flow_density", *TINY_FLOW)
    assert flow["encoder_checkpoint"] == enc["checkpoint"]
    ev = stage("iqc_evaluate", "evaluate.figures=false")
    assert ev["flow_run"] == str(runs / "flow_density" / "2026-01-01_00-00-00_test")
    assert 0.0 <= ev["auroc"] <= 1.0
    assert (runs / "iqc_evaluate" / "2026-01-01_00-00-00_test" / "scores.tsv").is_file()

    # an evaluation-only sweep over tau: the codes are embedded once, then read from the cache
    sweep = tmp_path / "sweep_tau"
    res = run_cli("-m", "experiment=iqc_evaluate", "sweep=tau", *common, "+evaluate.tau=0.05,0.5",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = pd.read_csv(sweep / "sweep_summary.csv").sort_values("evaluate.tau")
    assert list(summary["evaluate.tau"]) == [0.05, 0.5]
    assert summary.sensitivity.is_monotonic_increasing  # a larger tau flags more scans
    assert summary.specificity.is_monotonic_decreasing
    assert (sweep / "sweep_summary.png").is_file()
    assert (runs / "flow_density" / "2026-01-01_00-00-00_test" / "eval_cache.pt").is_file()

    # weekly scoring with the latest trained models: codes, density, decision per scan
    from qcflow.qc.scoring import ScoreTable

    sc = stage("score", "data.split=test_clean", "score.density=true", "score.iqm=false")
    assert sc["n_ok"] == sc["n_scans"] > 0
    table = ScoreTable.read(runs / "score" / "2026-01-01_00-00-00_test" / "scores.tsv")
    assert {"m_1", "m_2", "log_density", "density_percentile", "qc_decision"} <= set(table)
    assert set(table.qc_decision) <= {"pass", "review", "fail"}
    assert table.density_percentile.between(0, 100).all()
    thr = sc["thresholds"]
    assert thr["fail_log_density"] <= thr["review_log_density"]
    fails = table.log_density < thr["fail_log_density"]
    assert (table.qc_decision[fails] == "fail").all()
    refs = check_report(Path(sc["report_html"]), list(table.scan_id))
    assert "density_contours.png" in refs
    flagged = table[table.qc_decision != "pass"]
    assert all(f"thumbs/{sid}.png" in refs for sid in flagged.scan_id)

    # per-site thresholds: every training site has 2 volumes in the small dataset
    site = stage("score", "data.split=test_clean", "score.iqm=false", "score.per_site=true",
                 "score.min_site_volumes=2")  # fmt: skip
    by_site = ScoreTable.read(Path(site["report_html"]).parent / "scores.tsv")
    assert by_site.threshold_scope.str.startswith("site:").all()
    assert any(k.startswith("fail_log_density[") for k in site["thresholds"])

    # a folder of good scans plus every kind of bad file: a row each, decisions for the good ones
    import shutil

    from qcflow.testing import write_bad_scans

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for src in sorted((small_embedded / "test_clean").glob("sub-*/anat/*_T1w.nii.gz"))[:2]:
        shutil.copy(src, mixed / src.name)
    reasons = write_bad_scans(mixed / "bad")
    mx = stage("score", f"data.root={mixed}", "score.density=true")
    scored = ScoreTable.read(Path(mx["scores_tsv"]))
    ok = scored[scored.status == "ok"]
    assert len(ok) == 2 and ok.qc_decision.isin(["pass", "review", "fail"]).all()
    bad = scored[scored.status == "error"]
    assert len(bad) == len(scored) - 2 >= len(reasons) - 2  # a folder or link may not be listed
    for _, row in bad.iterrows():
        assert reasons[Path(row.path).name] in row.error and pd.isna(row.qc_decision), row.error

    # the Python API gives the CLI's table
    import qcflow

    api = qcflow.score(
        small_embedded / "test_clean",
        models=runs / "flow_density" / "2026-01-01_00-00-00_test",
        iqm=False,
    )
    cols = ["scan_id", "m_1", "m_2", "log_density", "density_percentile", "qc_decision", "status"]
    pd.testing.assert_frame_equal(api[cols], table[cols], check_dtype=False)


def test_encoder_ddp_two_processes_gathers_negatives(small_embedded: Path, tmp_path: Path) -> None:
    """2-process CPU DDP (gloo) in a subprocess with a clean environment (docs/pitfalls.md)."""
    import os

    env_backup = {k: os.environ.pop(k) for k in ("MASTER_PORT", "MASTER_ADDR") if k in os.environ}
    try:
        run_dir = tmp_path / "ddp"
        res = run_cli(
            "experiment=encoder_contrastive", *TINY, *TINY_ENCODER, "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
            f"hydra.run.dir={run_dir}", cwd=tmp_path,
        )  # fmt: skip
    finally:
        os.environ.update(env_backup)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"]) and Path(metrics["checkpoint"]).is_file()


def test_augmentation_sweep_runs_and_summarises(small_embedded: Path, tmp_path: Path) -> None:
    """`sweep=augmentations` trains one encoder per negative kind; the summary has a row each."""
    sweep = tmp_path / "sweep_aug"
    res = run_cli(
        "-m", "experiment=encoder_contrastive", "sweep=augmentations", "augment=noise,motion",
        *TINY, *TINY_ENCODER, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    assert sorted(summary["augment"]) == ["motion", "noise"]
    assert summary["train/loss"].notna().all()
    for job in ("0", "1"):
        cfg = OmegaConf.load(sweep / job / ".hydra" / "config.yaml")
        assert cfg.augment[str(summary.set_index("job").loc[int(job), "augment"])] is not None


def test_simulated_kinds_come_from_the_encoder_runs_augment(tmp_path: Path) -> None:
    from qcflow.tasks.iqc_evaluate import simulated_kinds_of

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert simulated_kinds_of(ckpt) is None  # no saved config: the caller falls back
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    augment = {"rate": 1.0, "noise": {"p": 0.5}, "motion": {"p": 0.5}, "blur": {"p": 0.0},
               "wrap": None, "bias": True}  # fmt: skip
    OmegaConf.save({"augment": augment}, tmp_path / "run" / ".hydra" / "config.yaml")
    assert sorted(simulated_kinds_of(ckpt)) == ["bias", "motion", "noise"]
    cfg = compose_cfg(["experiment=iqc_evaluate"], tmp_path / "eval")
    assert cfg.evaluate.simulated_kinds is None  # default: read from the encoder run
    enc = compose_cfg(["experiment=encoder_contrastive"], tmp_path / "enc")
    assert enc.contrastive.negatives_3d in (True, False) and enc.model.negatives in (
        "all",
        "corrupted",
    )


def test_paper_experiments_pin_the_paper_setting(tmp_path: Path) -> None:
    """The *_paper chain states the paper's setting itself, so the main job's defaults can
    move to the best measured one without losing it."""
    enc = compose_cfg(["experiment=encoder_contrastive_paper"], tmp_path)
    assert list(enc.model.encoder.block_config) == [6, 12, 24, 16]  # DenseNet-121
    assert enc.model.negatives == "all" and {"noise", "motion"} <= set(enc.augment)
    assert not {"spike", "blur", "wrap", "bias"} & set(enc.augment)
    assert enc.contrastive.negatives_3d is False and enc.contrastive.positive_nuisance is None
    assert "curriculum" not in enc.contrastive
    flow = compose_cfg(["experiment=flow_density_paper"], tmp_path)
    assert flow.model.mixture == 1 and flow.model.transforms == 6
    assert flow.flow.encoder_experiment == "encoder_contrastive_paper"
    assert flow.data.slice_size == enc.data.slice_size
    ev = compose_cfg(["experiment=iqc_evaluate_paper"], tmp_path)
    assert ev.evaluate.flow_experiment == "flow_density_paper"
