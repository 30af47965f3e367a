"""Explicit artifact parameters: one frozen dataclass per kind, and the per-sample record.

A :class:`~qcflow.kspace.sampler.RandomArtifacts` sampler draws an :class:`ArtifactParams`;
:func:`~qcflow.kspace.pipeline.apply_artifacts` applies it deterministically. The record
(:meth:`ArtifactParams.to_record`) is plain JSON -- kinds applied, every parameter, a severity
per kind -- and :meth:`ArtifactParams.from_record` replays it exactly.

Severity
--------
Each kind has a severity in ``[0, 1]`` computed from its parameters alone (so it is the same on
every device and for every image), 0 meaning "no artifact":

==========  ================================================================================
kind        severity
==========  ================================================================================
spike       ``log10(1 + sum(intensity)) / log10(11)``, clipped: one spike at 10x ``|DC|`` = 1
noise       ``(30 - snr_db) / 40``, clipped: 30 dB = 0, -10 dB = 1 (the paper's range)
blur        ``1 - 1 / max(ratio)``: kept fraction of the most truncated axis, 2x = 0.5, 12x = 0.92
wrap        fraction of the axis' k-space lines removed: ``1 - 1/interval`` or ``1 - keep``
motion      displacement (mm) of a point 80 mm from the centre, averaged over the phase-encode
            lines (time) that survive a low-pass along that axis, / 20 mm, clipped
bias        std of ``log b`` over the ball inscribed in the volume / 0.4, clipped (0.4 is the
            95th percentile for TorchIO's default coefficients in [-0.5, 0.5], median 0.28)
ghosting    summed ghost amplitude relative to the image, ``(n - 1) / n * |1 - g|``, clipped
            (``g = (1 - intensity) e^{i phase}``; the restored k-space centre is ignored):
            N/2 ghost of fully removed odd lines = 0.5, 8 ghosts at intensity 1 = 0.88
anisotropy  ``1 - 1 / factor``, as blur: 2x thicker slices = 0.5, 8x = 0.88
==========  ================================================================================

Length: one concept, the frozen parameter records and their JSON form, one per kind (~560 lines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = [
    "KINDS",
    "SHAW2021_KINDS",
    "OPT_IN_KINDS",
    "AnisotropyParams",
    "ArtifactParams",
    "BiasParams",
    "BlurParams",
    "GhostingParams",
    "MotionParams",
    "NoiseParams",
    "SpikeParams",
    "WrapParams",
    "motion_position_of_segment",
    "rotation_matrix",
]

#: every kind, in the order the fused pipeline applies them: the bias field multiplies the
#: object (image domain), then the acquisition: motion, phase-encode ghosting, RF spike,
#: thermal noise, the k-space sampling (low-pass truncation and line masking), and last the
#: resampling of thick slices back to the grid (image domain, on the reconstructed image).
KINDS: tuple[str, ...] = (
    "bias",
    "motion",
    "ghosting",
    "spike",
    "noise",
    "blur",
    "wrap",
    "anisotropy",
)
#: kinds that nothing enables unless asked (``augment=ghosting``, ``augment=contrastive_full``):
#: :meth:`~qcflow.kspace.sampler.RandomArtifacts.paper` leaves them off, and the embedded test
#: set counts ghosting among the kinds the paper setting never trains on (an encoder trained
#: with them lists them in its saved augment config, so its evaluation counts them simulated).
OPT_IN_KINDS: tuple[str, ...] = ("ghosting", "anisotropy")
#: the kinds of Shaw et al. (MELBA 2021, section 5: spike, noise, low-pass, line masking, with the
#: MIDL 2019 motion model), in that order: every kind but the bias field. Method B's default
#: artifact channels, in their channel order.
SHAW2021_KINDS: tuple[str, ...] = ("spike", "noise", "blur", "wrap", "motion")

#: radius (mm) at which the motion severity measures displacement (a brain is ~80 mm across
#: half its width) and the displacement (mm) that counts as severity 1
MOTION_RADIUS_MM = 80.0
MOTION_FULL_SEVERITY_MM = 20.0
#: std of log(bias) over the head that counts as severity 1
BIAS_FULL_SEVERITY_STD = 0.4


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def _triplet(v: Sequence[float], name: str) -> tuple[float, float, float]:
    t = tuple(float(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} needs 3 values (one per axis), got {len(t)}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class SpikeParams:
    """RF spikes: single k-space points added to the spectrum (herringbone artifact).

    Args:
        positions: one ``(u, v, w)`` per spike, each in ``[0, 1)``: the position as a fraction
            of the *centred* k-space of each axis -- TorchIO's ``spikes_positions``: signed
            frequency ``floor(u * n) - n // 2``.
        intensity: spike magnitude per spike as a multiple of ``|DC|``, which equals
            ``max |K|`` for a non-negative image (Shaw et al.: 1-10x).
        phase: spike phase per spike in radians (empty: 0, TorchIO's real spike).
    """

    positions: tuple[tuple[float, float, float], ...]
    intensity: tuple[float, ...]
    phase: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        pos = tuple(_triplet(p, "spike position") for p in self.positions)
        object.__setattr__(self, "positions", pos)
        object.__setattr__(self, "intensity", tuple(float(a) for a in self.intensity))
        object.__setattr__(self, "phase", tuple(float(a) for a in self.phase))
        if len(self.intensity) != len(pos):
            raise ValueError("spike: one intensity per position is needed")
        if self.phase and len(self.phase) != len(pos):
            raise ValueError("spike: one phase per position (or none) is needed")
        if any(not 0.0 <= u < 1.0 for p in pos for u in p):
            raise ValueError("spike positions must lie in [0, 1)")
        if any(a < 0 for a in self.intensity):
            raise ValueError("spike intensities must be non-negative")

    def severity(self) -> float:
        return _clip01(math.log10(1.0 + sum(self.intensity)) / math.log10(11.0))


@dataclass(frozen=True)
class NoiseParams:
    """Complex Gaussian k-space noise at a target image SNR (Rician noise in magnitude).

    Args:
        snr_db: ``20 log10(mu / sigma)``, see :func:`~qcflow.kspace.functional.snr_db_to_sigma`;
            ``inf`` adds nothing.
        seed: seed of the noise realisation (a generator on the data's device).
    """

    snr_db: float
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "snr_db", float(self.snr_db))
        object.__setattr__(self, "seed", int(self.seed))
        if math.isnan(self.snr_db):
            raise ValueError("noise snr_db is NaN")

    def severity(self) -> float:
        return _clip01((30.0 - self.snr_db) / 40.0)


@dataclass(frozen=True)
class BlurParams:
    """Low-pass k-space truncation (loss of resolution, Gibbs ringing).

    Args:
        ratio: per axis ``(D, H, W)``, the equivalent downsampling ratio ``r >= 1``: signed
            frequencies with ``|f| > floor(n / (2 r))`` are zeroed (``r = 1`` keeps the axis).
    """

    ratio: tuple[float, float, float]

    def __post_init__(self) -> None:
        r = _triplet(self.ratio, "blur ratio")
        object.__setattr__(self, "ratio", r)
        if any(a < 1.0 for a in r):
            raise ValueError(f"blur ratios must be >= 1, got {r}")

    def severity(self) -> float:
        return _clip01(1.0 - 1.0 / max(self.ratio))


@dataclass(frozen=True)
class WrapParams:
    """k-space line masking along one axis: wrap-around (aliasing) artifacts.

    ``mode='regular'`` keeps every ``interval``-th line (signed frequencies that are multiples
    of ``interval``): the field of view shrinks ``interval``-fold and the image becomes the sum
    of ``interval`` copies shifted by ``n / interval`` -- wrap-around. ``mode='random'`` keeps
    the centre line and each conjugate pair ``+-f`` with probability ``keep_fraction`` (drawn
    with ``seed``): incoherent aliasing. Both masks are conjugate-symmetric, so masking alone
    keeps the image real.

    Args:
        axis: image axis (0, 1, 2) whose lines are masked.
        mode: ``'regular'`` or ``'random'``.
        interval: ``n`` of every-``n``-th (regular mode, ``>= 1``).
        keep_fraction: probability of keeping a line pair (random mode, ``(0, 1]``).
        seed: seed of the random mask.
    """

    axis: int
    mode: Literal["regular", "random"] = "regular"
    interval: int = 2
    keep_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "interval", int(self.interval))
        object.__setattr__(self, "keep_fraction", float(self.keep_fraction))
        object.__setattr__(self, "seed", int(self.seed))
        if self.axis not in (0, 1, 2):
            raise ValueError(f"wrap axis must be 0, 1 or 2, got {self.axis}")
        if self.mode not in ("regular", "random"):
            raise ValueError(f"wrap mode must be 'regular' or 'random', got {self.mode!r}")
        if self.interval < 1:
            raise ValueError(f"wrap interval must be >= 1, got {self.interval}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"wrap keep_fraction must be in (0, 1], got {self.keep_fraction}")

    def severity(self) -> float:
        if self.mode == "regular":
            return _clip01(1.0 - 1.0 / self.interval)
        return _clip01(1.0 - self.keep_fraction)


def rotation_matrix(degrees: Sequence[float]) -> list[list[float]]:
    r"""Rotation matrix :math:`R = R_2(\gamma) R_1(\beta) R_0(\alpha)` about image axes 0, 1, 2.

    ``degrees = (alpha, beta, gamma)``; ``R_a`` is the right-handed rotation about axis ``a``
    (``R_0(90) e_1 = e_2``): the convention of TorchIO's ``Affine``, which TorchIO's ``Motion``
    does not follow (TorchIO #812).
    """
    a, b, c = (math.radians(float(v)) for v in degrees)
    ca, sa, cb, sb, cc, sc = (
        math.cos(a),
        math.sin(a),
        math.cos(b),
        math.sin(b),
        math.cos(c),
        math.sin(c),
    )
    r0 = [[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]]
    r1 = [[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]]
    r2 = [[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]]

    def mm(p: list[list[float]], q: list[list[float]]) -> list[list[float]]:
        return [[sum(p[i][k] * q[k][j] for k in range(3)) for j in range(3)] for i in range(3)]

    return mm(r2, mm(r1, r0))


def motion_position_of_segment(times: Sequence[float]) -> list[int]:
    """Which head position fills each k-space segment (Shaw et al. 2019 / TorchIO ``Motion``).

    With ``n`` movements at sorted ``times`` the phase-encode axis is cut into ``n + 1``
    segments (fractions of the *centred* axis). Position 0 is the original pose, position
    ``j >= 1`` is movement ``j``. Segment ``s`` would be acquired in position ``s``, except that
    the segment holding the k-space centre gets the original pose and its own position goes to
    segment 0 -- so the image stays where it was (and aligned with its labels).

    Returns:
        ``pos[s]`` for ``s = 0 .. n``.
    """
    n = len(times)
    centre = next((i for i, t in enumerate(times) if t > 0.5), n)
    pos = list(range(n + 1))
    pos[0], pos[centre] = pos[centre], pos[0]
    return pos


@dataclass(frozen=True)
class MotionParams:
    """Rigid head movements during the acquisition (Shaw et al. 2019 k-space motion model).

    Movement ``j`` puts the head in pose ``x -> R_j (x - c) + c + t_j`` (``c`` the volume
    centre, ``R_j`` from :func:`rotation_matrix`, ``t_j`` in mm along image axes 0, 1, 2) from
    time ``times[j]`` on; k-space is filled along ``pe_axis`` in time order and the segment at
    the k-space centre is taken from the original pose (:func:`motion_position_of_segment`).

    Args:
        times: sorted movement times in ``(0, 1)``, fractions of the phase-encode axis.
        degrees: per movement, rotations (degrees) about image axes 0, 1, 2.
        translation: per movement, translations (mm) along image axes 0, 1, 2.
        pe_axis: the phase-encode axis along which k-space is spliced (TorchIO: 2, the last).
    """

    times: tuple[float, ...]
    degrees: tuple[tuple[float, float, float], ...]
    translation: tuple[tuple[float, float, float], ...]
    pe_axis: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))
        deg = tuple(_triplet(d, "motion degrees") for d in self.degrees)
        tra = tuple(_triplet(t, "motion translation") for t in self.translation)
        object.__setattr__(self, "degrees", deg)
        object.__setattr__(self, "translation", tra)
        object.__setattr__(self, "pe_axis", int(self.pe_axis))
        if not (len(self.times) == len(deg) == len(tra)):
            raise ValueError("motion: times, degrees and translation need one entry per movement")
        if any(not 0.0 < t < 1.0 for t in self.times):
            raise ValueError(f"motion times must lie in (0, 1), got {self.times}")
        if list(self.times) != sorted(self.times):
            raise ValueError(f"motion times must be sorted, got {self.times}")
        if self.pe_axis not in (0, 1, 2):
            raise ValueError(f"motion pe_axis must be 0, 1 or 2, got {self.pe_axis}")

    @property
    def num_movements(self) -> int:
        return len(self.times)

    def displacement_mm(self, radius: float = MOTION_RADIUS_MM) -> list[float]:
        """Per position (0 = original), ``|t| + radius * angle(R)``: a displacement bound (mm)."""
        out = [0.0]
        for deg, tra in zip(self.degrees, self.translation, strict=True):
            r = rotation_matrix(deg)
            cos = max(-1.0, min(1.0, (r[0][0] + r[1][1] + r[2][2] - 1.0) / 2.0))
            out.append(math.sqrt(sum(v * v for v in tra)) + radius * math.acos(cos))
        return out

    def severity(self, pe_ratio: float = 1.0) -> float:
        """Displacement averaged over the acquired phase-encode lines, / 20 mm, clipped.

        Args:
            pe_ratio: low-pass ratio on the phase-encode axis (blur). Only the central
                ``1 / pe_ratio`` of the lines survive truncation -- mostly the original pose --
                so a strong blur along that axis hides the motion and lowers its severity.
        """
        half = 0.5 / max(1.0, pe_ratio)
        lo, hi = 0.5 - half, 0.5 + half  # surviving window of the centred axis
        bounds = [0.0, *self.times, 1.0]
        pos = motion_position_of_segment(self.times)
        disp = self.displacement_mm()
        mean = sum(
            max(0.0, min(hi, bounds[s + 1]) - max(lo, bounds[s])) * disp[pos[s]]
            for s in range(len(pos))
        )
        return _clip01(mean / (hi - lo) / MOTION_FULL_SEVERITY_MM)


@dataclass(frozen=True)
class BiasParams:
    """Smooth multiplicative field ``exp(polynomial)`` (TorchIO ``BiasField``'s model).

    Args:
        coefficients: polynomial coefficients in TorchIO's order
            (:func:`~qcflow.kspace.functional.bias_field_log`).
        order: polynomial order.
    """

    coefficients: tuple[float, ...]
    order: int = 3

    def __post_init__(self) -> None:
        from qcflow.kspace.functional import bias_num_coefficients

        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        object.__setattr__(self, "order", int(self.order))
        if self.order < 0:
            raise ValueError(f"bias order must be >= 0, got {self.order}")
        if len(self.coefficients) != bias_num_coefficients(self.order):
            raise ValueError(
                f"bias order {self.order} needs {bias_num_coefficients(self.order)} "
                f"coefficients, got {len(self.coefficients)}"
            )

    def severity(self) -> float:
        from qcflow.kspace.functional import _bias_log_std

        return _clip01(_bias_log_std(self.coefficients, self.order) / BIAS_FULL_SEVERITY_STD)


@dataclass(frozen=True)
class GhostingParams:
    r"""Phase-encode ghosts: every ``period``-th k-space line modulated (N/2 and periodic ghosts).

    Along ``axis`` (signed frequency ``f``, axis length ``N``) the lines with
    ``f = offset (mod period)`` are multiplied by ``g = (1 - intensity) e^{i phase}``, except
    the central lines ``|f| <= floor(restore N / 2)`` (``f = 0`` always). The modulation is
    ``m(f) = 1 + (g - 1) c(f)`` with ``c`` a comb of period ``n = period``; its inverse transform
    is a comb of ``n`` impulses ``N / n`` apart, so (without the restored centre)

    .. math:: y(x) = x(x) + \frac{g - 1}{n} \sum_{j=0}^{n-1}
              e^{2 \pi i\, \mathrm{offset}\, j / n}\, x(x - j N / n):

    ``n - 1`` ghost replicas shifted by multiples of FOV/``n`` along ``axis`` only, each of
    amplitude ``|1 - g| / n``. ``period = 2`` is the Nyquist (N/2) ghost of EPI, where odd and
    even echoes differ in phase and amplitude (Haacke et al., *Magnetic Resonance Imaging:
    Physical Principles and Sequence Design*, 1999, ch. 13; Bernstein, King, Zhou, *Handbook of
    MRI Pulse Sequences*, 2004, sec. 16.1); ``period >= 3`` is the periodic phase-encode ghosting
    of respiration, pulsation or flow that is periodic in the lines -- TorchIO ``Ghosting``'s
    model (``num_ghosts = period``, ``offset = -(N // 2) mod period``, ``restore`` as its
    ``None``; TorchIO keeps the real part, this pipeline the magnitude).

    Args:
        axis: the phase-encode axis (0, 1, 2) of the ghosts.
        period: ``n >= 2``, every ``n``-th line is modulated; ghosts are FOV/``n`` apart.
        intensity: amplitude lost by the modulated lines, in ``[0, 1]`` (1 removes them).
        phase: phase error of the modulated lines, radians.
        offset: which lines, ``f = offset (mod period)``, in ``[0, period)``; it sets the phase
            ``2 pi offset j / n`` of ghost ``j``.
        restore: fraction of the axis' central lines kept as acquired, in ``[0, 1)``.
    """

    axis: int
    period: int = 2
    intensity: float = 0.5
    phase: float = 0.0
    offset: int = 1
    restore: float = 0.0

    def __post_init__(self) -> None:
        for name in ("axis", "period", "offset"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("intensity", "phase", "restore"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.axis not in (0, 1, 2):
            raise ValueError(f"ghosting axis must be 0, 1 or 2, got {self.axis}")
        if self.period < 2:
            raise ValueError(f"ghosting period must be >= 2, got {self.period}")
        if not 0.0 <= self.intensity <= 1.0:
            raise ValueError(f"ghosting intensity must be in [0, 1], got {self.intensity}")
        if not math.isfinite(self.phase):
            raise ValueError(f"ghosting phase must be finite, got {self.phase}")
        if not 0 <= self.offset < self.period:
            raise ValueError(f"ghosting offset must be in [0, period), got {self.offset}")
        if not 0.0 <= self.restore < 1.0:
            raise ValueError(f"ghosting restore must be in [0, 1), got {self.restore}")

    @property
    def gain(self) -> complex:
        """``g``, the factor of the modulated lines."""
        return (1.0 - self.intensity) * complex(math.cos(self.phase), math.sin(self.phase))

    @property
    def active(self) -> bool:
        return abs(1.0 - self.gain) > 0.0

    def severity(self) -> float:
        return _clip01((self.period - 1) / self.period * abs(1.0 - self.gain))


@dataclass(frozen=True)
class AnisotropyParams:
    r"""Thick-slice (anisotropic) acquisition along one axis, resampled back to the grid.

    A 2-D multi-slice scan acquires contiguous slices of thickness ``t = factor`` voxels along
    ``axis``; the scanner reconstructs them and the pipeline resamples them to the fine grid.
    Slice ``s`` covers ``[a_s, a_s + t)`` with ``a_s = -1/2 + (s - offset) t`` (voxel ``i``
    covers ``[i - 1/2, i + 1/2)``) and its value is the slice-profile average of the object,

    .. math:: v_s = \frac{1}{|S_s|} \int_{S_s} x(z)\, dz \quad (\text{box profile}),
              \qquad v_s = x(\mathrm{round}(c_s)) \quad (\text{point profile}),

    ``c_s = a_s + t / 2`` its centre and ``x`` piecewise constant over voxels (partial volume);
    the output is the linear interpolation of ``(c_s, v_s)`` at every voxel, constant beyond the
    outer centres. In k-space this multiplies the through-plane spectrum by the slice profile's
    transform ``sinc(t f / N)`` and the interpolation's ``sinc^2(t f / N)`` and aliases it with
    period ``N / t`` (sampling): through-plane frequencies above ``N / (2 t)`` are lost, in-plane
    ones are untouched. The box profile is an ideal contiguous slice (Haacke et al. 1999, ch.
    10; the slice-profile model of super-resolution work, Greenspan, *Comput. J.* 52(1), 2009);
    ``'point'`` samples thin slices with gaps, TorchIO ``RandomAnisotropy``'s model (nearest
    downsampling, linear upsampling). The mean line-spread variance is ``t^2 / 4`` (box) and
    ``t^2 / 6`` (point) voxels^2. Applied to the reconstructed image (magnitude), after every
    k-space kind, so the thermal noise of each thick slice is interpolated with it.

    Args:
        axis: the through-plane (slice) axis.
        factor: slice thickness / voxel size ``>= 1``; 1 is the identity.
        offset: phase of the slice grid, in ``[0, 1)`` slices.
        profile: ``'box'`` (contiguous thick slices) or ``'point'`` (thin slices, gaps).
    """

    axis: int
    factor: float = 2.0
    offset: float = 0.0
    profile: Literal["box", "point"] = "box"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", int(self.axis))
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "offset", float(self.offset))
        if self.axis not in (0, 1, 2):
            raise ValueError(f"anisotropy axis must be 0, 1 or 2, got {self.axis}")
        if not self.factor >= 1.0 or not math.isfinite(self.factor):
            raise ValueError(f"anisotropy factor must be >= 1, got {self.factor}")
        if not 0.0 <= self.offset < 1.0:
            raise ValueError(f"anisotropy offset must be in [0, 1), got {self.offset}")
        if self.profile not in ("box", "point"):
            raise ValueError(f"anisotropy profile must be 'box' or 'point', got {self.profile!r}")

    @property
    def active(self) -> bool:
        return self.factor > 1.0

    def severity(self) -> float:
        return _clip01(1.0 - 1.0 / self.factor)


_PARAM_TYPES: dict[str, type] = {
    "bias": BiasParams,
    "motion": MotionParams,
    "spike": SpikeParams,
    "noise": NoiseParams,
    "blur": BlurParams,
    "wrap": WrapParams,
    "ghosting": GhostingParams,
    "anisotropy": AnisotropyParams,
}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(a) for a in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _from_json(v: Any) -> Any:
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return v


@dataclass(frozen=True)
class ArtifactParams:
    """Everything one sample's corruption needs; ``None`` fields are kinds not applied."""

    bias: BiasParams | None = None
    motion: MotionParams | None = None
    spike: SpikeParams | None = None
    noise: NoiseParams | None = None
    blur: BlurParams | None = None
    wrap: WrapParams | None = None
    ghosting: GhostingParams | None = None
    anisotropy: AnisotropyParams | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Kinds applied, in pipeline order."""
        return tuple(k for k in KINDS if getattr(self, k) is not None)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def severity(self) -> dict[str, float]:
        """Severity in ``[0, 1]`` of every applied kind (see the module docstring)."""
        out = {k: getattr(self, k).severity() for k in self.kinds}
        if self.motion is not None and self.blur is not None:
            out["motion"] = self.motion.severity(self.blur.ratio[self.motion.pe_axis])
        return out

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable record: ``{"kinds", "params", "severity"}``."""
        params = {
            k: {n: _jsonable(v) for n, v in asdict(getattr(self, k)).items()} for k in self.kinds
        }
        return {"kinds": list(self.kinds), "params": params, "severity": self.severity()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ArtifactParams:
        """Inverse of :meth:`to_record` (accepts the ``params`` mapping alone as well)."""
        params = record.get("params", record)
        kwargs: dict[str, Any] = {}
        for kind, values in params.items():
            if kind not in _PARAM_TYPES:
                raise ValueError(f"unknown artifact kind {kind!r}; choose from {', '.join(KINDS)}")
            tp = _PARAM_TYPES[kind]
            names = {f.name for f in fields(tp)}
            kwargs[kind] = tp(**{n: _from_json(v) for n, v in values.items() if n in names})
        return cls(**kwargs)
