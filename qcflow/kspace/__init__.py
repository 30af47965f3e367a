"""k-space artifact library: fused, batched, device-agnostic MRI artifact simulation.

Both qcflow methods train on simulated artifacts. References:

* Shaw, Sudre, Ourselin, Cardoso. MRI k-space motion artefact augmentation: model robustness
  and task-specific uncertainty. MIDL 2019, PMLR 102:427-436 (the motion model).
* Shaw, Sudre, Varsavsky, Ourselin, Cardoso. A k-space model of movement artefacts:
  application to segmentation augmentation and artefact removal. IEEE TMI 39(9), 2020.
* Shaw, Sudre, Ourselin, Cardoso. A heteroscedastic uncertainty model for decoupling sources
  of MRI image quality. MIDL 2020; extended in MELBA 2021 (section 5, "k-Space Augmentation":
  spike 1-10x max |k|, SNR in [-10, 30] / [-10, 20] dB, low-pass ratio in [2, 12], random or
  regular line masking, ~50 % of images corrupted, magnitude rescaled to [0, 1]).

Two kinds are opt-in (:data:`OPT_IN_KINDS`, off unless a config names them): phase-encode
ghosting (N/2 and periodic ghosts) and thick-slice anisotropy (issue 17).

The package depends on nothing in qcflow but torch (TorchIO and Lightning only for their
adapters).

Modules:
    functional: FFT primitives -- smooth sizes, pruned half-spectrum transforms, SNR, bias field.
    params: explicit per-kind parameters and the JSON record (kinds, parameters, severity).
    motion: the Shaw et al. 2019 rigid-motion model, batched resampling, TorchIO conversion.
    pipeline: the fused pipeline :func:`apply_artifacts`.
    single: one kind at a time (``add_noise``, ``add_ghosting``...), through the pipeline.
    slices: the thick-slice (anisotropic) acquisition map.
    ranges: one strength-range class per kind, and their interpolation.
    sampler: :class:`RandomArtifacts` (which kinds, probabilities, seeding).
    torchio_adapter: TorchIO transforms (imported lazily: ``qcflow.kspace.torchio_adapter``).
    lightning: the batched accelerator path (``qcflow.kspace.lightning``).
"""

from __future__ import annotations

from qcflow.kspace.functional import (
    fft_roundtrip,
    foreground_mean,
    measure_snr_db,
    smooth_size,
    snr_db_to_sigma,
)
from qcflow.kspace.motion import torchio_motion_to_params
from qcflow.kspace.params import (
    KINDS,
    OPT_IN_KINDS,
    SHAW2021_KINDS,
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
from qcflow.kspace.sampler import (
    AnisotropyRange,
    BiasRange,
    BlurRange,
    GhostingRange,
    MotionRange,
    NoiseRange,
    RandomArtifacts,
    SpikeRange,
    WrapRange,
)
from qcflow.kspace.single import (
    add_ghosting,
    add_motion,
    add_noise,
    add_spikes,
    add_thick_slices,
    apply_bias,
    lowpass,
    mask_lines,
)

__all__ = [
    "KINDS",
    "OPT_IN_KINDS",
    "SHAW2021_KINDS",
    "AnisotropyParams",
    "AnisotropyRange",
    "ArtifactParams",
    "BiasParams",
    "BiasRange",
    "BlurParams",
    "BlurRange",
    "GhostingParams",
    "GhostingRange",
    "MotionParams",
    "MotionRange",
    "NoiseParams",
    "NoiseRange",
    "RandomArtifacts",
    "SpikeParams",
    "SpikeRange",
    "WrapParams",
    "WrapRange",
    "add_ghosting",
    "add_motion",
    "add_noise",
    "add_spikes",
    "add_thick_slices",
    "apply_artifacts",
    "apply_bias",
    "fft_roundtrip",
    "foreground_mean",
    "lowpass",
    "mask_lines",
    "measure_snr_db",
    "smooth_size",
    "snr_db_to_sigma",
    "torchio_motion_to_params",
]
