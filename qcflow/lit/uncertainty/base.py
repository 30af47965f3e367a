"""What method B's three stages share: a two-head U-Net trained with the heteroscedastic CE.

Shaw et al., "A heteroscedastic uncertainty model for decoupling sources of MRI image quality"
(MIDL 2020; extended in MELBA 2021). Every stage is a U-Net with a segmentation head (logits
``f``) and a log-variance head (one channel per uncertainty source ``s``: the task, then each
artifact kind). The segmentation is trained with the heteroscedastic cross-entropy of the summed
variance, per voxel (:func:`~qcflow.models.losses.heteroscedastic_ce`)::

    L_seg = CE(f, y) / (sigma^2 + eps) + 1/2 log(sigma^2 + eps),   sigma^2 = sum_s sigma_s^2

on every deep-supervision output (weights halve per level, nnU-Net). ``eps`` starts at 0.05 and
is halved on loss plateaus (:class:`~qcflow.lit.uncertainty.schedule.EpsilonSchedule`). The roles
(:mod:`qcflow.lit.uncertainty.roles`) override the hooks of :meth:`UncertaintySeg.compute_loss`.

Frozen earlier stages sit in ``self.frozen``: moved with the module, always in eval mode, never
given to the optimizer and left out of checkpoints.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.parsing import collect_init_args
from torch import Tensor, nn

from qcflow.models.losses import heteroscedastic_ce
from qcflow.models.unet import TwoHeadUNet

__all__ = ["UncertaintySeg", "build_net", "scale_row_updates"]


def build_net(net: Mapping[str, Any], num_sources: int) -> TwoHeadUNet:
    """The network from its config: ``_target_`` (a :class:`TwoHeadUNet`) and its arguments.

    ``conf/model/unet_*.yaml`` gives everything but ``num_sources``, which follows from the role.
    The config also comes back from checkpoints, so ``_target_`` may only name a class of the
    ``qcflow.models`` package that is a :class:`TwoHeadUNet` (nothing else is imported).
    """
    from hydra.utils import get_class, instantiate

    target = net.get("_target_")
    if not isinstance(target, str) or not target.startswith("qcflow.models."):
        raise ValueError(f"net._target_ must name a qcflow.models TwoHeadUNet, got {target!r}")
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, TwoHeadUNet)):
        raise ValueError(f"net._target_ {target!r} is not a TwoHeadUNet")
    return instantiate(dict(net), num_sources=int(num_sources))


def scale_row_updates(
    optimizer: torch.optim.Optimizer, multipliers: Mapping[nn.Parameter, Tensor]
) -> None:
    """Scale each optimizer step of ``p`` row by row: ``p_new = p_old + m[row] * (step)``.

    A per-row learning-rate multiplier for parameters whose rows are different outputs (the
    rows of the 1x1x1 output convolution are the segmentation, task-variance and artifact-variance
    channels, so they cannot sit in different parameter groups). Adam's (and SGD's) update is
    linear in the learning rate, so scaling a row's update by ``m`` equals a learning rate
    ``m * lr`` for that row; ``m = 0`` freezes the row (its gradient still flows to the layers
    below). Implemented with optimizer step hooks: the pre-hook keeps a copy, the post-hook
    rescales the difference.

    Args:
        optimizer: the optimizer holding the parameters.
        multipliers: ``{parameter (R, ...): multipliers (R,)}``.
    """
    if not multipliers:
        return
    saved: dict[int, Tensor] = {}

    def _pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p in multipliers:
            saved[id(p)] = p.detach().clone()

    @torch.no_grad()
    def _post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, m in multipliers.items():
            old = saved.pop(id(p))
            scale = m.to(p.device, p.dtype).view(-1, *([1] * (p.ndim - 1)))  # (R, 1, ...)
            p.copy_(old + (p - old) * scale)

    optimizer.register_step_pre_hook(_pre)
    optimizer.register_step_post_hook(_post)


def _dice(pred: Tensor, target: Tensor) -> Tensor:
    inter = (pred * target).sum()
    denom = pred.sum() + target.sum()
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


def _plain(value: Any) -> Any:
    """Plain dicts/lists (an OmegaConf container would not load with ``weights_only``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class UncertaintySeg(pl.LightningModule):
    """Base of the method-B stages (:class:`~qcflow.lit.uncertainty.roles.TaskSeg`,
    :class:`~qcflow.lit.uncertainty.roles.TeacherSeg`,
    :class:`~qcflow.lit.uncertainty.roles.StudentSeg`), and the loader of all of them.

    ``UncertaintySeg.load_from_checkpoint(path)`` returns the stage the checkpoint holds (its
    ``role`` hyper-parameter picks the class), in this layout or the previous one (one
    ``UncertaintySeg`` class with a ``role`` argument; :mod:`qcflow.lit.uncertainty.legacy`).

    Args:
        net: network config, ``_target_`` + arguments of :class:`TwoHeadUNet` except
            ``num_sources`` (see :func:`build_net`).
        lr: Adam learning rate (1e-4 in the paper).
        eps: initial epsilon of the heteroscedastic CE (0.05 in the paper).
        ds_weights: deep-supervision loss weights (full resolution first); ``None`` halves per
            level (nnU-Net). Normalised to sum 1.
        kinds: the artifact kinds of the variance channels after ``task`` (given by the role).
        frozen: frozen earlier stages by name (``task``, teacher kinds; given by the role).

    Shapes: ``forward(x (B, 1, D, H, W)) -> (logits (B, 2, D, H, W), log_var (B, K, D, H, W))``
    with ``K = 1 + len(kinds)`` (:attr:`sources`).
    """

    #: the stage's name in checkpoints and results (``task`` | ``teacher`` | ``student``)
    role: ClassVar[str] = ""
    _by_role: ClassVar[dict[str, type[UncertaintySeg]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("role"):
            UncertaintySeg._by_role[cls.role] = cls

    def __init__(
        self,
        net: Mapping[str, Any],
        lr: float,
        eps: float,
        ds_weights: Sequence[float] | None,
        *,
        kinds: Sequence[str],
        frozen: Mapping[str, nn.Module],
    ) -> None:
        super().__init__()
        if not self.role:
            raise TypeError(f"{type(self).__name__} is no stage (TaskSeg, TeacherSeg, StudentSeg)")
        # hyper-parameters: the role class's own arguments (not the intermediate classes'),
        # plain data, and the role that picks the class when loading; frozen networks are in
        # their own checkpoints
        args = collect_init_args(inspect.currentframe(), [], classes=(UncertaintySeg,))[-1]
        hparams = {k: _plain(v) for k, v in args.items() if k not in ("task_net", "teacher_nets")}
        self.save_hyperparameters({**hparams, "role": self.role})
        self.kinds = [str(k) for k in kinds]
        self.sources = ["task", *self.kinds]
        self.net = build_net(net, len(self.sources))
        self.lr = float(lr)
        self.eps = float(eps)
        self.ds_weights = list(ds_weights) if ds_weights else None
        self.frozen = nn.ModuleDict(dict(frozen))
        for module in self.frozen.values():
            module.requires_grad_(False)
            module.eval()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO[bytes],
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = True,
        **kwargs: Any,
    ) -> UncertaintySeg:
        """The stage saved in ``checkpoint_path`` (either layout), as its own class.

        Called on a role class it also checks the role (``TeacherSeg.load_from_checkpoint`` of
        a student checkpoint raises ``ValueError``).
        """
        from qcflow.lit.uncertainty.legacy import checkpoint_arguments

        if weights_only is not True:  # never unpickle, whatever a caller or the environment says
            raise ValueError("qcflow loads checkpoints with weights_only=True only")
        seekable = hasattr(checkpoint_path, "seek")
        start = checkpoint_path.tell() if seekable else 0  # type: ignore[union-attr]
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, Mapping):
            raise ValueError("not a Lightning checkpoint (no dictionary)")
        role, args = checkpoint_arguments(ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {})
        target = cls._by_role.get(role)
        if target is None or not issubclass(target, cls):
            raise ValueError(f"a '{role}' checkpoint is not a {cls.__name__}")
        if seekable:
            checkpoint_path.seek(start)  # type: ignore[union-attr]
        load = super(UncertaintySeg, target).load_from_checkpoint  # Lightning's own
        return load(  # type: ignore[return-value]
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **{**args, **kwargs},
        )

    # ------------------------------------------------------------------ basics
    def train(self, mode: bool = True) -> UncertaintySeg:
        super().train(mode)
        for module in self.frozen.values():  # frozen stages stay in eval mode
            module.eval()
        return self

    def missing_frozen(self) -> list[str]:
        """Frozen stages this role needs for training but does not have."""
        return []

    def on_fit_start(self) -> None:
        missing = self.missing_frozen()
        if missing:
            raise ValueError(f"role '{self.role}' needs frozen networks for: {', '.join(missing)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x)

    def optimizer_params(self) -> Iterable[Any]:
        """What Adam trains: the network's parameters (a role may split them into groups)."""
        return self.net.parameters()

    def row_lr_multipliers(self) -> dict[nn.Parameter, Tensor]:
        """Per-row lr multipliers of output heads (:func:`scale_row_updates`); none here."""
        return {}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(self.optimizer_params(), lr=self.lr)
        scale_row_updates(opt, self.row_lr_multipliers())
        return opt

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # frozen stages live in their own checkpoints
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("frozen.")]:
            del state[key]
        checkpoint["eps"] = self.eps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.eps = float(checkpoint.get("eps", self.eps))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kw: Any):
        own = {k: v for k, v in state_dict.items() if not k.startswith("frozen.")}
        missing_frozen = {k for k in self.state_dict() if k.startswith("frozen.")}
        result = super().load_state_dict(own, strict=False, **kw)
        if strict:
            missing = [k for k in result.missing_keys if k not in missing_frozen]
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"checkpoint does not match the network: missing {missing[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
        return result

    # ------------------------------------------------------------------ loss
    def _weights(self, n: int) -> list[float]:
        w = self.ds_weights[:n] if self.ds_weights else [0.5**i for i in range(n)]
        total = sum(w)
        return [v / total for v in w]

    def loss_targets(self, batch: Mapping[str, Any]) -> Any:
        """What the role's terms need from frozen networks and the batch (none here)."""
        return None

    def variance_sum(self, log_var: Tensor, targets: Any) -> Tensor:
        """Log-variances ``(B, K, D, H, W)`` whose exp-sum enters the CE: the network's own."""
        return log_var

    def add_terms(self, out: dict[str, Tensor], log_var: Tensor, targets: Any) -> None:
        """Add the role's loss terms to ``out`` (``out["loss"]`` is the CE); none here."""

    def compute_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Heteroscedastic CE (all deep-supervision outputs) + the role's terms (full
        resolution) + the Dice of the argmax, for logging."""
        image, label = batch["image"], batch["label"]
        outs = self.net.forward_all(image)
        targets = self.loss_targets(batch)
        weights = self._weights(len(outs))
        seg = sum(
            w * heteroscedastic_ce(lg, label, self.variance_sum(lv, targets), self.eps)
            for w, (lg, lv) in zip(weights, outs, strict=True)
        )
        out = {"seg": seg, "loss": seg}
        logits, log_var = outs[0]
        self.add_terms(out, log_var, targets)
        with torch.no_grad():
            pred = logits.argmax(1)
            out["dice"] = _dice((pred == 1).float(), (label[:, 0] == 1).float())
        return out

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_loss(batch)
        bs = batch["image"].shape[0]
        # rank-averaged under DDP (metrics.json, loggers); EpsilonSchedule reduces on its own
        log = {"batch_size": bs, "sync_dist": True}
        self.log("train/loss", losses["loss"], on_step=True, on_epoch=True, **log)
        for k in ("seg", "consistency", "dice", "absent_kind_var"):
            if k in losses:
                self.log(f"train/{k}", losses[k], on_step=False, on_epoch=True, **log)
        self.log("train/eps", self.eps, on_step=False, on_epoch=True, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        losses = self.compute_loss(batch)
        bs = batch["image"].shape[0]
        for k, v in losses.items():
            self.log(f"val/{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
