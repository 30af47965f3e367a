"""Method B modules: output shapes per role, frozen stages, the epsilon schedule, the losses'
switches, modules built from the YAML only, and checkpoints of the previous layout."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from qcflow.api import compose_config
from qcflow.data.paired import PairedPatchDataModule
from qcflow.kspace import SHAW2021_KINDS
from qcflow.lit.uncertainty import (
    EpsilonSchedule,
    StudentSeg,
    TaskSeg,
    TeacherSeg,
    UncertaintySeg,
)
from qcflow.models.unet import TwoHeadUNet

TINY = {"filters": [4, 8, 16], "deep_supervision": False}
KINDS = list(SHAW2021_KINDS)
OLD = Path(__file__).parent / "data" / "uncertainty_v0"
#: the paper's loss (the modules' switches off), which most tests below start from
PAPER = {
    "hce_task_var": "own",
    "task_var_lr_mult": 1.0,
    "artifact_lr_mult": 1.0,
}


@functools.cache
def _yaml(role: str) -> dict[str, Any]:
    """``uncertainty.module`` of the role's experiment as composed: the only defaults."""
    cfg = compose_config([f"experiment=uncertainty_{role}", "artifact=noise"])
    return OmegaConf.to_container(cfg.uncertainty.module, resolve=True)  # type: ignore[return-value]


def stage(
    role: str, kinds: list[str] | None = None, net: dict[str, Any] | None = None, **kw: Any
) -> UncertaintySeg:
    """A stage with the YAML's arguments, a tiny plain network (``net`` on top), the paper's
    loss for a teacher/student (``PAPER``) and ``kw`` changed."""
    node = dict(_yaml(role))
    node["net"] = {**node["net"], **TINY, "context": False, "attribution": False, **(net or {})}
    if role == "teacher":
        node.update(PAPER, kind=(kinds or ["noise"])[0])
    elif role == "student":
        node.update(PAPER, kinds=kinds or KINDS, absent_kind_var="free")
    cls = get_class(node.pop("_target_"))
    node = {k: v for k, v in node.items() if not k.startswith("_")}  # Hydra's own keys
    return cls(**{**node, **kw})


def _batch(b: int = 2, p: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(b, 1, p, p, p, generator=g)
    return {
        "image": image,
        "image_clean": (image * 0.9).clamp(0, 1),
        "label": (torch.rand(b, 1, p, p, p, generator=g) > 0.5).to(torch.uint8),
    }


def _task_net() -> TwoHeadUNet:
    return TwoHeadUNet(num_sources=1, **TINY)


def _teacher_net() -> TwoHeadUNet:
    return TwoHeadUNet(num_sources=2, **TINY)


@pytest.mark.parametrize(
    ("role", "kinds", "k"), [("task", [], 1), ("teacher", ["noise"], 2), ("student", KINDS, 6)]
)
def test_output_shapes_per_role(role: str, kinds: list[str], k: int) -> None:
    frozen = {} if role == "task" else {"task_net": _task_net()}
    if role == "student":
        frozen["teacher_nets"] = {kind: _teacher_net() for kind in kinds}
    m = stage(role, kinds, **frozen)
    assert type(m) is {"task": TaskSeg, "teacher": TeacherSeg, "student": StudentSeg}[role]
    logits, log_var = m(torch.rand(2, 1, 8, 8, 8))
    assert logits.shape == (2, 2, 8, 8, 8)
    assert log_var.shape == (2, k, 8, 8, 8)
    assert m.sources == ["task", *kinds] and m.kinds == kinds and m.role == role
    losses = m.compute_loss(_batch())
    assert torch.isfinite(losses["loss"])
    assert ("consistency" in losses) == (role != "task")


def test_deep_supervision_outputs_train_and_eval() -> None:
    net = TwoHeadUNet(num_sources=2, filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
    net.train()
    outs = net.forward_all(torch.rand(1, 1, 8, 8, 8))
    assert len(outs) == 2 and all(o[1].shape == (1, 2, 8, 8, 8) for o in outs)
    net.eval()
    assert len(net.forward_all(torch.rand(1, 1, 8, 8, 8))) == 1


def test_each_role_takes_only_its_own_arguments_and_missing_frozen_stages() -> None:
    with pytest.raises(TypeError, match="no stage"):
        UncertaintySeg(net={}, lr=1e-3, eps=0.05, ds_weights=None, kinds=(), frozen={})
    with pytest.raises(ValueError, match="exactly one"):
        stage("teacher", kind=["noise", "blur"])
    with pytest.raises(TypeError, match="hce_task_var"):  # a task has no artifact channels
        stage("task", hce_task_var="own")
    with pytest.raises(TypeError, match="absent_kind_var"):  # a teacher's is free
        stage("teacher", absent_kind_var="zero")
    with pytest.raises(TypeError, match="kind"):
        stage("task", kind="noise")
    m = stage("student", ["noise"], task_net=_task_net())
    assert m.missing_frozen() == ["noise"]
    with pytest.raises(ValueError, match="frozen"):
        m.on_fit_start()
    assert stage("teacher").missing_frozen() == ["task"] and stage("task").missing_frozen() == []


def test_frozen_stages_stay_frozen_after_a_step() -> None:
    kinds = ["noise", "blur"]
    task, teachers = _task_net(), {k: _teacher_net() for k in kinds}
    m = stage("student", kinds, task_net=task, teacher_nets=teachers, lr=1e-2)
    m.train()
    assert all(not mod.training for mod in m.frozen.values())
    before = {k: v.clone() for k, v in m.frozen.state_dict().items()}
    own_before = {k: v.clone() for k, v in m.net.state_dict().items()}
    opt = m.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in m.net.parameters()
    }
    loss = m.compute_loss(_batch())["loss"]
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in m.frozen.parameters())
    assert all(not p.requires_grad for p in m.frozen.parameters())
    opt.step()
    after = m.frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(own_before[k], v) for k, v in m.net.state_dict().items())
    # frozen stages are not written into the checkpoint
    ckpt = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    assert not any(k.startswith("frozen.") for k in ckpt["state_dict"])


