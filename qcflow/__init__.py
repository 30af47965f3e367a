"""qcflow: unsupervised, task-aware MRI quality control (PyTorch Lightning + Hydra).

``qcflow.score(paths_or_dir, models=...)`` scores scans from Python (see :mod:`qcflow.api`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "score"]


def score(*args: Any, **kwargs: Any) -> Any:
    """Score scans; see :func:`qcflow.api.score` (imported lazily: torch is heavy)."""
    from qcflow.api import score as _score

    return _score(*args, **kwargs)
