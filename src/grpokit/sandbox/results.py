"""Limits of sandboxed calls and their results."""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Any

_SIGNAL_NAMES = {int(s): s.name for s in signal.Signals}


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker would not start), as opposed to the code it ran."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of each call in the sandbox (`None`: no limit of that kind).

    The rlimits apply to the call's process and are inherited by every process it starts.
    """

    timeout: float = 10.0
    """Wall-clock seconds before the call's whole process group is killed (SIGKILL)."""
    cpu_seconds: int | None = 10
    """CPU seconds per process (RLIMIT_CPU): SIGXCPU at the limit, SIGKILL a second later."""
    memory_bytes: int | None = 2 << 30
    """Address space per process (RLIMIT_AS); past it allocations fail (`MemoryError`)."""
    max_processes: int | None = 32
    """New processes and threads the call may start (RLIMIT_NPROC, set to the user's current
    count plus this; it counts per user, so the figure is approximate)."""
    max_file_bytes: int | None = 16 << 20
    """Largest file the call may write (RLIMIT_FSIZE); a larger write fails (`EFBIG`)."""
    max_open_files: int | None = 64
    """Open file descriptors per process (RLIMIT_NOFILE)."""
    max_output_bytes: int = 64 << 10
    """stdout and stderr are each cut to this many bytes (`truncated` says so)."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"SandboxLimits.timeout must be > 0 seconds, got {self.timeout}.")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "timeout" and value is not None and value < 0:
                raise ValueError(f"SandboxLimits.{field.name} must be >= 0, got {value}.")


@dataclass(frozen=True)
class SandboxResult:
    """What one run of code in the sandbox did."""

    stdout: str
    stderr: str
    exit_code: int | None
    """The process's exit status; `None` when a signal ended it."""
    timed_out: bool
    """The wall-clock timeout expired and the process group was killed."""
    killed_by: str | None
    """The signal that ended the process (`"SIGKILL"`, `"SIGXCPU"`, `"SIGSEGV"`, ...), if any."""
    duration: float
    """Wall-clock seconds from the call's start to its end."""
    truncated: bool
    """stdout or stderr was longer than `max_output_bytes` and was cut."""

    @property
    def ok(self) -> bool:
        """The code ran to completion and exited with status 0."""
        return self.exit_code == 0 and not self.timed_out


@dataclass(frozen=True)
class CallResult(SandboxResult):
    """A trusted function's result on untrusted data, from the sandbox."""

    value: Any = None
    """The function's return value, through JSON."""
    error: str | None = None
    """`"ExceptionType: message"` when the function raised, or why there is no value."""

    @property
    def ok(self) -> bool:
        """The function returned a value."""
        return self.error is None and self.exit_code == 0 and not self.timed_out

    @property
    def crashed(self) -> bool:
        """The call did not finish normally: timed out, killed by a signal, or exited without a
        result (as opposed to the function raising an exception, which is an ordinary error)."""
        return self.timed_out or self.killed_by is not None or self.exit_code != 0


def failed_result(message: str, duration: float, timed_out: bool = False) -> SandboxResult:
    """The result of a call whose worker died, hung or would not start."""
    return SandboxResult(
        stdout="",
        stderr=message,
        exit_code=None,
        timed_out=timed_out,
        killed_by="SIGKILL" if timed_out else None,
        duration=duration,
        truncated=False,
    )


def process_fields(reply: dict[str, Any]) -> dict[str, Any]:
    """`SandboxResult`'s fields from a worker's reply."""
    signum = reply.get("signal")
    return {
        "stdout": reply["stdout"],
        "stderr": reply["stderr"],
        "exit_code": reply["exit_code"],
        "timed_out": reply["timed_out"],
        "killed_by": None if signum is None else _SIGNAL_NAMES.get(signum, f"signal {signum}"),
        "duration": reply["duration"],
        "truncated": reply["truncated"],
    }


def why_no_result(fields: dict[str, Any]) -> str:
    """Why a call that ended without a result did (for `CallResult.error`)."""
    if fields["timed_out"]:
        return "timed out"
    if fields["killed_by"] is not None:
        return f"killed by {fields['killed_by']}"
    return f"exited with status {fields['exit_code']} before returning"
