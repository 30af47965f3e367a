"""The fused artifact pipeline: one forward FFT, every k-space edit, one inverse FFT.

:func:`apply_artifacts` applies an :class:`~qcflow.kspace.params.ArtifactParams` (or one per
sample of a batch) in the physical order of an acquisition (DESIGN.md; Shaw et al. 2019, 2020):

1. **bias** -- the smooth receive field multiplies the object (image domain);
2. **motion** -- the spectrum is spliced from posed copies along the phase-encode axis;
3. **ghosting** -- every ``n``-th phase-encode line is modulated in amplitude and phase;
4. **spike** -- RF spikes are added at single k-space points;
5. **noise** -- complex white Gaussian noise is added to k-space;
6. **blur / wrap** -- the acquired lines: low-pass truncation and line masking;

then the inverse transform, the magnitude ``|z|`` (so noise is Rician), the resampling of thick
slices back to the grid (**anisotropy**, a linear map along one axis of the reconstructed image)
and a min-max rescale of each channel to ``[0, 1]``. Whatever the kinds, there is one forward
transform per volume (per posed copy for motion) and one inverse (two real inverses -- together
the cost of one complex inverse -- when the image is complex). The result equals applying the
kinds one after another in that order, each with its own FFT round trip (tests check this
against direct implementations); in particular a low-pass along the phase-encode axis discards
the outer lines that motion corrupted, exactly as truncating a motion-corrupted scan would, and
the pruned path then never computes them.

Two execution strategies compute the same result (tests check they agree):

* ``'pruned'`` (default on CPU): per volume; the truncation and line masks become separable
  kept-line sets, so only the kept lines are transformed (:func:`forward_pruned`), noise is
  drawn only where it survives, and every-``n``-th-line masking is done by folding/tiling.
* ``'dense'`` (default on CUDA): the whole batch in one ``rfftn``/``irfftn`` with per-sample
  masks; each sample's posed copies are resampled in one batched ``grid_sample`` call.

Random draws that the result depends on (the noise realisation, the random line mask) come
from the parameters' own seeds, so a record replays bit-for-bit on the same device; the noise
is drawn with a generator on the data's device (CPU and CUDA streams differ, statistics agree).

Length: one concept, the fused pipeline -- every kind's k-space edit between one forward and one
inverse FFT -- so it stays one module (~600 lines; the one-kind wrappers are in ``single``, the
thick-slice map in ``slices``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from qcflow.kspace.functional import (
    AxisSupport,
    bias_field,
    crop_center,
    crop_unfolded,
    expand_folded,
    foreground_mean,
    forward_pruned,
    full_supports,
    inverse_pruned,
    pad_to_shape,
    rescale01,
    signed_freqs,
    smooth_shape,
    snr_db_to_sigma,
)
from qcflow.kspace.motion import motion_kspace
from qcflow.kspace.params import (
    AnisotropyParams,
    ArtifactParams,
    BiasParams,
    BlurParams,
    GhostingParams,
    NoiseParams,
    SpikeParams,
    WrapParams,
)
from qcflow.kspace.slices import thick_slice

__all__ = [
    "apply_artifacts",
    "plan_supports",
]

Strategy = Literal["auto", "pruned", "dense"]


# --------------------------------------------------------------------------------------------
# planning: which k-space lines survive
# --------------------------------------------------------------------------------------------
def _random_line_mask(n: int, keep: float, seed: int) -> Tensor:
    # keep[|f|] for |f| = 0 .. n // 2; DC always kept; drawn on the CPU so every device agrees
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(n // 2 + 1, generator=g)
    mask = u < keep
    mask[0] = True
    return mask


def plan_supports(
    params: ArtifactParams, shape: Sequence[int], device: torch.device | str | None = None
) -> tuple[AxisSupport, AxisSupport, AxisSupport]:
    """Kept k-space lines of every axis for the blur and wrap parameters.

    Per axis of length ``n`` (signed frequencies ``f``): blur ratio ``r`` keeps
    ``|f| <= floor(n / (2 r))``; regular wrap keeps ``f % interval == 0`` (folded when
    ``interval`` divides ``n``); random wrap keeps the seeded pairs ``+-f``.

    Args:
        params: the sample's parameters (only ``blur`` and ``wrap`` matter).
        shape: the (padded) spatial shape ``(D, H, W)``.
        device: where the index tensors live.

    Returns:
        One :class:`AxisSupport` per axis; the last is the halved rfft axis.
    """
    out = []
    for axis in range(3):
        n = int(shape[axis])
        halved = axis == 2
        f = torch.arange(n // 2 + 1) if halved else signed_freqs(n)
        keep = torch.ones(f.shape, dtype=torch.bool)
        period = 1
        blur: BlurParams | None = params.blur
        if blur is not None and blur.ratio[axis] > 1.0:
            keep &= f.abs() <= math.floor(n / (2.0 * blur.ratio[axis]))
        wr: WrapParams | None = params.wrap
        if wr is not None and wr.axis == axis:
            if wr.mode == "regular" and wr.interval > 1:
                keep &= f % wr.interval == 0
                if n % wr.interval == 0:
                    period = wr.interval
            elif wr.mode == "random" and wr.keep_fraction < 1.0:
                keep &= _random_line_mask(n, wr.keep_fraction, wr.seed)[f.abs()]
        if period > 1:
            length = n // period
            g = torch.arange(length // 2 + 1) if halved else signed_freqs(length)
            keep = keep[(g * period) if halved else (g * period) % n]
        index = None if bool(keep.all()) else torch.nonzero(keep).flatten().to(device)
        out.append(AxisSupport(n, halved=halved, period=period, index=index))
    return tuple(out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# k-space edits on kept entries
# --------------------------------------------------------------------------------------------
def _spike_points(
    spike: SpikeParams, supports: Sequence[AxisSupport], ref: Tensor
) -> tuple[list[tuple[int, int, int]], list[Tensor], list[Tensor]]:
    # Split each spike v at k0 into the Hermitian part (v d(k0) + conj(v) d(-k0)) / 2, added to
    # A, and the anti-Hermitian part, added to B as -i (v d(k0) - conj(v) d(-k0)) / 2; keep the
    # points stored in the half spectrum and surviving the masks.
    dev = ref.device
    lookups = [s.lookup("cpu") for s in supports]
    ns = [s.n for s in supports]
    phases = spike.phase or (0.0,) * len(spike.positions)
    where, va, vb = [], [], []
    for pos, inten, ph in zip(spike.positions, spike.intensity, phases, strict=True):
        f0 = [math.floor(u * n) - n // 2 for u, n in zip(pos, ns, strict=True)]
        v = ref * (inten * complex(math.cos(ph), math.sin(ph)))  # (C,) complex
        for sign, hv, bv in ((1, 0.5 * v, -0.5j * v), (-1, 0.5 * v.conj(), 0.5j * v.conj())):
            f = [sign * a for a in f0]
            iw = f[2] % ns[2]
            if iw > ns[2] // 2:
                continue  # the conjugate point carries it
            idx = [
                int(lookups[0][f[0] % ns[0]]),
                int(lookups[1][f[1] % ns[1]]),
                int(lookups[2][iw]),
            ]
            if min(idx) < 0:
                continue  # masked by blur / wrap
            where.append((idx[0], idx[1], idx[2]))
            va.append(hv.to(dev))
            vb.append(bv.to(dev))
    return where, va, vb


def _add_spikes(
    a: Tensor, b: Tensor | None, spike: SpikeParams, supports: Sequence[AxisSupport]
) -> tuple[Tensor, Tensor | None]:
    # a, b: (C, K_D, K_H, K_W); the reference |DC| is the k-space centre (entry 0 of every axis)
    ref = a[:, 0, 0, 0].abs().to(torch.complex64)  # (C,)
    where, va, vb = _spike_points(spike, supports, ref)
    if not where:
        return a, b
    if b is None:
        b = torch.zeros_like(a)
    for (i, j, k), x, y in zip(where, va, vb, strict=True):
        a[:, i, j, k] += x
        b[:, i, j, k] += y
    return a, b


def _signed(f: Tensor, n: int) -> Tensor:
    # the signed representative of frequency f on a length-n axis, in [-(n // 2), n - n // 2)
    return (f + n // 2) % n - n // 2


def _ghost_gain(f: Tensor, n: int, gh: GhostingParams) -> Tensor:
    # m(f) of GhostingParams for (signed or half-spectrum) frequencies f, complex128
    s = _signed(f, n)
    hit = ((s - gh.offset) % gh.period == 0) & (s.abs() > math.floor(gh.restore * n / 2.0))
    m = torch.ones(f.shape, dtype=torch.complex128)
    m[hit] = gh.gain
    return m


def _add_ghosts(
    a: Tensor, b: Tensor | None, gh: GhostingParams, supports: Sequence[AxisSupport]
) -> tuple[Tensor, Tensor | None]:
    """Multiply the spectrum ``Z = A + iB`` by ``m(f)`` along the ghost axis.

    ``A`` and ``B`` are the (Hermitian) spectra of the real and imaginary images; ``m`` splits
    into ``m_h(f) = (m(f) + conj(m(-f))) / 2`` and ``m_a = m - m_h``, and ``mZ`` has real-image
    spectrum ``m_h A + i m_a B`` and imaginary-image spectrum ``m_h B - i m_a A``.
    """
    sup = supports[gh.axis]
    f = sup.freqs("cpu")
    m, mneg = _ghost_gain(f, sup.n, gh), _ghost_gain(-f, sup.n, gh)
    mh, ma = 0.5 * (m + mneg.conj()), 0.5 * (m - mneg.conj())
    view = [1, 1, 1, 1]
    view[gh.axis + 1] = -1  # a: (C, K_D, K_H, K_W)
    mh = mh.to(device=a.device, dtype=torch.complex64).view(view)
    # ``a`` is edited in place: the dense path's spectrum is a view of the batch's
    if bool((ma == 0).all()):
        a.mul_(mh)
        return a, None if b is None else b.mul_(mh)
    ma = ma.to(device=a.device, dtype=torch.complex64).view(view)
    if b is None:
        b = -1j * ma * a
        a.mul_(mh)
        return a, b
    new_a = a * mh + 1j * ma * b
    b = b * mh - 1j * ma * a
    a.copy_(new_a)
    return a, b


def _kspace_noise(
    shape: Sequence[int],
    n_voxels: int,
    sigma: Tensor,
    supports: Sequence[AxisSupport],
    seed: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Half-spectrum noise ``(nA, nB)`` equal in law to ``rfft`` of real white noise of std sigma.

    ``E|rfft(w)(k)|^2 = N sigma^2`` everywhere; entries on the self-conjugate planes of the
    halved axis (``f_W = 0`` and the Nyquist plane) must be Hermitian within the plane, so they
    are drawn with twice the variance and symmetrised. Shape ``(C, K_D, K_H, K_W)`` each.
    """
    g = torch.Generator(device=device).manual_seed(int(seed))
    std = sigma.to(device=device, dtype=torch.float32) * math.sqrt(n_voxels / 2.0)  # (C,)
    r = torch.randn((2, *shape, 2), generator=g, device=device, dtype=torch.float32)
    r.mul_(std.view(1, -1, 1, 1, 1, 1))
    z = torch.view_as_complex(r)  # (2, C, K_D, K_H, K_W)
    sup_w = supports[2]
    f_w = sup_w.freqs("cpu")
    planes = [int(i) for i in torch.nonzero((f_w == 0) | (2 * f_w == sup_w.n)).flatten()]
    if planes:
        qd = supports[0].negation(device)
        qh = supports[1].negation(device)
        for p in planes:
            plane = z[..., p] * math.sqrt(2.0)  # (2, C, K_D, K_H)
            mirror = plane.index_select(2, qd).index_select(3, qh).conj()
            z[..., p] = 0.5 * (plane + mirror)
    return z[0], z[1]


