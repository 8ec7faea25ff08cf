"""Errors that point the user at the file, line or setting to fix, and how a command reports them."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

USER_ERROR_EXIT_CODE = 2
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DataError(ValueError):
    """Bad input data; the message names the file and, where known, the line."""

    def __init__(self, path: object, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting to change."""


class TrainingDiverged(ConfigError):
    """Training produced non-finite gradients step after step; the message names the settings to change."""


class RetrievalError(RuntimeError):
    """The retriever could not answer (missing index, JVM failure, ...)."""


def first_line(error: BaseException, default: str = "") -> str:
    """The first non-blank line of `error`'s message, stripped (libraries put the gist there, details below)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), default)


def user_error(error: BaseException | None) -> BaseException | None:
    """The DataError, ConfigError or full-disk OSError behind `error`, else None (a bug, whose traceback helps).

    OmegaConf wraps an error raised by a resolver (`data.dir` of `data=jsonl`) in its own exception without a
    cause, so for OmegaConf's and Hydra's exceptions the exception being handled when they were raised counts too."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DataError | ConfigError):
            return error
        if isinstance(error, OSError) and error.errno in FULL_DISK_ERRNOS:
            return error
        wrapper = type(error).__module__.split(".")[0] in ("omegaconf", "hydra")
        error = error.__cause__ or (error.__context__ if wrapper else None)
    return None


@contextmanager
def user_errors_reported() -> Iterator[None]:
    """End a command on a user's mistake (a bad file or setting, a full disk) with its message alone and exit code
    2, no traceback; any other exception keeps its traceback. `HYDRA_FULL_ERROR=1` shows every traceback."""
    try:
        yield
    except Exception as error:
        found = user_error(error)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        advice = "; free some space and rerun the same command" if isinstance(found, OSError) else ""
        print(f"Error: {found}{advice}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
