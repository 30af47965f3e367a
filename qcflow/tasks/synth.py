"""Task ``synth``: build (or reuse) the embedded default dataset."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from qcflow.data.synth import ensure_embedded


def run(cfg: DictConfig) -> dict[str, Any]:
    root, info = ensure_embedded(cfg.data.embedded, return_info=True)
    print(f"embedded dataset: {root}")
    return {"root": str(root), **info}
