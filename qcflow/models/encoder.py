"""Artifact encoder and contrastive loss of Zuo et al. 2023 (method A).

The encoder E is a 2-D DenseNet (MONAI) mapping one slice to a low-dimensional artifact code
m ∈ R^d (d = 2 by default). It is trained contrastively (:func:`contrastive_loss`) so that
slices of one volume (same artifact level) land close and slices of other volumes or corrupted
copies land apart; a volume is represented by the mean code of its central axial slices
(:func:`volume_code`).

References:
    Zuo, L. et al. Unsupervised MR image quality control using a latent artifact space and a
    normalizing flow. SPIE Medical Imaging 2023 (loss: their Eq. 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet
from torch import Tensor, nn

__all__ = [
    "ArtifactEncoder",
    "EncoderEnsemble",
    "contrastive_loss",
    "volume_code",
]


class ArtifactEncoder(nn.Module):
    """2-D DenseNet slice encoder: ``(B, 1, S, S)`` -> ``(B, d)``.

    ``ArtifactEncoder()`` with the defaults is MONAI's DenseNet-121 (``init_features=64``,
    ``growth_rate=32``, ``block_config=(6, 12, 24, 16)``); the light CPU setting in
    ``conf/model/encoder_light.yaml`` shrinks all three.

    Args:
        latent_dim: d, the size of the artifact code m.
        in_channels: image channels (1 for T1w).
        init_features: features of the stem convolution.
        growth_rate: features added by each dense layer.
        block_config: dense layers per dense block.
        bn_size: bottleneck width multiplier.
        dropout_prob: dropout inside dense layers.
    """

    def __init__(
        self,
        latent_dim: int = 2,
        in_channels: int = 1,
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.net = DenseNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=self.latent_dim,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            bn_size=bn_size,
            dropout_prob=dropout_prob,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, S, S)`` slices -> ``(B, d)`` codes."""
        return self.net(x)


class EncoderEnsemble(nn.Module):
    """Several trained slice encoders side by side: ``(B, 1, S, S)`` -> ``(B, sum_e d_e)``.

    Extension (off by default; the paper uses one encoder): the code of a slice is the
    concatenation of each member's code, so a volume's mean code is the concatenation of the
    members' mean codes and the flow models their joint density. Encoders trained with
    different seeds agree on strong artifacts but each spreads the clean scans along its own
    nuisance direction (SNR, bias; README of ``experiments/zuo2023_iqc``); a clean scan is
    rarely extreme for every member at once.

    Args:
        encoders: the members (each maps ``(B, 1, S, S)`` to ``(B, d_e)``), in a fixed order.

    Example:
        >>> ens = EncoderEnsemble([ArtifactEncoder(2, init_features=4, growth_rate=2,
        ...     block_config=(1,), bn_size=1) for _ in range(3)])
        >>> ens(torch.zeros(5, 1, 32, 32)).shape
        torch.Size([5, 6])
    """

    def __init__(self, encoders: Sequence[ArtifactEncoder]) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("EncoderEnsemble needs at least one encoder")
        self.members = nn.ModuleList(encoders)
        self.latent_dim = sum(int(e.latent_dim) for e in encoders)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, S, S)`` slices -> ``(B, sum_e d_e)`` concatenated codes."""
        return torch.cat([e(x) for e in self.members], dim=1)


def contrastive_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """The paper's contrastive loss, averaged over queries.

    For a query code m*, its positive m+ and N negatives m-_i::

        L = -log[ exp(m*·m+) / ( exp(m*·m+) + (1/N) Σ_i exp(m*·m-_i) ) ]

    i.e. the *mean* (not the sum) over negatives and no temperature, as in Zuo et al. 2023.
    Computed stably as ``softplus(lme - pos)`` with ``lme = logsumexp(neg) - log N``.

    Args:
        query: ``(B, d)`` codes m*.
        positive: ``(B, d)`` codes m+.
        negatives: ``(B, N, d)`` per-query negatives, or ``(M, d)`` shared by all queries.
        mask: ``(B, N)`` / ``(B, M)`` bool, True where a negative counts for that query
            (e.g. False for slices of the query's own volume). Every row needs one True.

    Returns:
        scalar loss.
    """
    pos = (query * positive).sum(-1)  # (B,)
    if negatives.ndim == 2:
        neg = query @ negatives.T  # (B, M)
    else:
        neg = torch.einsum("bd,bnd->bn", query, negatives)  # (B, N)
    if mask is None:
        mask = torch.ones_like(neg, dtype=torch.bool)
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("contrastive_loss: a query has no negative (mask row all False)")
    neg = neg.masked_fill(~mask, float("-inf"))
    lme = torch.logsumexp(neg, dim=-1) - torch.log(count.to(neg.dtype))  # log mean exp
    return F.softplus(lme - pos).mean()  # = -log(e^pos / (e^pos + e^lme))


@torch.no_grad()
def volume_code(encoder: nn.Module, slices: Tensor, batch_size: int = 64) -> Tensor:
    """A volume's artifact code: the mean of E over its slices.

    Args:
        encoder: slice encoder (its train/eval mode is left as is; call ``eval()`` first).
        slices: ``(n, 1, S, S)`` (the paper: the 20 central axial slices).
        batch_size: slices per forward pass.

    Returns:
        ``(d,)`` mean code.
    """
    codes = [encoder(slices[i : i + batch_size]) for i in range(0, len(slices), batch_size)]
    return torch.cat(codes).mean(0)
