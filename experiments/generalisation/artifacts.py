"""The benchmark's artifacts: TorchIO 1.x's own transforms plus four geometric/contrast kinds.

Why foreign: qcflow trains and scores with its own artifact code (``qcflow.kspace``,
``qcflow.data.synth.artifacts``); a generalisation test must not reuse it. Here the k-space and
intensity kinds are TorchIO's ``Random*`` transforms with explicit ranges per severity
(:data:`SEVERITY`, 1 mild, 2 moderate, 3 severe), run under ``torch.manual_seed`` of the scan's
artifact seed inside ``torch.random.fork_rng`` (the global RNG is restored); the values TorchIO
drew are read back from the subject's history into ``params``. ``foldover``, ``missing_half``,
``rotation`` and ``non_t1`` are written here with NumPy/torch.

Physical order: the *object* kinds (:data:`OBJECT_KINDS`: what is imaged or how it is resolved:
rotation, missing part, contrast, coil bias, blur, anisotropy, wrap-around by a reduced FOV) act
on the noise-free scan, then the clean scan's own Rician noise is added, then the *acquisition*
kinds (:data:`ACQ_KINDS`: motion, ghosting, spike, extra noise) act on the noisy magnitude image.
Geometric kinds move the head mask and the GM label with the anatomy (zero where cut).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from variation import ScanState, rotation, sample_grid

__all__ = ["KINDS", "SEVERITY", "OBJECT_KINDS", "ACQ_KINDS", "object_artifact", "acq_artifact"]

KINDS: tuple[str, ...] = (
    "motion",
    "ghosting",
    "spike",
    "bias",
    "anisotropy",
    "blur",
    "noise",
    "foldover",
    "missing_half",
    "rotation",
    "non_t1",
)

#: kind → severity → parameter ranges (TorchIO argument names for the TorchIO kinds)
SEVERITY: dict[str, dict[int, dict[str, Any]]] = {
    "motion": {
        1: {"degrees": (2.0, 5.0), "translation": (2.0, 5.0), "num_transforms": (2, 4)},
        2: {"degrees": (5.0, 10.0), "translation": (5.0, 10.0), "num_transforms": (2, 4)},
        3: {"degrees": (10.0, 20.0), "translation": (10.0, 15.0), "num_transforms": (2, 4)},
    },
    "ghosting": {s: {"num_ghosts": (2, 10), "axes": (0, 1, 2), "intensity": r}
                 for s, r in ((1, (0.25, 0.45)), (2, (0.45, 0.7)), (3, (0.7, 1.0)))},
    "spike": {s: {"num_spikes": (1, 3), "intensity": r}
              for s, r in ((1, (0.3, 0.6)), (2, (0.6, 1.2)), (3, (1.2, 2.0)))},
    "bias": {1: {"coefficients": 0.3}, 2: {"coefficients": 0.5}, 3: {"coefficients": 0.8}},
    "anisotropy": {s: {"axes": (0, 1, 2), "downsampling": r}
                   for s, r in ((1, (2.0, 3.0)), (2, (3.0, 5.0)), (3, (5.0, 8.0)))},
    "blur": {1: {"std": (0.7, 1.1)}, 2: {"std": (1.1, 1.8)}, 3: {"std": (1.8, 3.0)}},
    "noise": {1: {"std_frac": (0.04, 0.07)}, 2: {"std_frac": (0.07, 0.12)},
              3: {"std_frac": (0.12, 0.2)}},
    "foldover": {1: {"fraction": (0.08, 0.15)}, 2: {"fraction": (0.15, 0.25)},
                 3: {"fraction": (0.25, 0.4)}},
    "missing_half": {1: {"fraction": (0.15, 0.25)}, 2: {"fraction": (0.25, 0.4)},
                     3: {"fraction": (0.4, 0.55)}},
    "rotation": {1: {"degrees": (20.0, 30.0)}, 2: {"degrees": (30.0, 60.0)},
                 3: {"degrees": (60.0, 120.0)}},
    "non_t1": {1: {"mix": (0.5, 0.7), "gamma": (0.8, 1.25)},
               2: {"mix": (0.7, 0.9), "gamma": (0.8, 1.25)},
               3: {"mix": (0.9, 1.0), "gamma": (0.8, 1.25)}},
}  # fmt: skip

OBJECT_KINDS = frozenset(
    {"rotation", "missing_half", "non_t1", "bias", "blur", "anisotropy", "foldover"}
)
ACQ_KINDS = frozenset(KINDS) - OBJECT_KINDS


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor | np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float | np.floating):
        return round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _torchio(transform: tio.Transform, image: torch.Tensor, affine, seed: int):
    """Apply one TorchIO random transform under ``seed``; returns (image, drawn parameters)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        subject = tio.Subject(img=tio.ScalarImage(tensor=image[None].contiguous(), affine=affine))
        out = transform(subject)
    args = out.history[-1]._get_reproducing_arguments()
    drawn = {
        k: _jsonable(v["img"] if isinstance(v, dict) and "img" in v else v)
        for k, v in args.items()
        if k not in ("include", "exclude", "copy")
    }
    return out["img"].data[0].float(), {"torchio": type(out.history[-1]).__name__, **drawn}


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    return float(lo_hi[0] + rng.uniform() * (lo_hi[1] - lo_hi[0]))


