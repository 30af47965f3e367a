"""Per-kind strength ranges of the artifact sampler, and their interpolation.

One range class per kind (``SpikeRange``, ``NoiseRange``, ...) holds the interval each
parameter is drawn from and draws an explicit parameter record
(:mod:`qcflow.kspace.params`) from a CPU :class:`torch.Generator`;
:class:`~qcflow.kspace.sampler.RandomArtifacts` combines them. :func:`interpolate_ranges` moves
every strength range towards milder settings (the severity curriculum), never past a per-kind
floor. Defaults are the papers' where they give them (see :mod:`qcflow.kspace.sampler`).

Length: one concept, a range class per kind (eight kinds), hence ~590 lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from qcflow.kspace.params import (
    AnisotropyParams,
    BiasParams,
    BlurParams,
    GhostingParams,
    MotionParams,
    NoiseParams,
    SpikeParams,
    WrapParams,
)

__all__ = [
    "AnisotropyRange",
    "BiasRange",
    "BlurRange",
    "Draw",
    "GhostingRange",
    "MotionRange",
    "NoiseRange",
    "RANGES",
    "SEED_MAX",
    "SpikeRange",
    "STRENGTH_FIELDS",
    "WrapRange",
    "axis_angle_to_degrees",
    "interpolate_ranges",
    "parse_kind",
    "probability",
]

SEED_MAX = 2**31 - 1


def _pair(v: float | Sequence[float], name: str, symmetric: bool = True) -> tuple[float, float]:
    # d -> (-d, d) (TorchIO's convention for symmetric ranges), (a, b) -> (a, b)
    if isinstance(v, int | float):
        lo, hi = (-float(v), float(v)) if symmetric else (float(v), float(v))
    else:
        t = [float(a) for a in v]
        if len(t) != 2:
            raise ValueError(f"{name} must be a number or a [low, high] pair, got {list(v)}")
        lo, hi = t
    if lo > hi:
        raise ValueError(f"{name}: low {lo} is above high {hi}")
    return lo, hi


def _int_pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    lo, hi = _pair(v, name, symmetric=False)
    if lo != int(lo) or hi != int(hi):
        raise ValueError(f"{name} must be integers, got {v}")
    return int(lo), int(hi)


def _axes(v: Sequence[int], name: str) -> tuple[int, ...]:
    t = tuple(int(a) for a in v)
    if not t or any(a not in (0, 1, 2) for a in t):
        raise ValueError(f"{name} must be a non-empty list of axes among 0, 1, 2, got {list(v)}")
    return t


def probability(p: float, name: str) -> float:
    """``p`` as a float, checked to lie in [0, 1] (``name`` is the config key, for the error)."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


class Draw:
    """Uniform draws from one CPU generator (all parameters come from here, in order)."""

    def __init__(self, g: torch.Generator) -> None:
        self.g = g

    def rand(self, *shape: int) -> Tensor:
        return torch.rand(shape or (1,), generator=self.g, dtype=torch.float64)

    def uniform(self, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * self.rand()[0])

    def uniforms(self, lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * self.rand(*shape)

    def integer(self, lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g)[0])

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def seed(self) -> int:
        return self.integer(0, SEED_MAX)


@dataclass(frozen=True)
class SpikeRange:
    """Ranges of :class:`SpikeParams`: ``num_spikes`` and ``intensity`` (x ``|DC|``) pairs."""

    p: float = 1.0
    num_spikes: tuple[int, int] = (1, 3)
    intensity: tuple[float, float] = (1.0, 10.0)
    random_phase: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "spike.p"))
        object.__setattr__(self, "num_spikes", _int_pair(self.num_spikes, "spike.num_spikes"))
        object.__setattr__(self, "intensity", _pair(self.intensity, "spike.intensity", False))
        if self.num_spikes[0] < 1 or self.intensity[0] < 0:
            raise ValueError("spike: num_spikes must be >= 1 and intensity >= 0")

    def sample(self, d: Draw) -> SpikeParams:
        n = d.integer(*self.num_spikes)
        pos = d.rand(n, 3).clamp_max(1.0 - 1e-9).tolist()
        inten = d.uniforms(*self.intensity, n).tolist()
        phase = d.uniforms(0.0, 2.0 * math.pi, n).tolist() if self.random_phase else []
        return SpikeParams(tuple(tuple(p) for p in pos), tuple(inten), tuple(phase))


