"""One artifact kind at a time: thin wrappers around the fused pipeline.

Each builds the :class:`~qcflow.kspace.params.ArtifactParams` record of one kind from plain
arguments and applies it with the fused pipeline (one forward FFT, the kind's edit, one inverse
FFT); ``kwargs`` go to ``apply_artifacts``. Useful in tests, notebooks and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from qcflow.kspace.params import (
    AnisotropyParams,
    ArtifactParams,
    BiasParams,
    BlurParams,
    GhostingParams,
    MotionParams,
    NoiseParams,
    SpikeParams,
    WrapParams,
)
from qcflow.kspace.pipeline import apply_artifacts

__all__ = [
    "add_ghosting",
    "add_motion",
    "add_noise",
    "add_spikes",
    "add_thick_slices",
    "apply_bias",
    "lowpass",
    "mask_lines",
]


def add_spikes(
    x: Tensor,
    positions: Sequence[Sequence[float]],
    intensity: float | Sequence[float],
    phase: Sequence[float] = (),
    **kwargs,
) -> Tensor:
    """RF spike(s) alone (see :class:`SpikeParams`); ``kwargs`` go to :func:`apply_artifacts`.

    Not rescaled unless ``rescale=True`` is passed.
    """
    inten = [float(intensity)] * len(positions) if isinstance(intensity, int | float) else intensity
    p = ArtifactParams(spike=SpikeParams(tuple(positions), tuple(inten), tuple(phase)))
    kwargs.setdefault("rescale", False)
    return apply_artifacts(x, p, **kwargs)


def add_noise(x: Tensor, snr_db: float, seed: int = 0, **kwargs) -> Tensor:
    """Complex k-space noise at ``snr_db`` (see :class:`NoiseParams`); magnitude, not rescaled."""
    kwargs.setdefault("rescale", False)
    return apply_artifacts(x, ArtifactParams(noise=NoiseParams(snr_db, seed)), **kwargs)


def lowpass(x: Tensor, ratio: float | Sequence[float], **kwargs) -> Tensor:
    """k-space truncation with downsampling ratio(s) (see :class:`BlurParams`); not rescaled."""
    r = (float(ratio),) * 3 if isinstance(ratio, int | float) else tuple(ratio)
    kwargs.setdefault("rescale", False)
    return apply_artifacts(x, ArtifactParams(blur=BlurParams(r)), **kwargs)  # type: ignore[arg-type]


def mask_lines(
    x: Tensor,
    axis: int,
    interval: int = 2,
    mode: Literal["regular", "random"] = "regular",
    keep_fraction: float = 1.0,
    seed: int = 0,
    **kwargs,
) -> Tensor:
    """Line masking along ``axis`` (see :class:`WrapParams`); not rescaled."""
    kwargs.setdefault("rescale", False)
    p = WrapParams(axis=axis, mode=mode, interval=interval, keep_fraction=keep_fraction, seed=seed)
    return apply_artifacts(x, ArtifactParams(wrap=p), **kwargs)


def add_ghosting(
    x: Tensor,
    axis: int,
    period: int = 2,
    intensity: float = 0.5,
    phase: float = 0.0,
    offset: int = 1,
    restore: float = 0.0,
    **kwargs,
) -> Tensor:
    """Phase-encode ghosts alone (see :class:`GhostingParams`); magnitude, not rescaled."""
    kwargs.setdefault("rescale", False)
    p = GhostingParams(axis, period, intensity, phase, offset, restore)
    return apply_artifacts(x, ArtifactParams(ghosting=p), **kwargs)


def add_motion(
    x: Tensor,
    times: Sequence[float],
    degrees: Sequence[Sequence[float]],
    translation: Sequence[Sequence[float]],
    pe_axis: int = 2,
    **kwargs,
) -> Tensor:
    """Motion artifact alone (see :class:`MotionParams`); magnitude, not rescaled."""
    kwargs.setdefault("rescale", False)
    p = MotionParams(tuple(times), tuple(degrees), tuple(translation), pe_axis)  # type: ignore[arg-type]
    return apply_artifacts(x, ArtifactParams(motion=p), **kwargs)


def add_thick_slices(
    x: Tensor,
    axis: int,
    factor: float,
    offset: float = 0.0,
    profile: Literal["box", "point"] = "box",
    **kwargs,
) -> Tensor:
    """Thick-slice acquisition alone (see :class:`AnisotropyParams`); not rescaled."""
    kwargs.setdefault("rescale", False)
    p = AnisotropyParams(axis, factor, offset, profile)
    return apply_artifacts(x, ArtifactParams(anisotropy=p), **kwargs)


def apply_bias(x: Tensor, coefficients: Sequence[float], order: int = 3, **kwargs) -> Tensor:
    """Bias field alone (see :class:`BiasParams`); not rescaled."""
    kwargs.setdefault("rescale", False)
    return apply_artifacts(x, ArtifactParams(bias=BiasParams(tuple(coefficients), order)), **kwargs)
