"""Reading the hyper-parameters of method-B checkpoints, this layout's and the previous one's.

Checkpoints written before the stages became classes hold the arguments of one
``UncertaintySeg(role, kinds, net, ...)`` constructor: ``role`` and ``kinds`` for every role,
``net`` without ``_target_``, and every option for every role. :func:`checkpoint_arguments`
turns them into the arguments of :class:`~qcflow.lit.uncertainty.roles.TaskSeg`,
:class:`~qcflow.lit.uncertainty.roles.TeacherSeg` (``kind``) or
:class:`~qcflow.lit.uncertainty.roles.StudentSeg`, so ``UncertaintySeg.load_from_checkpoint``
loads both; the state dict (``net.*``) is the same in both layouts. Resuming such a run
(``resume=``) needs nothing of this: the module is built from the config and only its weights,
optimizer and loop state come from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["NET_TARGET", "PREVIOUS_DEFAULTS", "checkpoint_arguments"]

#: the network class of every checkpoint of the previous layout
NET_TARGET = "qcflow.models.unet.TwoHeadUNet"

#: What the previous constructor used for an argument that its checkpoint does not record
#: (a checkpoint written before the argument existed). A description of old files, not a
#: default of this code: new stages take every value from ``conf/``.
PREVIOUS_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "eps": 0.05,
    "ds_weights": None,
    "consistency_weight": 1.0,
    "ssim_weight": 0.1,
    "init_from_task": True,
    "init_log_var": -2.0,
    "task_var_lr_mult": 1.0,
    "artifact_lr_mult": 1.0,
    "hce_task_var": "own",
    "student_targets": "corrupted",
    "absent_kind_var": "free",
    "kind_aux_weight": 0.0,
    "context_lr_mult": 1.0,
}

_SHARED = ("net", "lr", "eps", "ds_weights")
_ARTIFACT = (
    "consistency_weight",
    "ssim_weight",
    "init_from_task",
    "init_log_var",
    "task_var_lr_mult",
    "artifact_lr_mult",
    "hce_task_var",
    "absent_kind_var",
    "kind_aux_weight",
    "context_lr_mult",
)


def _is_previous(hparams: Mapping[str, Any]) -> bool:
    net = hparams.get("net")
    return not (isinstance(net, Mapping) and "_target_" in net)


def checkpoint_arguments(hparams: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(role, constructor arguments)`` from a checkpoint's ``hyper_parameters``.

    Raises:
        ValueError: no ``role`` (not a method-B checkpoint), an unknown role, or a teacher
            of the previous layout without exactly one kind.
    """
    role = hparams.get("role")
    if role not in ("task", "teacher", "student"):
        raise ValueError(f"not a method-B stage checkpoint (role {role!r})")
    args = {k: v for k, v in hparams.items() if k != "role"}
    if not _is_previous(hparams):
        return str(role), args
    old = {**PREVIOUS_DEFAULTS, **args}
    old["net"] = {"_target_": NET_TARGET, **dict(old.get("net") or {})}
    out = {k: old[k] for k in _SHARED}
    if role == "task":
        return "task", out
    out.update({k: old[k] for k in _ARTIFACT})
    kinds = [str(k) for k in old.get("kinds") or ()]
    if role == "teacher":
        if len(kinds) != 1:
            raise ValueError(f"a teacher has exactly one artifact kind, got {kinds}")
        return "teacher", {**out, "kind": kinds[0]}
    return "student", {**out, "kinds": kinds, "student_targets": old["student_targets"]}