@dataclass(frozen=True)
class NoiseRange:
    """Range of :class:`NoiseParams`: ``snr_db`` pair (dB, see ``snr_db_to_sigma``)."""

    p: float = 1.0
    snr_db: tuple[float, float] = (-10.0, 30.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "noise.p"))
        object.__setattr__(self, "snr_db", _pair(self.snr_db, "noise.snr_db", False))

    def sample(self, d: Draw) -> NoiseParams:
        return NoiseParams(snr_db=d.uniform(*self.snr_db), seed=d.seed())


@dataclass(frozen=True)
class BlurRange:
    """Ranges of :class:`BlurParams`: downsampling ``ratio`` per truncated axis, how many axes."""

    p: float = 1.0
    ratio: tuple[float, float] = (2.0, 12.0)
    num_axes: tuple[int, int] = (1, 3)
    axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "blur.p"))
        object.__setattr__(self, "ratio", _pair(self.ratio, "blur.ratio", False))
        object.__setattr__(self, "num_axes", _int_pair(self.num_axes, "blur.num_axes"))
        object.__setattr__(self, "axes", _axes(self.axes, "blur.axes"))
        if self.ratio[0] < 1.0:
            raise ValueError(f"blur.ratio must be >= 1, got {self.ratio}")
        if not 1 <= self.num_axes[0] <= self.num_axes[1]:
            raise ValueError(f"blur.num_axes must be >= 1, got {self.num_axes}")

    def sample(self, d: Draw) -> BlurParams:
        k = min(d.integer(*self.num_axes), len(self.axes))
        order = torch.randperm(len(self.axes), generator=d.g)[:k].tolist()
        ratio = [1.0, 1.0, 1.0]
        for i in order:
            ratio[self.axes[i]] = d.uniform(*self.ratio)
        return BlurParams(tuple(ratio))  # type: ignore[arg-type]


@dataclass(frozen=True)
class WrapRange:
    """Ranges of :class:`WrapParams`: ``modes``, ``interval`` and ``keep_fraction`` pairs."""

    p: float = 1.0
    modes: tuple[str, ...] = ("regular", "random")
    interval: tuple[int, int] = (2, 4)
    keep_fraction: tuple[float, float] = (0.3, 0.7)
    axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "wrap.p"))
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes or any(m not in ("regular", "random") for m in modes):
            raise ValueError(f"wrap.modes must be among 'regular', 'random', got {modes}")
        object.__setattr__(self, "modes", modes)
        object.__setattr__(self, "interval", _int_pair(self.interval, "wrap.interval"))
        object.__setattr__(
            self, "keep_fraction", _pair(self.keep_fraction, "wrap.keep_fraction", False)
        )
        object.__setattr__(self, "axes", _axes(self.axes, "wrap.axes"))
        if self.interval[0] < 1 or not 0.0 < self.keep_fraction[0] <= self.keep_fraction[1] <= 1.0:
            raise ValueError("wrap: interval must be >= 1 and keep_fraction within (0, 1]")

    def sample(self, d: Draw) -> WrapParams:
        axis = d.choice(self.axes)
        mode = d.choice(self.modes)
        return WrapParams(
            axis=axis,
            mode=mode,
            interval=d.integer(*self.interval),
            keep_fraction=d.uniform(*self.keep_fraction),
            seed=d.seed(),
        )


def _window(v: Sequence[float] | None, name: str) -> tuple[float, float] | None:
    # a [low, high] window of movement times inside the open interval (0, 1), or None
    if v is None:
        return None
    lo, hi = _pair(v, name, symmetric=False)
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"{name} must lie inside (0, 1), got {[lo, hi]}")
    return lo, hi


def _directions(d: Draw, n: int) -> Tensor:
    """``n`` unit vectors uniform on the sphere, ``(n, 3)`` (Archimedes: ``z`` uniform)."""
    z = d.uniforms(-1.0, 1.0, n)
    phi = d.uniforms(0.0, 2.0 * math.pi, n)
    r = (1.0 - z * z).clamp_min(0.0).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1)


