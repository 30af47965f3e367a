"""What a teacher and the student of method B share: artifact-variance channels beside the
frozen task network (Shaw et al., MIDL 2020 / MELBA 2021, section 3).

Both predict ``(sigma_t^2, sigma_1^2, ...)``. The segmentation's heteroscedastic CE uses the sum
of the variances (:mod:`qcflow.lit.uncertainty.base`); the consistency loss
``C(a, b) = MSE(a, b) + lambda (1 - SSIM3D(a, b))`` ties each supervised channel
to a frozen network's variance: the task channel to the frozen task network's ``sigma_t^2`` *on
the clean patch*, so the variance that the corruption adds lands in the artifact channels. The
CPU-budget deviations of this repo (start from the task network, keep the task variance out of
the artifact uncertainty; ``experiments/shaw2021_uncertainty/README.md``) are arguments here,
with their values in ``conf/uncertainty_module/*.yaml`` only. A context branch of the network
(``net.context``, the student's kind attribution) is always frozen here: it is trained
beforehand as a kind classifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qcflow.lit.uncertainty.base import UncertaintySeg
from qcflow.models.losses import consistency_loss

__all__ = ["HCE_TASK_VAR", "ABSENT_KIND_VAR", "ArtifactSeg", "choice"]

#: which task variance enters a teacher's / student's heteroscedastic variance sum
HCE_TASK_VAR = ("own", "reference")
#: what the student's artifact channel i learns on samples without kind i
ABSENT_KIND_VAR = ("free", "zero")


def choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming the argument."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return str(value)


@dataclass
class _Targets:
    """Per batch: frozen-network variances ``ref (B, n, D, H, W)`` and which kinds each sample
    carries (``present (B, K)``; ``absent (B, K, 1, 1, 1)`` where ``absent_kind_var=zero``)."""

    ref: Tensor
    present: Tensor | None
    absent: Tensor | None


class ArtifactSeg(UncertaintySeg):
    """What a teacher and the student share: artifact channels beside the frozen task network.

    Args:
        net, lr, eps, ds_weights: see :class:`~qcflow.lit.uncertainty.base.UncertaintySeg`.
        kinds: the artifact kinds of the channels after ``task``.
        consistency_weight: weight of the consistency terms.
        ssim_weight: lambda of the SSIM term in the consistency loss (0.1).
        init_from_task: start from the frozen task network's weights (encoder, decoder,
            segmentation head and task-variance row; :meth:`TwoHeadUNet.init_from`) instead of
            from scratch. A CPU-budget deviation from the paper, which trains every stage from
            scratch for 30 000 iterations: from scratch, the student's cross-entropy is divided
            by the sum of six variances and its segmentation collapses to background in a short
            schedule.
        init_log_var: initial log-variance of the artifact channels when ``init_from_task``.
        task_var_lr_mult: learning-rate multiplier of the task-variance row of the output
            head(s) (0 freezes the row copied from the task network, so extra uncertainty on
            corrupted patches cannot be absorbed there through the head).
        artifact_lr_mult: learning-rate multiplier of the artifact log-variance rows of the
            output head(s) (their zero-initialised weights move ~lr per Adam step).
        hce_task_var: which ``sigma_t^2`` enters the variance sum of the CE: ``own`` (the
            stage's prediction, the paper) or ``reference`` (the frozen task network's on the
            clean patch, detached), so the uncertainty that the corruption adds can only be
            explained by the artifact channels; the own ``sigma_t^2`` channel then learns from
            the consistency loss alone.
        absent_kind_var: what artifact channel i learns on samples that do not carry kind i:
            ``free`` (the paper): it sits in the variance sum like everywhere, so it also
            absorbs segmentation errors of other causes; ``zero``: it leaves the variance sum
            there and its consistency target is 0 (the mean ``sigma_i^2`` there is logged as
            ``absent_kind_var``). Needs ``batch["artifact_kinds"]``. Given by the role: a
            teacher's is ``free``.
        task_net: the frozen task network (``None`` when loading for inference only).
    """

    def __init__(
        self,
        *,
        net: Mapping[str, Any],
        lr: float,
        eps: float,
        ds_weights: Sequence[float] | None,
        kinds: Sequence[str],
        consistency_weight: float,
        ssim_weight: float,
        init_from_task: bool,
        init_log_var: float,
        task_var_lr_mult: float,
        artifact_lr_mult: float,
        hce_task_var: str,
        absent_kind_var: str,
        task_net: nn.Module | None,
        frozen: Mapping[str, nn.Module],
    ) -> None:
        task_var = choice("hce_task_var", hce_task_var, HCE_TASK_VAR)
        absent = choice("absent_kind_var", absent_kind_var, ABSENT_KIND_VAR)
        if min(task_var_lr_mult, artifact_lr_mult) < 0:
            raise ValueError(
                f"lr multipliers must be >= 0, got {task_var_lr_mult}, {artifact_lr_mult}"
            )
        # frozen stages are optional here (loading for inference); fitting checks them
        nets = {"task": task_net} if task_net is not None else {}
        super().__init__(net, lr, eps, ds_weights, kinds=kinds, frozen={**nets, **frozen})
        self.consistency_weight = float(consistency_weight)
        self.ssim_weight = float(ssim_weight)
        self.task_var_lr_mult = float(task_var_lr_mult)
        self.artifact_lr_mult = float(artifact_lr_mult)
        self.hce_task_var = task_var
        self.absent_kind_var = absent
        if self.net.context is not None:  # a trained kind classifier: no gradient, no optimizer
            self.net.context.requires_grad_(False)
        # checkpoints are loaded without frozen stages: then the saved weights are used instead
        if init_from_task and "task" in self.frozen:
            self.net.init_from(self.frozen["task"], extra_log_var=float(init_log_var))

    def missing_frozen(self) -> list[str]:
        return [] if "task" in self.frozen else ["task"]

    # ------------------------------------------------------------------ optimizer
    def optimizer_params(self) -> Iterable[Any]:
        return [p for p in self.net.parameters() if p.requires_grad]  # not the frozen context

    def row_lr_multipliers(self) -> dict[nn.Parameter, Tensor]:
        """Per-row lr multipliers of the output heads (empty when all ones).

        Rows: ``num_classes`` segmentation rows (1), the task-variance row
        (``task_var_lr_mult``), then the artifact rows (``artifact_lr_mult``).
        """
        if self.task_var_lr_mult == 1.0 and self.artifact_lr_mult == 1.0:
            return {}
        n_cls = self.net.num_classes
        mult = torch.ones(n_cls + self.net.head_sources)
        mult[n_cls] = self.task_var_lr_mult
        mult[n_cls + 1 :] = self.artifact_lr_mult
        return {p: mult for head in self.net.heads() for p in head.parameters()}

    # ------------------------------------------------------------------ targets
    def kinds_present(self, batch: Mapping[str, Any]) -> Tensor | None:
        """``(B, K)`` bool from ``batch["artifact_kinds"]``: kind ``self.kinds[k]`` in sample b."""
        kinds = batch.get("artifact_kinds")
        if kinds is None:
            return None
        device = batch["image"].device
        return torch.as_tensor([[k in ks for k in self.kinds] for ks in kinds], device=device)

    def target_list(
        self, image: Tensor, image_clean: Tensor, present: Tensor | None
    ) -> list[Tensor]:
        """Targets of the supervised channels: ``[sigma_t^2 of the task network (clean)]``."""
        return [self.frozen["task"](image_clean)[1][:, :1].exp()]

    @torch.no_grad()
    def reference_variances(
        self, image: Tensor, image_clean: Tensor, present: Tensor | None = None
    ) -> Tensor:
        """Frozen-network targets for each supervised log-variance channel ``(B, n, D, H, W)``.

        Args:
            present: ``(B, K)`` bool, kind ``self.kinds[k]`` applied to sample ``b`` (see
                :meth:`kinds_present`).
        """
        return torch.cat(self.target_list(image, image_clean, present), dim=1)

    def loss_targets(self, batch: Mapping[str, Any]) -> _Targets:
        image = batch["image"]
        present = self.kinds_present(batch)
        absent = None
        if self.absent_kind_var == "zero":
            if present is None:
                raise ValueError("absent_kind_var='zero' needs the batch's 'artifact_kinds'")
            absent = ~present.view(*present.shape, 1, 1, 1)  # (B, K, 1, 1, 1)
        ref = self.reference_variances(image, batch.get("image_clean", image), present)
        return _Targets(ref, present, absent)

    # ------------------------------------------------------------------ loss
    def variance_sum(self, log_var: Tensor, targets: _Targets) -> Tensor:
        # hce_task_var=reference: the frozen task network's sigma_t^2 replaces the own one
        task = log_var[:, :1] if self.hce_task_var == "own" else targets.ref[:, :1].log()
        art = log_var[:, 1:]
        if targets.absent is not None:  # sigma_i^2 leaves the sum where kind i is absent
            art = torch.where(targets.absent, torch.full_like(art, float("-inf")), art)
        return torch.cat([task, art], dim=1)

    def add_terms(self, out: dict[str, Tensor], log_var: Tensor, targets: _Targets) -> None:
        ref, absent = targets.ref, targets.absent
        var = log_var[:, : ref.shape[1]].exp()
        cons = (
            sum(
                consistency_loss(var[:, c : c + 1], ref[:, c : c + 1], self.ssim_weight)
                for c in range(ref.shape[1])
            )
            / ref.shape[1]
        )
        if absent is not None:
            # mean sigma_i^2 where kind i is absent, for the log (always: DDP sync); its zero
            # consistency targets already pull it to 0
            with torch.no_grad():
                art = log_var[:, 1:].exp().mean(dim=(2, 3, 4))  # (B, K)
                mask = absent.view(art.shape)
                out["absent_kind_var"] = art[mask].mean() if bool(mask.any()) else art.sum() * 0
        out["consistency"] = cons
        out["loss"] = out["seg"] + self.consistency_weight * cons