class _Opt:
    def __init__(self, lr: float) -> None:
        self.param_groups = [{"lr": lr}]


class _Mod:
    eps = 0.05


def test_epsilon_schedule_halves_eps_and_lr_together_and_stops_at_floor() -> None:
    kw = {"monitor": "train/loss_epoch", "halve_lr": True, "stop_at_floor": False}
    cb = EpsilonSchedule(patience=2, min_delta=0.0, factor=0.5, floor=1e-3, **kw)
    mod, opt = _Mod(), _Opt(1e-4)
    assert not cb.update(1.0, mod, [opt])  # first value: an improvement
    assert not cb.update(0.5, mod, [opt])  # improvement
    assert not cb.update(0.5, mod, [opt])  # 1 epoch without improvement
    assert cb.update(0.6, mod, [opt])  # 2: plateau -> halve
    assert mod.eps == pytest.approx(0.025) and opt.param_groups[0]["lr"] == pytest.approx(5e-5)
    halvings = 1
    for _ in range(40):  # a flat loss: halve every `patience` epochs until eps < floor
        halvings += cb.update(1.0, mod, [opt])
    # 0.05 -> 0.025 -> ... -> 7.8e-4 (< 1e-3): six halvings, then nothing
    assert halvings == 6
    assert mod.eps == pytest.approx(0.05 / 2**6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 / 2**6)
    assert not any(cb.update(1.0, mod, [opt]) for _ in range(5))


@pytest.mark.parametrize(("role", "kinds"), [("teacher", ["noise"]), ("student", KINDS)])
def test_init_from_task_copies_segmentation_and_task_variance(role: str, kinds: list[str]) -> None:
    torch.manual_seed(0)
    task = _task_net().eval()
    teachers = {"teacher_nets": {k: _teacher_net() for k in kinds}} if role == "student" else {}
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        t_logits, t_log_var = task(x)
    m = stage(role, kinds, task_net=task, **teachers, init_log_var=-2.0).eval()
    with torch.no_grad():
        logits, log_var = m(x)
    # the student/teacher segments exactly like the task network right after construction
    torch.testing.assert_close(logits, t_logits)
    torch.testing.assert_close(log_var[:, :1], t_log_var)
    # artifact channels start at a small constant variance exp(init_log_var)
    torch.testing.assert_close(log_var[:, 1:], torch.full_like(log_var[:, 1:], -2.0))
    # ... which is what the option changes: from scratch the logits differ
    scratch = stage(role, kinds, task_net=task, **teachers, init_from_task=False).eval()
    with torch.no_grad():
        assert not torch.allclose(scratch(x)[0], t_logits)
    # a checkpoint (no frozen stages at load time) keeps its own weights
    reloaded = stage(role, kinds)
    reloaded.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(x)[0], logits)


