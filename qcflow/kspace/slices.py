"""Thick-slice (anisotropic) acquisition: a 2-D multi-slice scan resampled back to the grid.

A through-plane resolution of ``t`` voxels along one axis is simulated as a linear map ``y = L x``
along that axis, ``L = I P`` with ``n`` voxels and ``S`` slices: ``P`` ``(S, n)`` forms each slice
value from the object -- the average over the slice (``box`` profile, partial-volume weights:
contiguous slices of thickness ``t``) or the voxel at its centre (``point``: thin slices with
gaps, TorchIO's ``RandomAnisotropy`` model) -- and ``I`` ``(n, S)`` interpolates the slice values
linearly at the voxel centres. In k-space this is the slice profile's sinc times the linear
interpolation's sinc^2 (with the aliasing of sampling every ``t`` voxels): through-plane
frequencies above the slices' Nyquist are suppressed, in-plane ones untouched (the map is
separable). The pipeline applies it to the reconstructed image (:mod:`qcflow.kspace.pipeline`).

References:
    Haacke et al., *Magnetic Resonance Imaging: Physical Principles and Sequence Design*, 1999
    (slice profile and partial volume); Greenspan, Super-resolution in medical imaging, The
    Computer Journal 52(1), 2009 (thick-slice acquisition as blur + decimation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcflow.kspace.params import AnisotropyParams

__all__ = ["thick_slice_matrix", "thick_slice"]


def thick_slice_matrix(n: int, aniso: AnisotropyParams) -> Tensor:
    """The ``(n, n)`` float64 map of :class:`AnisotropyParams` along its axis: ``y = L x``.

    ``L = I P``: ``P`` ``(S, n)`` averages each slice's voxels by their overlap with the slice
    (box) or picks the voxel at its centre (point); ``I`` ``(n, S)`` interpolates the slice
    values linearly at the voxel centres (constant beyond the outer slice centres).
    """
    t, o = aniso.factor, aniso.offset
    count = math.ceil((n + o * t) / t)
    lo = -0.5 + (torch.arange(count, dtype=torch.float64) - o) * t  # (S,) slice starts
    centre = lo + t / 2.0
    vox = torch.arange(n, dtype=torch.float64)
    if aniso.profile == "box":
        overlap = torch.minimum(lo[:, None] + t, vox[None, :] + 0.5) - torch.maximum(
            lo[:, None], vox[None, :] - 0.5
        )
        prof = overlap.clamp_min(0.0)
        prof = prof / prof.sum(1, keepdim=True)  # (S, n): partial-volume average inside the FOV
    else:
        prof = torch.zeros(count, n, dtype=torch.float64)
        prof[torch.arange(count), torch.round(centre).clamp(0, n - 1).long()] = 1.0
    pos = ((vox - centre[0]) / t).clamp(0.0, count - 1.0)  # voxel position in slice units
    left = pos.floor().long().clamp_max(count - 1)
    right = (left + 1).clamp_max(count - 1)
    w = pos - left.to(torch.float64)
    interp = torch.zeros(n, count, dtype=torch.float64)  # (n, S)
    interp[torch.arange(n), left] += 1.0 - w
    interp[torch.arange(n), right] += w
    return interp @ prof


def thick_slice(x: Tensor, aniso: AnisotropyParams) -> Tensor:
    """Apply :class:`AnisotropyParams` to ``x`` ``(..., D, H, W)`` (real or complex)."""
    if not aniso.active:
        return x
    dim = x.ndim - 3 + aniso.axis
    mat = thick_slice_matrix(x.shape[dim], aniso).to(device=x.device, dtype=torch.float32)
    if x.is_complex():
        return torch.complex(thick_slice(x.real, aniso), thick_slice(x.imag, aniso))
    y = torch.movedim(x, dim, -1) @ mat.T
    return torch.movedim(y, -1, dim).contiguous()