def axis_angle_to_degrees(axis: Sequence[float], angle: float) -> tuple[float, float, float]:
    """Rotation by ``angle`` degrees about the unit ``axis`` as the angles of ``rotation_matrix``.

    :func:`~qcflow.kspace.params.rotation_matrix` composes ``R_2(c) R_1(b) R_0(a)`` (rotations
    about image axes 0, 1, 2); this inverts it for the Rodrigues matrix of ``(axis, angle)``,
    so a :class:`MotionParams` record keeps its per-axis form. Exact for ``angle < 90``
    (``|b| <= angle``, away from the ``|b| = 90`` singularity).
    """
    u = [float(v) for v in axis]
    th = math.radians(float(angle))
    c, s = math.cos(th), math.sin(th)
    k = 1.0 - c
    # Rodrigues: R = c I + s [u]_x + (1 - c) u u^T; only the entries the angles need
    r00 = c + k * u[0] * u[0]
    r10 = s * u[2] + k * u[1] * u[0]
    r20 = -s * u[1] + k * u[2] * u[0]
    r21 = s * u[0] + k * u[2] * u[1]
    r22 = c + k * u[2] * u[2]
    a = math.atan2(r21, r22)
    b = math.asin(max(-1.0, min(1.0, -r20)))
    g = math.atan2(r10, r00)
    return math.degrees(a), math.degrees(b), math.degrees(g)


@dataclass(frozen=True)
class MotionRange:
    """Ranges of :class:`MotionParams`: rigid movements of the Shaw et al. 2019 motion model.

    Defaults are TorchIO ``RandomMotion``'s: ``num_movements`` 1-3 at evenly spaced times
    ``j / (n + 1)`` jittered by ``perturbation`` (30 %) of the spacing, and per movement a
    rotation about each image axis uniform in ``degrees`` (-10 to 10) and a translation along
    each axis uniform in ``translation`` (-10 to 10 mm). Each movement is a pose relative to the
    original one (position 0).

    Two options reach the strengths of real corrupted scans, where every movement is large and
    some happen while the central k-space lines are acquired (issue 17):

    * ``magnitude=True``: ``degrees`` and ``translation`` are ranges of the movement's size,
      not of per-axis components. Each movement draws a rotation axis uniform on the sphere and
      an angle uniform in ``degrees`` (so ``[5, 20]`` is a 5-20 degree rotation with a random
      sense), and a translation direction uniform on the sphere and a length uniform in
      ``translation`` (mm). Per-axis draws (the default) set the size only indirectly: three
      uniform components in [-10, 10] rotate by anywhere in 0-17 degrees (under 5 degrees for
      ~6 % of the movements), and no range of sizes can be asked for. The rotation is stored
      as the per-axis angles of :func:`~qcflow.kspace.params.rotation_matrix`
      (:func:`axis_angle_to_degrees`), so records keep their form. Both ranges must lie in
      ``[0, 90]`` degrees / ``[0, inf)`` mm; a single number ``d`` is the fixed size ``d``.
    * ``times=[lo, hi]``: movement times uniform in that window of the phase-encode order
      (sorted; ``perturbation`` unused) instead of evenly spaced. The segment holding the
      k-space centre keeps the original pose
      (:func:`~qcflow.kspace.params.motion_position_of_segment`), so movements near 0.5
      shrink it and take low frequencies from moved poses -- the strong ghosting and
      blurring of a subject that moves mid-scan.
      ``centre_p`` draws each movement's time, with that probability, from the window
      ``centre_times`` instead (e.g. ``[0.4, 0.6]``), so that part of the movements fall near
      the centre while the others spread over the scan.

    The defaults (``magnitude=False``, ``times=None``) draw TorchIO's way, in a fixed order
    from the generator, so a config without the options gives the same parameters per seed.
    """

    p: float = 1.0
    degrees: tuple[float, float] = (-10.0, 10.0)
    translation: tuple[float, float] = (-10.0, 10.0)
    num_movements: tuple[int, int] = (1, 3)
    pe_axes: tuple[int, ...] = (0, 1, 2)
    perturbation: float = 0.3
    magnitude: bool = False
    times: tuple[float, float] | None = None
    centre_times: tuple[float, float] = (0.4, 0.6)
    centre_p: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "motion.p"))
        object.__setattr__(self, "magnitude", bool(self.magnitude))
        sym = not self.magnitude  # a magnitude range d is [d, d], a per-axis one [-d, d]
        object.__setattr__(self, "degrees", _pair(self.degrees, "motion.degrees", sym))
        object.__setattr__(self, "translation", _pair(self.translation, "motion.translation", sym))
        object.__setattr__(
            self, "num_movements", _int_pair(self.num_movements, "motion.num_movements")
        )
        object.__setattr__(self, "pe_axes", _axes(self.pe_axes, "motion.pe_axes"))
        object.__setattr__(self, "times", _window(self.times, "motion.times"))
        object.__setattr__(self, "centre_times", _window(self.centre_times, "motion.centre_times"))
        object.__setattr__(self, "centre_p", probability(self.centre_p, "motion.centre_p"))
        if self.num_movements[0] < 1:
            raise ValueError(f"motion.num_movements must be >= 1, got {self.num_movements}")
        if not 0.0 <= self.perturbation < 0.5:
            raise ValueError(f"motion.perturbation must be in [0, 0.5), got {self.perturbation}")
        if self.magnitude and not (
            self.degrees[0] >= 0.0 and self.degrees[1] <= 90.0 and self.translation[0] >= 0.0
        ):
            raise ValueError(
                "motion.magnitude: degrees must lie in [0, 90] and translation be >= 0, got "
                f"{list(self.degrees)}, {list(self.translation)}"
            )
        if self.centre_p > 0.0 and self.times is None:
            raise ValueError("motion.centre_p needs a motion.times window")

    def _times(self, d: Draw, n: int) -> list[float]:
        if self.times is None:  # TorchIO RandomMotion: evenly spaced, jittered
            step = 1.0 / (n + 1)
            jitter = d.uniforms(-step * self.perturbation, step * self.perturbation, n)
            return (torch.arange(1, n + 1, dtype=torch.float64) * step + jitter).tolist()
        central = (
            d.rand(n) < self.centre_p if self.centre_p > 0.0 else torch.zeros(n, dtype=torch.bool)
        )
        t = torch.where(central, d.uniforms(*self.centre_times, n), d.uniforms(*self.times, n))
        return sorted(t.tolist())

    def _movements(self, d: Draw, n: int) -> tuple[list[Any], list[Any]]:
        if not self.magnitude:  # TorchIO RandomMotion: each component uniform
            deg = d.uniforms(*self.degrees, n, 3).tolist()
            return deg, d.uniforms(*self.translation, n, 3).tolist()
        axes, angles = _directions(d, n).tolist(), d.uniforms(*self.degrees, n).tolist()
        deg = [axis_angle_to_degrees(u, a) for u, a in zip(axes, angles, strict=True)]
        tra = _directions(d, n) * d.uniforms(*self.translation, n)[:, None]
        return deg, tra.tolist()

    def sample(self, d: Draw) -> MotionParams:
        n = d.integer(*self.num_movements)
        times = self._times(d, n)
        deg, tra = self._movements(d, n)
        return MotionParams(
            times=tuple(times),
            degrees=tuple(tuple(v) for v in deg),
            translation=tuple(tuple(v) for v in tra),
            pe_axis=d.choice(self.pe_axes),
        )


