"""Pure torch primitives for k-space artifact simulation (no NumPy, no Lightning, no files).

Everything here works on real float32 images of shape ``(..., D, H, W)`` (any leading batch and
channel dimensions) and on their half spectra (complex64), on CPU or CUDA alike.

Conventions
-----------
* **Spectrum layout.** torch's un-shifted layout: index ``i`` of an axis of length ``n`` holds the
  signed integer frequency ``f = i`` for ``i < ceil(n / 2)`` and ``f = i - n`` otherwise (as
  :func:`torch.fft.fftfreq` times ``n``). The centre of k-space is index 0; nothing here ever
  calls ``fftshift`` (a full copy that doubles the cost of a round trip, docs/pitfalls.md)
  -- code that needs "the centre" indexes it. The last axis (W) is stored as an ``rfft`` half
  spectrum with ``W // 2 + 1`` entries (``f = 0 .. W // 2``).
* **Normalisation.** torch's default ("backward"): the forward transform is unnormalised, the
  inverse divides by the number of voxels ``N``. Hence the DC coefficient equals the image sum,
  and complex white noise of per-component standard deviation ``s`` in k-space becomes complex
  white noise of per-component standard deviation ``s / sqrt(N)`` in the image.
* **Complex images as two real images.** A k-space edit that is not conjugate-symmetric (an RF
  spike, complex noise, a motion-spliced spectrum) makes the image complex, ``z = a + i b``.
  Because ``a`` and ``b`` are real they are carried as two *half* spectra ``A = rfft(a)`` and
  ``B = rfft(b)``: the full spectrum is ``K = A + i B`` with ``A``, ``B`` Hermitian. This keeps
  the cheap real transforms (``rfftn`` is about half a complex ``fftn``) and costs a second
  inverse only when ``b`` is non-zero.
* **Pruned transforms.** Low-pass truncation and line masking keep a *separable* set of k-space
  lines (a product of per-axis index sets, :class:`AxisSupport`). The forward transform then
  computes only the kept lines and the inverse starts from them: after the first 1-D pass every
  later pass works on the reduced data. Keeping every ``n``-th line of an axis whose length is a
  multiple of ``n`` is exact aliasing: the forward transform *folds* the image (sums its ``n``
  blocks) and the inverse *tiles* the reduced image ``n`` times -- the wrap-around artifact
  computed as what it physically is.
* **Smooth sizes.** FFT cost per voxel roughly doubles for axes with large prime factors (197 and
  233 in the 1 mm MNI template). :func:`smooth_size` gives the next 2/3/5-smooth length; zero
  padding to it is a slightly larger field of view (background only).

Length: the FFT primitives the pipeline fuses, kept together so their support conventions (pruned,
halved, folded axes) are defined once (~530 lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AxisSupport",
    "bias_field",
    "bias_field_log",
    "bias_num_coefficients",
    "crop_center",
    "crop_unfolded",
    "expand_folded",
    "fft_roundtrip",
    "foreground_mean",
    "forward_pruned",
    "full_supports",
    "inverse_pruned",
    "measure_snr_db",
    "pad_to_shape",
    "rescale01",
    "signed_freqs",
    "smooth_shape",
    "smooth_size",
    "snr_db_to_sigma",
]


# --------------------------------------------------------------------------------------------
# sizes, padding, frequencies
# --------------------------------------------------------------------------------------------
def smooth_size(n: int, primes: Sequence[int] = (2, 3, 5)) -> int:
    """Smallest ``m >= n`` whose prime factors are all in ``primes`` (FFT-friendly length).

    Example:
        >>> smooth_size(197), smooth_size(233), smooth_size(189)
        (200, 240, 192)
    """
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    m = n
    while True:
        r = m
        for p in primes:
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def smooth_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """:func:`smooth_size` of every entry."""
    return tuple(smooth_size(int(n)) for n in shape)


def _pads(shape: Sequence[int], target: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for n, m in zip(shape, target, strict=True):
        if m < n:
            raise ValueError(f"cannot pad length {n} to the smaller length {m}")
        before = (m - n) // 2
        out.append((before, m - n - before))
    return out


def pad_to_shape(x: Tensor, shape: Sequence[int]) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad the last three axes of ``x`` symmetrically to ``shape``.

    Args:
        x: ``(..., D, H, W)``.
        shape: target ``(D', H', W')`` with every entry ``>=`` the current one.

    Returns:
        The padded tensor ``(..., D', H', W')`` (``x`` itself when nothing changes) and the
        ``(before, after)`` padding of each axis; :func:`crop_center` undoes it.
    """
    pads = _pads(x.shape[-3:], shape)
    if all(p == (0, 0) for p in pads):
        return x, pads
    flat = [v for p in reversed(pads) for v in p]  # F.pad wants the last axis first
    return F.pad(x, flat), pads


