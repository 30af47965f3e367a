"""The Shaw et al. 2019 motion model: conventions, a naive reference, and TorchIO's Motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcflow.kspace import ArtifactParams, BlurParams, MotionParams, add_motion, apply_artifacts
from qcflow.kspace.functional import signed_freqs
from qcflow.kspace.motion import (
    rotate,
    segment_of_freq,
    torchio_motion_to_params,
    translation_ramp,
)
from qcflow.kspace.params import motion_position_of_segment, rotation_matrix
from tests.test_kspace import SHAPE, phantom

tio = pytest.importorskip("torchio")


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def naive_motion(x: torch.Tensor, m: MotionParams) -> torch.Tensor:
    """Full complex spectra of every pose, spliced line by line; |ifftn| (no half spectra)."""
    shape = x.shape[-3:]
    fr = [signed_freqs(n) for n in shape]
    centre = [(n - 1) / 2 for n in shape]
    specs = [torch.fft.fftn(x.to(torch.complex64), dim=(-3, -2, -1))]
    for deg, t in zip(m.degrees, m.translation, strict=True):
        moved = rotate(x, torch.tensor(rotation_matrix(deg))[None].float(), centre)[0]
        spec = torch.fft.fftn(moved.to(torch.complex64), dim=(-3, -2, -1))
        for a in range(3):
            ramp = translation_ramp(fr[a], shape[a], t[a])
            if ramp is not None:
                spec = spec * ramp.view([-1 if i == a else 1 for i in range(3)])
        specs.append(spec)
    pos = motion_position_of_segment(m.times)
    seg = segment_of_freq(fr[m.pe_axis], shape[m.pe_axis], m.times)
    out = torch.zeros_like(specs[0])
    view = [-1 if i == m.pe_axis else 1 for i in range(3)]
    for s, p in enumerate(pos):
        out = torch.where((seg == s).view(view), specs[p], out)
    return torch.fft.ifftn(out, dim=(-3, -2, -1)).abs()


MOVES = MotionParams(
    times=(0.2, 0.45, 0.8),
    degrees=((3, -2, 5), (0, 0, 0), (1, 1, -4)),
    translation=((1.0, 2.0, 0.0), (0.0, -2.5, 3.0), (2.0, 0.0, 0.0)),
)


@pytest.mark.parametrize("pe_axis", [0, 1, 2])
@pytest.mark.parametrize("shape", [SHAPE, (33, 41, 35)])
def test_motion_matches_naive_splice(pe_axis: int, shape: tuple[int, int, int]) -> None:
    x = phantom(shape)
    m = MotionParams(MOVES.times, MOVES.degrees, MOVES.translation, pe_axis=pe_axis)
    ours = add_motion(x, m.times, m.degrees, m.translation, pe_axis, pad_to_smooth=False)
    assert (ours - naive_motion(x, m)).abs().max() < 1e-5
    dense = apply_artifacts(
        x, ArtifactParams(motion=m), rescale=False, strategy="dense", pad_to_smooth=False
    )
    assert (dense - ours).abs().max() < 1e-5


@pytest.mark.parametrize("pe_axis", [0, 1, 2])
def test_motion_without_movement_is_identity(pe_axis: int) -> None:
    x = phantom()
    y = add_motion(x, (0.1, 0.5, 0.9), ((0, 0, 0),) * 3, ((0, 0, 0),) * 3, pe_axis)
    assert (y - x).abs().max() < 1e-5


def test_original_pose_fills_kspace_centre() -> None:
    assert motion_position_of_segment((0.3, 0.7)) == [1, 0, 2]
    assert motion_position_of_segment((0.2, 0.4)) == [2, 1, 0]
    assert motion_position_of_segment((0.6,)) == [0, 1]  # segment 0 already holds the centre
    # so a movement confined to the outer k-space barely moves the image's centre of mass
    x = phantom()
    y = add_motion(x, (0.1,), ((0, 0, 0),), ((0.0, 6.0, 0.0),), pe_axis=1)
    com = lambda v: float((v.sum(dim=(0, 1, 3)) * torch.arange(SHAPE[1])).sum() / v.sum())  # noqa: E731
    assert abs(com(y) - com(x)) < 0.5


def test_rotation_convention_is_right_handed_push_forward() -> None:
    x = torch.zeros(1, 21, 21, 21)
    x[0, 10, 15, 10] = 1.0  # +5 voxels along axis 1 from the centre
    y = rotate(x, torch.tensor(rotation_matrix((90.0, 0.0, 0.0)))[None].float(), (10, 10, 10))
    assert torch.nonzero(y[0, 0] > 0.5).tolist() == [[10, 10, 15]]  # R_0(90) e_1 = e_2


def test_translation_ramp_is_a_shift() -> None:
    x = phantom()
    spec = torch.fft.fftn(x, dim=(-3, -2, -1))
    ramp = translation_ramp(signed_freqs(SHAPE[1]), SHAPE[1], 3.0)
    moved = torch.fft.ifftn(spec * ramp.view(1, 1, -1, 1), dim=(-3, -2, -1))
    assert (moved.real - torch.roll(x, 3, dims=2)).abs().max() < 1e-5
    assert translation_ramp(signed_freqs(8), 8, 0.0) is None
    # a fractional shift of a real image stays real (Nyquist handled symmetrically)
    ramp = translation_ramp(signed_freqs(SHAPE[1]), SHAPE[1], 2.5)
    moved = torch.fft.ifftn(spec * ramp.view(1, 1, -1, 1), dim=(-3, -2, -1))
    assert moved.imag.abs().max() < 1e-6


def _textured_subject(aff: np.ndarray) -> tuple[torch.Tensor, object]:
    x = phantom()
    return x, tio.ScalarImage(tensor=x, affine=aff)


AFFINES = {
    "identity": np.eye(4),
    "centred": np.array([[1.0, 0, 0, -16], [0, 1, 0, -20], [0, 0, 1, -17], [0, 0, 0, 1]]),
    "anisotropic": np.diag([1.2, 1.0, 0.9, 1.0]),
}
TIO_DEG = np.array([[3.0, -2.0, 4.0], [-5.0, 1.0, 2.0]])
TIO_TRA = np.array([[2.0, -1.0, 3.0], [-3.0, 2.0, 1.0]])
TIO_TIMES = np.array([0.3, 0.7])


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_motion_agrees_with_torchio_motion(name: str) -> None:
    aff = AFFINES[name]
    x, image = _textured_subject(aff)
    theirs = tio.Motion(
        degrees=TIO_DEG, translation=TIO_TRA, times=TIO_TIMES, image_interpolation="linear"
    )(image).data
    params = torchio_motion_to_params(TIO_DEG, TIO_TRA, TIO_TIMES, SHAPE, aff)
    spacing = tuple(float(v) for v in np.diag(aff)[:3])
    ours = apply_artifacts(x, ArtifactParams(motion=params), spacing=spacing, rescale=False)
    assert corr(ours, theirs) > 0.99


def test_motion_reproduces_torchio_splice_exactly() -> None:
    """Same posed copies as TorchIO (its own SimpleITK resampling), same splice: ~identical.

    TorchIO keeps the real part of the spliced image while qcflow keeps the magnitude (the
    image a scanner reconstructs), so the reference is TorchIO's composite spectrum, built with
    TorchIO's own methods, and its magnitude.
    """
    import SimpleITK as sitk
    from torchio.data.io import nib_to_sitk

    aff = AFFINES["centred"]
    x, _ = _textured_subject(aff)
    motion = tio.Motion(
        degrees=TIO_DEG, translation=TIO_TRA, times=TIO_TIMES, image_interpolation="linear"
    )
    image = nib_to_sitk(x.numpy(), aff, force_3d=True)
    copies = motion.resample_images(
        image, motion.get_rigid_transforms(TIO_DEG, TIO_TRA, image), "linear"
    )
    spectra = [
        motion.fourier_transform(torch.from_numpy(sitk.GetArrayFromImage(c).transpose().copy()))
        for c in copies
    ]
    motion.sort_spectra(spectra, TIO_TIMES)
    spliced = torch.empty_like(spectra[0])
    bounds = [int(v) for v in (SHAPE[2] * TIO_TIMES).astype(int)] + [SHAPE[2]]
    start = 0
    for spectrum, stop in zip(spectra, bounds, strict=True):
        spliced[..., start:stop] = spectrum[..., start:stop]
        start = stop
    reference = motion.inv_fourier_transform(spliced).abs()[None].float()
    params = torchio_motion_to_params(TIO_DEG, TIO_TRA, TIO_TIMES, SHAPE, aff)
    ours = apply_artifacts(x, ArtifactParams(motion=params), rescale=False)
    assert corr(ours, reference) > 0.9999
    assert corr(ours - x, reference - x) > 0.99  # the artifact itself, not just the anatomy


def test_torchio_conversion_maps_voxels_exactly() -> None:
    import SimpleITK as sitk  # noqa: F401
    from torchio.data.io import nib_to_sitk

    aff = AFFINES["anisotropic"]
    image = nib_to_sitk(np.zeros((1, *SHAPE), np.float32), aff, force_3d=True)
    motion = tio.Motion(
        degrees=TIO_DEG, translation=TIO_TRA, times=TIO_TIMES, image_interpolation="linear"
    )
    transform = motion.get_rigid_transforms(TIO_DEG, TIO_TRA, image)[1]
    params = torchio_motion_to_params(TIO_DEG, TIO_TRA, TIO_TIMES, SHAPE, aff)
    rot = np.array(rotation_matrix(params.degrees[0]))
    t = np.array(params.translation[0])
    sp = np.diag(aff)[:3]
    c = sp * (np.array(SHAPE) - 1) / 2
    for idx in [(0, 0, 0), (10, 5, 3), (31, 39, 35)]:
        src = image.TransformPhysicalPointToContinuousIndex(
            transform.TransformPoint(image.TransformIndexToPhysicalPoint(idx))
        )
        ours = (rot.T @ (sp * np.array(idx) - c - t) + c) / sp  # qcflow's pull-back, voxels
        assert np.allclose(src, ours, atol=1e-6)
    with pytest.raises(ValueError):
        torchio_motion_to_params(
            TIO_DEG,
            TIO_TRA,
            TIO_TIMES,
            SHAPE,
            np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        )


def test_motion_severity_grows_with_displacement() -> None:
    small = MotionParams((0.3,), ((1, 0, 0),), ((0.5, 0, 0),))
    large = MotionParams((0.3,), ((8, 0, 0),), ((6.0, 0, 0),))
    still = MotionParams((0.3,), ((0, 0, 0),), ((0, 0, 0),))
    assert still.severity() == 0.0
    assert 0.0 < small.severity() < large.severity() <= 1.0
    # a low-pass along the phase-encode axis keeps mostly the original pose's central lines
    assert large.severity(pe_ratio=1.5) < large.severity()
    assert large.severity(pe_ratio=4.0) == 0.0  # window [0.375, 0.625] lies in the centre segment
    blurred = ArtifactParams(motion=large, blur=BlurParams((1.0, 1.0, 4.0)))
    assert blurred.severity()["motion"] == 0.0
