"""Errors that point the user at the file, line or setting to fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the line."""

    def __init__(self, path: object, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting to change."""


class RetrievalError(RuntimeError):
    """The retriever could not answer (missing index, JVM failure, ...)."""
