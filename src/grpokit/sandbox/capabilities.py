"""What isolation the sandbox gets on this machine, checked by starting a worker."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

logger = logging.getLogger("grpokit.sandbox")

_warned = False
_warn_lock = threading.Lock()


@dataclass(frozen=True)
class Capabilities:
    """The isolation a sandbox worker achieved, as observed from inside it."""

    platform: str
    namespaces: bool
    """New namespaces (mount, network, PID) could be created."""
    network_isolated: bool
    """No network interface but an unconfigured loopback: no connection leaves the worker, not
    even to 127.0.0.1 of the host."""
    pid_isolated: bool
    """The worker is PID 1 of its own PID namespace: killing it kills everything it started."""
    filesystem_read_only: bool
    """Every mount is read-only inside, except the worker's private folder (and
    `writable_mounts`)."""
    writable_mounts: tuple[str, ...]
    """Mounts that could not be made read-only."""
    proc_private: bool
    """`/proc` shows the worker's own processes only (not the trainer and its environment)."""
    user: str
    """`"nobody"`, `"root without capabilities"` or `"unchanged"` (the trainer's own user)."""
    capabilities_dropped: bool
    """The worker holds no Linux capabilities."""
    rlimits: tuple[str, ...]
    """The resource limits the platform offers (`RLIMIT_CPU`, `RLIMIT_AS`, ...)."""
    bwrap: str | None
    """Path of a bubblewrap binary, if one is installed (used when the sandbox's own namespaces
    are refused and bubblewrap's work)."""
    errors: tuple[str, ...]
    """Why a step of the set-up failed."""

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> Capabilities:
        """From a worker's set-up report."""
        return cls(
            platform=sys.platform,
            namespaces=bool(report.get("namespaces")),
            network_isolated=bool(report.get("network_isolated")),
            pid_isolated=bool(report.get("pid_isolated")),
            filesystem_read_only=bool(report.get("filesystem_read_only")),
            writable_mounts=tuple(report.get("writable_mounts", ())),
            proc_private=bool(report.get("proc_private")),
            user=str(report.get("user", "unchanged")),
            capabilities_dropped=report.get("capabilities", 0) == 0,
            rlimits=tuple(report.get("rlimits", ())),
            bwrap=shutil.which("bwrap"),
            errors=tuple(report.get("errors", ())),
        )

    @property
    def missing(self) -> tuple[str, ...]:
        """One line per protection this machine does not give, empty when all are there."""
        lines = []
        if not self.network_isolated:
            lines.append("no network namespace: sandboxed code can open network connections")
        if not self.filesystem_read_only:
            who = "root's" if self.user == "root without capabilities" else "this user's"
            if self.user == "nobody":
                who = "world-writable"
            lines.append(f"no read-only mounts: sandboxed code can write to {who} files")
        elif self.writable_mounts:
            lines.append(f"mounts left writable: {', '.join(self.writable_mounts)}")
        if not self.pid_isolated:
            lines.append(
                "no PID namespace: processes the code detaches are killed after each call only "
                "on Linux, and survive a killed worker"
            )
        if not self.proc_private:
            lines.append("no private /proc: sandboxed code can list the machine's processes")
        if self.user != "nobody":
            lines.append(
                "files readable by the trainer's user are readable by sandboxed code"
                if self.user == "unchanged"
                else "sandboxed code reads files as root (the interpreter is not readable by "
                "nobody), though without capabilities"
            )
        for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
            if name not in self.rlimits:
                lines.append(f"no {name}")
        return tuple(lines)

    def summary(self) -> str:
        """One line: what is isolated and what is not."""
        have = [
            label
            for label, on in (
                ("network namespace", self.network_isolated),
                ("PID namespace", self.pid_isolated),
                ("read-only mounts", self.filesystem_read_only),
                ("private /proc", self.proc_private),
                (f"user {self.user}", self.user != "unchanged"),
                ("no capabilities", self.capabilities_dropped),
                ("rlimits " + ",".join(r.removeprefix("RLIMIT_") for r in self.rlimits), True),
            )
            if on
        ]
        text = "sandbox: " + "; ".join(have)
        if self.missing:
            text += ". Missing: " + "; ".join(self.missing)
            if self.errors:
                text += f" ({'; '.join(self.errors)})"
        return text


@cache
def capabilities() -> Capabilities:
    """The isolation available here, found by starting (and stopping) one sandbox worker; cached
    for the process."""
    from grpokit.sandbox.worker import SandboxWorker

    with SandboxWorker() as worker:
        return Capabilities.from_report(worker.report)


def warn_missing_isolation(caps: Capabilities) -> None:
    """Log, once per process, what isolation this machine lacks (nothing if it lacks none)."""
    global _warned
    with _warn_lock:
        if _warned or not caps.missing:
            return
        _warned = True
    logger.warning("%s", caps.summary())
