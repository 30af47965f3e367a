"""Atomic file and folder writes (a reader never sees a half-written output); flat scalars."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "atomic_dir",
    "atomic_path",
    "flatten_scalars",
]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success rename it onto ``path``.

    The rename is atomic on POSIX, so ``path`` either holds the old content or the complete
    new content. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (non-JSON values go through ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``path``.

    If ``path`` appeared meanwhile (another process finished first) the new folder is
    discarded and the existing one is kept: both were built from the same inputs.
    An interrupted build leaves only a ``.<name>.tmp-*`` folder that nothing trusts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def flatten_scalars(d: Mapping[str, Any], prefix: str = "", finite: bool = False) -> dict[str, Any]:
    """Nested mappings -> ``{"a.b": scalar}``; lists and other objects are dropped.

    Args:
        finite: keep only finite numbers (drops ``None`` and NaN/inf: W&B summaries); by
            default ``None`` and NaN are kept (sweep tables show them as missing).
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_scalars(v, f"{key}.", finite))
        elif isinstance(v, (bool, int, str)):
            out[key] = v
        elif isinstance(v, float):
            if math.isfinite(v) or not finite:
                out[key] = v
        elif v is None and not finite:
            out[key] = v
    return out
