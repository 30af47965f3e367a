"""Analytic checks of the k-space primitives and the fused pipeline (qcflow.kspace)."""

from __future__ import annotations

import math

import pytest
import torch

from qcflow.kspace import (
    AnisotropyParams,
    ArtifactParams,
    BiasParams,
    BlurParams,
    GhostingParams,
    MotionParams,
    NoiseParams,
    SpikeParams,
    WrapParams,
    add_noise,
    add_spikes,
    apply_artifacts,
    fft_roundtrip,
    lowpass,
    mask_lines,
    measure_snr_db,
    smooth_size,
)
from qcflow.kspace.functional import (
    AxisSupport,
    bias_field,
    foreground_mean,
    forward_pruned,
    full_supports,
    inverse_pruned,
    signed_freqs,
)
from qcflow.kspace.pipeline import plan_supports

SHAPE = (32, 40, 36)


def phantom(shape: tuple[int, int, int] = SHAPE, texture: bool = True) -> torch.Tensor:
    """Two nested ellipsoids (+ smooth texture) in [0, 1] with a zero background, (1, D, H, W)."""
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    v = ((z / 0.7) ** 2 + (y / 0.8) ** 2 + (x / 0.6) ** 2 < 1).float() * 0.6
    v = v + ((z / 0.3) ** 2 + (y / 0.2) ** 2 + (x / 0.25) ** 2 < 1).float() * 0.4
    if texture:
        g = torch.Generator().manual_seed(0)
        noise = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 3, 1, 1)[0]
        v = v * (0.8 + 0.4 * noise)
    v = v[None] if v.ndim == 3 else v
    return v / v.max()


def all_kinds() -> ArtifactParams:
    return ArtifactParams(
        bias=BiasParams(tuple(torch.linspace(-0.3, 0.3, 20).tolist())),
        motion=MotionParams((0.3, 0.7), ((3, 0, 5), (0, 0, 0)), ((1, 2, 0), (0, -2, 3)), pe_axis=1),
        spike=SpikeParams(((0.3, 0.6, 0.2), (0.5, 0.5, 0.9)), (2.0, 1.0), (0.3, 1.0)),
        noise=NoiseParams(10.0, seed=5),
        blur=BlurParams((1.0, 3.0, 1.5)),
        wrap=WrapParams(axis=0, interval=2),
    )


# ---------------------------------------------------------------------------------------------
# FFT primitives
# ---------------------------------------------------------------------------------------------
def test_smooth_size() -> None:
    assert [smooth_size(n) for n in (197, 233, 189, 160, 7, 1)] == [200, 240, 192, 160, 8, 1]
    with pytest.raises(ValueError):
        smooth_size(0)


@pytest.mark.parametrize("shape", [SHAPE, (33, 41, 35)])
def test_fft_roundtrip_error(shape: tuple[int, int, int]) -> None:
    x = phantom(shape)
    assert (fft_roundtrip(x) - x).abs().max() < 1e-5
    sup = full_supports(shape)
    assert (inverse_pruned(forward_pruned(x, sup), sup) - x).abs().max() < 1e-5


def test_forward_pruned_equals_restricted_rfftn() -> None:
    x = phantom()
    ref = torch.fft.rfftn(x, dim=(-3, -2, -1))
    idx_d = torch.tensor([0, 1, 2, 30, 31])
    idx_w = torch.tensor([0, 3, 7])
    sup = (AxisSupport(32, index=idx_d), AxisSupport(40), AxisSupport(36, halved=True, index=idx_w))
    # float32 FFTs: the error scales with the largest coefficient (the DC term, ~4e3 here)
    atol = 1e-6 * float(ref.abs().max())
    got = forward_pruned(x, sup)
    want = ref[:, idx_d][..., idx_w]
    assert torch.allclose(got, want, atol=atol, rtol=1e-5)
    # a folded axis holds the multiples of its period
    sup = (AxisSupport(32, period=4), AxisSupport(40), AxisSupport(36, halved=True, period=3))
    got = forward_pruned(x, sup)
    assert torch.allclose(got, ref[:, ::4][..., ::3], atol=atol, rtol=1e-5)


