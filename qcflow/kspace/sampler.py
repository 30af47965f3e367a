"""Random artifact parameters from config ranges: :class:`RandomArtifacts`.

Following TorchIO's ``Random*`` pattern, the sampler only *draws* explicit parameters
(:class:`~qcflow.kspace.params.ArtifactParams`) and hands them to the deterministic
:func:`~qcflow.kspace.pipeline.apply_artifacts`, so every sample carries a replayable record.

Which kinds an image gets. With probability ``rate`` (the paper's ~50 %) an image is corrupted;
a corrupted image gets each enabled kind independently with that kind's ``p``; if that selects
nothing, one kind is drawn with probabilities proportional to the ``p``'s (so a corrupted image
always shows at least one artifact). ``rate=1`` and every ``p=1`` applies all enabled kinds.

Default ranges (``KIND=true`` in a config) are the papers' where they give them: spike
magnitude 1-10 x ``|DC|`` (Shaw et al. 2020), SNR in [-10, 30] dB (Shaw et al. 2020, MIDL),
low-pass ratio in [2, 12], TorchIO ``RandomMotion``'s motion ranges (10 degrees, 10 mm, evenly
spaced times perturbed by 30 % of the spacing) and TorchIO ``RandomBiasField``'s (order 3,
coefficients in [-0.5, 0.5]).

Seeding. Draws use a CPU :class:`torch.Generator`: pass one explicitly, or set ``seed`` (a
DataLoader worker mixes it with the worker seed PyTorch draws from the main process RNG each
epoch, so workers and epochs differ yet ``torch.manual_seed`` reproduces a run), or leave
``seed=None`` to seed every draw from torch's global RNG (seeded per worker by PyTorch and by
Lightning's ``seed_everything``). Same seed, same parameters, same image.

Length: one concept, ranges -> parameter records, one range class per kind and the sampler that
draws them together (~680 lines).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor

from qcflow.kspace.params import (
    KINDS,
    OPT_IN_KINDS,
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
from qcflow.kspace.pipeline import Strategy, apply_artifacts

__all__ = [
    "AnisotropyRange",
    "BiasRange",
    "BlurRange",
    "GhostingRange",
    "MotionRange",
    "NoiseRange",
    "RandomArtifacts",
    "SpikeRange",
    "STRENGTH_FIELDS",
    "WrapRange",
    "interpolate_ranges",
]

_SEED_MAX = 2**31 - 1


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


def _prob(p: float, name: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


class _Draw:
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
        return self.integer(0, _SEED_MAX)


@dataclass(frozen=True)
class SpikeRange:
    """Ranges of :class:`SpikeParams`: ``num_spikes`` and ``intensity`` (x ``|DC|``) pairs."""

    p: float = 1.0
    num_spikes: tuple[int, int] = (1, 3)
    intensity: tuple[float, float] = (1.0, 10.0)
    random_phase: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _prob(self.p, "spike.p"))
        object.__setattr__(self, "num_spikes", _int_pair(self.num_spikes, "spike.num_spikes"))
        object.__setattr__(self, "intensity", _pair(self.intensity, "spike.intensity", False))
        if self.num_spikes[0] < 1 or self.intensity[0] < 0:
            raise ValueError("spike: num_spikes must be >= 1 and intensity >= 0")

    def sample(self, d: _Draw) -> SpikeParams:
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
        object.__setattr__(self, "p", _prob(self.p, "noise.p"))
        object.__setattr__(self, "snr_db", _pair(self.snr_db, "noise.snr_db", False))

    def sample(self, d: _Draw) -> NoiseParams:
        return NoiseParams(snr_db=d.uniform(*self.snr_db), seed=d.seed())


@dataclass(frozen=True)
class BlurRange:
    """Ranges of :class:`BlurParams`: downsampling ``ratio`` per truncated axis, how many axes."""

    p: float = 1.0
    ratio: tuple[float, float] = (2.0, 12.0)
    num_axes: tuple[int, int] = (1, 3)
    axes: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _prob(self.p, "blur.p"))
        object.__setattr__(self, "ratio", _pair(self.ratio, "blur.ratio", False))
        object.__setattr__(self, "num_axes", _int_pair(self.num_axes, "blur.num_axes"))
        object.__setattr__(self, "axes", _axes(self.axes, "blur.axes"))
        if self.ratio[0] < 1.0:
            raise ValueError(f"blur.ratio must be >= 1, got {self.ratio}")
        if not 1 <= self.num_axes[0] <= self.num_axes[1]:
            raise ValueError(f"blur.num_axes must be >= 1, got {self.num_axes}")

    def sample(self, d: _Draw) -> BlurParams:
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
        object.__setattr__(self, "p", _prob(self.p, "wrap.p"))
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

    def sample(self, d: _Draw) -> WrapParams:
        axis = d.choice(self.axes)
        mode = d.choice(self.modes)
        return WrapParams(
            axis=axis,
            mode=mode,
            interval=d.integer(*self.interval),
            keep_fraction=d.uniform(*self.keep_fraction),
            seed=d.seed(),
        )


@dataclass(frozen=True)
class MotionRange:
    """Ranges of :class:`MotionParams` (TorchIO ``RandomMotion``'s defaults and time model)."""

    p: float = 1.0
    degrees: tuple[float, float] = (-10.0, 10.0)
    translation: tuple[float, float] = (-10.0, 10.0)
    num_movements: tuple[int, int] = (1, 3)
    pe_axes: tuple[int, ...] = (0, 1, 2)
    perturbation: float = 0.3

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _prob(self.p, "motion.p"))
        object.__setattr__(self, "degrees", _pair(self.degrees, "motion.degrees"))
        object.__setattr__(self, "translation", _pair(self.translation, "motion.translation"))
        object.__setattr__(
            self, "num_movements", _int_pair(self.num_movements, "motion.num_movements")
        )
        object.__setattr__(self, "pe_axes", _axes(self.pe_axes, "motion.pe_axes"))
        if self.num_movements[0] < 1:
            raise ValueError(f"motion.num_movements must be >= 1, got {self.num_movements}")
        if not 0.0 <= self.perturbation < 0.5:
            raise ValueError(f"motion.perturbation must be in [0, 0.5), got {self.perturbation}")

    def sample(self, d: _Draw) -> MotionParams:
        n = d.integer(*self.num_movements)
        step = 1.0 / (n + 1)
        jitter = d.uniforms(-step * self.perturbation, step * self.perturbation, n)
        times = (torch.arange(1, n + 1, dtype=torch.float64) * step + jitter).tolist()
        deg = d.uniforms(*self.degrees, n, 3).tolist()
        tra = d.uniforms(*self.translation, n, 3).tolist()
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
        object.__setattr__(self, "p", _prob(self.p, "bias.p"))
        object.__setattr__(self, "coefficients", _pair(self.coefficients, "bias.coefficients"))
        object.__setattr__(self, "order", int(self.order))
        if self.order < 0:
            raise ValueError(f"bias.order must be >= 0, got {self.order}")

    def sample(self, d: _Draw) -> BiasParams:
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
        object.__setattr__(self, "p", _prob(self.p, "ghosting.p"))
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

    def sample(self, d: _Draw) -> GhostingParams:
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
        object.__setattr__(self, "p", _prob(self.p, "anisotropy.p"))
        object.__setattr__(self, "factor", _pair(self.factor, "anisotropy.factor", False))
        object.__setattr__(self, "axes", _axes(self.axes, "anisotropy.axes"))
        if self.factor[0] < 1.0:
            raise ValueError(f"anisotropy.factor must be >= 1, got {self.factor}")
        if self.profile not in ("box", "point"):
            raise ValueError(f"anisotropy.profile must be 'box' or 'point', got {self.profile!r}")

    def sample(self, d: _Draw) -> AnisotropyParams:
        axis = d.choice(self.axes)
        factor = d.uniform(*self.factor)
        offset = min(d.uniform(0.0, 1.0), 1.0 - 1e-9)
        return AnisotropyParams(axis=axis, factor=factor, offset=offset, profile=self.profile)


