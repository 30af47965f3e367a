"""Files of tensors that qcflow writes and reads back, loaded without unpickling.

``torch.load`` unpickles by default in older torch releases and whenever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set and the call site does not say otherwise: a crafted
``flow.pt``, cache entry or checkpoint then runs its payload. Every qcflow load goes through this
module and passes ``weights_only=True`` explicitly (which that variable cannot override), so a
file may hold only tensors, numbers, strings, ``None`` and lists/tuples/dicts of them; anything
else is refused with one line naming the file (:class:`~qcflow.errors.BadFileError`) and is
never executed. Files are opened with :func:`~qcflow.utils.io.open_regular` (no FIFO, device or
oversized file) first.

Caches (:func:`save_checked` / :func:`load_checked`) additionally store their key and a SHA-256
of their content: an entry that was damaged, truncated, copied under another name or edited is
a miss (recomputed), never an error and never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qcflow.errors import BadFileError
from qcflow.utils.io import atomic_path, one_line, open_regular

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_CHECKPOINT_BYTES",
    "load_tensors",
    "load_checkpoint",
    "content_hash",
    "save_checked",
    "load_checked",
]

log = logging.getLogger(__name__)

#: largest flow bundle / cache entry read (bytes); a 1 mm preprocessed volume is ~35 MB
MAX_BUNDLE_BYTES = 1 << 30
#: largest checkpoint read (bytes); DenseNet-121 is ~30 MB, the paper-size U-Net a few hundred
MAX_CHECKPOINT_BYTES = 4 << 30
#: format tag of cache files written by :func:`save_checked`
_CACHE_FORMAT = "qcflow-cache-1"


def _open(path: Path, max_bytes: int, what: str):  # noqa: ANN202 - a binary file object
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise BadFileError(path, f"{what} not found") from None
    except OSError as exc:  # not a regular file, permission denied, ...
        raise BadFileError(path, f"cannot read {what} ({exc.strerror or one_line(exc)})") from None
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        f.close()
        raise BadFileError(
            path, f"{what} is {size / 2**20:.0f} MB, over the {max_bytes >> 20} MB limit"
        )
    return f


def _refusal(path: Path, what: str, exc: BaseException) -> BadFileError:
    text = " ".join(str(exc).split())
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip()  # torch's own reason
    if "unsupported global" in text.lower() or "reduce" in detail.lower():
        return BadFileError(
            path,
            f"not a plain {what}: it holds Python objects other than tensors, numbers and "
            "strings, which qcflow never unpickles (the file was not run)",
        )
    return BadFileError(path, f"unreadable {what} ({(detail or type(exc).__name__)[:120]})")


def load_tensors(path: str | Path, what: str = "bundle", max_bytes: int = MAX_BUNDLE_BYTES) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, from a regular file of bounded size.

    Args:
        path: the file.
        what: what the file is, for the message (``"flow bundle"``).
        max_bytes: refuse larger files without reading them.

    Raises:
        BadFileError: missing, not a regular file, too large, holding objects other than
            tensors and plain data (the payload is not executed), or not a torch file.
    """
    path = Path(path)
    with _open(path, max_bytes, what) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
            raise _refusal(path, what, exc) from None


def load_checkpoint(
    module_class: Any, path: str | Path, what: str = "checkpoint", **kwargs: Any
) -> Any:
    """``module_class.load_from_checkpoint`` with ``weights_only=True`` and one-line errors.

    Args:
        module_class: a ``LightningModule`` subclass.
        path: the ``.ckpt`` file (regular, at most :data:`MAX_CHECKPOINT_BYTES`).
        what: what the file should be, for the message.
        **kwargs: passed to ``load_from_checkpoint`` (``map_location`` defaults to CPU).

    Raises:
        BadFileError: the file is missing, not a regular file, too large, holds objects other
            than tensors and plain data, or is not a checkpoint of ``module_class``.
    """
    path = Path(path)
    kwargs.setdefault("map_location", "cpu")
    with _open(path, MAX_CHECKPOINT_BYTES, what) as f:
        try:
            return module_class.load_from_checkpoint(f, weights_only=True, **kwargs)
        except BadFileError:
            raise
        except Exception as exc:
            raise _refusal(path, what, exc) from None


def _feed(h: Any, obj: Any) -> None:
    """Update ``h`` with a canonical, type-tagged encoding of plain data and tensors."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(f"S{len(b)}:".encode() + b)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"P{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot store a {type(obj).__name__} in a qcflow file (plain data only)")


def content_hash(obj: Any) -> str:
    """SHA-256 (hex) of tensors and plain data (dict order does not matter, types do)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_checked(path: str | Path, key: str, payload: Any) -> Path:
    """Write a cache entry atomically: ``payload`` (tensors and plain data), its key and hash."""
    entry = {"format": _CACHE_FORMAT, "key": key, "sha256": content_hash(payload)}
    with atomic_path(path) as tmp:
        torch.save({**entry, "payload": payload}, tmp)
    return Path(path)


def load_checked(path: str | Path, key: str, max_bytes: int = MAX_BUNDLE_BYTES) -> Any | None:
    """The payload of a :func:`save_checked` entry, or ``None`` (a miss).

    Missing files are a silent miss; an entry that is unreadable, of another format, written
    under another key, or whose content no longer matches its hash is a miss with one warning
    line. Nothing in the file is executed.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        entry = load_tensors(path, "cache entry", max_bytes)
        ok = (
            isinstance(entry, dict)
            and entry.get("format") == _CACHE_FORMAT
            and entry.get("key") == key
            and "payload" in entry
            and entry.get("sha256") == content_hash(entry["payload"])
        )
        if ok:
            return entry["payload"]
        reason = "stale or altered (key or content hash does not match)"
    except BadFileError as exc:
        reason = exc.reason
    except TypeError as exc:
        reason = one_line(exc)
    log.warning("%s: cache entry not used, recomputing: %s", path, reason)
    return None
