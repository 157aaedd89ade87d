"""`grpokit.errors`: user-error types and the conversion of failed writes into one clear line."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from grpokit.errors import (
    ConfigError,
    DataError,
    MissingColumnError,
    OutputError,
    PromptFormatError,
    UserError,
    output_errors,
    output_write_error,
)


def test_user_errors_are_also_the_builtin_errors_api_callers_catch() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(PromptFormatError, TypeError) and issubclass(MissingColumnError, KeyError)
    assert issubclass(OutputError, OSError)
    for cls in (ConfigError, DataError, PromptFormatError, MissingColumnError, OutputError):
        assert issubclass(cls, UserError)
    assert str(MissingColumnError("no 'prompt' column")) == "no 'prompt' column"  # not quoted


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (
            errno.ENOSPC,
            "the disk is full (free disk space, or set --output_dir to a disk with room)",
        ),
        (errno.EDQUOT, "the disk quota is exceeded (free disk space"),
        (errno.EROFS, "the file system is read-only (make it writable, or set --output_dir"),
        (errno.EACCES, "permission denied (make it writable, or set --output_dir"),
    ],
)
def test_os_errors_of_a_write_name_the_file_cause_and_fix(code: int, text: str) -> None:
    error = OSError(code, "strerror", "/runs/x/checkpoint-2/optimizer.pt")
    converted = output_write_error(error, "/runs/x")
    assert converted is not None
    assert str(converted).startswith(f"cannot write /runs/x/checkpoint-2/optimizer.pt: {text}")
    # Without a file name the output folder is named.
    assert str(output_write_error(OSError(code, "strerror"), "/runs/x")).startswith(
        f"cannot write /runs/x: {text}"
    )


def test_library_write_errors_are_recognised_by_their_errno_or_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors reports the errno only in its message.
    safetensors = RuntimeError("Error while serializing: I/O error: No space left (os error 28)")
    assert "the disk is full" in str(output_write_error(safetensors, tmp_path))
    # torch's archive writer gives no errno: a full disk is taken as the cause only when the
    # output disk is indeed (nearly) full.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704")
    assert output_write_error(torch_error, tmp_path / "not" / "yet") is None  # plenty of room
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    assert "the disk is full" in str(output_write_error(torch_error, tmp_path / "not" / "yet"))


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    assert output_write_error(OSError(errno.ENOENT, "No such file"), tmp_path) is None
    assert output_write_error(ValueError("bug"), tmp_path) is None
    with pytest.raises(KeyError), output_errors(tmp_path):
        raise KeyError("a bug keeps its type and traceback")
    with pytest.raises(ConfigError), output_errors(tmp_path):
        raise ConfigError("user errors pass as they are")
    full = r"^cannot write .*: the disk is full"
    with pytest.raises(OutputError, match=full) as caught, output_errors(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))
    assert isinstance(caught.value.__cause__, OSError)  # the original stays for --debug
