"""Atomic file and folder writes (a reader never sees a half-written output), bounded reading of
files that other people hand us, and flat scalars.

Writes honour the process umask: ``tempfile.mkstemp``/``mkdtemp`` create 0600/0700 entries, which
would hide a report, a shared cache or a shared dataset from colleagues, so the temporary entry
is given the mode a plain ``open``/``mkdir`` would have (0666/0777 minus the umask) before it is
renamed into place.

Reading never blocks and never runs away: :func:`open_regular` opens only regular files (after
resolving symbolic links, checked again on the open descriptor) with ``O_NONBLOCK``, so a FIFO, a
device such as ``/dev/zero`` or a socket is refused with a reason instead of hanging or filling
memory; callers compare the descriptor's size with their cap before reading.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import tempfile
import threading
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
    "open_regular",
    "NotRegularFileError",
    "format_bytes",
    "one_line",
    "current_umask",
]

_UMASK_LOCK = threading.Lock()

#: what ``stat`` says a path is, for the reason a non-regular file is refused
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


class NotRegularFileError(OSError):
    """The path is not a regular file (a FIFO, a device, a socket, a folder)."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, what in _KINDS:
        if test(mode):
            return what
    return "not a regular file"


def open_regular(path: str | Path):  # noqa: ANN201 - a binary file object
    """Open ``path`` for binary reading if (after resolving symbolic links) it is a regular file.

    The check is made on the path and again on the opened descriptor (so a file swapped for a
    FIFO in between is caught), and the file is opened with ``O_NONBLOCK``: opening a FIFO never
    waits for a writer.

    Raises:
        FileNotFoundError: nothing at ``path`` (or a broken symbolic link).
        NotRegularFileError: ``path`` is a FIFO, a device, a socket or a folder; the message
            says which.
        PermissionError, OSError: as ``os.open``.
    """
    path = Path(path)
    st = os.stat(path)  # follows symbolic links
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(f"not a regular file ({_kind(st.st_mode)})")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"not a regular file ({_kind(st.st_mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def format_bytes(n: int) -> str:
    """``n`` bytes for a message: ``"12.3 MB"`` below 1 GiB, else ``"64.0 GB"`` (binary units)."""
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.1f} GB"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed), at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success rename it onto ``path``.

    The rename is atomic on POSIX, so ``path`` either holds the old content or the complete
    new content. On error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from colleagues
    finally:
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
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from colleagues
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