def _extent(head: torch.Tensor, axis: int) -> tuple[int, int]:
    """First and last index along ``axis`` where the head is."""
    dims = tuple(d for d in range(3) if d != axis)
    idx = torch.nonzero(head.sum(dim=dims) > 0)[:, 0]
    return int(idx.min()), int(idx.max())


def _foldover(state: ScanState, rng, rg) -> dict[str, Any]:
    """Reduce the FOV along an in-plane (R or A) axis; the outside folds onto the other side."""
    axis = int(rng.integers(2))
    f = _uniform(rng, rg["fraction"])
    lo, hi = _extent(state.head, axis)
    n_head, n = hi - lo + 1, state.image.shape[axis]
    fov = max(8, int(round(n_head * (1.0 - f))))
    start = lo + (n_head - fov) // 2
    dst = (torch.arange(n) - start) % fov
    shape = list(state.image.shape)
    shape[axis] = fov
    state.image = torch.zeros(shape).index_add_(axis, dst, state.image)
    state.head = state.head.narrow(axis, start, fov).clone()  # the anatomy in the new FOV
    if state.gm is not None:
        state.gm = state.gm.narrow(axis, start, fov).clone()
    state.affine = state.affine.copy()
    state.affine[:3, 3] += state.affine[:3, axis] * start
    state.pad[axis] = 0
    return {"axis_ras": axis, "fraction": round(f, 5), "fov_vox": fov, "start_vox": start}


def _missing(state: ScanState, rng, rg) -> dict[str, Any]:
    """Zero the head beyond a plane at ``fraction`` of its extent, from a random side."""
    axis, side = int(rng.integers(3)), ("low", "high")[int(rng.integers(2))]
    f = _uniform(rng, rg["fraction"])
    lo, hi = _extent(state.head, axis)
    cut = int(round(f * (hi - lo + 1)))
    n = state.image.shape[axis]
    start, stop = (0, lo + cut) if side == "low" else (hi + 1 - cut, n)
    start, length = max(0, start), min(stop, n) - max(0, start)
    for t in (state.image, state.head, state.gm):
        if t is not None:
            t.narrow(axis, start, length).zero_()
    return {"axis_ras": axis, "side": side, "fraction": round(f, 5), "cut_vox": cut}


def _rotate(state: ScanState, rng, rg) -> dict[str, Any]:
    """Tilt the head about its centre inside the unchanged grid (affine kept: misregistered)."""
    axis = int(rng.integers(3))
    sign = 1.0 if rng.uniform() < 0.5 else -1.0
    deg = sign * _uniform(rng, rg["degrees"])
    angles = np.zeros(3)
    angles[axis] = deg
    rot = rotation(angles)
    idx = torch.nonzero(state.head).float().mean(0).numpy()
    centre = state.affine[:3, :3] @ idx + state.affine[:3, 3]
    world_map = np.eye(4)  # destination world y → source world R⁻¹(y − c) + c
    world_map[:3, :3] = rot.T
    world_map[:3, 3] = centre - rot.T @ centre
    shape = tuple(state.image.shape)
    grid = sample_grid(state.affine, shape, state.affine, shape, world_map)
    src = torch.stack([state.image, state.head.float()])[None]
    out = F.grid_sample(src, grid, mode="bilinear", align_corners=True)[0]
    state.image, state.head = out[0].clamp_min(0.0), out[1] > 0.5
    if state.gm is not None:
        gm = F.grid_sample(state.gm[None, None].float(), grid, mode="nearest", align_corners=True)
        state.gm = gm[0, 0].to(torch.uint8)
    return {"axis_ras": axis, "degrees": round(deg, 4), "centre_mm": centre.round(3).tolist()}