@dataclass(frozen=True)
class BiasRange:
    """Ranges of :class:`BiasParams`: polynomial ``order`` and a ``coefficients`` pair."""

    p: float = 1.0
    coefficients: tuple[float, float] = (-0.5, 0.5)
    order: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "bias.p"))
        object.__setattr__(self, "coefficients", _pair(self.coefficients, "bias.coefficients"))
        object.__setattr__(self, "order", int(self.order))
        if self.order < 0:
            raise ValueError(f"bias.order must be >= 0, got {self.order}")

    def sample(self, d: Draw) -> BiasParams:
        n = (self.order + 1) * (self.order + 2) * (self.order + 3) // 6
        return BiasParams(tuple(d.uniforms(*self.coefficients, n).tolist()), self.order)


@dataclass(frozen=True)
class GhostingRange:
    """Ranges of :class:`GhostingParams` (opt-in: no shipped config enables it).

    Defaults: ``period`` 2-8 -- 2 is the N/2 (Nyquist) ghost of EPI, 3-8 the periodic
    phase-encode ghosts of respiration, pulsation and flow (TorchIO ``RandomGhosting``: 4-10);
    ``intensity`` 0.2-1 (TorchIO: 0.5-1), so one ghost carries 2.5 % (8 ghosts at 0.2) to 50 %
    (an N/2 ghost at 1) of the image's amplitude, the span from a faint to a gross ghost;
    ``phase`` 0 (TorchIO's amplitude-only model; an odd/even echo phase error of ``phi`` gives
    an N/2 ghost of amplitude ``sin(phi / 2)``); ``offset`` uniform in ``[0, period)``;
    ``restore`` 0 (only the centre line kept, TorchIO's default).
    """

    p: float = 1.0
    period: tuple[int, int] = (2, 8)
    intensity: tuple[float, float] = (0.2, 1.0)
    phase: tuple[float, float] = (0.0, 0.0)
    restore: tuple[float, float] = (0.0, 0.0)
    axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "ghosting.p"))
        object.__setattr__(self, "period", _int_pair(self.period, "ghosting.period"))
        object.__setattr__(self, "intensity", _pair(self.intensity, "ghosting.intensity", False))
        object.__setattr__(self, "phase", _pair(self.phase, "ghosting.phase"))
        object.__setattr__(self, "restore", _pair(self.restore, "ghosting.restore", False))
        object.__setattr__(self, "axes", _axes(self.axes, "ghosting.axes"))
        if self.period[0] < 2:
            raise ValueError(f"ghosting.period must be >= 2, got {self.period}")
        if not 0.0 <= self.intensity[0] <= self.intensity[1] <= 1.0:
            raise ValueError(f"ghosting.intensity must lie in [0, 1], got {self.intensity}")
        if not 0.0 <= self.restore[0] <= self.restore[1] < 1.0:
            raise ValueError(f"ghosting.restore must lie in [0, 1), got {self.restore}")

    def sample(self, d: Draw) -> GhostingParams:
        axis = d.choice(self.axes)
        period = d.integer(*self.period)
        return GhostingParams(
            axis=axis,
            period=period,
            intensity=d.uniform(*self.intensity),
            phase=d.uniform(*self.phase),
            offset=d.integer(0, period - 1),
            restore=d.uniform(*self.restore),
        )


