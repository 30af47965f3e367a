"""Diagnosis of trained method-A encoders without retraining (README: "Diagnosis").

Two steps::

    # per-slice codes of every train/test volume, 60 central slices in each orientation
    python experiments/zuo2023_iqc/diagnose.py embed RUN /tmp/zdiag/seed0.pt
    # AUROC, sens/spec at tau = 5 % (mean over flow fits), for one encoder or an ensemble
    python experiments/zuo2023_iqc/diagnose.py score /tmp/zdiag/seed0.pt --rep ax20 ax40 3o20
    python experiments/zuo2023_iqc/diagnose.py score /tmp/zdiag/seed0.pt /tmp/zdiag/seed1.pt
    python experiments/zuo2023_iqc/diagnose.py score A.pt B.pt C.pt --combine mean
    # Gaussian / robust Gaussian / k-NN / KDE against single flows on the same codes
    python experiments/zuo2023_iqc/diagnose.py densities A.pt B.pt C.pt

``RUN`` is an ``encoder_contrastive`` run folder. Representations (``--rep``): ``axN`` the
mean code of the N central axial slices (``ax20`` = the study's), ``3o20`` the mean over the 20
central slices of all three orientations, ``3o20cat`` the three orientation means side by side,
``slN`` the per-slice codes of the N central axial slices (one flow on all training slices; a
volume scores the mean log-density of its slices; ``slNqP``: its slices' P-th percentile).
Several code files are an encoder ensemble: ``--combine joint`` (default) fits one flow on the
concatenated codes, as ``flow.encoder_ckpt=[...]`` does; ``--combine mean`` fits one flow per
member and averages the members' log-densities, each standardised on the training codes.
Each score is the mean over ``--flow-fits`` RealNVP fits (the study's flow setting, seeds
0, 1, ...): a single fit moves the AUROC by up to ~0.02. Thresholds are the tau percentile of
the in-sample training log-densities, as in ``flow_density``. Also prints how one-dimensional
the code is (eigenvalue ratio of its training covariance) and its Spearman correlation with
the clean scans' simulated SNR and bias ratio (``artifacts.tsv``).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch

from qcflow.data.synth import UNSIMULATED_KINDS
from qcflow.utils.bundles import load_tensors

N_SLICES = 60  # central slices per orientation kept by ``embed``
NEVER = UNSIMULATED_KINDS  # the test set's kinds that no encoder trained on


def embed(run: Path, out: Path) -> None:
    from qcflow.api import compose_config
    from qcflow.data.datasets import ORIENTATIONS, central_indices, extract_slice, fit_square
    from qcflow.runs.flow import load_encoder
    from qcflow.tasks.iqc_evaluate import load_evaluation_set

    torch.set_num_threads(1)
    encoder = load_encoder(sorted((run / "checkpoints").glob("epoch*.ckpt"))[-1])
    cfg = compose_config(["experiment=iqc_evaluate", "data.slice_size=112"])
    codes: dict[str, dict] = {}
    for split, label in (("train", 0), ("test_clean", 0), ("test_artifact", 1)):
        s = load_evaluation_set(cfg, split, None, label)
        volumes = s["dm"].volumes(s["dm"].scans)
        per: dict[str, list[np.ndarray]] = {o: [] for o in ORIENTATIONS}
        for i in range(len(volumes)):
            v = volumes.volume(i)["image"]  # (1, D, H, W)
            for o, axis in ORIENTATIONS.items():
                idx = central_indices(v.shape[axis + 1], N_SLICES)
                x = torch.stack([fit_square(extract_slice(v, o, j), 112) for j in idx])
                with torch.no_grad():
                    per[o].append(encoder(x).numpy())  # (N_SLICES, d)
        codes[split] = {
            "ids": [sc.scan_id for sc in s["dm"].scans],
            "kinds": s["kinds"],
            "severity": s["severity"],
            "labels": s["labels"],
            # (V, N_SLICES, d) as tensors: the file loads with weights_only=True
            **{o: torch.from_numpy(np.stack(per[o])) for o in per},
        }
    torch.save(codes, out)


def _load_codes(path: Path) -> dict:
    """An :func:`embed` file, read without unpickling, with its code arrays back as NumPy."""
    codes = load_tensors(path, "codes file")
    return {
        split: {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in part.items()}
        for split, part in codes.items()
    }


def _slices(how: str) -> tuple[int, float | None]:
    """``slN`` -> ``(N, None)`` (mean of the slices); ``slNqP`` -> ``(N, P / 100)``."""
    n, _, p = how[2:].partition("q")
    return int(n), (float(p) / 100 if p else None)


def _rep(codes: dict, split: str, how: str) -> np.ndarray:
    def central(a: np.ndarray, n: int) -> np.ndarray:
        start = (N_SLICES - n) // 2
        return a[:, start : start + n]

    r = codes[split]
    if how.startswith("sl"):  # per-slice codes (V, n, d): the flow models slices
        return central(r["axial"], _slices(how)[0])
    if how.startswith("ax"):
        return central(r["axial"], int(how[2:])).mean(1)
    per = [central(r[o], 20).mean(1) for o in ("axial", "coronal", "sagittal")]
    if how == "3o20":
        return np.mean(per, 0)
    if how == "3o20cat":
        return np.concatenate(per, 1)
    raise ValueError(f"unknown representation {how!r}")


@functools.cache
def _flow_model(mixture: int):  # -> the composed DictConfig's ``model``
    """``conf/model/flow.yaml`` as ``flow_density`` composes it, with ``model.mixture``."""
    from qcflow.api import compose_config

    return compose_config(["experiment=flow_density", f"model.mixture={mixture}"]).model


def _fit_log_prob(
    tr: np.ndarray, te: np.ndarray, seed: int, mixture: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Log-densities of the training ``(N, d)`` and test ``(M, d)`` codes under one flow fit.

    The study's flow setting, read from ``conf/model/flow.yaml`` as ``flow_density`` reads it
    (RealNVP, 6 couplings, hidden [32, 32], early stopping on 20 % held-out codes); ``seed``
    seeds the initialisation and the split; ``mixture > 1`` fits the equal mixture of that many
    flows (``model.mixture``).
    """
    from qcflow.lit.flow import fit_density
    from qcflow.models.flow import DensityFlow
    from qcflow.tasks.flow_density import flow_settings

    flow_config, fit_kwargs = flow_settings(_flow_model(mixture), tr.shape[1])
    torch.manual_seed(seed)
    density = DensityFlow(**flow_config)
    fit_density(density, torch.tensor(tr, dtype=torch.float32),
             generator=torch.Generator().manual_seed(seed), **fit_kwargs)  # fmt: skip
    with torch.no_grad():
        ltr = density.log_prob(torch.tensor(tr, dtype=torch.float32)).double().numpy()
        lte = density.log_prob(torch.tensor(te, dtype=torch.float32)).double().numpy()
    return ltr, lte