def crop_center(x: Tensor, pads: Sequence[tuple[int, int]]) -> Tensor:
    """Undo :func:`pad_to_shape` on the last three axes (a view, no copy)."""
    for axis, (before, after) in enumerate(pads):
        if before or after:
            dim = x.ndim - 3 + axis
            x = x.narrow(dim, before, x.shape[dim] - before - after)
    return x


def signed_freqs(n: int, device: torch.device | str | None = None) -> Tensor:
    """Signed integer frequency of each index of a length-``n`` axis, ``(n,)`` int64.

    ``[0, 1, ..., ceil(n/2) - 1, -floor(n/2), ..., -1]`` (``torch.fft.fftfreq(n) * n``).
    """
    i = torch.arange(n, device=device)
    return torch.where(i < (n + 1) // 2, i, i - n)


# --------------------------------------------------------------------------------------------
# separable k-space supports and pruned transforms
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisSupport:
    """The k-space lines kept along one image axis.

    The axis has image length ``n``. With ``period = p > 1`` (``p`` divides ``n``) only signed
    frequencies that are multiples of ``p`` can be kept: the image is folded to length
    ``n // p`` before the transform and the spectrum is that of the folded image, whose
    frequency ``g`` is the original frequency ``p * g``. ``index`` lists the kept entries of
    the (folded) stored axis -- ``n // p`` entries, or ``n // p // 2 + 1`` when ``halved`` (the
    rfft axis) -- in increasing order; ``None`` keeps them all.

    Args:
        n: image length of the axis (after any smooth-size padding).
        halved: whether the axis is stored as an rfft half spectrum (the last axis).
        period: fold factor ``p`` (1: no folding).
        index: kept stored entries, ``(K,)`` int64, or ``None`` for all.
    """

    n: int
    halved: bool = False
    period: int = 1
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.period < 1 or self.n % self.period:
            raise ValueError(f"period {self.period} must divide the axis length {self.n}")

    @property
    def length(self) -> int:
        """Image length after folding, ``n // period``."""
        return self.n // self.period

    @property
    def stored(self) -> int:
        """Number of stored spectrum entries of the (folded) axis."""
        return self.length // 2 + 1 if self.halved else self.length

    @property
    def size(self) -> int:
        """Number of kept entries."""
        return self.stored if self.index is None else int(self.index.numel())

    @property
    def fraction(self) -> float:
        """Kept fraction of the full axis' lines (folding included)."""
        full = self.n // 2 + 1 if self.halved else self.n
        return self.size / full

    def positions(self, device: torch.device | str | None = None) -> Tensor:
        """Kept entries of the folded stored axis, ``(K,)`` int64."""
        if self.index is not None:
            return self.index.to(device)
        return torch.arange(self.stored, device=device)

    def freqs(self, device: torch.device | str | None = None) -> Tensor:
        """Signed frequency (of the unfolded axis of length ``n``) of each kept entry, ``(K,)``."""
        pos = self.positions(device)
        if self.halved:
            g = pos
        else:
            g = torch.where(pos < (self.length + 1) // 2, pos, pos - self.length)
        return g * self.period

    def full_index(self, device: torch.device | str | None = None) -> Tensor:
        """Index of each kept entry in the unfolded stored axis (``n`` or ``n // 2 + 1``)."""
        f = self.freqs(device)
        return f if self.halved else f % self.n

    def lookup(self, device: torch.device | str | None = None) -> Tensor:
        """Map from unfolded stored index to kept position (``-1`` where not kept)."""
        full = self.n // 2 + 1 if self.halved else self.n
        table = torch.full((full,), -1, dtype=torch.long, device=device)
        table[self.full_index(device)] = torch.arange(self.size, device=device)
        return table

    def negation(self, device: torch.device | str | None = None) -> Tensor:
        """Permutation ``q`` with ``freqs[q] == -freqs`` (modulo ``n``); needs a symmetric set.

        Only meaningful for full (not halved) axes, whose kept sets are conjugate-symmetric by
        construction in this package.
        """
        table = self.lookup(device)
        neg = (-self.freqs(device)) % self.n
        q = table[neg]
        if bool((q < 0).any()):
            raise ValueError("the kept frequencies are not symmetric")
        return q


def full_supports(shape: Sequence[int]) -> tuple[AxisSupport, AxisSupport, AxisSupport]:
    """Supports that keep all of k-space for an image of spatial ``shape`` ``(D, H, W)``."""
    d, h, w = (int(s) for s in shape)
    return (AxisSupport(d), AxisSupport(h), AxisSupport(w, halved=True))


def _loop_leading(x: Tensor) -> bool:
    # On the CPU, batched FFTs over leading dimensions run several times slower than the same
    # transforms one volume at a time (measured with torch 2.13: 2 x 160x192x81 irfftn 163 ms vs
    # 2 x 36 ms); CUDA batches well.
    return x.device.type == "cpu" and x.ndim > 3 and math.prod(x.shape[:-3]) > 1


def _fold(x: Tensor, dim: int, period: int) -> Tensor:
    # (..., n, ...) -> (..., n // p, ...): sum of the p consecutive blocks (aliasing)
    n = x.shape[dim]
    return x.unflatten(dim, (period, n // period)).sum(dim)


def _c2c_order(
    supports: Sequence[AxisSupport], forward: bool, line_index: tuple[int, Tensor] | None = None
) -> list[int]:
    # Forward: transform the axis that keeps the smallest fraction first (it shrinks the data
    # every later pass reads). Inverse: expand the axis that keeps the largest fraction first,
    # so the most reduced axis is expanded last.
    frac = [s.fraction for s in supports]
    if line_index is not None:
        a = line_index[0]
        frac[a] *= line_index[1].numel() / max(1, supports[a].size)
    axes = [a for a in range(3) if not supports[a].halved]
    return sorted(axes, key=lambda a: frac[a], reverse=not forward)


def forward_pruned(
    x: Tensor,
    supports: Sequence[AxisSupport],
    line_index: tuple[int, Tensor] | None = None,
) -> Tensor:
    """Kept entries of the half spectrum of a real image.

    Equals ``torch.fft.rfftn(x, dim=(-3, -2, -1))`` restricted to the kept lines of every axis
    (and, for folded axes, computed from the folded image), but only the kept lines are ever
    computed after the first 1-D pass.

    Args:
        x: real image ``(..., D, H, W)`` (float32).
        supports: one :class:`AxisSupport` per spatial axis; exactly the last one is halved.
        line_index: optional ``(axis, positions)`` restricting one axis further to a subset of
            its kept positions (positions index the axis' kept entries); used by motion, which
            needs each moved copy only on its own phase-encode lines.

    Returns:
        complex64 ``(..., K_D, K_H, K_W)`` (``K_a`` = kept entries, or the subset's length).
    """
    if not supports[2].halved or supports[0].halved or supports[1].halved:
        raise ValueError("the last axis (and only it) must be the halved rfft axis")
    if _loop_leading(x):
        flat = x.reshape(-1, *x.shape[-3:])
        out = [forward_pruned(v, supports, line_index) for v in flat]
        return torch.stack(out).reshape(*x.shape[:-3], *out[0].shape)
    nd = x.ndim
    for axis, sup in enumerate(supports):
        if sup.period > 1:
            x = _fold(x, nd - 3 + axis, sup.period)

    def select(k: Tensor, axis: int) -> Tensor:
        sup = supports[axis]
        idx = sup.index
        if line_index is not None and line_index[0] == axis:
            pos = line_index[1]
            idx = pos if idx is None else idx.to(pos.device)[pos]
        if idx is None:
            return k
        return k.index_select(nd - 3 + axis, idx.to(k.device))

    k = torch.fft.rfft(x, dim=-1)  # (..., D, H, W // 2 + 1)
    k = select(k, 2)
    for axis in _c2c_order(supports, forward=True, line_index=line_index):
        k = torch.fft.fft(k, dim=nd - 3 + axis)
        k = select(k, axis)
    return k


def _zero_fill(k: Tensor, dim: int, index: Tensor | None, length: int) -> Tensor:
    if index is None:
        return k
    shape = list(k.shape)
    shape[dim] = length
    out = k.new_zeros(shape)
    return out.index_copy_(dim, index.to(k.device), k)


def inverse_pruned(k: Tensor, supports: Sequence[AxisSupport]) -> Tensor:
    """Inverse of :func:`forward_pruned`: the real (folded) image of a kept half spectrum.

    Missing entries are zeros (the truncation / line mask). Folded axes come back at their
    folded length ``n // p``; :func:`expand_folded` tiles them back (and crops any padding);
    the ``1 / p`` factor of that expansion is the caller's (it is a global scale).

    Args:
        k: complex64 ``(..., K_D, K_H, K_W)`` on the kept entries.
        supports: the supports ``k`` was computed with.

    Returns:
        real float32 ``(..., D / p_D, H / p_H, W / p_W)``.
    """
    if _loop_leading(k):
        flat = k.reshape(-1, *k.shape[-3:])
        out = [inverse_pruned(v, supports) for v in flat]
        return torch.stack(out).reshape(*k.shape[:-3], *out[0].shape)
    nd = k.ndim
    for axis in _c2c_order(supports, forward=False):
        sup = supports[axis]
        k = _zero_fill(k, nd - 3 + axis, sup.index, sup.stored)
        k = torch.fft.ifft(k, dim=nd - 3 + axis)
    sup = supports[2]
    k = _zero_fill(k, nd - 1, sup.index, sup.stored)
    return torch.fft.irfft(k, n=sup.length, dim=-1)


def crop_unfolded(
    x: Tensor, supports: Sequence[AxisSupport], pads: Sequence[tuple[int, int]]
) -> Tensor:
    """Crop the padding of the axes that are *not* folded (a view); folded axes are untouched."""
    for axis, (sup, (before, after)) in enumerate(zip(supports, pads, strict=True)):
        if sup.period == 1 and (before or after):
            dim = x.ndim - 3 + axis
            x = x.narrow(dim, before, x.shape[dim] - before - after)
    return x


def expand_folded(
    x: Tensor, supports: Sequence[AxisSupport], pads: Sequence[tuple[int, int]]
) -> Tensor:
    """Tile folded axes back to their image length and crop their padding.

    The output at position ``t`` of a folded axis is ``x[(t + before) % (n // p)]`` -- the
    ``p`` aliased copies of the wrap-around artifact -- gathered in one ``index_select`` per
    folded axis. Axes that are not folded are returned unchanged (see :func:`crop_unfolded`).
    """
    for axis, (sup, (before, after)) in enumerate(zip(supports, pads, strict=True)):
        if sup.period > 1:
            length = sup.n - before - after
            idx = (torch.arange(length, device=x.device) + before) % sup.length
            x = x.index_select(x.ndim - 3 + axis, idx)
    return x


def fft_roundtrip(x: Tensor) -> Tensor:
    """One ``rfftn`` + ``irfftn`` over the last three axes (the speed floor of any pipeline)."""
    return torch.fft.irfftn(torch.fft.rfftn(x, dim=(-3, -2, -1)), s=x.shape[-3:], dim=(-3, -2, -1))


# --------------------------------------------------------------------------------------------
# intensities and SNR
# --------------------------------------------------------------------------------------------
def rescale01(x: Tensor, dims: int = 3) -> Tensor:
    """Min-max rescale each volume to ``[0, 1]`` over its last ``dims`` axes, in place.

    Constant volumes become zeros. ``x`` must be a floating tensor that may be overwritten.
    """
    flat = x.flatten(-dims)
    lo = flat.amin(-1)
    hi = flat.amax(-1)
    scale = torch.where(hi > lo, 1.0 / (hi - lo), torch.zeros_like(hi))
    view = lo.shape + (1,) * dims
    return x.sub_(lo.view(view)).mul_(scale.view(view))


def foreground_mean(x: Tensor, dims: int = 4) -> Tensor:
    """Mean signal in the foreground, ``mu = mean(x[x > mean(x)])``, over the last ``dims`` axes.

    The foreground is every voxel brighter than the volume mean -- the heuristic TorchIO uses
    for its ``'mean'`` masking -- which separates head from air on T1w scans without a mask.

    Args:
        x: ``(..., C, D, H, W)`` with ``dims=4`` (all channels of a sample pooled).

    Returns:
        ``mu`` with shape ``x.shape[:-dims]``; the plain mean where nothing exceeds the mean.
    """
    flat = x.flatten(-dims)
    mean = flat.mean(-1, keepdim=True)
    fg = (flat > mean).to(flat.dtype)  # float mask: summing a bool tensor is ~10x slower on CPU
    count = fg.sum(-1)
    total = (flat * fg).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), mean.squeeze(-1))


def snr_db_to_sigma(mu: Tensor | float, snr_db: Tensor | float) -> Tensor:
    r"""Noise level of the qcflow SNR convention.

    .. math:: \mathrm{SNR_{dB}} = 20 \log_{10} \frac{\mu}{\sigma}, \qquad
              \sigma = \mu \, 10^{-\mathrm{SNR_{dB}} / 20},

    where :math:`\mu` is the mean foreground signal of the clean image
    (:func:`foreground_mean`) and :math:`\sigma` the standard deviation of *each* of the real
    and imaginary parts of the complex Gaussian image-domain noise (the amplitude convention
    of NEMA MS 1 and of Shaw et al.'s noise model: the background of the magnitude image is
    Rayleigh distributed with that :math:`\sigma`). ``+inf`` dB gives :math:`\sigma = 0`.
    """
    mu = torch.as_tensor(mu, dtype=torch.float32)
    snr = torch.as_tensor(snr_db, dtype=torch.float32, device=mu.device)
    return mu * torch.pow(10.0, -snr / 20.0)


def measure_snr_db(clean: Tensor, noisy_magnitude: Tensor, background: Tensor) -> float:
    r"""Estimate the SNR (qcflow convention) from a magnitude image and its clean original.

    :math:`\sigma` comes from the background of the magnitude image, where the signal is zero
    and :math:`E[m^2] = 2\sigma^2` (Rayleigh); :math:`\mu` from the clean image
    (:func:`foreground_mean`). Used by the tests and the benchmark to check the noise model.

    Args:
        clean: clean image ``(C, D, H, W)``.
        noisy_magnitude: corrupted magnitude image, not rescaled, same shape.
        background: boolean mask of signal-free voxels, broadcastable to the images.
    """
    mu = foreground_mean(clean.float())
    bg = noisy_magnitude[background.expand_as(noisy_magnitude)].double()
    sigma = torch.sqrt((bg * bg).mean() / 2.0)
    return float(20.0 * torch.log10(mu.double() / sigma))


# --------------------------------------------------------------------------------------------
# bias field
# --------------------------------------------------------------------------------------------
def bias_num_coefficients(order: int) -> int:
    """Number of monomials ``x^i y^j z^k`` with ``i + j + k <= order``."""
    return (order + 1) * (order + 2) * (order + 3) // 6


def _bias_coords(n: int, device: torch.device | str | None) -> Tensor:
    # TorchIO's grid: (arange(-n/2, n/2) + 0.5), scaled so its maximum is 1
    c = torch.arange(-n / 2, n / 2, 1.0, device=device, dtype=torch.float64) + 0.5
    top = c.max()
    return c / top if top > 0 else c


def bias_field_log(
    shape: Sequence[int],
    coefficients: Sequence[float] | Tensor,
    order: int,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Logarithm of the polynomial bias field of TorchIO's ``BiasField``, ``(D, H, W)``.

    .. math:: \log b(x, y, z) = \sum_{i + j + k \le \mathrm{order}} c_{ijk}\, x^i y^j z^k,

    with coordinates in ``[-1, 1]`` along axes 0, 1, 2 and the coefficients in TorchIO's order
    (``i`` outermost, then ``j``, then ``k``), so a TorchIO record replays exactly. Evaluated
    as one matrix product, ``(D, order+1) @ (order+1, H*W)``: about 4 multiply-adds per voxel
    instead of TorchIO's 20 full-volume passes in float64.
    """
    d, h, w = (int(s) for s in shape)
    coeffs = torch.as_tensor(coefficients, dtype=torch.float64, device=device).flatten()
    if coeffs.numel() != bias_num_coefficients(order):
        raise ValueError(
            f"order {order} needs {bias_num_coefficients(order)} coefficients, got {coeffs.numel()}"
        )
    powers = torch.arange(order + 1, device=device, dtype=torch.float64)
    xp = _bias_coords(d, device)[None, :] ** powers[:, None]  # (O, D)
    yp = _bias_coords(h, device)[None, :] ** powers[:, None]  # (O, H)
    zp = _bias_coords(w, device)[None, :] ** powers[:, None]  # (O, W)
    c = torch.zeros(order + 1, order + 1, order + 1, dtype=torch.float64, device=device)
    n = 0
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                c[i, j, k] = coeffs[n]
                n += 1
    q = torch.einsum("ijk,jh,kw->ihw", c, yp, zp).to(torch.float32)  # (O, H, W)
    out = xp.to(torch.float32).T @ q.reshape(order + 1, h * w)  # (D, H*W)
    return out.view(d, h, w)


def bias_field(
    shape: Sequence[int],
    coefficients: Sequence[float] | Tensor,
    order: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Multiplicative bias field ``exp(bias_field_log(...))``, ``(D, H, W)`` float32."""
    return bias_field_log(shape, coefficients, order, device).exp_()


def _bias_log_std(coefficients: Sequence[float], order: int, grid: int = 17) -> float:
    """Standard deviation of ``log b`` over the ball inscribed in the volume (the head).

    Evaluated on a coarse grid (normalised coordinates, so it does not depend on the image
    size); used for the bias severity.
    """
    if not any(coefficients):
        return 0.0
    log_b = bias_field_log((grid, grid, grid), coefficients, order)
    c = torch.linspace(-1.0, 1.0, grid)
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    return float(log_b[r2 <= 1.0].std())
