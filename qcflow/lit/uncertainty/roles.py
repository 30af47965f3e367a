"""Method B's three stages as classes: task, teacher (one per artifact kind) and student.

Shaw et al., MIDL 2020 / MELBA 2021 (section 3):

* :class:`TaskSeg` is trained on clean patches; its variance is the task uncertainty
  ``sigma_t^2`` (boundaries, anatomy the network gets wrong without any artifact).
* :class:`TeacherSeg` (one per kind i) is trained on patches corrupted with kind i and predicts
  ``(sigma_t_hat^2, sigma_i^2)``; the consistency loss ties ``sigma_t_hat^2`` to the frozen task
  network's ``sigma_t^2`` *on the clean patch*, so the variance that the corruption adds lands in
  ``sigma_i^2``.
* :class:`StudentSeg` is trained with every kind and predicts ``sigma_t^2`` and every
  ``sigma_i^2``; channel ``task`` is taught by the frozen task network on the clean patch,
  channel ``i`` by frozen teacher i.

Teacher and student share :class:`~qcflow.lit.uncertainty.artifact.ArtifactSeg`; each class
overrides what its role does differently. Their values live in ``conf/uncertainty_module/*.yaml``
only: no argument has a default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qcflow.lit.uncertainty.artifact import STUDENT_TARGETS, ArtifactSeg, choice
from qcflow.lit.uncertainty.base import UncertaintySeg

__all__ = ["TaskSeg", "TeacherSeg", "StudentSeg"]


class TaskSeg(UncertaintySeg):
    """Stage 1: the task network, one variance channel (``sources == ["task"]``).

    Args: those of :class:`~qcflow.lit.uncertainty.base.UncertaintySeg` (``net``, ``lr``,
    ``eps``, ``ds_weights``); its loss is the heteroscedastic CE of its own ``sigma_t^2``.
    """

    role = "task"

    def __init__(
        self, *, net: Mapping[str, Any], lr: float, eps: float, ds_weights: Sequence[float] | None
    ) -> None:
        super().__init__(net, lr, eps, ds_weights, kinds=(), frozen={})


class TeacherSeg(ArtifactSeg):
    """Stage 2: the teacher of one artifact kind (``sources == ["task", kind]``).

    Args:
        kind: its artifact kind.
        others: see :class:`ArtifactSeg`.

    With ``absent_kind_var=zero`` its artifact channel has no consistency target, so the mean
    ``sigma_i^2`` over samples without kind i (clean ones, or negatives of other kinds) is added
    to the consistency term.
    """

    role = "teacher"

    def __init__(
        self,
        *,
        net: Mapping[str, Any],
        lr: float,
        eps: float,
        ds_weights: Sequence[float] | None,
        kind: str,
        consistency_weight: float,
        ssim_weight: float,
        init_from_task: bool,
        init_log_var: float,
        task_var_lr_mult: float,
        artifact_lr_mult: float,
        hce_task_var: str,
        absent_kind_var: str,
        kind_aux_weight: float,
        context_lr_mult: float,
        task_net: nn.Module | None = None,
    ) -> None:
        if not isinstance(kind, str):
            raise ValueError(f"a teacher has exactly one artifact kind, got {kind!r}")
        super().__init__(
            net=net,
            lr=lr,
            eps=eps,
            ds_weights=ds_weights,
            kinds=[kind],
            consistency_weight=consistency_weight,
            ssim_weight=ssim_weight,
            init_from_task=init_from_task,
            init_log_var=init_log_var,
            task_var_lr_mult=task_var_lr_mult,
            artifact_lr_mult=artifact_lr_mult,
            hce_task_var=hce_task_var,
            absent_kind_var=absent_kind_var,
            kind_aux_weight=kind_aux_weight,
            context_lr_mult=context_lr_mult,
            task_net=task_net,
            frozen={},
        )

    def absent_pull(self, consistency: Tensor, pull: Tensor) -> Tensor:
        return consistency + pull


class StudentSeg(ArtifactSeg):
    """Stage 3: the student of every kind (``sources == ["task", *kinds]``).

    Args:
        kinds: its artifact kinds, in channel order.
        student_targets: what frozen teacher i sees when it makes the target of channel i:
            ``corrupted`` (the student's input, every applied kind: the paper's wording) or
            ``own_kind`` (the input if kind i was applied to this sample, else the clean patch):
            a teacher that never saw kind j still reacts to it, so with ``corrupted`` every
            channel learns every kind; with ``own_kind`` channel i is taught to stay at its
            clean level on the other kinds. Exact for single-kind samples
            (``RandomArtifacts(exclusive=True)``); needs ``batch["artifact_kinds"]``.
        teacher_nets: frozen teachers by kind (``None`` when loading for inference only).
        others: see :class:`ArtifactSeg`.

    With ``absent_kind_var=zero`` channel i's consistency target is 0 where kind i is absent.
    """

    role = "student"

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
        student_targets: str,
        absent_kind_var: str,
        kind_aux_weight: float,
        context_lr_mult: float,
        task_net: nn.Module | None = None,
        teacher_nets: Mapping[str, nn.Module] | None = None,
    ) -> None:
        targets = choice("student_targets", student_targets, STUDENT_TARGETS)
        kinds = [str(k) for k in kinds]
        teachers = {k: teacher_nets[k] for k in kinds if k in teacher_nets} if teacher_nets else {}
        super().__init__(
            net=net,
            lr=lr,
            eps=eps,
            ds_weights=ds_weights,
            kinds=kinds,
            consistency_weight=consistency_weight,
            ssim_weight=ssim_weight,
            init_from_task=init_from_task,
            init_log_var=init_log_var,
            task_var_lr_mult=task_var_lr_mult,
            artifact_lr_mult=artifact_lr_mult,
            hce_task_var=hce_task_var,
            absent_kind_var=absent_kind_var,
            kind_aux_weight=kind_aux_weight,
            context_lr_mult=context_lr_mult,
            task_net=task_net,
            frozen=teachers,
        )
        self.student_targets = targets

    def missing_frozen(self) -> list[str]:
        return [*super().missing_frozen(), *(k for k in self.kinds if k not in self.frozen)]

    def target_list(
        self, image: Tensor, image_clean: Tensor, present: Tensor | None
    ) -> list[Tensor]:
        """``[sigma_t^2(clean), sigma_i^2 of teacher i for each kind]``: teacher i sees
        ``image`` (``student_targets=corrupted``) or, per sample, ``image`` where kind i is
        present and ``image_clean`` elsewhere (``own_kind``); with ``absent_kind_var=zero`` the
        target is 0 where kind i is absent (and teacher i is not run when no sample has it)."""
        targets = super().target_list(image, image_clean, present)
        zero_absent = self.absent_kind_var == "zero"
        if present is None and (zero_absent or self.student_targets == "own_kind"):
            raise ValueError(
                f"student_targets='{self.student_targets}', absent_kind_var="
                f"'{self.absent_kind_var}' need the batch's 'artifact_kinds'"
            )
        for k, kind in enumerate(self.kinds):
            sel = None if present is None else present[:, k].view(-1, 1, 1, 1, 1)
            if zero_absent and not bool(sel.any()):
                targets.append(torch.zeros_like(targets[0]))
                continue
            seen = image
            if self.student_targets == "own_kind" and not zero_absent and not bool(sel.all()):
                seen = torch.where(sel, image, image_clean)  # (absent: the target is 0 anyway)
            target = self.frozen[kind](seen)[1][:, 1:2].exp()
            targets.append(torch.where(sel, target, 0.0) if zero_absent else target)
        return targets

    def absent_pull(self, consistency: Tensor, pull: Tensor) -> Tensor:
        return consistency  # its absent channels already have zero consistency targets