def test_bias_field_matches_torchio() -> None:
    tio = pytest.importorskip("torchio")
    coeffs = torch.randn(20, generator=torch.Generator().manual_seed(1)).mul(0.3).tolist()
    ours = bias_field(SHAPE, coeffs, 3)
    theirs = torch.as_tensor(tio.BiasField.generate_bias_field(torch.zeros(1, *SHAPE), 3, coeffs))
    assert torch.allclose(ours, theirs.float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# analytic properties of each kind
# ---------------------------------------------------------------------------------------------
ZERO = {
    "spike": ArtifactParams(spike=SpikeParams(((0.3, 0.6, 0.2),), (0.0,))),
    "noise": ArtifactParams(noise=NoiseParams(math.inf)),
    "blur": ArtifactParams(blur=BlurParams((1.0, 1.0, 1.0))),
    "wrap": ArtifactParams(wrap=WrapParams(axis=1, interval=1)),
    "wrap_random": ArtifactParams(wrap=WrapParams(axis=2, mode="random", keep_fraction=1.0)),
    "motion": ArtifactParams(motion=MotionParams((0.3, 0.7), ((0, 0, 0),) * 2, ((0, 0, 0),) * 2)),
    "bias": ArtifactParams(bias=BiasParams((0.0,) * 20)),
    "ghosting": ArtifactParams(ghosting=GhostingParams(axis=1, period=3, intensity=0.0)),
    "anisotropy": ArtifactParams(anisotropy=AnisotropyParams(axis=0, factor=1.0)),
}
ZERO["all"] = ArtifactParams(**{k: getattr(v, k) for k, v in ZERO.items() if k in v.kinds})


@pytest.mark.parametrize("strategy", ["pruned", "dense"])
@pytest.mark.parametrize("kind", sorted(ZERO))
def test_zero_strength_is_identity(kind: str, strategy: str) -> None:
    x = phantom((33, 41, 35))  # odd sizes: padding to smooth sizes is exercised too
    y = apply_artifacts(x, ZERO[kind], strategy=strategy)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 1e-5


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0, 20.0, 30.0])
def test_noise_hits_requested_snr(snr_db: float) -> None:
    x = torch.zeros(1, 48, 48, 48)
    x[:, 12:36, 12:36, 12:36] = 1.0
    background = torch.ones_like(x, dtype=torch.bool)
    background[:, 8:40, 8:40, 8:40] = False
    y = add_noise(x, snr_db, seed=3)
    assert abs(measure_snr_db(x, y, background) - snr_db) < 1.0
    # complex Gaussian in the image: real and imaginary parts with the same sigma, mean 0
    z = add_noise(x, snr_db, seed=3, output="complex")[background]
    sd_re, sd_im = float(z.real.std()), float(z.imag.std())
    assert abs(sd_re / sd_im - 1.0) < 0.05
    assert abs(float(z.real.mean())) < 0.05 * sd_re


def _kept_fraction(p: ArtifactParams, shape: tuple[int, int, int]) -> float:
    """Fraction of the full (signed) k-space grid that the blur/wrap masks keep."""
    frac = 1.0
    for sup in plan_supports(p, shape):
        f = sup.freqs()
        if sup.halved:  # each stored f > 0 (but not Nyquist) stands for the pair +-f
            count = sum(1 if int(v) == 0 or 2 * int(v) == sup.n else 2 for v in f)
        else:
            count = f.numel()
        frac *= count / sup.n
    return frac


THIN = (24, 20, 8)  # a short rfft axis: its self-conjugate planes hold 1/4 of the entries


@pytest.mark.parametrize(
    ("shape", "masks"),
    [
        (SHAPE, {"blur": BlurParams((1.0, 1.0, 1.01))}),  # drops the Nyquist plane of axis 2
        (SHAPE, {"blur": BlurParams((1.01, 2.5, 1.0))}),
        (SHAPE, {"wrap": WrapParams(axis=0, interval=2)}),  # folded
        (SHAPE, {"wrap": WrapParams(axis=2, interval=3)}),  # folded rfft axis
        (SHAPE, {"wrap": WrapParams(axis=1, mode="random", keep_fraction=0.5, seed=1)}),
        (THIN, {"blur": BlurParams((1.01, 1.0, 1.0))}),
        (THIN, {"wrap": WrapParams(axis=2, interval=2)}),
    ],
    ids=["nyquist", "blur", "wrap0", "wrap2", "random", "thin-blur", "thin-wrap2"],
)
def test_kspace_noise_has_the_requested_level_on_kept_lines(
    shape: tuple[int, int, int], masks: dict
) -> None:
    """Noise drawn in k-space (lines masked) = white noise of the SNR's sigma, then masked."""
    x = phantom(shape)
    clean = apply_artifacts(x, ArtifactParams(**masks), output="complex")
    noisy = apply_artifacts(
        x, ArtifactParams(noise=NoiseParams(10.0, seed=2), **masks), output="complex"
    )
    diff = noisy - clean  # exactly the (masked) noise image
    sigma = float(foreground_mean(x)) * 10 ** (-10.0 / 20)
    expected = sigma**2 * _kept_fraction(ArtifactParams(**masks), shape)
    measured = float(diff.abs().pow(2).mean()) / 2
    assert abs(measured / expected - 1.0) < 0.05
    assert abs(float(diff.real.var() / diff.imag.var()) - 1.0) < 0.1


