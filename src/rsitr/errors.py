"""Error types. Every user-facing failure is one line that names the file, line or field."""

from __future__ import annotations

from pathlib import Path


class RsitrError(Exception):
    """Base class for errors that the CLI reports as one line with exit code 2."""


class DataError(RsitrError, ValueError):
    """Bad input data: names the file and, where known, the line or field.

    Args:
        message: what is wrong.
        path: the offending file.
        line: 1-based line number in ``path``, if any.
        field: the offending field or key, if any.
    """

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        where = ""
        if self.path is not None:
            where = self.path if line is None else f"{self.path}:{line}"
        if field is not None:
            where = f"{where} [{field}]" if where else f"[{field}]"
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(RsitrError, ValueError):
    """An invalid option or config value; the message names the field and what is allowed."""


class MissingDependencyError(RsitrError, ImportError):
    """An optional dependency or weight file is missing; the message says what to install."""


class TrainingError(RsitrError, RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the loss term."""
