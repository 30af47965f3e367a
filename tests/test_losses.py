"""Heteroscedastic CE and the consistency loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qcflow.models.losses import consistency_loss, heteroscedastic_ce, ssim3d


def test_heteroscedastic_ce_matches_hand_computation() -> None:
    # one voxel, two classes, two sources
    logits = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1, 1)
    target = torch.tensor([1]).view(1, 1, 1, 1)
    log_var = torch.log(torch.tensor([0.5, 0.25])).view(1, 2, 1, 1, 1)
    eps = 0.05
    ce = -math.log(math.exp(-1.0) / (math.exp(2.0) + math.exp(-1.0)))
    var = 0.5 + 0.25 + eps
    expected = ce / var + 0.5 * math.log(var)
    got = heteroscedastic_ce(logits, target, log_var, eps=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_heteroscedastic_ce_reduces_to_ce() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, 5, generator=g)
    target = torch.randint(0, 2, (2, 1, 3, 4, 5), generator=g)
    log_var = torch.zeros(2, 1, 3, 4, 5)  # sigma^2 = 1
    ce = F.cross_entropy(logits, target[:, 0])
    assert heteroscedastic_ce(logits, target, log_var, eps=0.0).item() == pytest.approx(ce.item())
    # a variance sum of K sources: sigma^2 = sum exp(s) = 1 again
    log_var3 = torch.full((2, 3, 3, 4, 5), math.log(1 / 3))
    assert heteroscedastic_ce(logits, target, log_var3, eps=0.0).item() == pytest.approx(
        ce.item(), rel=1e-5
    )


def _direct_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """SSIM over 3x3x3 uniform windows (population statistics, valid region only)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(x, 3, stride=1)

    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).mean()


def test_ssim3d_matches_direct_computation() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 7, 8, 9, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(2, 1, 7, 8, 9, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim3d(a, b, data_range=1.0)
    assert got.item() == pytest.approx(_direct_ssim(a, b, 1.0).item(), rel=1e-6)


def test_consistency_zero_for_identical_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.rand(2, 1, 6, 6, 6, generator=g)
    assert consistency_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-5)
    b = a + 0.1 * torch.rand(2, 1, 6, 6, 6, generator=g)
    assert consistency_loss(a, b).item() > 0.01
    # a constant offset: L1 > 0 while the gradient term is zero
    c = a + 0.2
    l1 = (a - c).abs().mean().item()
    assert consistency_loss(a, c, ssim_weight=0.0).item() == pytest.approx(l1, rel=1e-5)


def test_consistency_gradients_flow_only_into_prediction() -> None:
    pred = torch.rand(1, 1, 5, 5, 5, requires_grad=True)
    target = torch.rand(1, 1, 5, 5, 5, requires_grad=True)
    consistency_loss(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
