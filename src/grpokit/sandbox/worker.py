"""The trainer's side of one sandbox worker process, and one-shot `run_python` / `call_in_sandbox`.

A `SandboxWorker` starts `python -I -S` on `_child.py` (the worker: isolation set-up, then a fork
server), talks to it over pipes with one JSON line per request and reply, and restarts it when it
dies. It is not thread-safe; `SandboxPool` shares several among threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from grpokit.sandbox.packages import link_packages
from grpokit.sandbox.results import (
    CallResult,
    SandboxError,
    SandboxLimits,
    SandboxResult,
    failed_result,
    process_fields,
    why_no_result,
)

Isolation = Literal["auto", "namespaces", "bwrap", "process"]
Call = tuple[str, str, Sequence[Any]]
"""`(module, function, args)` of a trusted function to call on untrusted arguments."""
ISOLATION_MODES = ("auto", "namespaces", "bwrap", "process")

_CHILD_SOURCE = (Path(__file__).parent / "_child.py").read_text()
# Past its own timeout a call gets this long to be reported before the worker counts as hung.
_REPLY_MARGIN = 10.0
_STARTUP_TIMEOUT = 300.0


def sandbox_environment(home: str) -> dict[str, str]:
    """The whole environment of sandboxed code: nothing is inherited from the trainer's."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


_auto_lock = threading.Lock()
_auto_choice: list[Isolation] = []  # what "auto" became on this machine, decided once


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _bwrap_command(work: str) -> list[str]:
    """bubblewrap's new network, PID, IPC and UTS namespaces, the whole filesystem read-only but
    `work`, a fresh `/dev` and `/proc`; the worker inside adds limits and drops privileges."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    return [
        bwrap,
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--bind",
        work,
        work,
        "--chdir",
        work,
        "--",
    ]


def _stop(process: subprocess.Popen[bytes], folder: str, log: Any) -> None:
    """Close the worker's input (it exits), then kill its process group and delete its folder."""
    if process.poll() is None:
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


