"""Motion at real corrupted-scan strengths: movement sizes, times near the k-space centre.

``MotionRange(magnitude=True)`` draws each movement's rotation angle and translation length
(random axis and direction), ``times``/``centre_p`` put movements in a window of the
phase-encode order; the defaults draw exactly as before (digests of the old sampler's draws).
Checked against TorchIO's ``Motion`` at equal strong parameters, and as records.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import qcflow.cli
from qcflow.kspace import ArtifactParams, MotionRange, RandomArtifacts, apply_artifacts
from qcflow.kspace.motion import torchio_motion_to_params
from qcflow.kspace.params import rotation_matrix
from qcflow.kspace.ranges import Draw, axis_angle_to_degrees, interpolate_ranges
from tests.test_kspace import phantom

STRONG = MotionRange(
    magnitude=True,
    degrees=(5.0, 20.0),
    translation=(5.0, 15.0),
    num_movements=(2, 5),
    times=(0.1, 0.9),
    centre_p=0.5,
    centre_times=(0.4, 0.6),
)


def draws(rng: MotionRange, n: int, seed: int = 0) -> list:
    d = Draw(torch.Generator().manual_seed(seed))
    return [rng.sample(d) for _ in range(n)]


def angle(deg: tuple[float, float, float]) -> float:
    r = rotation_matrix(deg)
    cos = max(-1.0, min(1.0, (r[0][0] + r[1][1] + r[2][2] - 1.0) / 2.0))
    return math.degrees(math.acos(cos))


def digest(params: list) -> str:
    return hashlib.sha256(json.dumps(params).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the defaults are unchanged (digests written from the sampler before the new options)
# ---------------------------------------------------------------------------------------------
def test_default_sampling_is_bit_identical() -> None:
    ms = draws(MotionRange(), 20)
    assert ms[0].times == (0.196866205825045, 0.43343662758565216, 0.6858944567358383)
    assert ms[0].degrees[0] == (-6.568837893917115, -8.830989399966096, -5.725226997497463)
    assert ms[0].translation[2] == (-1.2321484564576597, 8.773813043769291, 8.985326758943213)
    assert ms[0].pe_axis == 1
    assert digest([asdict(m) for m in ms]) == "bef1ebb25e678031"
    custom = MotionRange(
        degrees=(-4.0, 7.0),
        translation=(-2.0, 3.0),
        num_movements=(2, 5),
        pe_axes=(1,),
        perturbation=0.1,
    )
    assert digest([asdict(m) for m in draws(custom, 20, seed=1)]) == "f29fbaccad88409c"
    aug = RandomArtifacts.paper(rate=1.0, seed=0)
    assert digest([p.to_record() for p in aug.sample_batch(30)]) == "404a9a3bdc069945"


def test_rejects_bad_options() -> None:
    for kwargs in (
        {"magnitude": True, "degrees": (-5.0, 20.0)},  # a size is >= 0
        {"magnitude": True, "degrees": (5.0, 120.0)},
        {"magnitude": True, "translation": (-1.0, 15.0)},
        {"times": (0.0, 0.5)},  # inside the open interval (0, 1)
        {"times": (0.5, 1.0)},
        {"times": (0.7, 0.3)},
        {"centre_p": 0.5},  # needs a times window
        {"times": (0.1, 0.9), "centre_p": 1.5},
        {"times": (0.1, 0.9), "centre_times": (0.6, 1.2)},
    ):
        with pytest.raises(ValueError):
            MotionRange(**kwargs)
    assert MotionRange(magnitude=True, degrees=10.0, translation=4.0).degrees == (10.0, 10.0)


# ---------------------------------------------------------------------------------------------
# sizes and times
# ---------------------------------------------------------------------------------------------
def test_axis_angle_conversion_is_exact() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        u = torch.randn(3, generator=g, dtype=torch.float64)
        u = (u / u.norm()).tolist()
        th = float(torch.rand(1, generator=g, dtype=torch.float64)) * 89.0
        t = math.radians(th)
        k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
        rodrigues = np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * k @ k
        ours = np.array(rotation_matrix(axis_angle_to_degrees(u, th)))
        assert np.allclose(ours, rodrigues, atol=1e-12)


def test_magnitudes_are_respected_with_random_axes_and_signs() -> None:
    ms = draws(STRONG, 400)
    angles = [angle(deg) for m in ms for deg in m.degrees]
    lengths = [math.hypot(*t) for m in ms for t in m.translation]
    assert min(angles) >= 5.0 - 1e-9 and max(angles) <= 20.0 + 1e-9
    assert min(lengths) >= 5.0 - 1e-9 and max(lengths) <= 15.0 + 1e-9
    assert min(angles) < 6.0 and max(angles) > 19.0  # the whole range is reached
    assert {len(m.times) for m in ms} == {2, 3, 4, 5}
    # directions uniform on the sphere: both signs on every axis, mean direction ~0
    tra = torch.tensor([t for m in ms for t in m.translation], dtype=torch.float64)
    unit = tra / tra.norm(dim=1, keepdim=True)
    assert unit.mean(0).abs().max() < 0.1
    assert ((unit**2).mean(0) - 1 / 3).abs().max() < 0.05
    deg = torch.tensor([d for m in ms for d in m.degrees])
    assert (deg > 0).any(0).all() and (deg < 0).any(0).all()


def test_times_lie_in_their_windows_sorted() -> None:
    ms = draws(STRONG, 400)
    times = [t for m in ms for t in m.times]
    assert all(list(m.times) == sorted(m.times) for m in ms)
    assert all(0.1 <= t < 0.9 for t in times)
    central = sum(0.4 <= t < 0.6 for t in times) / len(times)
    # half drawn from [0.4, 0.6], the other half uniform over [0.1, 0.9] (a quarter of it)
    assert central == pytest.approx(0.5 + 0.5 * 0.25, abs=0.05)
    only = MotionRange(times=(0.35, 0.65), num_movements=(1, 4))
    assert all(0.35 <= t < 0.65 for m in draws(only, 200) for t in m.times)
    centre = MotionRange(times=(0.1, 0.9), centre_p=1.0, centre_times=(0.45, 0.55))
    assert all(0.45 <= t < 0.55 for m in draws(centre, 200) for t in m.times)


def test_motion_strong_config_draws_strong_motion() -> None:
    with initialize_config_dir(config_dir=str(qcflow.cli.config_dir()), version_base="1.3"):
        strong = instantiate(compose("config", overrides=["+augment=motion_strong"]).augment)
        full = instantiate(compose("config", overrides=["+augment=contrastive_full"]).augment)
    assert strong.ranges["motion"] == STRONG
    assert full.ranges["motion"] == MotionRange(**{**asdict(STRONG), "p": 0.26})
    assert full.rate == 1.0 and {r.p for r in full.ranges.values()} == {0.26}
    # ghosting and anisotropy (opt-in kinds) at their own configs' ranges
    assert full.ranges["ghosting"].period == (2, 8)
    assert full.ranges["anisotropy"].factor == (2.0, 8.0)
    kinds = [len(p.kinds) for p in full.sample_batch(2000, torch.Generator().manual_seed(0))]
    assert min(kinds) >= 1
    assert sum(kinds) / len(kinds) == pytest.approx(8 * 0.26 + 0.74**8, abs=0.1)


def test_curriculum_moves_sizes_towards_milder_ones() -> None:
    # zuo_study_curriculum's motion end and floor, read as sizes
    mild = {"motion": {"degrees": [-6.0, 6.0], "translation": [-6.0, 6.0]}}
    floor = {"motion": {"degrees": 3.0, "translation": 3.0}}
    end = interpolate_ranges({"motion": STRONG}, mild, 1.0, floor)["motion"]
    assert end.magnitude and end.degrees == (3.0, 6.0) and end.translation == (3.0, 6.0)
    half = interpolate_ranges({"motion": STRONG}, mild, 0.5, floor)["motion"]
    assert half.degrees == (4.0, 13.0) and half.translation == (4.0, 10.5)
    assert interpolate_ranges({"motion": STRONG}, mild, 0.0, floor)["motion"] == STRONG


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _relative_error(rng: MotionRange, n: int = 8) -> float:
    x = phantom()
    errs = []
    for m in draws(rng, n, seed=5):
        y = apply_artifacts(x, ArtifactParams(motion=m), rescale=False)
        errs.append(float((y - x).abs().mean() / x.mean()))
    return sum(errs) / len(errs)


def test_strong_motion_corrupts_more_than_torchio_defaults() -> None:
    torchio_like = MotionRange(num_movements=(2, 2))  # RandomMotion(): 10 deg, 10 mm, 2 moves
    mild, strong = _relative_error(torchio_like), _relative_error(STRONG)
    assert strong > 2.0 * mild > 0.0  # ~0.86 against ~0.27 of the mean signal
    # movements in the central lines matter most: same sizes, times at the k-space centre
    centre = MotionRange(
        **{**asdict(STRONG), "centre_p": 1.0, "centre_times": (0.45, 0.55)}  # type: ignore[arg-type]
    )
    edge = MotionRange(**{**asdict(STRONG), "times": (0.05, 0.15), "centre_p": 0.0})  # type: ignore[arg-type]
    assert _relative_error(centre) > 5.0 * _relative_error(edge)  # ~1.1 against ~0.08


def test_strong_motion_agrees_with_torchio_motion() -> None:
    """TorchIO's ``Motion`` at the same strong movements (12-20 degrees, 8-15 mm, two of them
    around the k-space centre), as in ``test_kspace_motion``: TorchIO's own posed copies
    (SimpleITK) and splice, whose magnitude qcflow's image should be (TorchIO itself keeps the
    real part, which at these strengths differs from the magnitude)."""
    tio = pytest.importorskip("torchio")
    import SimpleITK as sitk
    from torchio.data.io import nib_to_sitk

    # the phantom with a zero margin (a 2/3/5-smooth grid): 10 mm moves it within the field of
    # view, where TorchIO's resampling (zero outside) and qcflow's phase ramp (circular) agree
    x = torch.nn.functional.pad(phantom(), (9, 9, 10, 10, 8, 8))
    shape = tuple(x.shape[1:])
    aff = np.array([[1.0, 0, 0, -24], [0, 1, 0, -30], [0, 0, 1, -27], [0, 0, 0, 1]])
    degrees = np.array([[12.0, -8.0, 5.0], [-4.0, 15.0, -10.0], [6.0, 6.0, -6.0]])
    translation = np.array([[8.0, -6.0, 4.0], [-5.0, 9.0, -7.0], [10.0, 4.0, -6.0]])
    times = np.array([0.46, 0.54, 0.8])
    motion = tio.Motion(
        degrees=degrees, translation=translation, times=times, image_interpolation="linear"
    )
    image = nib_to_sitk(x.numpy(), aff, force_3d=True)
    copies = motion.resample_images(
        image, motion.get_rigid_transforms(degrees, translation, image), "linear"
    )
    spectra = [
        motion.fourier_transform(torch.from_numpy(sitk.GetArrayFromImage(c).transpose().copy()))
        for c in copies
    ]
    motion.sort_spectra(spectra, times)
    spliced = torch.empty_like(spectra[0])
    bounds = [int(v) for v in (shape[2] * times).astype(int)] + [shape[2]]
    start = 0
    for spectrum, stop in zip(spectra, bounds, strict=True):
        spliced[..., start:stop] = spectrum[..., start:stop]
        start = stop
    reference = motion.inv_fourier_transform(spliced).abs()[None].float()
    params = torchio_motion_to_params(degrees, translation, times, shape, aff)
    ours = apply_artifacts(x, ArtifactParams(motion=params), rescale=False)
    corr = lambda a, b: float(np.corrcoef(a.flatten().double(), b.flatten().double())[0, 1])  # noqa: E731
    assert corr(ours, reference) > 0.995  # 0.9999 at the small movements of test_kspace_motion
    assert corr(ours - x, reference - x) > 0.99  # the artifact itself, not just the anatomy
    assert float((ours - x).abs().mean() / x.mean()) > 0.1  # and a strong one
    theirs = motion(tio.ScalarImage(tensor=x, affine=aff)).data  # TorchIO's output (real part)
    assert float((theirs - x).abs().mean() / x.mean()) > 0.1


def test_records_replay() -> None:
    aug = RandomArtifacts(rate=1.0, motion=asdict(STRONG), seed=0)
    x = phantom()
    y, record = aug(x)
    assert record["kinds"] == ["motion"]
    replay = ArtifactParams.from_record(json.loads(json.dumps(record)))
    assert replay.motion == ArtifactParams.from_record(record).motion
    assert torch.equal(apply_artifacts(x, replay), y)