@dataclass(frozen=True)
class AnisotropyRange:
    """Ranges of :class:`AnisotropyParams` (opt-in: no shipped config enables it).

    Defaults: ``factor`` 2-8, slice thickness over voxel size -- 2-8 mm slices on a 1 mm grid,
    the span of clinical 2-D T1w/T2w/FLAIR protocols (3-6 mm typical; TorchIO
    ``RandomAnisotropy``: 1.5-5); the slice grid's ``offset`` uniform; ``profile`` ``'box'``
    (contiguous slices; ``'point'`` is TorchIO's thin slices with gaps).
    """

    p: float = 1.0
    factor: tuple[float, float] = (2.0, 8.0)
    axes: tuple[int, ...] = (0, 1, 2)
    profile: Literal["box", "point"] = "box"

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", probability(self.p, "anisotropy.p"))
        object.__setattr__(self, "factor", _pair(self.factor, "anisotropy.factor", False))
        object.__setattr__(self, "axes", _axes(self.axes, "anisotropy.axes"))
        if self.factor[0] < 1.0:
            raise ValueError(f"anisotropy.factor must be >= 1, got {self.factor}")
        if self.profile not in ("box", "point"):
            raise ValueError(f"anisotropy.profile must be 'box' or 'point', got {self.profile!r}")

    def sample(self, d: Draw) -> AnisotropyParams:
        axis = d.choice(self.axes)
        factor = d.uniform(*self.factor)
        offset = min(d.uniform(0.0, 1.0), 1.0 - 1e-9)
        return AnisotropyParams(axis=axis, factor=factor, offset=offset, profile=self.profile)


RANGES: dict[str, type] = {
    "spike": SpikeRange,
    "noise": NoiseRange,
    "blur": BlurRange,
    "wrap": WrapRange,
    "motion": MotionRange,
    "bias": BiasRange,
    "ghosting": GhostingRange,
    "anisotropy": AnisotropyRange,
}


def parse_kind(kind: str, value: Any) -> Any:
    if value is None or value is False:
        return None
    tp = RANGES[kind]
    if value is True:
        return tp()
    if isinstance(value, tp):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown {kind} option(s) {unknown}; valid: {sorted(names)}")
        return tp(
            **{
                k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                for k, v in value.items()
            }
        )
    raise TypeError(f"{kind} must be null, true, a mapping of options or a {tp.__name__}")


