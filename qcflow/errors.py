"""Exceptions whose message is a one-line, user-actionable reason."""

from __future__ import annotations

__all__ = ["QCFlowError", "ScanError", "ConfigError", "BadFileError"]


class QCFlowError(Exception):
    """A failure the user can act on; the CLI prints ``str(exc)`` on one line and exits 1."""


class ScanError(QCFlowError, ValueError):
    """One scan cannot be used. ``str(exc)`` is ``"<path>: <reason>"``.

    Args:
        path: the offending file.
        reason: short, lower-case description of what is wrong with it.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(QCFlowError, ValueError):
    """The configuration is invalid (unknown task, impossible value, missing model...)."""


class BadFileError(QCFlowError, ValueError):
    """A file qcflow was given to load (a model bundle, a checkpoint) is unusable.

    ``str(exc)`` is ``"<path>: <reason>"``, one line.

    Args:
        path: the offending file.
        reason: short, lower-case description of what is wrong with it.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
