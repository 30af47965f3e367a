"""RealNVP density of artifact codes with stored standardisation and τ thresholds.

Zuo et al. 2023 fit a RealNVP flow f (6 affine coupling layers) to the codes m of the
unlabelled training volumes, with f(m) ~ N(0, I) and

    log p_M(m) = log p_Z(f(m̃)) + log|det ∂f/∂m̃| - Σ_j log s_j,   m̃ = (m - μ) / s

(the last term accounts for the standardisation, so densities are in m-space). A volume is
flagged when its density is below the τ-percentile of the training volumes' densities.
The flow is zuko's ``RealNVP`` (it integrates to 1; nflows and normflows did not fit:
docs/pitfalls.md).

Extension (``mixture > 1``, off by default = the paper's single flow): K flows, each fitted
from its own initialisation on its own random hold-out split, and the density is their equal
mixture ``p_M(m) = (1/K) Σ_k p_k(m)`` -- still a normalised density, and with ~150 training
codes the decision no longer hinges on one fit's initialisation and split (measured in the
README of experiments/zuo2023_iqc).

The fit (maximum likelihood with Adam, best held-out epoch kept) is a Lightning module:
:func:`qcflow.lit.flow.fit_density`.

Example:
    >>> from qcflow.lit.flow import fit_density
    >>> m = torch.randn(200, 2)
    >>> density = DensityFlow(features=2, transforms=2, hidden_features=(16,))
    >>> _ = fit_density(density, m, epochs=2)
    >>> density.set_thresholds(m, taus=(0.05,))
    >>> density.flag(m, 0.05).float().mean() <= 0.06
    tensor(True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import zuko
from torch import Tensor, nn

__all__ = ["DensityFlow", "tau_key"]


def tau_key(tau: float) -> str:
    """``0.05`` -> ``'tau05'``, ``0.03`` -> ``'tau03'``, ``0.1`` -> ``'tau10'`` (metric names)."""
    return f"tau{round(tau * 100):02d}"


class DensityFlow(nn.Module):
    """zuko RealNVP on standardised codes, plus the standardisation and the thresholds.

    Everything needed at scoring time is a buffer, so ``state_dict`` round-trips it.

    Args:
        features: code dimension d.
        transforms: affine coupling layers (paper: 6).
        hidden_features: hidden widths of each coupling's MLP.
        taus: default percentiles (fractions) for :meth:`set_thresholds`.
        mixture: flows in the equal mixture (1 = the paper's single flow). The first is
            ``self.flow`` and the others ``self.others``, so a one-flow state dict is the
            same as before the option existed.
    """

    def __init__(
        self,
        features: int = 2,
        transforms: int = 6,
        hidden_features: Sequence[int] = (64, 64),
        taus: Sequence[float] = (0.05, 0.03),
        mixture: int = 1,
    ) -> None:
        super().__init__()
        if int(mixture) < 1:
            raise ValueError(f"mixture must be >= 1 (flows in the mixture), got {mixture}")
        self.features = int(features)

        def realnvp() -> zuko.flows.RealNVP:
            return zuko.flows.RealNVP(
                features=self.features,
                transforms=int(transforms),
                hidden_features=tuple(hidden_features),
            )

        self.flow = realnvp()
        self.others = nn.ModuleList([realnvp() for _ in range(int(mixture) - 1)])
        self.register_buffer("mean", torch.zeros(self.features))
        self.register_buffer("std", torch.ones(self.features))
        self.register_buffer("taus", torch.tensor([float(t) for t in taus], dtype=torch.float64))
        self.register_buffer(
            "thresholds", torch.full((len(taus),), float("nan"), dtype=torch.float64)
        )

    # ------------------------------------------------------------------ standardisation
    def set_standardization(self, m: Tensor) -> None:
        """Store per-feature mean and std of the training codes ``(N, d)``."""
        self.mean.copy_(m.mean(0))
        self.std.copy_(m.std(0).clamp_min(1e-8))

    def standardize(self, m: Tensor) -> Tensor:
        """``(N, d)`` codes -> standardised ``(N, d)``."""
        return (m - self.mean) / self.std

    # ------------------------------------------------------------------ density
    @property
    def flows(self) -> list[zuko.flows.RealNVP]:
        """The mixture's flows (one unless ``mixture > 1``)."""
        return [self.flow, *self.others]

    def log_prob(self, m: Tensor) -> Tensor:
        """log p_M(m) for codes ``(N, d)`` (m-space, standardisation Jacobian included)."""
        x = self.standardize(m)
        per = torch.stack([f().log_prob(x) for f in self.flows])  # (K, N); K = 1: exact
        return per.logsumexp(0) - math.log(len(per)) - self.std.log().sum()

    def forward(self, m: Tensor) -> Tensor:
        return self.log_prob(m)

    def to_latent(self, m: Tensor) -> Tensor:
        """z = f(m̃) ``(N, d)``: the flow's Gaussian latent (the paper's z scatter).

        A mixture (``mixture > 1``) has no single latent: this is its first flow's.
        """
        return self.flow().transform(self.standardize(m))

    def from_latent(self, z: Tensor) -> Tensor:
        """The inverse: codes m ``(N, d)`` of latents ``z`` (the first flow's, as above)."""
        return self.flow().transform.inv(z) * self.std + self.mean

    # ------------------------------------------------------------------ thresholds
    @torch.no_grad()
    def set_thresholds(self, m: Tensor, taus: Sequence[float] | None = None) -> Tensor:
        """Thresholds = the τ-percentiles of log p_M over the training codes ``m``
        (:func:`qcflow.qc.detection.tau_thresholds`).

        Args:
            m: ``(N, d)`` codes of the unlabelled training volumes.
            taus: fractions (0.05 = 5 %); default the stored ``taus``.

        Returns:
            ``(len(taus),)`` log-density thresholds (float64), also stored.
        """
        from qcflow.qc.detection import tau_thresholds  # the one definition of a τ threshold

        if taus is not None:
            self.taus = torch.tensor([float(t) for t in taus], dtype=torch.float64)
        logp = self.log_prob(m).double().cpu()
        thresholds = tau_thresholds(logp, self.taus.tolist())
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=self.taus.device)
        return self.thresholds

    def threshold(self, tau: float) -> float:
        """The stored log-density threshold of ``tau``."""
        for t, thr in zip(self.taus.tolist(), self.thresholds.tolist(), strict=True):
            if math.isclose(t, tau, abs_tol=1e-9):
                return float(thr)
        raise KeyError(f"no threshold stored for tau={tau}; stored: {self.taus.tolist()}")

    @torch.no_grad()
    def flag(self, m: Tensor, tau: float) -> Tensor:
        """``(N,)`` bool: True where log p_M(m) is below the ``tau`` threshold (fail)."""
        return self.log_prob(m).double() < self.threshold(tau)

    def extra_repr(self) -> str:
        return f"features={self.features}, mixture={len(self.flows)}, taus={self.taus.tolist()}"
