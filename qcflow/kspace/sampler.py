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

The per-kind ranges and their interpolation live in :mod:`qcflow.kspace.ranges`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from qcflow.kspace.params import (
    KINDS,
    OPT_IN_KINDS,
    ArtifactParams,
)
from qcflow.kspace.pipeline import Strategy, apply_artifacts
from qcflow.kspace.ranges import (  # the per-kind ranges are re-exported here
    RANGES,
    SEED_MAX,
    STRENGTH_FIELDS,
    AnisotropyRange,
    BiasRange,
    BlurRange,
    Draw,
    GhostingRange,
    MotionRange,
    NoiseRange,
    SpikeRange,
    WrapRange,
    interpolate_ranges,
    parse_kind,
    probability,
)

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
        self.rate = probability(rate, "rate")
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
        self.ranges: dict[str, Any] = {k: parse_kind(k, v) for k, v in given.items()}
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
        for k in RANGES:
            if k not in OPT_IN_KINDS:
                kwargs.setdefault(k, True)
        return cls(rate=rate, **kwargs)

    def with_ranges(self, ranges: Mapping[str, Any]) -> RandomArtifacts:
        """A copy that draws from ``ranges`` (kind -> range or ``None``), all else the same.

        Used by a severity schedule (:class:`qcflow.lit.curriculum.SeverityCurriculum`) with
        :func:`interpolate_ranges`; the copy starts its own generator stream.
        """
        unknown = sorted(set(ranges) - set(RANGES))
        if unknown:
            raise ValueError(f"unknown artifact kind(s) {unknown}; valid: {sorted(RANGES)}")
        new = copy.copy(self)  # __getstate__: a fresh generator
        new.ranges = {k: parse_kind(k, ranges.get(k)) for k in RANGES}
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
            return torch.Generator().manual_seed(int(torch.randint(0, SEED_MAX, (1,))[0]))
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
        d = Draw(self._generator(generator))
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
