"""A 3-D nnU-Net-style U-Net (MONAI ``DynUNet``) with a segmentation head and a log-variance head.

Shaw et al. (MIDL 2020, MELBA 2021) predict, per voxel, segmentation logits ``f`` and one
log-variance channel ``s_k = log sigma_k^2`` per uncertainty source (task, and one per artifact
kind). Both heads are 1x1x1 convolutions on the last decoder features; MONAI's ``DynUNet`` ends in
exactly such a convolution, so one ``DynUNet`` with ``num_classes + num_sources`` output channels
split into ``(logits, log_var)`` *is* the two-head network (the heads share no weights).

Optional attribution (``context=True`` with ``attribution=True``; off by default, not in the
papers): a small strided CNN on the input patch (:class:`PatchContext`, pooled to one vector by
the mean and standard deviation of its features) gives per-patch kind logits ``c``, and the head
predicts one *total* artifact log-variance ``s_a`` per voxel that they split between the kinds:
``sigma_i^2 = exp(s_a) * softmax(c)_i``, i.e. ``s_i = s_a + log_softmax(c)_i``. The sum over the
artifact channels is exactly ``exp(s_a)`` (what the heteroscedastic CE sees), and which channel
is the largest depends only on the patch-level kind logits, so all artifact channels share one
scale. Why (experiments/shaw2021_uncertainty/README.md): the 1x1x1 heads see only the last
decoder features at one voxel, which encode segmentation difficulty rather than the artifact
kind, and per-kind heads learn scales far apart. The context branch is trained beforehand as a
kind classifier (``experiment=kind_classifier``) and stays frozen in the student.

Deep supervision (docs/pitfalls.md): with ``deep_supervision=True`` ``DynUNet`` returns a stacked
``(B, 1 + deep_supr_num, C, D, H, W)`` tensor in training mode and a single ``(B, C, D, H, W)``
tensor in eval mode; :meth:`TwoHeadUNet.forward_all` always returns a list of outputs (full
resolution first) and :meth:`TwoHeadUNet.forward` always the full-resolution one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DynUNet
from torch import Tensor, nn

__all__ = ["TwoHeadUNet", "PatchContext", "LOG_VAR_RANGE"]

#: log sigma^2 is clamped to this range before exponentiation (avoids inf/0 variances)
LOG_VAR_RANGE = (-12.0, 12.0)


class PatchContext(nn.Module):
    """Per-patch kind logits from a small strided CNN on the input, pooled by mean and std.

    Args:
        in_channels: image channels.
        num_outputs: logits per patch (one per artifact kind; a classifier: one per class).
        widths: features of the stride-2 3x3x3 convolutions (one per level).

    Shapes:
        ``x`` ``(B, in_channels, D, H, W)`` -> ``(B, num_outputs)``; zero for a fresh module.
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        widths: Sequence[int] = (16, 32, 32),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv3d(c, int(w), 3, stride=2, padding=1), nn.LeakyReLU(0.01)]
            c = int(w)
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(2 * c, num_outputs)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @torch.no_grad()
    def init_from_classifier(
        self, classifier: PatchContext, classes: Sequence[str], kinds: Sequence[str]
    ) -> None:
        """Start from a kind classifier trained with a clean class (``experiment=kind_classifier``).

        ``classifier`` has one output per entry of ``classes`` (which includes ``"none"``);
        the features are copied and output ``i`` becomes the log-odds of ``kinds[i]`` against
        clean: ``logit[kinds[i]] - logit["none"]``.
        """
        names = list(classes)
        missing = [k for k in ["none", *kinds] if k not in names]
        if missing or len(kinds) != self.out.out_features:
            raise ValueError(f"classifier classes {names} do not cover none + {list(kinds)}")
        self.features.load_state_dict(classifier.features.state_dict())
        rows = torch.as_tensor([names.index(k) for k in kinds])
        none = names.index("none")
        self.out.weight.copy_(classifier.out.weight[rows] - classifier.out.weight[none])
        self.out.bias.copy_(classifier.out.bias[rows] - classifier.out.bias[none])

    def logits(self, x: Tensor) -> Tensor:
        """``(B, num_outputs)`` kind logits."""
        f = self.features(x).flatten(2)  # (B, C, N)
        return self.out(torch.cat([f.mean(-1), f.std(-1, correction=0)], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


class TwoHeadUNet(nn.Module):
    """DynUNet returning segmentation logits and per-source log-variances.

    Args:
        num_sources: log-variance channels K (1 task; 2 teacher: task + its kind; 1 + n_kinds
            student).
        num_classes: segmentation classes (2: background, grey matter).
        in_channels: image channels.
        filters: features per resolution level; the number of levels is ``len(filters)``, each
            level below the first halves the resolution (patches must be divisible by
            ``2 ** (len(filters) - 1)``).
        kernel_size: convolution kernel size at every level.
        norm_name: MONAI normalisation name (nnU-Net: instance norm).
        deep_supervision: add deep-supervision heads (training mode only).
        deep_supr_num: number of deep-supervision outputs.
        res_block: residual blocks (nnU-Net "ResEnc"-like) instead of plain conv blocks.
        context: add a :class:`PatchContext` branch whose kind logits split the artifact
            variance (needs ``attribution``; no effect with a single source, i.e. the task
            network).
        attribution: one total artifact log-variance row in the head, split between the
            artifact channels by the softmax of the context logits (needs ``context`` when
            there are two or more artifact channels).

    Shapes:
        ``x`` ``(B, in_channels, D, H, W)`` -> ``logits`` ``(B, num_classes, D, H, W)`` and
        ``log_var`` ``(B, num_sources, D, H, W)``.
    """

    def __init__(
        self,
        num_sources: int = 1,
        num_classes: int = 2,
        in_channels: int = 1,
        filters: Sequence[int] = (16, 32, 64, 128),
        kernel_size: int = 3,
        norm_name: str = "instance",
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        context: bool = False,
        attribution: bool = False,
    ) -> None:
        super().__init__()
        if num_sources < 1 or num_classes < 2:
            raise ValueError(
                f"need num_sources >= 1 and num_classes >= 2, got {num_sources}, {num_classes}"
            )
        levels = len(filters)
        if levels < 3:  # DynUNet needs at least 3 levels
            raise ValueError(f"filters needs at least 3 levels, got {list(filters)}")
        strides = [1] + [2] * (levels - 1)
        self.num_sources = int(num_sources)
        self.num_classes = int(num_classes)
        self.divisor = 2 ** (levels - 1)
        self.attribution = bool(attribution) and self.num_sources > 1
        if self.attribution and self.num_sources > 2 and not context:
            raise ValueError("attribution=True needs context=True (the kind logits)")
        if context and not attribution and self.num_sources > 1:
            raise ValueError(
                "context=True needs attribution=True: per-kind context offsets were retired "
                "(measured no gain; README of experiments/shaw2021_uncertainty, Switches)"
            )
        #: log-variance rows of the output head(s): task (+ one total artifact row)
        self.head_sources = 2 if self.attribution else self.num_sources
        self.net = DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes + self.head_sources,
            kernel_size=[kernel_size] * levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(filters),
            norm_name=norm_name,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        self.context = (
            PatchContext(in_channels, self.num_sources - 1)
            if context and self.num_sources > 1
            else None
        )

    def _split(self, out: Tensor, share: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logits, log_var = out.split([self.num_classes, self.head_sources], dim=1)
        if self.attribution:  # share: log_softmax of the kind logits (B, num_sources - 1)
            share = share if share is not None else log_var.new_zeros(log_var.shape[0], 1)
            art = log_var[:, 1:2] + share[:, :, None, None, None]
            log_var = torch.cat([log_var[:, :1], art], dim=1)
        return logits, log_var.clamp(*LOG_VAR_RANGE)

    def forward_all(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """All outputs (full resolution first; deep-supervision ones are upsampled by DynUNet)."""
        out = self.net(x)
        outs = out.unbind(1) if out.ndim == 6 else (out,)  # (B, 1 + n, C, D, H, W) in training
        share = None
        if self.context is not None:
            share = self.context.logits(x).log_softmax(dim=1)
        return [self._split(o, share) for o in outs]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, log_var)`` at full resolution."""
        return self.forward_all(x)[0]

    def heads(self) -> list[nn.Conv3d]:
        """The 1x1x1 output convolutions (full resolution first, then deep-supervision heads)."""
        blocks = [self.net.output_block, *getattr(self.net, "deep_supervision_heads", [])]
        return [b.conv.conv for b in blocks]

    @torch.no_grad()
    def init_from(self, source: TwoHeadUNet, extra_log_var: float = -2.0) -> None:
        """Start from ``source``'s weights (a trained network with fewer variance channels).

        Every parameter and buffer is copied from ``source`` (same ``filters`` etc. required);
        in the output heads the segmentation rows and ``source``'s log-variance rows are
        copied, and each extra log-variance row (an artifact channel the source does not have)
        gets zero weights and bias ``extra_log_var``, i.e. a small constant variance
        ``exp(extra_log_var)`` that training raises where the artifact hurts the segmentation.
        So right after this call the logits equal ``source``'s and the first
        ``source.num_sources`` log-variances too. A :class:`PatchContext` branch is not copied:
        it keeps its fresh (zero-output) initialisation.
        """
        if (
            source.num_classes != self.num_classes
            or source.num_sources > self.num_sources
            or source.head_sources > self.head_sources
        ):
            raise ValueError(
                f"cannot initialise {self.num_classes} classes / {self.num_sources} sources "
                f"from {source.num_classes} / {source.num_sources}"
            )
        n_src = source.num_classes + source.head_sources
        head_params = {id(p) for h in self.heads() for p in h.parameters()}
        own, theirs = self.state_dict(), source.state_dict()

        def unet_params(net: TwoHeadUNet) -> list[tuple[str, nn.Parameter]]:
            return [(n, p) for n, p in net.named_parameters() if not n.startswith("context.")]

        for (name, p_own), (name_src, p_src) in zip(
            unet_params(self), unet_params(source), strict=True
        ):
            if name != name_src:
                raise ValueError(f"architectures differ: {name} vs {name_src}")
            if id(p_own) in head_params:
                p_own[:n_src].copy_(p_src)
                if p_own.ndim > 1:
                    p_own[n_src:].zero_()
                else:
                    p_own[n_src:].fill_(float(extra_log_var))
            elif p_own.shape != p_src.shape:
                raise ValueError(f"architectures differ at {name}: {p_own.shape} vs {p_src.shape}")
            else:
                p_own.copy_(p_src)
        for name, buf in self.named_buffers():  # e.g. norm statistics
            if name in theirs and theirs[name].shape == buf.shape:
                own[name].copy_(theirs[name])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Concatenated ``(B, num_classes + num_sources, D, H, W)`` (for sliding windows)."""
        logits, log_var = self.forward(x)
        return torch.cat([logits, log_var], dim=1)
