"""Method B's retired switches, as plain data (no torch, no Lightning).

The command line refuses an override that sets one (:func:`qcflow.cli.renamed_override`) and
:mod:`qcflow.lit.uncertainty.legacy` checks old checkpoints against the same table; kept apart
from both so that the check on every command line does not import the networks.
"""

from __future__ import annotations

__all__ = ["RETIRED", "RETIRED_OVERRIDES"]

#: retired switches (README of experiments/shaw2021_uncertainty, "Switches") and when they had
#: no effect
RETIRED = {
    "kind_aux_weight": "0 (no kind-presence loss)",
    "context_lr_mult": "0 with a context branch (frozen), any value without one",
    "student_targets": "corrupted, or own_kind with absent_kind_var=zero (the same targets)",
    "absent_kind_var": "free (teachers only; without negatives)",
    "net.context_max_offset": "any, unless context=True without attribution (offsets)",
}


#: the config paths of the retired switches (with the teachers' negatives, a sampler setting;
#: absent_kind_var stays the student's)
RETIRED_OVERRIDES = (
    *(f"uncertainty.module.{k}" for k in RETIRED if k != "absent_kind_var" and "." not in k),
    *(f"model.{k.removeprefix('net.')}" for k in RETIRED if k.startswith("net.")),
    "uncertainty.teacher_negatives",
    "uncertainty.negative_kinds",
)