def combined_log_prob(
    train: list[np.ndarray],
    test: list[np.ndarray],
    combine: str,
    seed: int,
    q: float | None = None,
    mixture: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Training and test scores (higher = more typical) of an ensemble's codes.

    Args:
        train: per member, ``(N, d_k)`` training codes.
        test: per member, ``(M, d_k)`` test codes.
        combine: ``'joint'`` -- one flow on the concatenated codes (``flow.encoder_ckpt`` as
            a list); ``'mean'`` -- one flow per member, each member's log-density standardised
            by the mean and standard deviation of its training log-densities, then averaged
            over members (each member gets the same weight whatever its density's scale).
        seed: flow seed (every member's flow gets the same one).
        q: per-slice codes only: a volume scores this quantile of its slices' log-densities
            instead of their mean (``sl20q10``: the 10th percentile).
        mixture: flows per fit (an equal mixture when > 1, ``model.mixture``).

    Returns:
        ``(N,)`` training and ``(M,)`` test scores; thresholds are tau percentiles of the
        training scores.
    """
    if train[0].ndim == 3:  # per-slice codes: one flow on all slices, volume = mean log p
        tr, te = np.concatenate(train, -1), np.concatenate(test, -1)
        (v, n, d), m = tr.shape, te.shape[0]
        ltr, lte = _fit_log_prob(tr.reshape(-1, d), te.reshape(-1, d), seed, mixture)
        ltr, lte = ltr.reshape(v, n), lte.reshape(m, n)
        if q is None:
            return ltr.mean(1), lte.mean(1)
        return np.quantile(ltr, q, axis=1), np.quantile(lte, q, axis=1)
    if combine == "joint":
        return _fit_log_prob(np.concatenate(train, 1), np.concatenate(test, 1), seed, mixture)
    if combine != "mean":
        raise ValueError(f"combine must be 'joint' or 'mean', got {combine!r}")
    s_tr, s_te = [], []
    for tr, te in zip(train, test, strict=True):
        ltr, lte = _fit_log_prob(tr, te, seed, mixture)
        mu, sd = ltr.mean(), ltr.std()
        s_tr.append((ltr - mu) / sd)
        s_te.append((lte - mu) / sd)
    return np.mean(s_tr, 0), np.mean(s_te, 0)


def score(
    files: list[Path], reps: list[str], fits: int, combine: str = "joint", mixture: int = 1
) -> None:
    from qcflow.qc import detection as det

    torch.set_num_threads(1)
    all_codes = [_load_codes(f) for f in files]
    first = all_codes[0]
    labels = np.array(first["test_clean"]["labels"] + first["test_artifact"]["labels"])
    kinds = np.array(first["test_clean"]["kinds"] + first["test_artifact"]["kinds"])
    severity = np.array(first["test_clean"]["severity"] + first["test_artifact"]["severity"])
    for how in reps:
        tr = [_rep(c, "train", how) for c in all_codes]
        te = [np.concatenate([_rep(c, "test_clean", how), _rep(c, "test_artifact", how)])
              for c in all_codes]  # fmt: skip
        d = sum(t.shape[-1] for t in tr)
        rows = []
        q = _slices(how)[1] if how.startswith("sl") else None
        for seed in range(fits):
            ltr, lte = combined_log_prob(tr, te, combine, seed, q, mixture)
            flag = lte < np.quantile(ltr, 0.05)
            sens, spec = det.sensitivity_specificity(det.contingency(flag, labels))
            never = np.mean([flag[kinds == k].mean() for k in NEVER])
            sev = [flag[severity == s].mean() for s in (1, 2, 3)]
            rows.append([det.auroc(-lte, labels), sens, spec, never, *sev])
        o = np.array(rows)
        print(
            f"{how:8s} d={d:2d} {combine:5s} AUROC {o[:, 0].mean():.3f} "
            f"({o[:, 0].min():.3f}-{o[:, 0].max():.3f})  sens {100 * o[:, 1].mean():.1f}  "
            f"spec {100 * o[:, 2].mean():.1f}  never-simulated {100 * o[:, 3].mean():.1f}  "
            f"severity 1/2/3 {100 * o[:, 4].mean():.0f}/{100 * o[:, 5].mean():.0f}/"
            f"{100 * o[:, 6].mean():.0f}"
        )
    for f, c in zip(files, all_codes, strict=True):
        _shape(f, c)


def densities(files: list[Path], flow_fits: int) -> None:
    """Other density estimators than the flow on the same ``ax20`` codes (an ensemble: joint).

    Gaussian (Mahalanobis), robust Gaussian (scikit-learn's MinCovDet), distance to the k-th
    nearest training code, Gaussian KDE (bandwidths in standardised units), and ``flow_fits``
    single flows -- each thresholded at the 5th percentile of its training scores, as the flow.
    Whether the codes or the density estimator limit detection.
    """
    from scipy.spatial.distance import cdist
    from sklearn.covariance import MinCovDet
    from sklearn.neighbors import KernelDensity

    from qcflow.qc import detection as det

    torch.set_num_threads(1)
    codes = [_load_codes(f) for f in files]
    first = codes[0]
    labels = np.array(first["test_clean"]["labels"] + first["test_artifact"]["labels"])
    kinds = np.array(first["test_clean"]["kinds"] + first["test_artifact"]["kinds"])
    tr = np.concatenate([_rep(c, "train", "ax20") for c in codes], 1)
    te = np.concatenate(
        [np.concatenate([_rep(c, "test_clean", "ax20"), _rep(c, "test_artifact", "ax20")])
         for c in codes], 1,
    )  # fmt: skip
    mu, sd = tr.mean(0), tr.std(0)
    trs, tes = (tr - mu) / sd, (te - mu) / sd
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (train, test), high = typical
    precision = np.linalg.inv(np.cov(trs.T))
    scores["gaussian"] = tuple(-np.einsum("ij,jk,ik->i", x, precision, x) for x in (trs, tes))
    mcd = MinCovDet(random_state=0).fit(trs)
    scores["mcd"] = (-mcd.mahalanobis(trs), -mcd.mahalanobis(tes))
    d_tr, d_te = cdist(trs, trs), cdist(tes, trs)
    np.fill_diagonal(d_tr, np.inf)  # a training code is not its own neighbour
    d_tr, d_te = np.sort(d_tr, 1), np.sort(d_te, 1)
    for k in (1, 3, 5, 10):
        scores[f"knn{k}"] = (-d_tr[:, k - 1], -d_te[:, k - 1])
    for bw in (0.2, 0.4, 0.8):
        kde = KernelDensity(bandwidth=bw).fit(trs)
        scores[f"kde{bw}"] = (kde.score_samples(trs), kde.score_samples(tes))
    for seed in range(flow_fits):
        scores[f"flow{seed}"] = _fit_log_prob(tr, te, seed)
    for name, (s_tr, s_te) in scores.items():
        flag = s_te < np.quantile(s_tr, 0.05)
        sens, spec = det.sensitivity_specificity(det.contingency(flag, labels))
        never = np.mean([flag[kinds == k].mean() for k in NEVER])
        print(f"{name:9s} AUROC {det.auroc(-s_te, labels):.3f}  sens {100 * sens:.1f}  "
              f"spec {100 * spec:.1f}  never-simulated {100 * never:.1f}")  # fmt: skip


def _shape(name: Path, codes: dict) -> None:
    """How one-dimensional the study code is, and what clean-scan nuisance it follows."""
    import pandas as pd
    from scipy.stats import spearmanr

    from qcflow.api import compose_config
    from qcflow.data.discovery import resolve_data_root
    from qcflow.tasks.iqc_evaluate import evaluation_data_cfg

    cfg = compose_config(["experiment=iqc_evaluate"])
    tr = _rep(codes, "train", "ax20")
    if tr.shape[1] != 2:
        return
    eig = np.linalg.eigvalsh(np.cov(tr.T))
    u = np.linalg.eigh(np.cov(tr.T))[1][:, -1]  # first principal direction
    z, snr, bias = [], [], []
    for split in ("train", "test_clean"):
        r = codes[split]
        table = Path(resolve_data_root(evaluation_data_cfg(cfg, split, None))) / "artifacts.tsv"
        if not table.is_file():
            return
        params = pd.read_csv(table, sep="\t").set_index("participant_id")["params"]
        proj = _rep(codes, split, "ax20") @ u
        for i, sid in enumerate(r["ids"]):
            if r["kinds"][i] == "none" and sid in params.index:
                subject = json.loads(params[sid])["subject"]
                z.append(proj[i])
                snr.append(subject["snr_db"])
                bias.append(subject["bias_ratio"])
    print(
        f"{name.name}: eigenvalue ratio {eig[-1] / eig[0]:.0f}; clean codes along PC1 vs SNR "
        f"rho={spearmanr(z, snr)[0]:+.2f}, vs bias ratio rho={spearmanr(z, bias)[0]:+.2f} "
        f"(sign arbitrary; n={len(z)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="per-slice codes of one encoder run")
    e.add_argument("run", type=Path)
    e.add_argument("out", type=Path)
    s = sub.add_parser("score", help="detection metrics from code files (several: an ensemble)")
    s.add_argument("codes", type=Path, nargs="+")
    s.add_argument("--rep", nargs="+", default=["ax20"])
    s.add_argument("--flow-fits", type=int, default=4)
    s.add_argument("--flow-mixture", type=int, default=1, help="flows per fit (model.mixture)")
    s.add_argument(
        "--combine", choices=("joint", "mean"), default="joint",
        help="ensemble: one flow on the concatenated codes (joint, the pipeline's) or the mean "
        "of per-member standardised log-densities (mean)",
    )  # fmt: skip
    de = sub.add_parser("densities", help="other density estimators on the same codes")
    de.add_argument("codes", type=Path, nargs="+")
    de.add_argument("--flow-fits", type=int, default=3)
    args = parser.parse_args()
    if args.cmd == "embed":
        embed(args.run, args.out)
    elif args.cmd == "densities":
        densities(args.codes, args.flow_fits)
    else:
        score(args.codes, args.rep, args.flow_fits, args.combine, args.flow_mixture)


if __name__ == "__main__":
    main()
