"""Rigid-motion k-space artifacts (Shaw et al. 2019), batched and device-agnostic.

Model (Shaw, Sudre, Ourselin, Cardoso, "MRI k-space motion artefact augmentation: model
robustness and task-specific uncertainty", MIDL 2019, PMLR 102; the model TorchIO's
``RandomMotion`` implements). k-space is acquired line by line along the phase-encode axis; the
head moves rigidly ``n`` times during the scan, so each of the ``n + 1`` k-space segments comes
from the spectrum of a differently posed head:

.. math:: K(\\mathbf{k}) = \\mathcal{F}[x \\circ T_{\\pi(s(k_{pe}))}^{-1}](\\mathbf{k}),

with ``s(k_pe)`` the segment of the line and ``pi`` the pose of each segment
(:func:`~qcflow.kspace.params.motion_position_of_segment`: the segment holding the k-space
centre is taken from the original pose, so the image stays in place).

Two decisions, documented here because TorchIO's history shows both are easy to get wrong:

* **No demeaning** (TorchIO #85 / PR #86). Shaw et al. (2019; 2020 TMI; MELBA 2021: "a
  sequence of 'demeaned' 3D affine transformations") divide every pose by the time-weighted
  mean pose so that the brain does not drift away from its labels. Putting the original pose
  at the k-space centre already pins the image -- the low frequencies fix its position and
  contrast -- and doing both over-corrects: the centre segment would then come from a pose
  that is *not* the original. TorchIO dropped demeaning for that reason; qcflow does the same.
  Poses are *absolute* (each relative to the original pose, not to the previous one) and the
  original pose fills the centre segment, so the corrupted image stays aligned with its labels.
* **One documented rigid convention** (TorchIO #812 / PR #1507). TorchIO's ``Motion`` builds
  SimpleITK Euler transforms (``R = Rz Rx Ry`` in LPS, applied as a pull-back, and -- through
  its matrix round trip -- about the *world origin* rather than the image centre, a fact we
  measured on torchio 1.2.1), so its parameters do not mean what ``Affine``'s mean. qcflow's
  poses use ``Affine``'s convention on the array axes: ``x -> R (x - c) + c + t`` with
  ``R = R_2 R_1 R_0`` right-handed about image axes 0, 1, 2, ``c`` the volume centre and ``t``
  in mm (push-forward: ``t = (8, 0, 0)`` moves the content +8 mm along axis 0).
  :func:`torchio_motion_to_params` converts a TorchIO ``Motion`` record exactly.

Speed. A pose that is a pure translation needs no resampling: its spectrum is the original
spectrum times the phase ramp ``exp(-2 pi i sum_a f_a t_a / (n_a s_a))`` (a band-limited,
circular shift -- TorchIO interpolates translations linearly, which also smooths). Rotations are
resampled with ``grid_sample`` (trilinear, like TorchIO) on a grid built by broadcasting three
per-axis terms (``affine_grid`` costs a full ``(D*H*W) x 4 @ 4 x 3`` product). Each posed copy is
transformed only on the phase-encode lines its pose fills (and their mirror lines, see below).

Complex images. Spliced spectra are not conjugate-symmetric, so the image is complex. With the
two-real-image representation of :mod:`qcflow.kspace.functional` (``K = A + iB``) and ``S_p``
the (Hermitian) spectrum of the real copy in pose ``p``:
``A(k) = sum_p 1/2 ([pi(s(k)) = p] + [pi(s(-k)) = p]) S_p(k)`` and
``B(k) = -i sum_p 1/2 ([pi(s(k)) = p] - [pi(s(-k)) = p]) S_p(k)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qcflow.kspace.functional import AxisSupport, forward_pruned
from qcflow.kspace.params import MotionParams, motion_position_of_segment, rotation_matrix

__all__ = [
    "motion_kspace",
    "rigid_grid",
    "rotate",
    "segment_of_freq",
    "torchio_motion_to_params",
    "translation_ramp",
]


def rigid_grid(
    rotations: Tensor,
    shape: Sequence[int],
    center: Sequence[float],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """Sampling grid of rotations about ``center`` for ``grid_sample(align_corners=True)``.

    The output voxel ``i`` samples the input at ``M (i - c) + c`` with
    ``M = S^-1 R^T S`` (``S = diag(spacing)``): the content is rotated by ``R`` (push-forward).
    Built from three broadcast per-axis terms instead of ``affine_grid``'s full matrix product.

    Args:
        rotations: ``(M, 3, 3)`` rotation matrices ``R`` (image axes 0, 1, 2).
        shape: ``(D, H, W)``.
        center: rotation centre in voxel coordinates (axis order 0, 1, 2).
        spacing: voxel size (mm) per axis.

    Returns:
        ``(M, D, H, W, 3)`` float32 grid, last dimension ordered ``(w, h, d)`` as
        ``grid_sample`` expects.
    """
    dev = rotations.device
    sp = torch.as_tensor(spacing, dtype=torch.float64, device=dev)
    c = torch.as_tensor(center, dtype=torch.float64, device=dev)
    n = torch.as_tensor([float(s) for s in shape], dtype=torch.float64, device=dev)
    r = rotations.to(torch.float64)
    m = r.transpose(-1, -2) * sp[None, None, :] / sp[None, :, None]  # S^-1 R^T S, (M, 3, 3)
    scale = 2.0 / (n - 1.0).clamp_min(1.0)  # voxel -> [-1, 1] per input axis a
    # u_a = sum_b scale_a M[a, b] (i_b - c_b) + scale_a c_a - 1, reordered to grid (w, h, d)
    coef = (m * scale[None, :, None]).flip(1)  # (M, 3 grid comps, 3 image axes b)
    const = (scale * c - 1.0).flip(0)  # (3,)
    m_ = rotations.shape[0]
    terms = []
    for b in range(3):
        i = torch.arange(int(shape[b]), device=dev, dtype=torch.float64) - c[b]
        view = [m_, 3, 1, 1, 1]
        view[2 + b] = -1
        terms.append((coef[:, :, b, None] * i[None, None, :]).to(torch.float32).view(view))
    # built channel-first, (M, 3, D, H, W), so the broadcast adds run along contiguous W
    # (~30 % faster than a trailing size-3 axis); grid_sample accepts the permuted view
    grid = (terms[0] + const.to(torch.float32).view(1, 3, 1, 1, 1) + terms[1]) + terms[2]
    return grid.permute(0, 2, 3, 4, 1)


def rotate(
    x: Tensor,
    rotations: Tensor,
    center: Sequence[float],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Tensor:
    """Rotate volumes about ``center`` (trilinear, zeros outside), batched.

    Args:
        x: ``(C, D, H, W)`` (one image, every rotation applied to it) or ``(M, C, D, H, W)``.
        rotations: ``(M, 3, 3)``.
        center: rotation centre (voxels, axes 0, 1, 2).
        spacing: voxel size (mm).

    Returns:
        ``(M, C, D, H, W)``.
    """
    m = rotations.shape[0]
    if x.ndim == 4:
        x = x.unsqueeze(0).expand(m, *x.shape)
    grid = rigid_grid(rotations, x.shape[-3:], center, spacing)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def segment_of_freq(freqs: Tensor, n: int, times: Sequence[float]) -> Tensor:
    """Motion segment of each signed frequency of a length-``n`` phase-encode axis.

    TorchIO's rule on the centred axis: centred index ``s = (f + n // 2) mod n`` (so the
    Nyquist frequency ``+n/2`` of an rfft axis is the centred index 0, like ``-n/2``); segment
    ``j`` spans ``[floor(n t_j), floor(n t_{j+1}))`` with ``t_0 = 0`` and ``t_{n+1} = 1``.
    """
    shifted = (freqs + n // 2) % n
    bounds = torch.tensor([int(n * t) for t in times], dtype=shifted.dtype, device=freqs.device)
    return torch.bucketize(shifted, bounds, right=True)


def translation_ramp(freqs: Tensor, n: int, shift_mm: float, spacing: float = 1.0) -> Tensor | None:
    """Phase ramp ``exp(-2 pi i f t / (n s))`` of a translation by ``t`` mm (``None`` if 0).

    Multiplying a spectrum by it moves the image content by ``+t`` mm (circularly, with
    band-limited interpolation). At the Nyquist frequency ``|f| = n / 2`` of an even axis the
    ramp is its real part ``cos(pi t / s)``: ``+n/2`` and ``-n/2`` are the same line, and only
    the real choice keeps a shifted real image real (conjugate-symmetric spectrum), which the
    two-real-image representation relies on.
    """
    if shift_mm == 0.0:
        return None
    phase = freqs.to(torch.float64) * (-2.0 * math.pi * shift_mm / (n * spacing))
    ramp = torch.polar(torch.ones_like(phase), phase)
    if n % 2 == 0:
        nyquist = freqs.abs() == n // 2
        ramp = torch.where(nyquist, torch.cos(phase).to(ramp.dtype), ramp)
    return ramp.to(torch.complex64)


def _neg(freqs: Tensor, n: int) -> Tensor:
    # -f mapped back into the signed range of a length-n axis
    g = (-freqs) % n
    return torch.where(g < (n + 1) // 2, g, g - n)


def motion_kspace(
    x: Tensor,
    params: MotionParams,
    supports: Sequence[AxisSupport],
    center: Sequence[float],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor | None]:
    """Composite (motion-spliced) half spectra ``(A, B)`` on the kept k-space entries.

    Args:
        x: real image ``(C, D, H, W)`` in the pose at rest (already padded, bias applied).
        params: the movements.
        supports: kept entries per axis (see :func:`~qcflow.kspace.functional.forward_pruned`).
        center: rotation centre in voxels of ``x`` (the centre of the unpadded volume).
        spacing: voxel size (mm) per axis; translations are in mm.

    Returns:
        ``A``, ``B`` complex64 ``(C, K_D, K_H, K_W)``: the image is ``ifft(A) + i ifft(B)``;
        ``B`` is ``None`` when every spliced line pair comes from one pose.
    """
    dev = x.device
    pe = params.pe_axis
    sup_pe = supports[pe]
    n_pe = sup_pe.n
    f_pe = sup_pe.freqs(dev)
    pos_of_seg = torch.tensor(motion_position_of_segment(params.times), device=dev)
    pos_f = pos_of_seg[segment_of_freq(f_pe, n_pe, params.times)]  # pose filling line f
    pos_nf = pos_of_seg[segment_of_freq(_neg(f_pe, n_pe), n_pe, params.times)]  # ... line -f
    shape = [x.shape[0]] + [s.size for s in supports]
    a = torch.zeros(shape, dtype=torch.complex64, device=dev)
    b: Tensor | None = None
    dim = 1 + pe

    n_pos = params.num_movements + 1
    degrees = [(0.0, 0.0, 0.0), *params.degrees]
    shifts = [(0.0, 0.0, 0.0), *params.translation]
    lines = [torch.nonzero((pos_f == p) | (pos_nf == p)).flatten() for p in range(n_pos)]
    still = [p for p in range(n_pos) if not any(degrees[p]) and lines[p].numel()]
    turned = [p for p in range(n_pos) if any(degrees[p]) and lines[p].numel()]

    def add(piece: Tensor, p: int, idx: Tensor) -> None:
        # piece: (C, ..., len(idx) on the pe axis, ...) = spectrum of pose p on lines idx
        nonlocal b
        for axis in range(3):
            sup = supports[axis]
            fr = sup.freqs(dev) if axis != pe else f_pe[idx]
            ramp = translation_ramp(fr, sup.n, shifts[p][axis], float(spacing[axis]))
            if ramp is not None:
                view = [1, 1, 1, 1]
                view[1 + axis] = -1
                piece = piece * ramp.view(view)
        hit_f = (pos_f[idx] == p).to(torch.float32)
        hit_n = (pos_nf[idx] == p).to(torch.float32)
        view = [1, 1, 1, 1]
        view[dim] = -1
        wa = (0.5 * (hit_f + hit_n)).view(view)
        wb = (0.5 * (hit_f - hit_n)).view(view)
        a.index_add_(dim, idx, piece * wa)
        if bool((wb != 0).any()):
            if b is None:
                b = torch.zeros_like(a)
            b.index_add_(dim, idx, piece * (wb * -1j))

    if still:
        union = torch.unique(torch.cat([lines[p] for p in still]))
        piece = forward_pruned(x, supports, line_index=(pe, union))
        for p in still:
            sub = torch.searchsorted(union, lines[p])
            add(piece.index_select(dim, sub), p, lines[p])
    if turned:
        rots = torch.tensor([rotation_matrix(degrees[p]) for p in turned], device=dev)
        moved = rotate(x, rots.to(torch.float32), center, spacing)  # (M, C, D, H, W)
        for m, p in enumerate(turned):
            piece = forward_pruned(moved[m], supports, line_index=(pe, lines[p]))
            add(piece, p, lines[p])
    return a, b


def _euler_from_matrix(r: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    # inverse of params.rotation_matrix: R = R2(c) R1(b) R0(a), degrees
    beta = math.asin(max(-1.0, min(1.0, -r[2][0])))
    alpha = math.atan2(r[2][1], r[2][2])
    gamma = math.atan2(r[1][0], r[0][0])
    return (math.degrees(alpha), math.degrees(beta), math.degrees(gamma))


def torchio_motion_to_params(
    degrees: Sequence[Sequence[float]],
    translation: Sequence[Sequence[float]],
    times: Sequence[float],
    shape: Sequence[int],
    affine: Sequence[Sequence[float]] | None = None,
) -> MotionParams:
    """The :class:`MotionParams` that reproduce a torchio 1.2 ``Motion`` with these arguments.

    TorchIO's ``Motion`` resamples with SimpleITK Euler transforms in LPS,
    ``p -> R_s p + t_s`` with ``R_s = Rz(g) Rx(a) Ry(b)`` (SimpleITK's default ZXY order) about
    the *world origin* (its centre is lost in ``transform_to_matrix``), as a pull-back. For an
    axis-aligned RAS affine ``x_world = S i + o`` the same pose in qcflow's convention
    (push-forward about the volume centre ``c``) is

    ``R = Q^T`` and ``t = Q^T [(I - Q)(c + o) - F t_s]``, with ``F = diag(-1, -1, 1)`` and
    ``Q = F R_s F``.

    Args:
        degrees: TorchIO ``Motion.degrees`` ``(n, 3)``.
        translation: TorchIO ``Motion.translation`` ``(n, 3)`` (mm, LPS).
        times: TorchIO ``Motion.times`` ``(n,)``.
        shape: spatial shape ``(D, H, W)`` of the image.
        affine: the image's 4x4 RAS affine (identity if ``None``); must be axis-aligned with
            positive spacings.

    Returns:
        Equivalent parameters with ``pe_axis=2`` (TorchIO splices the last axis).
    """
    aff = (
        torch.eye(4, dtype=torch.float64)
        if affine is None
        else torch.as_tensor(affine, dtype=torch.float64)
    )
    lin = aff[:3, :3]
    sp = torch.diagonal(lin)
    if not torch.allclose(lin, torch.diag(sp)) or bool((sp <= 0).any()):
        raise ValueError(
            "torchio_motion_to_params needs an axis-aligned RAS affine with positive spacing"
        )
    origin = aff[:3, 3]
    centre = sp * (torch.as_tensor([float(s) for s in shape], dtype=torch.float64) - 1.0) / 2.0
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    out_deg, out_tra = [], []
    for deg, tra in zip(degrees, translation, strict=True):
        a, b, g = (math.radians(float(v)) for v in deg)
        rx = torch.tensor(
            [[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
            dtype=torch.float64,
        )
        ry = torch.tensor(
            [[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]],
            dtype=torch.float64,
        )
        rz = torch.tensor(
            [[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]],
            dtype=torch.float64,
        )
        q = flip @ (rz @ rx @ ry) @ flip
        t_s = torch.as_tensor([float(v) for v in tra], dtype=torch.float64)
        t = q.T @ ((torch.eye(3, dtype=torch.float64) - q) @ (centre + origin) - flip @ t_s)
        out_deg.append(_euler_from_matrix(q.T.tolist()))
        out_tra.append(tuple(float(v) for v in t))
    return MotionParams(
        times=tuple(float(t) for t in times),
        degrees=tuple(out_deg),
        translation=tuple(out_tra),
        pe_axis=2,
    )