#: range fields a severity schedule may move, and which way is milder: ``+1`` a higher value is
#: milder (noise SNR, fraction of k-space lines kept), ``-1`` a lower value is milder (spike
#: magnitude, blur ratio), ``0`` a symmetric range is milder when narrower (motion, bias)
STRENGTH_FIELDS: dict[tuple[str, str], int] = {
    ("spike", "intensity"): -1,
    ("noise", "snr_db"): +1,
    ("blur", "ratio"): -1,
    ("wrap", "keep_fraction"): +1,
    ("motion", "degrees"): 0,
    ("motion", "translation"): 0,
    ("bias", "coefficients"): 0,
    ("ghosting", "intensity"): -1,
    ("anisotropy", "factor"): -1,
}


def _no_milder_than(pair: tuple[float, float], floor: float, milder: int) -> tuple[float, float]:
    """Clamp both bounds of ``pair`` so that neither is milder than ``floor``."""
    lo, hi = pair
    if milder > 0:
        return min(lo, floor), min(hi, floor)
    if milder < 0:
        return max(lo, floor), max(hi, floor)
    a = abs(floor)  # symmetric: the half-width is at least |floor|
    return min(lo, -a), max(hi, a)


def _magnitude_pair(v: float | Sequence[float], name: str) -> tuple[float, float]:
    # a per-axis (symmetric) range read as a range of sizes: d or [-d, d] -> [0, d]
    lo, hi = _pair(v, name)
    return (lo, hi) if lo >= 0.0 else (0.0, max(-lo, abs(hi)))


def interpolate_ranges(
    start: Mapping[str, Any],
    end: Mapping[str, Mapping[str, Sequence[float]]],
    t: float,
    floor: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Artifact ranges between ``start`` (``t = 0``) and a milder ``end`` (``t = 1``).

    Every bound of a strength field (:data:`STRENGTH_FIELDS`) moves linearly,
    ``b(t) = (1 - t) b_start + t b_target``, where the target is ``end``'s bound (``start``'s
    where ``end`` does not name the field) clamped so that it is not milder than ``floor``.
    ``t = 0`` returns ``start``'s ranges unchanged. A bound that the start already puts beyond
    the floor (the paper's 30 dB upper SNR against a 20 dB floor) moves to the floor; every
    other bound stays on the strong side of it for every ``t``. Other fields (probabilities,
    counts, axes) are kept. A motion range with ``magnitude=True`` holds movement sizes: a
    smaller size is milder, a per-axis ``end`` (``d`` or ``[-d, d]``) reads as sizes ``[0, d]``
    and its ``floor`` is the smallest size either bound may reach.

    Args:
        start: kind -> range dataclass or ``None`` (:attr:`RandomArtifacts.ranges`).
        end: kind -> {field: ``[low, high]``}, the mild end (e.g. ``{"noise": {"snr_db":
            [5, 20]}}``); kinds disabled in ``start`` are ignored.
        t: position in [0, 1].
        floor: kind -> {field: value}, the mildest value a bound may be moved to (for a
            symmetric field: the smallest half-width).

    Returns:
        A new kind -> range mapping (``start`` is not modified).

    Raises:
        ValueError: ``t`` outside [0, 1], or a field that is not a strength range.
    """
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    floor = floor or {}
    for spec in (end, floor):
        for kind, values in spec.items():
            bad = [f for f in values if (kind, f) not in STRENGTH_FIELDS]
            if bad:
                valid = sorted(f"{k}.{f}" for k, f in STRENGTH_FIELDS)
                raise ValueError(f"not a strength range: {kind}.{bad}; valid: {valid}")
    out = dict(start)
    for kind, rng in start.items():
        if rng is None:
            continue
        changes = {}
        for (k, name), milder in STRENGTH_FIELDS.items():
            if k != kind or (name not in end.get(kind, {}) and name not in floor.get(kind, {})):
                continue
            a = getattr(rng, name)
            if kind == "motion" and getattr(rng, "magnitude", False):
                milder = -1  # movement sizes: a smaller one is milder
                b = _magnitude_pair(end.get(kind, {}).get(name, a), f"{kind}.{name}")
            else:
                b = _pair(end.get(kind, {}).get(name, a), f"{kind}.{name}", symmetric=milder == 0)
            if name in floor.get(kind, {}):
                b = _no_milder_than(b, float(floor[kind][name]), milder)
            changes[name] = tuple((1.0 - t) * x + t * y for x, y in zip(a, b, strict=True))
        if changes and t > 0.0:
            out[kind] = replace(rng, **changes)
    return out
