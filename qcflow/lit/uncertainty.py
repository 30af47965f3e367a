"""``UncertaintySeg``: the task / teacher / student heteroscedastic segmentation networks.

Shaw et al. (MIDL 2020; MELBA 2021), see DESIGN.md method B. One module, three roles:

* ``task``: a two-head U-Net trained on clean patches; predicts logits and ``sigma_t^2``.
* ``teacher`` (one per artifact kind i): trained on patches corrupted with kind i only; predicts
  ``(sigma_t_hat^2, sigma_i^2)``; the heteroscedastic CE uses their sum, and the consistency loss
  ties ``sigma_t_hat^2`` to the frozen task network's ``sigma_t^2`` *on the clean patch*, so the
  extra variance the corruption causes lands in ``sigma_i^2``.
* ``student``: trained with all kinds; predicts ``sigma_t^2`` and every ``sigma_i^2``; channel
  ``task`` is supervised by the frozen task network on the clean patch, channel ``i`` by frozen
  teacher i's ``sigma_i^2`` on the same corrupted patch.

Frozen networks are held in ``self.frozen`` (moved with the module, always in eval mode, never
given to the optimizer, ``requires_grad=False``) and are left out of checkpoints. Training batches
carry ``image`` (corrupted), ``image_clean`` and ``label`` (see :class:`PairedPatchDataModule`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchio as tio
from torch import Tensor, nn

from qcflow.data.datamodule import PatchDataModule, _patch_collate
from qcflow.models.losses import consistency_loss, heteroscedastic_ce
from qcflow.models.unet import TwoHeadUNet

__all__ = [
    "ROLES",
    "DEFAULT_KINDS",
    "HCE_TASK_VAR",
    "STUDENT_TARGETS",
    "ABSENT_KIND_VAR",
    "sources_for",
    "scale_row_updates",
    "UncertaintySeg",
    "PairedPatchDataModule",
]

ROLES = ("task", "teacher", "student")
DEFAULT_KINDS = ("spike", "noise", "blur", "wrap", "motion")
#: which task variance enters a teacher's / student's heteroscedastic variance sum
HCE_TASK_VAR = ("own", "reference")
#: what frozen teacher i sees when it makes the student's target for channel i
STUDENT_TARGETS = ("corrupted", "own_kind")
#: what artifact channel i of a teacher / student learns on samples without kind i
ABSENT_KIND_VAR = ("free", "zero")


def sources_for(role: str, kinds: Sequence[str]) -> list[str]:
    """Names of the log-variance channels: ``task`` then the artifact kinds of the role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if role == "task":
        return ["task"]
    if role == "teacher" and len(kinds) != 1:
        raise ValueError(f"a teacher has exactly one artifact kind, got {list(kinds)}")
    return ["task", *kinds]


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