def _non_t1(state: ScanState, rng, rg) -> dict[str, Any]:
    """Reverse the intensity order inside the head (T2/PD-like), then a power curve."""
    mix, gamma = _uniform(rng, rg["mix"]), _uniform(rng, rg["gamma"])
    inside = state.image[state.head]
    hi = float(np.percentile(inside.numpy(), 99))
    rev = (mix * (hi - inside) + (1.0 - mix) * inside).clamp_min(0.0)
    state.image[state.head] = hi * (rev / hi).pow(gamma)
    return {"mix": round(mix, 5), "gamma": round(gamma, 5), "hi": round(hi, 6)}


def _bias(state: ScanState, rg, seed: int) -> dict[str, Any]:
    """TorchIO ``RandomBiasField`` on a ¼-size grid of ones (its field is defined on [-1, 1]³,
    so the draws and the polynomial are the full grid's), upsampled trilinearly: ~30× faster.
    """
    shape = tuple(state.image.shape)
    small = torch.ones(tuple(max(4, n // 4) for n in shape))
    field, params = _torchio(tio.RandomBiasField(coefficients=rg["coefficients"]), small,
                             np.eye(4), seed)  # fmt: skip
    full = F.interpolate(field[None, None], size=shape, mode="trilinear", align_corners=True)
    state.image.mul_(full[0, 0])
    return {**params, "field_grid": list(small.shape)}


def object_artifact(kind, severity, state: ScanState, rng, seed: int) -> dict[str, Any]:
    """Apply an :data:`OBJECT_KINDS` artifact to the noise-free ``state`` (in place)."""
    rg = SEVERITY[kind][severity]
    own = {"foldover": _foldover, "missing_half": _missing, "rotation": _rotate, "non_t1": _non_t1}
    if kind in own:
        return own[kind](state, rng, rg)
    if kind == "bias":
        return _bias(state, rg, seed)
    transform = {
        "blur": lambda: tio.RandomBlur(std=rg["std"]),
        "anisotropy": lambda: tio.RandomAnisotropy(rg["axes"], rg["downsampling"]),
    }[kind]()
    state.image, params = _torchio(transform, state.image, state.affine, seed)
    state.image.clamp_min_(0.0)
    return params


def acq_artifact(kind, severity, image, state: ScanState, rng, seed: int):
    """Apply an :data:`ACQ_KINDS` artifact to the noisy magnitude ``image``: (image, params)."""
    rg = SEVERITY[kind][severity]
    extra: dict[str, Any] = {}
    if kind == "motion":
        k = int(rng.integers(rg["num_transforms"][0], rg["num_transforms"][1] + 1))
        transform = tio.RandomMotion(rg["degrees"], rg["translation"], num_transforms=k)
    elif kind == "ghosting":
        transform = tio.RandomGhosting(rg["num_ghosts"], rg["axes"], rg["intensity"])
    elif kind == "spike":
        transform = tio.RandomSpike(rg["num_spikes"], rg["intensity"])
    else:  # noise: std a fraction of the mean head signal
        lo, hi = (state.signal * v for v in rg["std_frac"])
        transform = tio.RandomNoise(mean=0.0, std=(lo, hi))
        extra = {"signal": round(state.signal, 6)}
    out, params = _torchio(transform, image, state.affine, seed)
    if kind == "noise":
        params["std_frac"] = round(params["std"] / state.signal, 6)
    out = out.abs() if kind in ("noise", "spike", "ghosting") else out.clamp_min(0.0)
    return out, {**params, **extra}


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS difference of two images on one grid, / the RMS of ``b`` (test helper)."""
    return float((a - b).square().mean().sqrt() / b.square().mean().sqrt().clamp_min(1e-12))


assert set(SEVERITY) == set(KINDS)
