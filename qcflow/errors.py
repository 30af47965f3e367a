"""Exceptions whose message is a one-line, user-actionable reason."""

from __future__ import annotations

__all__ = ["QCFlowError", "FileError", "ScanError", "BadFileError", "ConfigError"]


class QCFlowError(Exception):
    """A failure the user can act on; the CLI prints ``str(exc)`` on one line and exits 1."""


class FileError(QCFlowError, ValueError):
    """One file cannot be used. ``str(exc)`` is ``"<path>: <reason>"``.

    Args:
        path: the offending file.
        reason: short, lower-case description of what is wrong with it.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ScanError(FileError):
    """An input scan cannot be used (missing, not NIfTI, corrupt, implausible...)."""


class BadFileError(FileError):
    """A file qcflow was given to load (a model bundle, a checkpoint) is unusable: missing,
    not a regular file, too large, malformed, or holding objects it never unpickles."""


class ConfigError(QCFlowError, ValueError):
    """The configuration is invalid (unknown task, impossible value, missing model...)."""
