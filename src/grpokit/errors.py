"""Errors that ask the user to change something: a config value, a data file, a path, a disk.

The `grpokit` command prints a `UserError` as one line, `grpokit: error: <what> (<fix>)`, and
exits with code 2 without a traceback (`--debug` shows it). Any other exception is a bug or an
unexpected failure and keeps its traceback. Each type also derives from the built-in exception a
caller of the Python API would catch for it (`ValueError`, `TypeError`, `KeyError`, `OSError`).

This module imports nothing from grpokit, so every layer may raise these.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

# errno of a failed write -> what it means for the user; the fix is in `output_write_error`.
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class UserError(Exception):
    """A mistake in the user's input or setup; the message names it and says how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value that cannot be used; the message names the field, the value and the fix."""


class DataError(UserError, ValueError):
    """A dataset or prompt that cannot be used (format, columns, length)."""


class PromptFormatError(DataError, TypeError):
    """A prompt that is neither a string nor a list of `{"role", "content"}` messages."""


class MissingColumnError(DataError, KeyError):
    """A dataset without a column grpokit needs (e.g. `prompt`)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class OutputError(UserError, OSError):
    """The output folder cannot be written: read-only, no permission, or the disk is full."""


def output_write_error(error: BaseException, path: str | Path) -> OutputError | None:
    """An `OutputError` for a write that failed because of the disk or permissions, else None.

    Recognised: an `OSError` whose errno is in `WRITE_ERRNOS`; an error of a library that writes
    files itself and puts the errno in its message (safetensors: "os error 28"); torch's archive
    writer failing ("inline_container.cc", no errno) while the disk of `path` is nearly full.

    Args:
        error: The exception a write raised.
        path: The output folder (named when the error does not name a file).

    Returns:
        An `OutputError` naming the path, the cause and what to do; None for anything else (not
        the user's to fix: let it propagate with its traceback).
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None:
        match = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
        if match:
            code = int(match.group(1) or match.group(2))
        elif "inline_container" in str(error) and _free_bytes(path) < LOW_DISK_BYTES:
            code = errno.ENOSPC
    cause = WRITE_ERRNOS.get(code or 0)
    if cause is None:
        return None
    where = getattr(error, "filename", None) or str(path)
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space, or set --output_dir to a disk with room"
    else:
        fix = "make it writable, or set --output_dir to a folder you can write"
    return OutputError(f"cannot write {where}: {cause} ({fix}).")


LOW_DISK_BYTES = 64 << 20
"""Free space below which a torch write failure without an errno is taken for a full disk."""


def _free_bytes(path: str | Path) -> int:
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn a write that fails for a full disk or missing permissions into an `OutputError`.

    Args:
        path: The output folder the enclosed code writes into.

    Raises:
        OutputError: from `output_write_error`; every other exception passes unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        converted = output_write_error(error, path)
        if converted is None:
            raise
        raise converted from error