_RANGES: dict[str, type] = {
    "spike": SpikeRange,
    "noise": NoiseRange,
    "blur": BlurRange,
    "wrap": WrapRange,
    "motion": MotionRange,
    "bias": BiasRange,
    "ghosting": GhostingRange,
    "anisotropy": AnisotropyRange,
}


def _parse_kind(kind: str, value: Any) -> Any:
    if value is None or value is False:
        return None
    tp = _RANGES[kind]
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
    counts, axes) are kept.

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
            b = _pair(end.get(kind, {}).get(name, a), f"{kind}.{name}", symmetric=milder == 0)
            if name in floor.get(kind, {}):
                b = _no_milder_than(b, float(floor[kind][name]), milder)
            changes[name] = tuple((1.0 - t) * x + t * y for x, y in zip(a, b, strict=True))
        if changes and t > 0.0:
            out[kind] = replace(rng, **changes)
    return out


class RandomArtifacts:
    """Sampler of k-space artifacts with per-kind probabilities and an overall rate.

    ``hydra.utils.instantiate(cfg.augment)`` builds one from ``conf/augment/*.yaml``.

    Args:
        rate: probability that an image gets any artifact (paper: ~0.5).
        spike, noise, blur, wrap, motion, bias, ghosting, anisotropy: ``None``/``False``
            disables the kind; ``True`` uses the default ranges; a mapping sets
            :class:`SpikeRange` etc. fields (e.g. ``noise={"snr_db": [0, 20], "p": 0.5}``).
            Ghosting and anisotropy (:data:`~qcflow.kspace.params.OPT_IN_KINDS`) are off
            unless given.
        spacing: voxel size (mm) used when applying (motion translations are in mm); callers
            that know the image's spacing pass it to :meth:`__call__`.
        pad_to_smooth, rescale, strategy: passed to
            :func:`~qcflow.kspace.pipeline.apply_artifacts`.
        device: where training applies it: ``'loader'`` (per volume, in the DataLoader) or
            ``'batch'`` (on the accelerator after transfer, :mod:`qcflow.kspace.lightning`).
        exclusive: a corrupted image gets exactly one kind, drawn with probability
            proportional to the kinds' ``p`` (default: each kind independently with its ``p``,
            at least one). Gives single-kind samples whose kind is the label.
        seed: seed of the parameter draws (``None``: torch's global RNG, see module docstring).

    Example:
        >>> aug = RandomArtifacts(rate=1.0, noise=True, seed=0)
        >>> y, record = aug(torch.rand(1, 16, 16, 16))
        >>> record["kinds"]
        ['noise']
    """

    def __init__(
        self,
        rate: float = 0.5,
        spike: Any = None,
        noise: Any = None,
        blur: Any = None,
        wrap: Any = None,
        motion: Any = None,
        bias: Any = None,
        ghosting: Any = None,
        anisotropy: Any = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        pad_to_smooth: bool = True,
        rescale: bool = True,
        strategy: Strategy = "auto",
        device: Literal["loader", "batch"] = "loader",
        exclusive: bool = False,
        seed: int | None = None,
    ) -> None:
        self.rate = _prob(rate, "rate")
        given = {
            "spike": spike,
            "noise": noise,
            "blur": blur,
            "wrap": wrap,
            "motion": motion,
            "bias": bias,
            "ghosting": ghosting,
            "anisotropy": anisotropy,
        }
        self.ranges: dict[str, Any] = {k: _parse_kind(k, v) for k, v in given.items()}
        self.spacing = tuple(float(s) for s in spacing)
        if len(self.spacing) != 3:
            raise ValueError(f"spacing needs 3 values, got {list(spacing)}")
        self.pad_to_smooth = bool(pad_to_smooth)
        self.rescale = bool(rescale)
        if strategy not in ("auto", "pruned", "dense"):
            raise ValueError(f"strategy must be 'auto', 'pruned' or 'dense', got {strategy!r}")
        self.strategy: Strategy = strategy
        if device not in ("loader", "batch"):
            raise ValueError(f"device must be 'loader' or 'batch', got {device!r}")
        self.device = device
        self.exclusive = bool(exclusive)
        self.seed = None if seed is None else int(seed)
        self._gen: torch.Generator | None = None
        self._gen_pid: int | None = None

    @classmethod
    def paper(cls, rate: float = 0.5, **kwargs: Any) -> RandomArtifacts:
        """The six kinds of the papers (all but :data:`OPT_IN_KINDS`), default ranges."""
        for k in _RANGES:
            if k not in OPT_IN_KINDS:
                kwargs.setdefault(k, True)
        return cls(rate=rate, **kwargs)

    def with_ranges(self, ranges: Mapping[str, Any]) -> RandomArtifacts:
        """A copy that draws from ``ranges`` (kind -> range or ``None``), all else the same.

        Used by a severity schedule (:class:`qcflow.lit.curriculum.SeverityCurriculum`) with
        :func:`interpolate_ranges`; the copy starts its own generator stream.
        """
        unknown = sorted(set(ranges) - set(_RANGES))
        if unknown:
            raise ValueError(f"unknown artifact kind(s) {unknown}; valid: {sorted(_RANGES)}")
        new = copy.copy(self)  # __getstate__: a fresh generator
        new.ranges = {k: _parse_kind(k, ranges.get(k)) for k in _RANGES}
        return new

    @property
    def kinds(self) -> tuple[str, ...]:
        """Enabled kinds, in pipeline order."""
        return tuple(k for k in KINDS if self.ranges.get(k) is not None)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(rate={self.rate}, kinds={list(self.kinds)}, device={self.device!r})"

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) and copies start their own stream (see _generator)
        state = self.__dict__.copy()
        state["_gen"] = None
        state["_gen_pid"] = None
        return state

    # ---------------------------------------------------------------------------------------
    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        if self.seed is None:  # fresh seed from the global RNG (per-worker seeded by PyTorch)
            return torch.Generator().manual_seed(int(torch.randint(0, _SEED_MAX, (1,))[0]))
        pid = os.getpid()
        if self._gen is None or self._gen_pid != pid:
            info = torch.utils.data.get_worker_info()
            # in a DataLoader worker, mix in the worker's seed (PyTorch's base seed + worker
            # id, redrawn from the main process RNG every epoch): workers differ, epochs differ,
            # and torch.manual_seed in the main process reproduces everything
            seed = self.seed if info is None else (self.seed * 1_000_003 + info.seed) % 2**63
            self._gen = torch.Generator().manual_seed(seed)
            self._gen_pid = pid
        return self._gen

    def sample(self, generator: torch.Generator | None = None) -> ArtifactParams:
        """Draw one sample's parameters (an empty :class:`ArtifactParams` for a clean image)."""
        d = _Draw(self._generator(generator))
        kinds = self.kinds
        if not kinds or d.uniform(0.0, 1.0) >= self.rate:
            return ArtifactParams()
        probs = torch.tensor([self.ranges[k].p for k in kinds], dtype=torch.float64)
        if self.exclusive:
            if float(probs.sum()) == 0.0:
                return ArtifactParams()
            pick = int(torch.multinomial(probs, 1, generator=d.g)[0])
            return ArtifactParams(**{kinds[pick]: self.ranges[kinds[pick]].sample(d)})
        chosen = (d.rand(len(kinds)) < probs).tolist()
        if not any(chosen):
            if float(probs.sum()) == 0.0:
                return ArtifactParams()
            chosen[int(torch.multinomial(probs, 1, generator=d.g)[0])] = True
        return ArtifactParams(
            **{k: self.ranges[k].sample(d) for k, c in zip(kinds, chosen, strict=True) if c}
        )

    def sample_batch(
        self, n: int, generator: torch.Generator | None = None
    ) -> list[ArtifactParams]:
        """Draw ``n`` samples' parameters from one generator."""
        g = self._generator(generator)
        return [self.sample(g) for _ in range(n)]

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        spacing: Sequence[float] | None = None,
    ) -> tuple[Tensor, dict[str, Any] | list[dict[str, Any]]]:
        """Corrupt ``x`` and return it with its record(s).

        Args:
            x: ``(C, D, H, W)`` (one record) or ``(B, C, D, H, W)`` (a list of ``B`` records).
            generator: CPU generator for the draws (default: see the module docstring).
            spacing: voxel size (mm), default ``self.spacing``.

        Returns:
            The corrupted (and rescaled) image(s) and the JSON-serialisable record(s).
        """
        batched = x.ndim == 5
        params = self.sample_batch(x.shape[0], generator) if batched else self.sample(generator)
        y = apply_artifacts(
            x,
            params,
            spacing=self.spacing if spacing is None else spacing,
            pad_to_smooth=self.pad_to_smooth,
            rescale=self.rescale,
            strategy=self.strategy,
        )
        if batched:
            return y, [p.to_record() for p in params]  # type: ignore[union-attr]
        return y, params.to_record()  # type: ignore[union-attr]