def test_init_from_task_rejects_other_architectures() -> None:
    other = TwoHeadUNet(num_sources=1, filters=[4, 8, 32])
    with pytest.raises(ValueError, match="architectures differ"):
        stage("teacher", task_net=other)


def _step(m: UncertaintySeg) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the full-resolution head weight before and after."""
    opt = m.configure_optimizers()
    w = m.net.heads()[0].weight
    before = w.detach().clone()
    loss = m.compute_loss(_batch())["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before, w.detach().clone()


def test_frozen_task_variance_row_and_artifact_row_lr() -> None:
    torch.manual_seed(0)
    kw = {"task_net": _task_net(), "lr": 1e-2}
    base_before, base_after = _step(stage("teacher", **kw))
    torch.manual_seed(0)
    kw["task_net"] = _task_net()
    m = stage("teacher", task_var_lr_mult=0.0, artifact_lr_mult=10.0, **kw)
    assert set(m.row_lr_multipliers()) == set(m.net.heads()[0].parameters())
    before, after = _step(m)
    torch.testing.assert_close(before, base_before)
    step, base_step = (after - before).flatten(1), (base_after - base_before).flatten(1)
    # rows: logits (2), task variance (frozen: unchanged), noise variance (10x the lr)
    torch.testing.assert_close(step[:2], base_step[:2])
    assert torch.equal(after[2], before[2])
    assert base_step[2].abs().max() > 0
    torch.testing.assert_close(step[3], 10 * base_step[3])
    # the frozen row is still the one copied from the task network
    assert torch.equal(m.net.heads()[0].bias[2], m.frozen["task"].heads()[0].bias[2])
    # the task role has no multipliers (no artifact rows to protect)
    assert stage("task").row_lr_multipliers() == {}
    with pytest.raises(ValueError, match="multipliers"):
        stage("teacher", artifact_lr_mult=-1.0)


def test_hce_task_var_reference_uses_the_frozen_task_variance() -> None:
    torch.manual_seed(0)
    task = _task_net()
    own = stage("teacher", task_net=task)
    ref = stage("teacher", task_net=task, hce_task_var="reference")
    ref.net.load_state_dict(own.net.state_dict())
    with torch.no_grad():  # make the own task variance differ from the task network's
        for m in (own, ref):
            m.net.heads()[0].bias[2] += 1.0
    batch = _batch()
    l_own, l_ref = own.compute_loss(batch), ref.compute_loss(batch)
    assert not torch.allclose(l_own["seg"], l_ref["seg"])
    torch.testing.assert_close(l_own["consistency"], l_ref["consistency"])
    # the own task-variance channel gets gradient from the consistency loss only
    ref.zero_grad()
    l_ref["seg"].backward()
    grad = ref.net.heads()[0].weight.grad
    assert torch.all(grad[2] == 0) and grad[3].abs().sum() > 0
    with pytest.raises(ValueError, match="hce_task_var"):
        stage("teacher", hce_task_var="mine")


class _EchoTeacher(torch.nn.Module):
    """A stand-in frozen teacher whose sigma_i^2 is a fingerprint of its input."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_var = torch.cat([torch.zeros_like(x), x.log()], dim=1)
        return torch.cat([x, -x], dim=1), log_var


def test_student_targets_are_teacher_i_on_the_input_or_zero_where_kind_i_is_absent() -> None:
    batch = _batch(b=3)
    kinds_per_sample = [["noise"], [], ["blur", "noise"]]
    teachers = {k: _EchoTeacher() for k in KINDS}
    args = dict(task_net=_task_net(), teacher_nets=teachers)
    zero = stage("student", KINDS, absent_kind_var="zero", **args)
    present = zero.kinds_present({**batch, "artifact_kinds": kinds_per_sample})
    assert present.tolist() == [[k in ks for k in KINDS] for ks in kinds_per_sample]
    ref = zero.reference_variances(batch["image"], batch["image_clean"], present)
    assert ref.shape == (3, 6, 8, 8, 8)
    for c, kind in enumerate(KINDS, start=1):
        for b, applied in enumerate(kinds_per_sample):
            seen = batch["image"][b, 0] if kind in applied else torch.zeros_like(ref[b, c])
            torch.testing.assert_close(ref[b, c], seen)
    # 'free' (the paper): every teacher sees the corrupted input
    free = stage("student", KINDS, **args)
    ref_f = free.reference_variances(batch["image"], batch["image_clean"], present)
    for c in range(1, 6):
        torch.testing.assert_close(ref_f[:, c], batch["image"][:, 0])
    with pytest.raises(ValueError, match="artifact_kinds"):
        zero.compute_loss(batch)
    zero.compute_loss({**batch, "artifact_kinds": kinds_per_sample})["loss"].backward()


