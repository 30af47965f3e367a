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

from qcflow.lit.uncertainty.artifact import ArtifactSeg
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
        others: see :class:`ArtifactSeg` (``absent_kind_var`` is ``free``: a teacher's
            channel learns from the CE wherever it is).
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
            absent_kind_var="free",
            task_net=task_net,
            frozen={},
        )


class StudentSeg(ArtifactSeg):
    """Stage 3: the student of every kind (``sources == ["task", *kinds]``).

    Args:
        kinds: its artifact kinds, in channel order.
        absent_kind_var: ``free`` (the paper): frozen teacher i makes channel i's target from
            the student's input, whatever kinds it carries; ``zero``: only where kind i was
            applied, and the target is 0 elsewhere (see :class:`ArtifactSeg`).
        teacher_nets: frozen teachers by kind (``None`` when loading for inference only).
        others: see :class:`ArtifactSeg`.

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
        absent_kind_var: str,
        task_net: nn.Module | None = None,
        teacher_nets: Mapping[str, nn.Module] | None = None,
    ) -> None:
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
            task_net=task_net,
            frozen=teachers,
        )

    def missing_frozen(self) -> list[str]:
        return [*super().missing_frozen(), *(k for k in self.kinds if k not in self.frozen)]

    def target_list(
        self, image: Tensor, image_clean: Tensor, present: Tensor | None
    ) -> list[Tensor]:
        """``[sigma_t^2(clean), sigma_i^2 of teacher i on image for each kind]``; with
        ``absent_kind_var=zero`` the target is 0 where kind i is absent (and teacher i is not
        run when no sample has it)."""
        targets = super().target_list(image, image_clean, present)
        zero_absent = self.absent_kind_var == "zero"
        if present is None and zero_absent:
            raise ValueError("absent_kind_var='zero' needs the batch's 'artifact_kinds'")
        for k, kind in enumerate(self.kinds):
            sel = None if present is None else present[:, k].view(-1, 1, 1, 1, 1)
            if zero_absent and not bool(sel.any()):
                targets.append(torch.zeros_like(targets[0]))
                continue
            target = self.frozen[kind](image)[1][:, 1:2].exp()
            targets.append(torch.where(sel, target, 0.0) if zero_absent else target)
        return targets
