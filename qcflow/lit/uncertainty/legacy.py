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

Both layouts may carry switches retired since (measured no gain: README of
experiments/shaw2021_uncertainty, "Switches"): at the value where they had no effect they are
dropped, so such checkpoints load as before; a checkpoint trained with one switched on is
refused (its weights were trained for a loss or network this code no longer has).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qcflow.lit.retired import RETIRED, RETIRED_OVERRIDES

__all__ = [
    "NET_TARGET",
    "PREVIOUS_DEFAULTS",
    "RETIRED",
    "RETIRED_OVERRIDES",
    "checkpoint_arguments",
]

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


def _refuse(setting: str) -> None:
    raise ValueError(
        f"trained with {setting}, a retired switch (measured no gain; README of "
        "experiments/shaw2021_uncertainty, Switches): retrain without it"
    )


def _retire(role: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` without the :data:`RETIRED` switches, each checked to be at its no-effect value."""
    args = dict(args)
    net = dict(args.get("net") or {})
    context = bool(net.get("context")) and role != "task"  # a task network has no branch
    net.pop("context_max_offset", None)
    if context and not net.get("attribution"):
        _refuse("model.context=true without model.attribution (per-kind context offsets)")
    args["net"] = net
    if role == "task":
        return args
    kind_aux = args.pop("kind_aux_weight", 0.0)
    if kind_aux:
        _refuse(f"kind_aux_weight={kind_aux}")
    lr_mult = args.pop("context_lr_mult", 0.0)
    if context and lr_mult:
        _refuse(f"context_lr_mult={lr_mult} (a context branch fine-tuned in the stage)")
    if role == "teacher":
        absent = args.pop("absent_kind_var", "free")
        if absent != "free":
            _refuse(f"absent_kind_var={absent!r} in a teacher")
    else:
        targets = args.pop("student_targets", "corrupted")
        if targets != "corrupted" and args.get("absent_kind_var") != "zero":
            _refuse(f"student_targets={targets!r} without absent_kind_var='zero'")
    return args


def _is_previous(hparams: Mapping[str, Any]) -> bool:
    net = hparams.get("net")
    return not (isinstance(net, Mapping) and "_target_" in net)


def checkpoint_arguments(hparams: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(role, constructor arguments)`` from a checkpoint's ``hyper_parameters``.

    Raises:
        ValueError: no ``role`` (not a method-B checkpoint), an unknown role, a teacher of
            the previous layout without exactly one kind, or a retired switch switched on.
    """
    role = hparams.get("role")
    if role not in ("task", "teacher", "student"):
        raise ValueError(f"not a method-B stage checkpoint (role {role!r})")
    args = {k: v for k, v in hparams.items() if k != "role"}
    if not _is_previous(hparams):
        return str(role), _retire(str(role), args)
    old = {**PREVIOUS_DEFAULTS, **args}
    old["net"] = {"_target_": NET_TARGET, **dict(old.get("net") or {})}
    out = {k: old[k] for k in _SHARED}
    if role == "task":
        return "task", _retire("task", out)
    out.update({k: old[k] for k in _ARTIFACT})
    kinds = [str(k) for k in old.get("kinds") or ()]
    if role == "teacher":
        if len(kinds) != 1:
            raise ValueError(f"a teacher has exactly one artifact kind, got {kinds}")
        return "teacher", _retire("teacher", {**out, "kind": kinds[0]})
    out.update(kinds=kinds, student_targets=old["student_targets"])
    return "student", _retire("student", out)