def test_paired_patches_carry_the_applied_kinds(data_cfg) -> None:
    from qcflow.kspace import RandomArtifacts

    sampler = RandomArtifacts(
        rate=0.5, noise={"p": 1.0}, blur={"p": 1.0}, exclusive=True, spacing=(4, 4, 4)
    )
    dm = PairedPatchDataModule(data_cfg, sampler=sampler)
    dm.setup("fit")
    torch.manual_seed(0)
    seen: list[list[str]] = []
    for batch in dm.train_dataloader():
        seen += batch["artifact_kinds"]
        for b, applied in enumerate(batch["artifact_kinds"]):
            diff = float((batch["image"][b] - batch["image_clean"][b]).abs().max())
            # a clean draw is only min-max rescaled by the pipeline
            assert (diff > 1e-2) if applied else (diff < 1e-3), (applied, diff)
    assert all(len(k) <= 1 and set(k) <= {"noise", "blur"} for k in seen)
    assert any(seen) and not all(seen)
    val = next(iter(dm.val_dataloader()))
    assert val["artifact_kinds"] == [[]] * len(val["artifact_kinds"])


def test_absent_kind_var_zero_leaves_absent_kinds_out_of_the_sum_and_pulls_to_zero() -> None:
    torch.manual_seed(0)
    task = _task_net()
    teachers = {"noise": _teacher_net()}
    args = dict(task_net=task, teacher_nets=teachers, init_log_var=-1.0)
    free = stage("student", ["noise"], **args)
    zero = stage("student", ["noise"], absent_kind_var="zero", **args)
    zero.net.load_state_dict(free.net.state_dict())
    batch = _batch()
    # every sample carries the kind: identical to the paper's loss
    own = {**batch, "artifact_kinds": [["noise"], ["noise"]]}
    l_free, l_zero = free.compute_loss(own), zero.compute_loss(own)
    torch.testing.assert_close(l_free["loss"], l_zero["loss"])
    assert float(l_zero["absent_kind_var"]) == 0.0
    # clean or another kind: the artifact channel is out of the CE and taught a zero target
    for kinds in ([[], []], [["blur"], []]):
        absent = {**batch, "artifact_kinds": kinds}
        l_zero = zero.compute_loss(absent)
        _, log_var = zero(batch["image"])
        torch.testing.assert_close(l_zero["absent_kind_var"], log_var[:, 1].exp().mean())
        zero.zero_grad()
        l_zero["seg"].backward()
        grad = zero.net.heads()[0].weight.grad
        assert torch.all(grad[3] == 0) and torch.isfinite(grad).all()
        zero.zero_grad()
        zero.compute_loss(absent)["loss"].backward()
        assert zero.net.heads()[0].bias.grad[3] > 0  # gradient descent lowers sigma_noise^2
    # five kinds: per sample and channel
    teachers = {k: _teacher_net() for k in KINDS}
    student = stage("student", KINDS, task_net=task, teacher_nets=teachers, absent_kind_var="zero")
    kinds = [["noise"], []]
    out = student.compute_loss({**batch, "artifact_kinds": kinds})
    _, log_var = student(batch["image"])
    var = log_var[:, 1:].exp().mean(dim=(2, 3, 4))  # (B, 5)
    expected = torch.cat([var[0, [0, 2, 3, 4]], var[1]]).mean()
    torch.testing.assert_close(out["absent_kind_var"], expected)
    # ... and its absent channels are taught a zero target by the consistency loss
    from qcflow.models.losses import consistency_loss

    out = student.compute_loss({**batch, "artifact_kinds": [[], []]})
    task_ref = task(batch["image_clean"])[1][:, :1].exp()
    v = log_var.exp()
    expected = consistency_loss(v[:, :1], task_ref, 0.1) + sum(
        consistency_loss(v[:, c : c + 1], torch.zeros_like(task_ref), 0.1) for c in range(1, 6)
    )
    torch.testing.assert_close(out["consistency"], expected / 6)
    with pytest.raises(ValueError, match="absent_kind_var"):
        stage("student", ["noise"], absent_kind_var="none")


