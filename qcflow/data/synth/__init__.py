"""The embedded default dataset: synthetic T1w heads from nilearn's MNI152 tissue maps.

qcflow must run out of the box on a machine without network, so its default data is generated
on first use from the MNI152 template files that ship inside nilearn, and cached under the data
root. :func:`ensure_embedded` returns the folder, building it if needed::

    <dir>/mni2mm_n150_s0_<hash8>/
      dataset_complete.json                 completion marker (+ config, counts, build time)
      cohorts.json                          the acquisition table used
      train/ test_clean/ test_artifact/     three BIDS datasets, each with
        dataset_description.json  participants.tsv  participants.json  artifacts.tsv
        sub-001/anat/sub-001_T1w.nii.gz
        derivatives/labels/dataset_description.json
        derivatives/labels/sub-001/anat/sub-001_label-GM_mask.nii.gz     uint8 GM ground truth
        derivatives/labels/sub-001/anat/sub-001_label-GM_probseg.nii.gz  float32 warped GM prob.
        derivatives/labels/sub-001/anat/sub-001_desc-brain_mask.nii.gz   uint8 brain mask

Generative model, per scan (every draw from a per-scan seed, so two builds with one config are
voxel-identical), one module per step:

====================  ========================================================================
module                what it holds
====================  ========================================================================
``anatomy``           the head model (MNI152 GM/WM/mask plus synthetic CSF, skull, scalp and
                      neck) and the subject deformation (affine + smooth displacement)
``acquisition``       the cohort table (sites/scanners) and the acquisition physics: grid,
                      bias field, k-space noise and truncation, padding and scale
``artifacts``         the dataset's artifact kinds, their severity ranges and parameter draws,
                      and where each acts (:data:`ARTIFACT_KINDS`, :data:`UNSIMULATED_KINDS`)
``variation``         ``data.embedded.variation``: ``cohort`` (default: per-cohort contrast and
                      acquisition, small jitter) or ``wide`` (SynthSeg-style: contrast, atrophy,
                      shape, head layers, acquisition and S coverage drawn per subject)
``scan``              one scan, assembled in physical order (:func:`synthesize_scan`)
``bids``              writing a scan and a split's tables as BIDS
``build``             the config, the plan of scans per split, the build and its cache
                      (:func:`ensure_embedded`)
====================  ========================================================================

``artifacts.tsv`` records kind, severity, the continuous ``severity_value`` and every sampled
parameter (JSON: ``subject`` = anatomy/acquisition draws, ``artifact`` = the artifact's; axes
are RAS axes of the generated grid, before reorientation). Clean scans have ``kind=none``,
``severity=0``, ``severity_value=0``.
"""

from __future__ import annotations

from qcflow.data.synth.acquisition import COHORTS, Cohort
from qcflow.data.synth.anatomy import CHANNELS, TISSUES, head_model
from qcflow.data.synth.artifacts import (
    ARTIFACT_KINDS,
    SEVERITY_RANGES,
    UNSIMULATED_KINDS,
    sample_artifact,
)
from qcflow.data.synth.build import (
    GENERATOR_VERSION,
    SPLITS,
    EmbeddedConfig,
    build_embedded,
    embedded_name,
    ensure_embedded,
    plan_scans,
)
from qcflow.data.synth.scan import ScanSpec, synthesize_scan
from qcflow.data.synth.variation import VARIATIONS

__all__ = [
    "GENERATOR_VERSION",
    "ARTIFACT_KINDS",
    "UNSIMULATED_KINDS",
    "SEVERITY_RANGES",
    "SPLITS",
    "VARIATIONS",
    "TISSUES",
    "CHANNELS",
    "Cohort",
    "COHORTS",
    "EmbeddedConfig",
    "ScanSpec",
    "ensure_embedded",
    "build_embedded",
    "embedded_name",
    "head_model",
    "plan_scans",
    "sample_artifact",
    "synthesize_scan",
]