def test_noise_is_rician_in_magnitude() -> None:
    x = torch.zeros(1, 32, 32, 32)
    x[:, :4, :4, :4] = 1.0
    y = add_noise(x, 0.0, seed=1)[:, 8:, 8:, 8:]  # background: Rayleigh, mean = sigma sqrt(pi/2)
    ratio = float(y.mean() / torch.sqrt((y * y).mean() / 2))
    assert abs(ratio - math.sqrt(math.pi / 2)) < 0.02


@pytest.mark.parametrize("ratio", [2.0, 3.5, 8.0])
def test_lowpass_zeroes_energy_beyond_cutoff(ratio: float) -> None:
    x = phantom()
    z = lowpass(x, (1.0, ratio, 1.0), output="complex")
    spec = torch.fft.fftn(z, dim=(-3, -2, -1))
    f = signed_freqs(SHAPE[1]).abs()
    cut = math.floor(SHAPE[1] / (2 * ratio))
    beyond = spec[:, :, f > cut].abs().pow(2).sum()
    kept = spec[:, :, f <= cut].abs().pow(2).sum()
    assert beyond / kept < 1e-12
    # and nothing changed inside the window
    ref = torch.fft.fftn(x, dim=(-3, -2, -1))
    assert torch.allclose(spec[:, :, f <= cut], ref[:, :, f <= cut], atol=1e-3)


@pytest.mark.parametrize(("axis", "interval"), [(0, 2), (1, 4), (2, 3), (2, 4)])
def test_regular_wrap_gives_shifted_copies(axis: int, interval: int) -> None:
    x = torch.zeros(1, *SHAPE)
    x[:, 10:14, 15:20, 12:17] = 1.0  # a small block: its copies are easy to see
    y = mask_lines(x, axis=axis, interval=interval)
    period = SHAPE[axis] // interval
    expect = sum(torch.roll(x, j * period, dims=1 + axis) for j in range(interval)) / interval
    assert (y - expect).abs().max() < 1e-5


def test_random_wrap_keeps_conjugate_pairs() -> None:
    x = phantom()
    p = ArtifactParams(wrap=WrapParams(axis=1, mode="random", keep_fraction=0.5, seed=4))
    z = apply_artifacts(x, p, output="complex")
    assert z.imag.abs().max() < 1e-5  # a conjugate-symmetric mask keeps the image real
    spec = torch.fft.fftn(z.real, dim=(-3, -2, -1))
    power = spec.abs().pow(2).sum(dim=(0, 1, 3))  # per line of axis 1
    f = signed_freqs(SHAPE[1])
    kept = power > 1e-6 * power.max()
    assert kept[0] and torch.equal(kept, kept[(-f) % SHAPE[1]])
    assert 0.2 < kept.float().mean() < 0.8