class UncertaintySeg(pl.LightningModule):
    """Heteroscedastic two-head segmentation network in one of three roles.

    Args:
        role: ``task`` | ``teacher`` | ``student``.
        kinds: artifact kinds (one for a teacher, all for a student, ignored for the task).
        net: :class:`~qcflow.models.unet.TwoHeadUNet` keyword arguments (``num_sources`` is set
            from the role).
        lr: Adam learning rate (1e-4 in the paper).
        eps: initial epsilon (0.05), changed by :class:`~qcflow.lit.callbacks.EpsilonSchedule`.
        consistency_weight: weight of the consistency terms.
        ssim_weight: lambda of the SSIM term in the consistency loss (0.1).
        ds_weights: deep-supervision loss weights (full resolution first); default halves per
            level (nnU-Net), normalised to sum 1.
        task_net: frozen task network (teacher and student).
        teacher_nets: frozen teacher networks by kind (student).
        init_from_task: a teacher or student starts from the frozen task network's weights
            (encoder, decoder, segmentation head and task-variance row; see
            :meth:`~qcflow.models.unet.TwoHeadUNet.init_from`) instead of from scratch. A
            CPU-budget deviation from the paper, which trains every stage from scratch for
            30 000 iterations: from scratch, the student's cross-entropy is divided by the sum of
            six variances and its segmentation collapses to background in a short schedule.
        init_log_var: initial log-variance of the artifact channels when ``init_from_task``.
        task_var_lr_mult: learning-rate multiplier of the task-variance row of the output
            head(s) of a teacher or student (0 freezes the row copied from the task network, so
            extra uncertainty on corrupted patches cannot be absorbed there through the head).
        artifact_lr_mult: learning-rate multiplier of the artifact log-variance rows of the
            output head(s) (their zero-initialised weights move ~lr per Adam step).
        hce_task_var: which ``sigma_t^2`` enters a teacher's / student's variance sum in the
            heteroscedastic CE: ``own`` (its own prediction, the paper) or ``reference`` (the
            frozen task network's on the clean patch, detached), so the uncertainty that the
            corruption adds can only be explained by the artifact channels; the own
            ``sigma_t^2`` channel then learns from the consistency loss alone.
        student_targets: what frozen teacher i sees when it makes the target of the student's
            channel i: ``corrupted`` (the student's input, every applied kind: the paper's
            wording) or ``own_kind`` (the input if kind i was applied to this sample, else the
            clean patch): a teacher that never saw kind j still reacts to it ("degraded"), so
            with ``corrupted`` every channel learns every kind; with ``own_kind`` channel i is
            taught to stay at its clean level on the other kinds. Exact for single-kind
            samples (``RandomArtifacts(exclusive=True)``); needs ``batch["artifact_kinds"]``.
        absent_kind_var: what artifact channel i learns on training samples that do not carry
            kind i (clean ones, and for a student or a teacher with negatives, other kinds):
            ``free`` (the paper): it sits in the variance sum like everywhere, so it also absorbs
            segmentation errors that have other causes (boundaries, other kinds); ``zero``: it
            leaves the variance sum there and is pulled to 0 (teacher: mean sigma_i^2 over those
            samples, weight ``consistency_weight``; student: its consistency target there is 0
            instead of teacher i's output): a channel stays near 0 unless its kind is present.
            Needs ``batch["artifact_kinds"]``.
        kind_aux_weight: weight of an auxiliary, self-supervised kind-presence loss (0: off,
            the paper): the network's :class:`~qcflow.models.unet.PatchContext` outputs (which
            offset the artifact log-variances per patch) are also trained as logits of "kind i
            was applied to this sample" (binary cross-entropy against
            ``batch["artifact_kinds"]``, the simulation's own record; no human labels), so a
            channel's offset rises on patches that carry its kind and falls elsewhere. Needs
            ``net.context`` and the batch's ``artifact_kinds``.
        context_lr_mult: learning-rate multiplier of the context branch (0 freezes it: a
            student whose context starts from a kind classifier keeps that classifier's
            decisions; fine-tuning it at batch 2 measurably degraded them).

    Shapes: ``forward(x (B, 1, D, H, W)) -> (logits (B, 2, D, H, W), log_var (B, K, D, H, W))``
    with K = 1 (task), 2 (teacher), 1 + len(kinds) (student).
    """

    def __init__(
        self,
        role: str = "task",
        kinds: Sequence[str] = DEFAULT_KINDS,
        net: Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        eps: float = 0.05,
        consistency_weight: float = 1.0,
        ssim_weight: float = 0.1,
        ds_weights: Sequence[float] | None = None,
        task_net: nn.Module | None = None,
        teacher_nets: Mapping[str, nn.Module] | None = None,
        init_from_task: bool = True,
        init_log_var: float = -2.0,
        task_var_lr_mult: float = 1.0,
        artifact_lr_mult: float = 1.0,
        hce_task_var: str = "own",
        student_targets: str = "corrupted",
        absent_kind_var: str = "free",
        kind_aux_weight: float = 0.0,
        context_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        if hce_task_var not in HCE_TASK_VAR:
            raise ValueError(f"hce_task_var must be one of {HCE_TASK_VAR}, got {hce_task_var!r}")
        if student_targets not in STUDENT_TARGETS:
            raise ValueError(
                f"student_targets must be one of {STUDENT_TARGETS}, got {student_targets!r}"
            )
        if absent_kind_var not in ABSENT_KIND_VAR:
            raise ValueError(
                f"absent_kind_var must be one of {ABSENT_KIND_VAR}, got {absent_kind_var!r}"
            )
        if min(task_var_lr_mult, artifact_lr_mult, context_lr_mult) < 0:
            raise ValueError(
                f"lr multipliers must be >= 0, got {task_var_lr_mult}, {artifact_lr_mult}, "
                f"{context_lr_mult}"
            )
        kinds = [] if role == "task" else [str(k) for k in kinds]
        self.save_hyperparameters(ignore=["task_net", "teacher_nets"])
        self.role = role
        self.kinds = kinds
        self.sources = sources_for(role, kinds)
        net_kwargs = dict(net or {})
        net_kwargs["num_sources"] = len(self.sources)
        self.net = TwoHeadUNet(**net_kwargs)
        self.lr = float(lr)
        self.eps = float(eps)
        self.consistency_weight = float(consistency_weight)
        self.ssim_weight = float(ssim_weight)
        self.ds_weights = list(ds_weights) if ds_weights else None
        self.task_var_lr_mult = float(task_var_lr_mult)
        self.artifact_lr_mult = float(artifact_lr_mult)
        self.hce_task_var = str(hce_task_var)
        self.student_targets = str(student_targets)
        self.absent_kind_var = str(absent_kind_var)
        self.kind_aux_weight = float(kind_aux_weight)
        self.context_lr_mult = float(context_lr_mult)
        if self.kind_aux_weight < 0:
            raise ValueError(f"kind_aux_weight must be >= 0, got {kind_aux_weight}")
        if self.kind_aux_weight > 0 and self.net.context is None:
            raise ValueError("kind_aux_weight > 0 needs a teacher/student net with context=True")
        if self.context_lr_mult == 0 and self.net.context is not None:
            self.net.context.requires_grad_(False)  # frozen: no gradient, not in the optimizer
        # frozen stages are optional here (loading for inference); fitting checks them
        frozen: dict[str, nn.Module] = {}
        if task_net is not None and role != "task":
            frozen["task"] = task_net
        if role == "student" and teacher_nets:
            frozen.update({k: teacher_nets[k] for k in kinds if k in teacher_nets})
        self.frozen = nn.ModuleDict(frozen)
        for module in self.frozen.values():
            module.requires_grad_(False)
            module.eval()
        # checkpoints are loaded without frozen stages: then the saved weights are used instead
        if init_from_task and "task" in self.frozen:
            self.net.init_from(self.frozen["task"], extra_log_var=float(init_log_var))

    # ------------------------------------------------------------------ basics
    def train(self, mode: bool = True) -> UncertaintySeg:
        super().train(mode)
        for module in self.frozen.values():  # frozen stages stay in eval mode
            module.eval()
        return self

    def missing_frozen(self) -> list[str]:
        """Frozen stages this role needs for training but does not have."""
        need = [] if self.role == "task" else ["task"]
        if self.role == "student":
            need += self.kinds
        return [k for k in need if k not in self.frozen]

    def on_fit_start(self) -> None:
        missing = self.missing_frozen()
        if missing:
            raise ValueError(f"role '{self.role}' needs frozen networks for: {', '.join(missing)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.net(x)

    def row_lr_multipliers(self) -> dict[nn.Parameter, Tensor]:
        """Per-row lr multipliers of the output heads (empty for the task role or all ones).

        Rows: ``num_classes`` segmentation rows (1), the task-variance row
        (``task_var_lr_mult``), then the artifact rows (``artifact_lr_mult``).
        """
        if self.role == "task" or (self.task_var_lr_mult == 1.0 and self.artifact_lr_mult == 1.0):
            return {}
        n_cls = self.net.num_classes
        mult = torch.ones(n_cls + self.net.head_sources)
        mult[n_cls] = self.task_var_lr_mult
        mult[n_cls + 1 :] = self.artifact_lr_mult
        return {p: mult for head in self.net.heads() for p in head.parameters()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        context = list(self.net.context.parameters()) if self.net.context is not None else []
        if self.context_lr_mult == 1.0 or not context:
            opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        else:
            ids = {id(p) for p in context}
            groups = [{"params": [p for p in self.net.parameters() if id(p) not in ids]}]
            if self.context_lr_mult > 0:
                groups.append({"params": context, "lr": self.lr * self.context_lr_mult})
            opt = torch.optim.Adam(groups, lr=self.lr)
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

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def reference_variances(
        self, image: Tensor, image_clean: Tensor, present: Tensor | None = None
    ) -> Tensor:
        """Frozen-network targets for each supervised log-variance channel ``(B, n, D, H, W)``.

        Teacher: ``[sigma_t^2(clean)]`` (its task channel only). Student:
        ``[sigma_t^2(clean), sigma_i^2 of teacher i for each kind]``, teacher i seeing ``image``
        (``student_targets=corrupted``) or, per sample, ``image`` where kind i is present and
        ``image_clean`` elsewhere (``own_kind``); with ``absent_kind_var=zero`` the target is 0
        where kind i is absent (and teacher i is not run when no sample carries kind i).

        Args:
            present: ``(B, K)`` bool, kind ``self.kinds[k]`` applied to sample ``b`` (needed by
                ``own_kind`` and ``absent_kind_var=zero``; see :meth:`kinds_present`).
        """
        targets = [self.frozen["task"](image_clean)[1][:, :1].exp()]
        if self.role != "student":
            return torch.cat(targets, dim=1)
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
        return torch.cat(targets, dim=1)

    def kinds_present(self, batch: Mapping[str, Any]) -> Tensor | None:
        """``(B, K)`` bool from ``batch["artifact_kinds"]``: kind ``self.kinds[k]`` in sample b."""
        kinds = batch.get("artifact_kinds")
        if kinds is None:
            return None
        device = batch["image"].device
        return torch.as_tensor([[k in ks for k in self.kinds] for ks in kinds], device=device)

    def _weights(self, n: int) -> list[float]:
        w = self.ds_weights[:n] if self.ds_weights else [0.5**i for i in range(n)]
        total = sum(w)
        return [v / total for v in w]

    def compute_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Heteroscedastic CE (all deep-supervision outputs) + consistency (full resolution)."""
        image, label = batch["image"], batch["label"]
        context_logits = None
        if self.kind_aux_weight > 0:
            assert self.net.context is not None
            context_logits = self.net.context.logits(image)
        outs = self.net.forward_all(image, context_logits)
        ref, absent = None, None
        if self.role != "task":
            present = self.kinds_present(batch)
            if self.absent_kind_var == "zero":
                if present is None:
                    raise ValueError("absent_kind_var='zero' needs the batch's 'artifact_kinds'")
                absent = ~present.view(*present.shape, 1, 1, 1)  # (B, K, 1, 1, 1)
            ref = self.reference_variances(image, batch.get("image_clean", image), present)

        def summed(lv: Tensor) -> Tensor:
            # hce_task_var=reference: the frozen task network's sigma_t^2 replaces the own one
            task = lv[:, :1] if ref is None or self.hce_task_var == "own" else ref[:, :1].log()
            art = lv[:, 1:]
            if absent is not None:  # sigma_i^2 leaves the sum where kind i is absent
                art = torch.where(absent, torch.full_like(art, float("-inf")), art)
            return torch.cat([task, art], dim=1)

        weights = self._weights(len(outs))
        seg = sum(
            w * heteroscedastic_ce(lg, label, summed(lv), self.eps)
            for w, (lg, lv) in zip(weights, outs, strict=True)
        )
        out = {"seg": seg, "loss": seg}
        logits, log_var = outs[0]
        if ref is not None:
            var = log_var[:, : ref.shape[1]].exp()
            cons = (
                sum(
                    consistency_loss(var[:, c : c + 1], ref[:, c : c + 1], self.ssim_weight)
                    for c in range(ref.shape[1])
                )
                / ref.shape[1]
            )
            if absent is not None:
                # sigma_i^2 is pulled to zero where kind i is absent (always logged: DDP sync);
                # a student's absent channels also have zero consistency targets
                art = log_var[:, 1:].exp().mean(dim=(2, 3, 4))  # (B, K)
                mask = absent.view(art.shape)
                pull = art[mask].mean() if bool(mask.any()) else art.sum() * 0.0
                out["absent_kind_var"] = pull
                if ref.shape[1] == 1:  # teacher: no consistency target for its artifact channel
                    cons = cons + pull
            out["consistency"] = cons
            out["loss"] = seg + self.consistency_weight * cons
        if context_logits is not None:
            if present is None:
                raise ValueError("kind_aux_weight > 0 needs the batch's 'artifact_kinds'")
            aux = F.binary_cross_entropy_with_logits(context_logits, present.float())
            out["kind_aux"] = aux
            out["loss"] = out["loss"] + self.kind_aux_weight * aux
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
        for k in ("seg", "consistency", "dice", "absent_kind_var", "kind_aux"):
            if k in losses:
                self.log(f"train/{k}", losses[k], on_step=False, on_epoch=True, **log)
        self.log("train/eps", self.eps, on_step=False, on_epoch=True, batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        losses = self.compute_loss(batch)
        bs = batch["image"].shape[0]
        for k, v in losses.items():
            self.log(f"val/{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)


class _KeepClean(tio.Transform):
    """Copy ``image`` to ``image_clean`` (before the corruption) so patches come in pairs."""

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["image"]
        clean = tio.ScalarImage(tensor=image.data.clone(), affine=image.affine)
        subject.add_image(clean, "image_clean")
        return subject


#: Subject key of the applied artifact records (JSON, see ``records_from_subject``)
RECORD_KEY = "artifacts"


def _paired_collate(batch: list[tio.Subject]) -> dict[str, Any]:
    """Adds ``image_clean`` and ``artifact_kinds`` (per sample, the kinds applied to ``image``)."""
    from qcflow.kspace.torchio_adapter import records_from_subject

    out = _patch_collate(batch)
    if "image_clean" in batch[0]:
        out["image_clean"] = torch.stack([s["image_clean"].data for s in batch])
    else:  # clean training / validation: the image is its own clean version
        out["image_clean"] = out["image"]
    out["artifact_kinds"] = [
        list(records_from_subject(s, RECORD_KEY)["image"]["kinds"]) if RECORD_KEY in s else []
        for s in batch
    ]
    return out


class PairedPatchDataModule(PatchDataModule):
    """Patches of a corrupted volume with the matching clean patch (``image_clean``).

    The whole volume is corrupted (k-space artifacts are global; ``augment.device: loader``)
    before the queue samples patches, so corrupted and clean patches share the location and the
    intensity scaling. Validation patches are clean (``image_clean == image``).

    Args:
        data_cfg: the ``data`` config group.
        sampler: a :class:`~qcflow.kspace.RandomArtifacts`, or ``None`` for clean training.
    """

    def __init__(self, data_cfg: Any, sampler: Any | None = None) -> None:
        transform = None
        if sampler is not None:
            from qcflow.kspace.torchio_adapter import RandomKSpaceArtifacts

            transform = tio.Compose(
                [
                    _KeepClean(),
                    RandomKSpaceArtifacts(sampler, record_key=RECORD_KEY, include=["image"]),
                ]
            )
        super().__init__(data_cfg, with_label=True, transform=transform)

    def _collate(self, batch: list[tio.Subject]) -> dict[str, Any]:
        return _paired_collate(batch)
