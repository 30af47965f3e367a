"""The opt-in kinds: phase-encode ghosting and thick-slice anisotropy.

Analytic cases (zero strength is the identity, ghosts at FOV/n along the chosen axis only, the
restored k-space centre, separability of the slice model), TorchIO's ``Ghosting`` and
``RandomAnisotropy`` on the same parameters, records and batched == per-sample.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qcflow.kspace import (
    AnisotropyParams,
    ArtifactParams,
    GhostingParams,
    RandomArtifacts,
    add_ghosting,
    add_thick_slices,
    apply_artifacts,
)
from qcflow.kspace.slices import thick_slice_matrix
from tests.test_kspace import phantom

SHAPE = (32, 40, 36)  # 2/3/5-smooth: no padding, so TorchIO sees the same grid


# ---------------------------------------------------------------------------------------------
# ghosting
# ---------------------------------------------------------------------------------------------
def test_ghosting_rejects_bad_arguments() -> None:
    for kwargs in (
        {"axis": 3},
        {"axis": 0, "period": 1},
        {"axis": 0, "intensity": 1.5},
        {"axis": 0, "period": 3, "offset": 3},
        {"axis": 0, "restore": 1.0},
        {"axis": 0, "phase": math.nan},
    ):
        with pytest.raises(ValueError):
            GhostingParams(**kwargs)


@pytest.mark.parametrize(("axis", "period"), [(0, 3), (1, 2), (2, 4)])
def test_ghosts_are_replicas_at_fov_over_n_along_the_axis_only(axis: int, period: int) -> None:
    shape = [48, 48, 48]
    x = torch.zeros(1, *shape)
    x[0, 10:13, 20:23, 30:33] = 1.0  # a small bright cube
    intensity, phase = 0.8, 0.4
    y = add_ghosting(x, axis, period, intensity, phase, offset=1, pad_to_smooth=False)
    g = (1 - intensity) * complex(math.cos(phase), math.sin(phase))
    expected = torch.zeros_like(x)
    for j in range(1, period):  # ghost j: shifted by j * N / n, amplitude |1 - g| / n
        expected += torch.roll(x, j * shape[axis] // period, dims=axis + 1) * abs(1 - g) / period
    expected += x * abs(1 + (g - 1) / period)  # the image itself, dimmed
    assert torch.allclose(y, expected, atol=1e-5)
    assert GhostingParams(axis, period, intensity, phase).severity() == pytest.approx(
        (period - 1) / period * abs(1 - g)
    )


def test_restore_keeps_the_kspace_centre_lines_and_modulates_every_nth() -> None:
    x = phantom(SHAPE)
    gh = GhostingParams(axis=1, period=2, intensity=0.6, phase=0.3, offset=0, restore=0.2)
    z = apply_artifacts(x, ArtifactParams(ghosting=gh), pad_to_smooth=False, output="complex")
    kx, kz = torch.fft.fft(x.to(torch.complex64), dim=2), torch.fft.fft(z, dim=2)
    n = SHAPE[1]
    f = torch.fft.fftfreq(n, 1.0 / n).round().long()
    restored = f.abs() <= math.floor(0.2 * n / 2)
    hit = (f % 2 == 0) & ~restored
    assert restored.sum() == 9 and hit.sum() == 15
    assert torch.allclose(kz[:, :, restored], kx[:, :, restored], atol=1e-3)
    assert torch.allclose(kz[:, :, ~hit & ~restored], kx[:, :, ~hit & ~restored], atol=1e-3)
    assert torch.allclose(kz[:, :, hit], gh.gain * kx[:, :, hit], atol=1e-3)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("num_ghosts", [2, 3, 4, 5])
def test_ghosting_matches_torchio(axis: int, num_ghosts: int) -> None:
    tio = pytest.importorskip("torchio")
    x = phantom(SHAPE)
    theirs = tio.Ghosting(num_ghosts=num_ghosts, axis=axis, intensity=0.7, restore=None)(
        tio.ScalarImage(tensor=x)
    ).data
    # TorchIO modulates the planes 0, n, 2n, ... of the fftshifted spectrum (signed frequency
    # f = i - N // 2) and restores the centre plane: offset -(N // 2) mod n, restore 0
    n = SHAPE[axis]
    gh = GhostingParams(axis, num_ghosts, 0.7, offset=-(n // 2) % num_ghosts)
    z = apply_artifacts(x, ArtifactParams(ghosting=gh), pad_to_smooth=False, output="complex")
    # same physics: TorchIO's image is the real part of the same complex image
    assert torch.allclose(z.real, theirs, atol=1e-5)
    # what differs: TorchIO drops the imaginary part, qcflow keeps the magnitude. They agree
    # where the modulated lines are symmetric (f and -f both or neither: the image is real)
    mag = apply_artifacts(x, ArtifactParams(ghosting=gh), pad_to_smooth=False, rescale=False)
    if (2 * gh.offset) % num_ghosts == 0 or n % num_ghosts == 0 and (-(n // 2)) % num_ghosts == 0:
        assert torch.allclose(mag, theirs.abs(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# anisotropy
# ---------------------------------------------------------------------------------------------
def test_anisotropy_rejects_bad_arguments() -> None:
    for kwargs in (
        {"axis": -1},
        {"axis": 0, "factor": 0.5},
        {"axis": 0, "factor": math.inf},
        {"axis": 0, "offset": 1.0},
        {"axis": 0, "profile": "gauss"},
    ):
        with pytest.raises(ValueError):
            AnisotropyParams(**kwargs)


@pytest.mark.parametrize("profile", ["box", "point"])
@pytest.mark.parametrize("factor", [1.0, 2.0, 3.5, 8.0])
def test_thick_slice_map_keeps_constants_and_factor_one_is_identity(
    factor: float, profile: str
) -> None:
    for offset in (0.0, 0.37):
        mat = thick_slice_matrix(40, AnisotropyParams(0, factor, offset, profile))
        assert torch.allclose(mat.sum(1), torch.ones(40, dtype=torch.float64))  # partition of 1
        assert bool((mat >= 0).all())
        if factor == 1.0 and offset == 0.0:
            assert torch.allclose(mat, torch.eye(40, dtype=torch.float64))
    x = phantom(SHAPE)
    assert torch.equal(add_thick_slices(x, 1, 1.0, 0.37, profile), x)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_in_plane_untouched_and_through_plane_high_frequencies_attenuated(axis: int) -> None:
    g = torch.Generator().manual_seed(0)
    plane = [48, 48, 48]
    plane[axis] = 1
    u = torch.rand(1, *plane, generator=g)  # in-plane pattern, white
    line = [1, 1, 1]
    line[axis] = 48
    v = torch.rand(1, *line, generator=g)  # through-plane profile, white
    y = add_thick_slices(u * v, axis, 4.0, 0.25)
    # separable: the in-plane pattern of every slice is the input's (in-plane frequencies kept)
    lsf = y / u  # (1, D, H, W): must not vary in-plane
    assert torch.allclose(
        lsf,
        lsf.mean(dim=[d + 1 for d in range(3) if d != axis], keepdim=True).expand_as(lsf),
        rtol=1e-4,
    )
    # through plane: the band above the slices' Nyquist, N / (2 t), keeps a small fraction
    noise = torch.rand(1, 48, 48, 48, generator=g) - 0.5
    out = add_thick_slices(noise, axis, 4.0, 0.25)
    f = torch.fft.fftfreq(48).abs()
    spec_in = torch.fft.fft(noise, dim=axis + 1).abs().pow(2).movedim(axis + 1, -1).mean((0, 1, 2))
    spec_out = torch.fft.fft(out, dim=axis + 1).abs().pow(2).movedim(axis + 1, -1).mean((0, 1, 2))
    gain = spec_out / spec_in
    assert float(gain[f < 0.03].mean()) > 0.8  # low frequencies pass
    assert float(gain[f > 1 / 8].mean()) < 0.1  # above the slices' Nyquist: attenuated


def _mean_lsf_variance(fn, n: int = 64) -> float:
    # the line-spread function (response to a one-voxel plane) averaged over plane positions
    # that cover whole slice periods: the thick-slice blur width, free of the grid's phase
    acc = torch.zeros(n, dtype=torch.float64)
    for pos in range(16, 44):
        v = torch.zeros(1, n, 4, 4)
        v[0, pos] = 1.0
        acc += torch.roll(fn(v)[0, :, 1, 1].double(), n // 2 - pos)
    acc /= acc.sum()
    i = torch.arange(n, dtype=torch.float64)
    mu = (acc * i).sum()
    return float((acc * (i - mu) ** 2).sum())


@pytest.mark.parametrize("factor", [3.5, 4.0, 7.0])
def test_anisotropy_blur_width_matches_torchio(factor: float) -> None:
    tio = pytest.importorskip("torchio")
    rng = tio.RandomAnisotropy(axes=0, downsampling=(factor, factor))
    theirs = _mean_lsf_variance(lambda v: rng(tio.ScalarImage(tensor=v)).data)
    point = _mean_lsf_variance(lambda v: add_thick_slices(v, 0, factor, 0.3, "point"))
    box = _mean_lsf_variance(lambda v: add_thick_slices(v, 0, factor, 0.3, "box"))
    # thin slices + linear interpolation (TorchIO's model, profile 'point'): variance t^2 / 6
    assert point == pytest.approx(theirs, rel=0.1)
    assert theirs == pytest.approx(factor**2 / 6, rel=0.1)
    # contiguous thick slices add the box profile's own variance t^2 / 12
    assert box - theirs == pytest.approx(factor**2 / 12, rel=0.15)
    # in-plane sharpness: both leave a pattern that is constant through-plane unchanged
    x = phantom((64, 24, 24))[:, 32:33].expand(1, 64, 24, 24).contiguous()
    inner = slice(8, -8)  # TorchIO pads beyond its outer slice centres with zeros
    assert torch.allclose(rng(tio.ScalarImage(tensor=x)).data[:, inner], x[:, inner], atol=1e-4)
    assert torch.allclose(add_thick_slices(x, 0, factor, 0.3), x, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# both: records, batches, the sampler
# ---------------------------------------------------------------------------------------------
def _sampler(seed: int = 0) -> RandomArtifacts:
    return RandomArtifacts.paper(
        rate=1.0, seed=seed, ghosting=True, anisotropy=True, motion={"num_movements": [1, 2]}
    )


def test_records_replay_bit_for_bit_from_json() -> None:
    x = phantom((20, 24, 18))
    aug = RandomArtifacts(rate=1.0, ghosting=True, anisotropy=True, seed=3)
    for _ in range(4):
        y, record = aug(x)
        back = json.loads(json.dumps(record))
        assert set(back["severity"]) == set(back["kinds"])
        assert all(0.0 <= s <= 1.0 for s in back["severity"].values())
        assert torch.equal(apply_artifacts(x, ArtifactParams.from_record(back)), y)


def test_batched_equals_per_sample_with_every_kind() -> None:
    x = torch.stack([phantom((20, 24, 18)) * (1.0 + 0.1 * i) for i in range(4)])
    params = _sampler(5).sample_batch(4)
    assert all({"ghosting", "anisotropy"} <= set(p.kinds) for p in params)
    dense = apply_artifacts(x, params, strategy="dense")
    pruned = apply_artifacts(x, params, strategy="pruned")
    one = torch.stack([apply_artifacts(x[i], params[i]) for i in range(4)])
    assert torch.allclose(dense, pruned, atol=1e-4)
    assert torch.equal(pruned, one)


@pytest.mark.parametrize("kind", ["ghosting", "anisotropy"])
def test_single_kind_batches_agree_across_strategies(kind: str) -> None:
    x = torch.stack([phantom((20, 24, 18)) for _ in range(3)])
    params = RandomArtifacts(rate=1.0, seed=1, **{kind: True}).sample_batch(3)
    dense = apply_artifacts(x, params, strategy="dense")
    pruned = apply_artifacts(x, params, strategy="pruned")
    assert torch.allclose(dense, pruned, atol=1e-5)