class SandboxWorker:
    """One isolated worker process; runs calls one at a time, each in a fresh forked child.

    Args:
        limits: Resource limits of every call (the timeout can be changed per call).
        packages: Third-party packages importable inside (with what they require); the standard
            library always is, nothing else is.
        paths: Extra folders of trusted modules to put on the sandbox's `sys.path` (modules that
            wrap a verifier, say); they must not import from the trainer's packages.
        preload: Modules the worker imports once at start (trusted), so calls start warm.
        isolation: `"auto"` (namespaces where the platform allows; else bubblewrap's, if `bwrap`
            is installed and works; else process and limits only), `"namespaces"` (fail if
            unavailable), `"bwrap"` (through bubblewrap) or `"process"`.
    """

    def __init__(
        self,
        *,
        limits: SandboxLimits | None = None,
        packages: Sequence[str] = (),
        paths: Sequence[str | os.PathLike[str]] = (),
        preload: Sequence[str] = (),
        isolation: Isolation = "auto",
    ) -> None:
        if isolation not in ISOLATION_MODES:
            raise ValueError(
                f"sandbox isolation must be one of {ISOLATION_MODES}, got {isolation!r}."
            )
        self.limits = limits or SandboxLimits()
        self.packages = tuple(packages)
        self.paths = tuple(str(Path(p).resolve()) for p in paths)
        self.preload = tuple(preload)
        self.isolation = isolation
        self.report: dict[str, Any] = {}
        self._warm: list[tuple[str, str, list[Any]]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._finalizer: weakref.finalize | None = None
        self._start()

    # -- life cycle -------------------------------------------------------------------------

    def _start(self) -> None:
        mode = self.isolation
        if mode == "auto":
            with _auto_lock:
                if _auto_choice:
                    mode = _auto_choice[0]
                else:
                    mode = self._choose_auto()
                    _auto_choice.append(mode)
        self._launch(mode)

    def _choose_auto(self) -> Isolation:
        """Own namespaces where allowed; else bubblewrap, if installed and it isolates more."""
        self._launch("auto")
        if self.report["namespaces"] or shutil.which("bwrap") is None:
            return "auto"
        first = (self._process, self._buffer, self._finalizer, self.report)
        try:
            self._launch("bwrap")
        except SandboxError:
            self._process, self._buffer, self._finalizer, self.report = first
            return "auto"
        if self.report["network_isolated"]:
            assert first[2] is not None
            first[2]()  # stop the first worker: bubblewrap does better
            return "bwrap"
        self.close()
        self._process, self._buffer, self._finalizer, self.report = first
        return "auto"

    def _launch(self, mode: Isolation) -> None:
        folder = os.path.realpath(tempfile.mkdtemp(prefix="grpokit-sandbox-"))
        work = os.path.join(folder, "work")
        os.mkdir(work, 0o700)
        sys_path = list(self.paths)
        if self.packages:
            sys_path.insert(0, str(link_packages(Path(folder) / "site", self.packages)))
        config = {
            "work": work,
            "sys_path": sys_path,
            "preload": list(self.preload),
            "isolation": mode,
            "parent_pid_namespace": _pid_namespace(),
        }
        command = [sys.executable, "-I", "-S", "-c", _CHILD_SOURCE, json.dumps(config)]
        if mode == "bwrap":
            command = _bwrap_command(work) + command
        log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the finalizer)
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=work,
            env=sandbox_environment(work),
            start_new_session=True,
            close_fds=True,
        )
        self._process, self._buffer = process, b""
        self._finalizer = weakref.finalize(self, _stop, process, folder, log)
        ready = self._read_reply(time.monotonic() + _STARTUP_TIMEOUT)
        if ready is None or not ready.get("ready"):
            log.seek(0)
            detail = log.read().decode("utf-8", "replace")[-2000:]
            reason = ready.get("error") if ready else "no answer"
            self.close()
            raise SandboxError(f"the sandbox worker did not start: {reason}\n{detail}".strip())
        self.report = ready["isolation"]
        for module, function, args in self._warm:
            self._warm_one(module, function, args)

    def close(self) -> None:
        """Stop the worker and delete its folder (also done when the object is collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self._process = None

    def __enter__(self) -> SandboxWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        """The worker process is running."""
        return self._process is not None and self._process.poll() is None

    def _restart(self) -> None:
        self.close()
        self._start()

    # -- protocol ---------------------------------------------------------------------------

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, request: dict[str, Any], wait: float) -> dict[str, Any] | None:
        """One request and its reply; `None` (and a dead worker) when the worker died or hung."""
        try:
            line = json.dumps(request).encode() + b"\n"
        except (TypeError, ValueError) as error:
            raise TypeError(f"sandbox call arguments must be JSON-serialisable: {error}") from None
        if not self.alive:
            self._restart()
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return None
        reply = self._read_reply(time.monotonic() + wait)
        if reply is None:
            self.close()
        return reply

    def _call(
        self, request: dict[str, Any], timeout: float | None
    ) -> dict[str, Any] | SandboxResult:
        """The worker's reply, or a failed `SandboxResult` when the worker died or hung."""
        timeout = self.limits.timeout if timeout is None else timeout
        if not timeout > 0:
            raise ValueError(f"sandbox timeout must be > 0 seconds, got {timeout}.")
        request = {**request, "timeout": timeout, "limits": dataclasses.asdict(self.limits)}
        if self.limits.max_processes is not None:
            # RLIMIT_NPROC counts every task of the call's real user on the machine, and a worker
            # in its own PID namespace cannot see the others (other workers and pools): count
            # them here, so `max_processes` stays the number of *new* tasks a call may start.
            # The worker script's own counter; imported here, where it is needed, because the
            # script imports POSIX-only modules (`resource`) that `import grpokit` must not need.
            from grpokit.sandbox._child import NOBODY, user_tasks

            request["host_user_tasks"] = max(user_tasks(NOBODY), user_tasks(os.getuid()))
        calls = max(1, len(request.get("calls", ())))
        start = time.monotonic()
        try:
            reply = self._send(request, timeout * calls + _REPLY_MARGIN)
        except SandboxError as error:
            return failed_result(str(error), time.monotonic() - start)
        if reply is None:
            elapsed = time.monotonic() - start
            message = "the sandbox worker died or stopped answering; it was killed"
            return failed_result(message, elapsed, timed_out=elapsed >= timeout)
        return reply

    # -- public calls -----------------------------------------------------------------------

    def run_python(
        self, code: str, *, stdin: str | None = None, timeout: float | None = None
    ) -> SandboxResult:
        """Run `code` as a Python program (like `python -c code`) in a fresh child.

        Args:
            code: The program's source.
            stdin: Text on the program's standard input (empty if `None`).
            timeout: Wall-clock seconds; defaults to `limits.timeout`.
        """
        reply = self._call({"kind": "python", "code": code, "stdin": stdin}, timeout)
        return reply if isinstance(reply, SandboxResult) else SandboxResult(**process_fields(reply))

    def call(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> CallResult:
        """Call the trusted `module.function(*args, **kwargs)` on (untrusted) arguments.

        Arguments and the return value go through JSON. The function runs in a fresh child of the
        worker, so whatever the data makes it do stays there.
        """
        call = {"module": module, "function": function, "args": list(args), "kwargs": kwargs or {}}
        reply = self._call({"kind": "calls", "calls": [call]}, timeout)
        if isinstance(reply, SandboxResult):
            return CallResult(**dataclasses.asdict(reply), error=reply.stderr)
        fields = process_fields(reply)
        if not reply["results"]:
            return CallResult(**fields, error=why_no_result(fields))
        result = reply["results"][0]
        return CallResult(**fields, value=result.get("value"), error=result.get("error"))

    def call_many(self, calls: Sequence[Call], *, timeout: float | None = None) -> list[CallResult]:
        """Several calls in one child, one after the other: one fork instead of `len(calls)`.

        Each call still has its own `timeout`. A call that overruns it is reported as timed out
        and the calls after it run in a new child; when the child crashes (killed by a signal,
        out of CPU time, ...) the calls from the one that was running on are each run again in a
        child of their own, so that only the culprit fails. The price of sharing a child: a call
        can change the interpreter state that the later calls of the same chunk see.
        """
        if not calls:
            return []
        if len(calls) == 1:
            return [self.call(*calls[0], timeout=timeout)]
        request = {
            "kind": "calls",
            "calls": [
                {"module": m, "function": f, "args": list(a), "kwargs": {}} for m, f, a in calls
            ],
        }
        reply = self._call(request, timeout)
        if isinstance(reply, SandboxResult):  # the worker died: run each on its own
            return [self.call(*c, timeout=timeout) for c in calls]
        fields = process_fields(reply)
        done = [
            CallResult(
                stdout="",
                stderr="",
                exit_code=0,
                timed_out=False,
                killed_by=None,
                duration=result.get("duration", 0.0),
                truncated=False,
                value=result.get("value"),
                error=result.get("error"),
            )
            for result in reply["results"]
        ]
        if len(done) == len(calls):
            return done
        culprit = len(done)
        if fields["timed_out"]:
            overran = CallResult(**fields, error=why_no_result(fields))
            rest = self.call_many(calls[culprit + 1 :], timeout=timeout)
            return [*done, overran, *rest]
        return [*done, *(self.call(*c, timeout=timeout) for c in calls[culprit:])]

    def warm(self, module: str, function: str, args: Sequence[Any] = ()) -> None:
        """Run trusted `module.function(*args)` in the worker itself (not a child), so that every
        later call starts with its effect (a cache filled, a dataset built). Kept across
        restarts."""
        self._warm.append((module, function, list(args)))
        self._warm_one(module, function, list(args))

    def _warm_one(self, module: str, function: str, args: list[Any]) -> None:
        request = {"kind": "warm", "module": module, "function": function, "args": args}
        reply = self._send(request, _STARTUP_TIMEOUT)
        if reply is None or not reply.get("ok"):
            reason = reply.get("error") if reply else "the worker died"
            raise SandboxError(f"sandbox warm-up {module}.{function}{tuple(args)}: {reason}")


def run_python(
    code: str,
    *,
    stdin: str | None = None,
    timeout: float | None = None,
    limits: SandboxLimits | None = None,
    packages: Sequence[str] = (),
    isolation: Isolation = "auto",
) -> SandboxResult:
    """Run a Python program in a new sandbox worker (started and stopped for this one call).

    For many calls use a `SandboxPool`, whose workers stay up.

    Args:
        code: The program's source.
        stdin: Text on its standard input.
        timeout: Wall-clock seconds (default `limits.timeout`).
        limits: Resource limits (default `SandboxLimits()`).
        packages: Third-party packages the program may import (the standard library always).
        isolation: See `SandboxWorker`.
    """
    with SandboxWorker(limits=limits, packages=packages, isolation=isolation) as worker:
        return worker.run_python(code, stdin=stdin, timeout=timeout)


def call_in_sandbox(
    module: str,
    function: str,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float | None = None,
    limits: SandboxLimits | None = None,
    packages: Sequence[str] = (),
    paths: Sequence[str | os.PathLike[str]] = (),
    isolation: Isolation = "auto",
) -> CallResult:
    """Call a trusted function on untrusted data in a new sandbox worker.

    Args:
        module: Module of the function, importable inside the sandbox: from the standard library,
            `packages` or `paths`.
        function: The function's (dotted) name in `module`.
        args: Positional arguments (JSON-serialisable).
        kwargs: Keyword arguments (JSON-serialisable).
        timeout: Wall-clock seconds (default `limits.timeout`).
        limits: Resource limits (default `SandboxLimits()`).
        packages: Third-party packages to allow; defaults to `module`'s top-level package when
            that is not in the standard library or `paths`.
        paths: Folders of trusted modules to put on the sandbox's `sys.path`.
        isolation: See `SandboxWorker`.

    Returns:
        The `CallResult`; `value` holds the return value when `ok`.
    """
    top = module.split(".")[0]
    if not packages and not paths and top not in sys.stdlib_module_names:
        packages = (top,)
    with SandboxWorker(
        limits=limits, packages=packages, paths=paths, isolation=isolation
    ) as worker:
        return worker.call(module, function, args, kwargs, timeout=timeout)