def test_context_without_attribution_is_refused_and_a_task_network_has_none() -> None:
    assert TwoHeadUNet(num_sources=1, context=True, **TINY).context is None  # task: no kinds
    with pytest.raises(ValueError, match="retired"):  # per-kind offsets (measured no gain)
        TwoHeadUNet(num_sources=6, context=True, **TINY)
    with pytest.raises(ValueError, match="retired"):
        TwoHeadUNet(num_sources=2, context=True, **TINY)


def test_context_from_a_kind_classifier_gives_log_odds_against_clean() -> None:
    from qcflow.models.unet import PatchContext

    torch.manual_seed(0)
    classes = ["none", "spike", "noise", "blur"]
    clf = PatchContext(1, len(classes))
    torch.nn.init.normal_(clf.out.weight)
    torch.nn.init.normal_(clf.out.bias)
    ctx = PatchContext(1, 2)
    ctx.init_from_classifier(clf, classes, ["blur", "spike"])
    x = torch.rand(3, 1, 8, 8, 8)
    with torch.no_grad():
        full = clf.logits(x)
        torch.testing.assert_close(ctx.logits(x), full[:, [3, 1]] - full[:, :1])
    with pytest.raises(ValueError, match="cover"):
        ctx.init_from_classifier(clf, classes, ["blur", "motion"])


def test_attribution_splits_one_total_artifact_variance_by_the_kind_softmax() -> None:
    torch.manual_seed(0)
    task = _task_net().eval()
    teachers = {k: _teacher_net() for k in KINDS}
    net = {"context": True, "attribution": True}
    m = stage("student", KINDS, net, task_net=task, teacher_nets=teachers).eval()
    assert m.net.head_sources == 2  # task row + one total artifact row
    x = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        fresh = m(x)[1]
        # after init_from: task channel as the task network's, the total at exp(-2) split evenly
        torch.testing.assert_close(fresh[:, :1], task(x)[1])
        torch.testing.assert_close(
            fresh[:, 1:].exp().sum(1), torch.full((2, 8, 8, 8), math.exp(-2.0))
        )
        even = torch.full_like(fresh[:, 1:], -2.0 - math.log(5.0))
        torch.testing.assert_close(fresh[:, 1:], even)
        m.net.context.out.weight.normal_()
        m.net.context.out.bias.copy_(torch.arange(5.0))
        logits = m.net.context.logits(x)
        shifted = m(x)[1]
    share = shifted[:, 1:].exp() / shifted[:, 1:].exp().sum(1, keepdim=True)
    # the shares are the softmax of the patch's kind logits at every voxel; the total is unchanged
    torch.testing.assert_close(share, logits.softmax(1)[:, :, None, None, None].expand_as(share))
    torch.testing.assert_close(shifted[:, 1:].exp().sum(1), fresh[:, 1:].exp().sum(1))
    torch.testing.assert_close(shifted[:, :1], fresh[:, :1])
    # the total row trains through the loss; the context (a kind classifier) and frozen stages
    # get no gradient
    m.train()
    m.compute_loss(_batch())["loss"].backward()
    assert all(p.grad is None for p in m.net.context.parameters())
    assert m.net.heads()[0].weight.grad[3].abs().sum() > 0  # rows: 2 classes, task, total
    assert all(p.grad is None for p in m.frozen.parameters())
    # a teacher's single channel is its total; a student needs the kind logits
    t = TwoHeadUNet(num_sources=2, attribution=True, **TINY)
    assert t.head_sources == 2 and t(x)[1].shape == (2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="context"):
        TwoHeadUNet(num_sources=6, attribution=True, **TINY)
    # a plain student's heads cannot be squeezed into the attribution layout
    with pytest.raises(ValueError, match="cannot initialise"):
        m.net.init_from(TwoHeadUNet(num_sources=6, **TINY))


def test_the_context_branch_is_frozen_and_left_out_of_the_optimizer() -> None:
    torch.manual_seed(0)
    teachers = {k: _teacher_net() for k in KINDS}
    net = {"context": True, "attribution": True}
    m = stage("student", KINDS, net, task_net=_task_net(), teacher_nets=teachers)
    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    opt = m.configure_optimizers()
    m.compute_loss(_batch())["loss"].backward()
    opt.step()
    moved = {n for n, p in m.net.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not any(n.startswith("context.") for n in moved)  # the rest trains
    assert all(not p.requires_grad for p in m.net.context.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in m.net.context.parameters()}
    with pytest.raises(ValueError, match="multipliers"):
        stage("teacher", artifact_lr_mult=-1.0)