def test_spike_gives_stripes_at_expected_frequency() -> None:
    x = torch.full((1, *SHAPE), 0.5)
    pos = (0.75, 0.4, 0.6)  # TorchIO's convention: signed frequency floor(u n) - n // 2
    f0 = [math.floor(u * n) - n // 2 for u, n in zip(pos, SHAPE, strict=True)]
    z = add_spikes(x, [pos], 2.0, output="complex")
    spec = torch.fft.fftn(z - x, dim=(-3, -2, -1))[0]
    peak = torch.nonzero(spec.abs() == spec.abs().max())[0].tolist()
    assert peak == [f % n for f, n in zip(f0, SHAPE, strict=True)]
    # amplitude: 2 x |DC| of the original spectrum (= max |K| for a non-negative image)
    assert abs(float(spec.abs().max()) - 2.0 * float(x.sum())) < 1e-2 * float(x.sum())
    # the magnitude image shows stripes with that frequency and orientation
    m = add_spikes(x, [pos], 0.5)
    mspec = torch.fft.fftn(m - m.mean(), dim=(-3, -2, -1))[0].abs()
    top = torch.nonzero(mspec == mspec.max()).tolist()
    assert any(t == [f % n for f, n in zip(f0, SHAPE, strict=True)] for t in top) or any(
        t == [(-f) % n for f, n in zip(f0, SHAPE, strict=True)] for t in top
    )


def test_bias_only_multiplies() -> None:
    x = phantom()
    coeffs = tuple(torch.linspace(-0.2, 0.2, 10).tolist())
    y = apply_artifacts(x, ArtifactParams(bias=BiasParams(coeffs, order=2)), rescale=False)
    assert torch.allclose(y, x * bias_field(SHAPE, coeffs, 2), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# strategies, batching, shapes
# ---------------------------------------------------------------------------------------------
def test_pruned_and_dense_agree_on_every_kind() -> None:
    x = phantom((33, 41, 35))
    full = all_kinds()
    for kind in (*full.kinds, "all"):
        p = full if kind == "all" else ArtifactParams(**{kind: getattr(full, kind)})
        a = apply_artifacts(x, p, strategy="pruned", rescale=False)
        b = apply_artifacts(x, p, strategy="dense", rescale=False)
        assert (a - b).abs().max() < 1e-5, kind


def test_batched_and_per_volume_agree() -> None:
    x = torch.stack([phantom(), phantom().flip(-1), phantom(texture=False)])  # (3, 1, D, H, W)
    plist = [all_kinds(), ArtifactParams(), ArtifactParams(noise=NoiseParams(5.0, seed=2))]
    single = torch.stack([apply_artifacts(x[i], plist[i]) for i in range(3)])
    for strategy in ("pruned", "dense"):
        batched = apply_artifacts(x, plist, strategy=strategy)
        assert (batched - single).abs().max() < 1e-5


def test_input_shapes_and_channels() -> None:
    v = phantom()[0]
    p = ArtifactParams(blur=BlurParams((2.0, 1.0, 1.0)), noise=NoiseParams(20.0, seed=0))
    assert apply_artifacts(v, p).shape == v.shape
    two = torch.stack([v, v.flip(0)])  # two channels share the parameters
    y = apply_artifacts(two, p)
    assert y.shape == two.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0 + 1e-6
    with pytest.raises(ValueError):
        apply_artifacts(v[0], p)
    with pytest.raises(ValueError):
        apply_artifacts(two[None], [p, p])


def test_plan_supports_folds_divisible_intervals() -> None:
    p = ArtifactParams(wrap=WrapParams(axis=0, interval=4), blur=BlurParams((2.0, 1.0, 3.0)))
    sup = plan_supports(p, SHAPE)
    assert sup[0].period == 4 and sup[0].index is not None  # folded, then low-passed
    assert sup[1].index is None
    assert sup[2].halved and int(sup[2].index.max()) == 6  # floor(36 / 6)
    p = ArtifactParams(wrap=WrapParams(axis=1, interval=3))  # 3 does not divide 40
    assert plan_supports(p, SHAPE)[1].period == 1


@pytest.mark.parametrize(
    "bad",
    [
        lambda: BlurParams((0.5, 1.0, 1.0)),
        lambda: WrapParams(axis=3),
        lambda: WrapParams(axis=0, mode="diagonal"),  # type: ignore[arg-type]
        lambda: WrapParams(axis=0, mode="random", keep_fraction=0.0),
        lambda: SpikeParams(((1.0, 0.0, 0.0),), (1.0,)),
        lambda: SpikeParams(((0.1, 0.0, 0.0),), (1.0, 2.0)),
        lambda: MotionParams((0.7, 0.3), ((0, 0, 0),) * 2, ((0, 0, 0),) * 2),
        lambda: MotionParams((0.5,), ((0, 0, 0),), ((0, 0, 0),), pe_axis=5),
        lambda: BiasParams((0.1, 0.2), order=3),
        lambda: NoiseParams(float("nan")),
    ],
)
def test_bad_parameters_raise(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_bad_apply_arguments_raise() -> None:
    x = phantom()
    with pytest.raises(ValueError):
        apply_artifacts(x, ArtifactParams(), strategy="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        apply_artifacts(x, ArtifactParams(), output="phase")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree() -> None:
    x = phantom((33, 41, 35))
    p = all_kinds()
    det = ArtifactParams(**{k: getattr(p, k) for k in p.kinds if k != "noise"})
    cpu = apply_artifacts(x, det, rescale=False)
    for strategy in ("pruned", "dense"):
        gpu = apply_artifacts(x.cuda(), det, rescale=False, strategy=strategy).cpu()
        assert (gpu - cpu).abs().max() < 1e-4
    # noise: different streams on the two devices, same statistics
    xb = torch.zeros(1, 48, 48, 48)
    xb[:, 12:36, 12:36, 12:36] = 1.0
    bg = torch.ones_like(xb, dtype=torch.bool)
    bg[:, 8:40, 8:40, 8:40] = False
    y = add_noise(xb.cuda(), 10.0, seed=1).cpu()
    assert abs(measure_snr_db(xb, y, bg) - 10.0) < 1.0
