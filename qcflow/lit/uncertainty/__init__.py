"""Method B (Shaw et al., MIDL 2020 / MELBA 2021): decoupled heteroscedastic uncertainty.

Three stages, each a Lightning module built from config (``uncertainty.module``, a
``_target_`` of ``conf/uncertainty_module/*.yaml``, with the network ``net: ${model}``):

* :class:`TaskSeg` -- the task network on clean patches (``sources == ["task"]``);
* :class:`TeacherSeg` -- one per artifact kind, beside the frozen task network;
* :class:`StudentSeg` -- every kind, taught by the frozen task network and teachers;

with the shared base :class:`UncertaintySeg` (network, heteroscedastic CE, checkpoints) and
:class:`ArtifactSeg` (what a teacher and the student share). ``UncertaintySeg.load_from_checkpoint``
loads any stage, of this layout or the previous one, as its own class.
:class:`EpsilonSchedule` halves epsilon and the learning rate on loss plateaus.

Modules: ``base`` (shared module, loader), ``artifact`` (teacher and student), ``roles`` (the
three stages), ``schedule`` (epsilon), ``legacy`` (hyper-parameters of previous checkpoints).
The paired clean/corrupted patches are :class:`qcflow.data.paired.PairedPatchDataModule`.
"""

from __future__ import annotations

from qcflow.lit.uncertainty.artifact import (
    ABSENT_KIND_VAR,
    HCE_TASK_VAR,
    ArtifactSeg,
)
from qcflow.lit.uncertainty.base import UncertaintySeg, build_net, scale_row_updates
from qcflow.lit.uncertainty.roles import StudentSeg, TaskSeg, TeacherSeg
from qcflow.lit.uncertainty.schedule import EpsilonSchedule

__all__ = [
    "ABSENT_KIND_VAR",
    "HCE_TASK_VAR",
    "ArtifactSeg",
    "EpsilonSchedule",
    "StudentSeg",
    "TaskSeg",
    "TeacherSeg",
    "UncertaintySeg",
    "build_net",
    "scale_row_updates",
]