def _image_noise(re: Tensor, im: Tensor | None, sigma: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Add complex white Gaussian noise in the image domain, ``(C, D, H, W)`` each.

    When no k-space line is masked, white k-space noise *is* white image noise (the FFT is
    unitary up to the factor folded into ``sigma``), so it is drawn here without any transform,
    on the unpadded grid: the same draw for both strategies.
    """
    g = torch.Generator(device=re.device).manual_seed(int(seed))
    w = torch.randn((2, *re.shape), generator=g, device=re.device, dtype=torch.float32)
    w.mul_(sigma.to(device=re.device, dtype=torch.float32).view(1, -1, 1, 1, 1))
    re = re + w[0]
    im = w[1] if im is None else im + w[1]
    return re, im


def _fold_scale(supports: Sequence[AxisSupport]) -> float:
    return 1.0 / math.prod(s.period for s in supports)


def _all_kept(supports: Sequence[AxisSupport]) -> bool:
    return all(s.index is None and s.period == 1 for s in supports)


def _needs_kspace(params: ArtifactParams, supports: Sequence[AxisSupport]) -> bool:
    # bias, noise (no masked line) and anisotropy are image-domain operations: no FFT at all
    ghosts = params.ghosting is not None and params.ghosting.active
    return (
        params.motion is not None or params.spike is not None or ghosts or not _all_kept(supports)
    )


def _sigma(params: ArtifactParams, mu: Tensor | None) -> Tensor | None:
    # per-channel image-domain noise std, or None when no noise is added
    noise: NoiseParams | None = params.noise
    if noise is None or not math.isfinite(noise.snr_db) or mu is None:
        return None
    sigma = snr_db_to_sigma(mu, noise.snr_db)
    return sigma if bool((sigma > 0).any()) else None


def _biased(x: Tensor, params: ArtifactParams) -> Tensor:
    bias: BiasParams | None = params.bias
    if bias is None or not any(bias.coefficients):
        return x
    return x * bias_field(x.shape[-3:], bias.coefficients, bias.order, x.device)


def _kspace_edits(
    a: Tensor,
    b: Tensor | None,
    params: ArtifactParams,
    supports: Sequence[AxisSupport],
    n_voxels: int,
    sigma: Tensor | None,
    noise_supports: Sequence[AxisSupport] | None = None,
    scatter: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Ghosting, spike, then k-space noise (if ``sigma``) on ``a`` (and ``b``, made if needed).

    ``a``/``b`` ``(C, ...)`` hold the entries kept by ``supports``. The noise is always drawn on
    the kept entries of ``noise_supports`` (default ``supports``) so both strategies draw the
    same realisation; ``scatter`` (full-grid index per axis) places it in a dense spectrum.
    """
    ghosting: GhostingParams | None = params.ghosting
    if ghosting is not None and ghosting.active:
        a, b = _add_ghosts(a, b, ghosting, supports)
    if params.spike is not None:
        a, b = _add_spikes(a, b, params.spike, supports)
    if sigma is None:
        return a, b
    nsup = supports if noise_supports is None else noise_supports
    shape = [a.shape[0]] + [s.size for s in nsup]
    seed = params.noise.seed  # type: ignore[union-attr]
    na, nb = _kspace_noise(shape, n_voxels, sigma, nsup, seed, a.device)
    if b is None:
        b = torch.zeros_like(a)
    if scatter is None:
        a += na
        b += nb
    else:
        idx = (
            slice(None),
            scatter[0][:, None, None],
            scatter[1][None, :, None],
            scatter[2][None, None, :],
        )
        a[idx] += na
        b[idx] += nb
    return a, b


def _finish(
    re: Tensor,
    im: Tensor | None,
    supports: Sequence[AxisSupport],
    pads: Sequence[tuple[int, int]],
    rescale: bool,
    complex_out: bool,
    shape: Sequence[int],
    aniso: AnisotropyParams | None = None,
) -> Tensor:
    # (folded) real and imaginary images -> magnitude (rescaled) or complex, full size; the
    # thick slices are resampled on the full-size reconstruction
    aniso = aniso if aniso is not None and aniso.active else None
    if complex_out:
        z = torch.complex(re, torch.zeros_like(re) if im is None else im)
        z = expand_folded(z, supports, pads)
        return z if aniso is None else thick_slice(z, aniso)
    mag = re.abs() if im is None else torch.hypot(re, im)
    early = aniso is None and all(
        s.period == 1 or s.length <= shape[i] for i, s in enumerate(supports)
    )
    if rescale and early:  # every folded position appears in the crop: rescale the small array
        rescale01(mag)
    out = expand_folded(mag, supports, pads)
    if aniso is not None:
        out = thick_slice(out, aniso)
    if rescale and not early:
        rescale01(out)
    return out


# --------------------------------------------------------------------------------------------
# per-volume (pruned) path
# --------------------------------------------------------------------------------------------
def _apply_pruned(
    x: Tensor,
    params: ArtifactParams,
    spacing: Sequence[float],
    pad_to_smooth: bool,
    rescale: bool,
    complex_out: bool = False,
) -> Tensor:
    # x: (C, D, H, W) float32 -> (C, D, H, W) magnitude (or complex64 with complex_out)
    shape = x.shape[-3:]
    target = smooth_shape(shape) if pad_to_smooth else tuple(shape)
    supports = plan_supports(params, target, x.device)
    sigma = _sigma(params, foreground_mean(x) if params.noise is not None else None)
    x = _biased(x, params)
    image_noise = sigma is not None and _all_kept(supports)
    if not _needs_kspace(params, supports):  # bias and/or noise only
        re, im = x, None
        pads: Sequence[tuple[int, int]] = [(0, 0)] * 3
        supports = full_supports(shape)
    else:
        xp, pads = pad_to_shape(x, target)
        centre = [pads[a][0] + (shape[a] - 1) / 2.0 for a in range(3)]
        if params.motion is not None:
            a, b = motion_kspace(xp, params.motion, supports, centre, spacing)
        else:
            a, b = forward_pruned(xp, supports), None
        k_sigma = None if image_noise else sigma
        a, b = _kspace_edits(a, b, params, supports, xp[0].numel(), k_sigma)
        scale = _fold_scale(supports)
        if scale != 1.0:  # the 1/p of tiling, applied where the data is smallest
            a = a * scale
            b = None if b is None else b * scale
        re = crop_unfolded(inverse_pruned(a, supports), supports, pads)
        # b's inverse runs on its own: batching FFTs is slow on the CPU (functional._loop_leading)
        im = None if b is None else crop_unfolded(inverse_pruned(b, supports), supports, pads)
    if image_noise:
        re, im = _image_noise(re, im, sigma, params.noise.seed)  # type: ignore[arg-type,union-attr]
    return _finish(re, im, supports, pads, rescale, complex_out, shape, params.anisotropy)


# --------------------------------------------------------------------------------------------
# batched (dense) path
# --------------------------------------------------------------------------------------------
def _dense_mask(supports: Sequence[AxisSupport], device: torch.device) -> Tensor | None:
    # separable 0/1 mask on the full half spectrum, (1, D, H, W // 2 + 1), or None if all kept
    if _all_kept(supports):
        return None
    vecs = []
    for s in supports:
        full = s.n // 2 + 1 if s.halved else s.n
        v = torch.zeros(full, device=device)
        v[s.full_index(device)] = 1.0
        vecs.append(v)
    return (vecs[0][:, None, None] * vecs[1][None, :, None] * vecs[2][None, None, :])[None]


def _apply_dense(
    x: Tensor,
    params: Sequence[ArtifactParams],
    spacing: Sequence[float],
    pad_to_smooth: bool,
    rescale: bool,
    complex_out: bool = False,
) -> Tensor:
    # x: (B, C, D, H, W) -> (B, C, D, H, W) magnitude (or complex64 with complex_out)
    dev = x.device
    out = x.to(torch.complex64) if complex_out else x.clone()
    shape = x.shape[-3:]
    target = smooth_shape(shape) if pad_to_smooth else tuple(shape)
    plans = {i: plan_supports(p, target, dev) for i, p in enumerate(params) if p}
    fourier = [i for i, sup in plans.items() if _needs_kspace(params[i], sup)]
    for i in range(len(params)):
        if i in fourier:
            continue
        if i in plans:  # bias / noise only: image domain, one volume at a time is optimal
            out[i] = _apply_pruned(x[i], params[i], spacing, pad_to_smooth, rescale, complex_out)
        elif rescale:
            out[i] = rescale01(out[i].clone())
    if not fourier:
        return out
    sigmas = [_sigma(params[i], foreground_mean(x[i])) for i in fourier]
    xp = torch.stack([_biased(x[i], params[i]) for i in fourier])  # (Bf, C, D, H, W)
    xp, pads = pad_to_shape(xp, target)  # (Bf, C, D', H', W')
    centre = [pads[a][0] + (shape[a] - 1) / 2.0 for a in range(3)]
    full = full_supports(target)
    plain = [j for j, i in enumerate(fourier) if params[i].motion is None]
    half = (len(fourier), x.shape[1], target[0], target[1], target[2] // 2 + 1)
    spec = torch.empty(half, dtype=torch.complex64, device=dev)  # (Bf, C, D', H', W'//2+1)
    if plain:
        spec[plain] = forward_pruned(xp[plain], full)  # one batched rfftn on CUDA
    imag: dict[int, Tensor] = {}
    image_noise: list[int] = []
    for j, i in enumerate(fourier):
        p, pruned = params[i], plans[i]
        b = None
        if p.motion is not None:
            spec[j], b = motion_kspace(xp[j], p.motion, full, centre, spacing)
        if sigmas[j] is not None and _all_kept(pruned):
            image_noise.append(j)
            k_sigma = None
        else:
            k_sigma = sigmas[j]
        scatter = [s.full_index(dev) for s in pruned]
        a, b = _kspace_edits(spec[j], b, p, full, xp[j, 0].numel(), k_sigma, pruned, scatter)
        mask = _dense_mask(pruned, dev)
        if mask is not None:
            a.mul_(mask)
            if b is not None:
                b.mul_(mask)
        if b is not None:
            imag[j] = b
    re = crop_center(inverse_pruned(spec, full), pads)  # (Bf, C, D, H, W)
    keys = sorted(imag)
    im_stack = None
    if keys:
        im_stack = crop_center(inverse_pruned(torch.stack([imag[k] for k in keys]), full), pads)
    unpadded = full_supports(shape)
    nopad = [(0, 0)] * 3
    for j, i in enumerate(fourier):
        r = re[j]
        im = im_stack[keys.index(j)] if j in imag else None  # type: ignore[index]
        if j in image_noise:
            r, im = _image_noise(r, im, sigmas[j], params[i].noise.seed)  # type: ignore[arg-type,union-attr]
        out[i] = _finish(r, im, unpadded, nopad, rescale, complex_out, shape, params[i].anisotropy)
    return out


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
def apply_artifacts(
    x: Tensor,
    params: ArtifactParams | Sequence[ArtifactParams],
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    pad_to_smooth: bool = True,
    rescale: bool = True,
    strategy: Strategy = "auto",
    output: Literal["magnitude", "complex"] = "magnitude",
) -> Tensor:
    """Apply explicit artifact parameters (deterministic; the fused pipeline).

    Args:
        x: non-negative magnitude image(s): ``(D, H, W)``, ``(C, D, H, W)`` or
            ``(B, C, D, H, W)``; any float dtype (computed in float32), any device.
        params: one :class:`ArtifactParams` (applied to every sample) or one per sample.
        spacing: voxel size (mm) per spatial axis; motion translations are in mm.
        pad_to_smooth: zero-pad each axis to a 2/3/5-smooth length for the FFTs (a larger
            field of view; the output is cropped back). Wrap copies then repeat with the padded
            period and spike frequencies refer to the padded grid.
        rescale: min-max rescale each channel of the output to ``[0, 1]``. Samples without
            artifacts are rescaled too, so clean and corrupted images share one scale.
        strategy: ``'pruned'`` (per volume, only kept lines transformed), ``'dense'`` (whole
            batch at once) or ``'auto'`` (dense on CUDA, pruned otherwise).
        output: ``'magnitude'`` (the default, ``|z|``) or ``'complex'``: the complex image
            ``z`` itself (complex64, never rescaled) -- for checks and phase-aware models.

    Returns:
        float32 tensor of the input's shape: the magnitude image(s); complex64 with
        ``output='complex'``.
    """
    squeeze = 0
    if x.ndim == 3:
        x, squeeze = x[None, None], 2
    elif x.ndim == 4:
        x, squeeze = x[None], 1
    elif x.ndim != 5:
        raise ValueError(
            f"expected (D, H, W), (C, D, H, W) or (B, C, D, H, W), got {tuple(x.shape)}"
        )
    x = x.to(torch.float32)
    bsz = x.shape[0]
    if isinstance(params, ArtifactParams):
        plist = [params] * bsz
    else:
        plist = list(params)
        if len(plist) != bsz:
            raise ValueError(f"got {len(plist)} parameter sets for a batch of {bsz}")
    spacing = tuple(float(s) for s in spacing)
    if output not in ("magnitude", "complex"):
        raise ValueError(f"output must be 'magnitude' or 'complex', got {output!r}")
    complex_out = output == "complex"
    rescale = rescale and not complex_out
    if strategy == "auto":
        strategy = "dense" if x.is_cuda else "pruned"
    if strategy == "dense":
        out = _apply_dense(x, plist, spacing, pad_to_smooth, rescale, complex_out)
    elif strategy == "pruned":
        outs = []
        for i in range(bsz):
            if plist[i]:
                outs.append(
                    _apply_pruned(x[i], plist[i], spacing, pad_to_smooth, rescale, complex_out)
                )
            elif complex_out:
                outs.append(x[i].to(torch.complex64))
            else:
                outs.append(rescale01(x[i].clone()) if rescale else x[i].clone())
        out = torch.stack(outs)
    else:
        raise ValueError(f"strategy must be 'auto', 'pruned' or 'dense', got {strategy!r}")
    for _ in range(squeeze):
        out = out[0]
    return out
