"""The sandbox worker: isolation set-up, then a fork server that runs one call per child.

This file runs *inside* the sandbox as `python -I -S -c <this text> <config JSON>` (see
`grpokit.sandbox.worker`), so it uses the standard library only and imports nothing from grpokit.
The trainer runs none of it, except `user_tasks` (with `NOBODY`), which `SandboxWorker` imports to
count the tasks of a call's user outside the worker's PID namespace; importing this module runs
nothing else.

Life of a worker:

1. Set-up, while still privileged (Linux, when allowed): new mount, network and PID namespaces (plus
   a user namespace when not root); every mount re-mounted read-only except the worker's `work`
   folder; a fresh `/proc` for the new PID namespace; then every capability dropped, `no_new_privs`
   set, and the user switched to `nobody` (or, as root when the interpreter is not readable by
   `nobody`, only the real user id, which is what `RLIMIT_NPROC` counts).
2. Trusted preloading: import the allow-listed modules, so that each call's child starts warm.
3. Serve: one JSON request per line on stdin, one JSON reply per line on stdout. Each call runs in
   a forked child with its own session, the resource limits, stdin/stdout/stderr redirected to
   unnamed files and the `work` folder as its (emptied) current directory. The parent side of the
   worker waits with a wall-clock timeout, kills the child's whole process group (and, as PID 1 of
   its namespace, every other process in it), reaps them, and empties `work`.

Results of `call` requests are written by the child as JSON to file descriptor 3.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import io
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
import types
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 14, 1 << 18, 1 << 21, 1 << 24
_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# SECBIT_NOROOT, _NO_SETUID_FIXUP, _KEEP_CAPS (locked), _NO_CAP_AMBIENT_RAISE, each with its lock:
# uid 0 never regains capabilities, not even through execve.
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
NOBODY = 65534

RESULT_FD = 3
MAX_RESULT_BYTES = 1 << 20

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_c().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype)]
    _check(_c().mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), None), f"mount {target}")


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mountinfo() -> list[tuple[str, int, bool]]:
    """(mount point, per-mount flags to keep, read-only) for every mount, parents first."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            options = fields[5].split(",")
            keep = 0
            for option in options:
                keep |= _MOUNT_FLAGS.get(option, 0)
            mounts.append((point, keep, "ro" in options))
    return mounts


def _read_only_except(work: str) -> list[str]:
    """Re-mount every mount read-only except `work` (bind-mounted onto itself first, so it is a
    mount of its own that stays writable). Returns the mount points left writable."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount(work, work, None, MS_BIND)
    writable = []
    for point, keep, read_only in _mountinfo():
        if point == work or read_only:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            writable.append(point)
    return writable


def _enter_namespaces(work: str, report: dict[str, Any]) -> bool:
    """unshare() mount, network, PID (and, when not root, user) namespaces; mounts read-only."""
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if root else CLONE_NEWUSER)
    try:
        _check(_c().unshare(flags), "unshare")
        if not root:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1")
            _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError as error:
        report["errors"].append(f"namespaces: {error}")
        return False
    try:
        report["writable_mounts"] = _read_only_except(work)
    except OSError as error:
        report["errors"].append(f"read-only mounts: {error}")
    return True


def _become_pid1(report: dict[str, Any]) -> None:
    """Fork into the new PID namespace. The parent waits and passes on the exit status; the child,
    PID 1 of the namespace, carries on (when it dies, the kernel kills every process inside)."""
    pid = os.fork()
    if pid:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as error:
        report["errors"].append(f"private /proc: {error}")


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner can read `path` (every ancestor searchable)."""
    path = os.path.realpath(path)
    try:
        st = os.stat(path)
    except OSError:
        return True  # nothing there to read either way
    if not st.st_mode & stat.S_IROTH:
        return False
    parent = path
    while True:
        parent = os.path.dirname(parent)
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        if parent == os.path.dirname(parent):
            return True


def _needed_paths(config: dict[str, Any]) -> list[str]:
    paths = [sys.executable, os.path.dirname(os.__file__), *config["sys_path"]]
    for folder in config["sys_path"]:
        if os.path.isdir(folder):
            paths += [os.path.join(folder, name) for name in os.listdir(folder)]
    return paths


def _drop_bounding_set() -> None:
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as error:
            if error.errno == errno.EINVAL:  # past the kernel's last capability
                return
            raise


def _drop_capabilities() -> None:
    """Empty every capability set, for good (the secure bits stop uid 0 regaining them)."""
    _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)
    _drop_bounding_set()
    _c().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)

    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        )

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two Data structs
    data = (Data * 2)()
    _check(_c().capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def _drop_privileges(to_nobody: bool, report: dict[str, Any]) -> None:
    """Leave no way back to privileges; as root also stop being root where possible."""
    report["user"] = "unchanged"
    if sys.platform != "linux":
        return
    try:
        if to_nobody:
            _drop_bounding_set()
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)  # clears every capability
            report["user"] = "nobody"
        elif os.geteuid() == 0:
            # The interpreter or a package is readable by root only: keep root's effective user
            # id for reading files (without any capability, behind read-only mounts where
            # available) and set the real user id, which RLIMIT_NPROC counts and which is exempt
            # from it when 0, to nobody.
            os.setgroups([])
            _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)
            os.setresuid(NOBODY, 0, 0)
            _drop_capabilities()
            report["user"] = "root without capabilities"
        elif _capabilities():
            _drop_capabilities()  # those held in a new user namespace
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as error:
        report["errors"].append(f"dropping privileges: {error}")
    report["capabilities"] = _capabilities()


def _capabilities() -> int:
    """The effective capability mask (0: none)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return int(status["CapEff"].strip(), 16)


def _pid_namespace(pid: str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _observe(work: str, config: dict[str, Any], report: dict[str, Any]) -> None:
    """What the set-up achieved, checked rather than assumed."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    report["network_isolated"] = bool(names) and names == ["lo"]
    own = _pid_namespace()
    # Certain only when compared with the trainer's: kill(-1) relies on it.
    parent = config["parent_pid_namespace"]
    report["pid_isolated"] = None not in (own, parent) and own != parent
    report["proc_private"] = report["pid_isolated"] and _pid_namespace("1") == own
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.dirname(work))):
            pass
        report["filesystem_read_only"] = False
    except OSError:
        report["filesystem_read_only"] = True
    report["rlimits"] = [
        name
        for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE")
        if hasattr(resource, name)
    ]


def _prepare_for_nobody(config: dict[str, Any]) -> bool:
    """As root, whether the worker can become `nobody`: the interpreter and packages must be
    readable by it, and its folder is handed over (before any mount turns read-only)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    if not all(_reachable_by_others(p) for p in _needed_paths(config)):
        return False
    work = config["work"]
    try:
        os.chmod(os.path.dirname(work), 0o755)
        os.chown(work, NOBODY, NOBODY)
    except OSError:  # e.g. already behind bubblewrap's read-only mounts
        return False
    return True


def setup(config: dict[str, Any]) -> dict[str, Any]:
    """Isolate this process as far as the platform allows; returns the report.

    `config["isolation"]`: "auto" (namespaces if allowed), "namespaces" (or fail), "process"
    (none), "bwrap" (none of its own: bubblewrap created them before starting this process).
    """
    work = config["work"]
    report: dict[str, Any] = {"errors": [], "namespaces": False, "writable_mounts": []}
    want = config["isolation"]
    to_nobody = _prepare_for_nobody(config)
    if sys.platform == "linux" and want in ("auto", "namespaces"):
        report["namespaces"] = _enter_namespaces(work, report)
        if report["namespaces"]:
            _become_pid1(report)
        elif want == "namespaces":
            raise RuntimeError("namespaces requested but unavailable: " + report["errors"][-1])
    report["namespaces"] = report["namespaces"] or want == "bwrap"
    if sys.platform == "linux":
        # Calls run as the same user as this process: not dumpable, it cannot be ptraced (or its
        # memory written through /proc) by them. Inherited by each call's child.
        _prctl(PR_SET_DUMPABLE, 0)
    if sys.platform == "linux" and os.getpid() != 1:
        # Orphans of a call are re-parented to this process, which kills them after the call.
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _drop_privileges(to_nobody, report)
    os.chdir(work)
    _observe(work, config, report)
    return report


# ---------------------------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------------------------


def user_tasks(uid: int) -> int:
    """Processes and threads of real user `uid` in this process's view of /proc (RLIMIT_NPROC
    counts them all). The worker counts them in its own PID namespace; `SandboxWorker` counts
    them on the host, where the worker cannot see, with this same function."""
    count = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return count


def _set_limits(limits: dict[str, Any], running: int, calls: int) -> None:
    cpu = None if limits["cpu_seconds"] is None else limits["cpu_seconds"] * calls
    wanted = [
        ("RLIMIT_CPU", cpu, None if cpu is None else cpu + 1),
        ("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
        ("RLIMIT_FSIZE", limits["max_file_bytes"], limits["max_file_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"], limits["max_open_files"]),
        ("RLIMIT_NPROC", running + limits["max_processes"], running + limits["max_processes"]),
        ("RLIMIT_CORE", 0, 0),
    ]
    for name, soft, hard in wanted:
        which = getattr(resource, name, None)
        if which is None or soft is None:
            continue
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        # A limit the platform refuses (RLIMIT_AS on macOS) is left as it is.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (soft, hard))


def _text_streams() -> None:
    reader = io.BufferedReader(io.FileIO(0, "r", closefd=False))
    sys.stdin = io.TextIOWrapper(reader, encoding="utf-8", errors="replace")
    for fd, name in ((1, "stdout"), (2, "stderr")):
        buffer = io.BufferedWriter(io.FileIO(fd, "w", closefd=False))
        stream = io.TextIOWrapper(
            buffer, encoding="utf-8", errors="backslashreplace", line_buffering=True
        )
        setattr(sys, name, stream)


def _exit_status(error: SystemExit) -> int:
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code & 0xFF
    print(error.code, file=sys.stderr)
    return 1


def _run_python(code: str) -> int:
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["<sandbox>"]
    try:
        exec(compile(code, "<sandbox>", "exec"), main.__dict__)
    except SystemExit as error:
        return _exit_status(error)
    except BaseException as error:  # the code's own failure: a traceback, exit status 1
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # type: ignore[union-attr]
        return 1
    return 0


def _run_calls(calls: list[dict[str, Any]]) -> int:
    """Each call's result as one JSON line on RESULT_FD, written as soon as the call returns."""
    for call in calls:
        start = time.monotonic()
        try:
            target: Any = importlib.import_module(call["module"])
            for part in call["function"].split("."):
                target = getattr(target, part)
            result: dict[str, Any] = {"value": target(*call["args"], **call["kwargs"])}
        except SystemExit as error:
            return _exit_status(error)
        except BaseException as error:
            result = {"error": f"{type(error).__name__}: {error}"[:2000]}
        result["duration"] = time.monotonic() - start
        try:
            line = json.dumps(result).encode() + b"\n"
        except (TypeError, ValueError) as error:
            message = f"the result is not JSON-serialisable: {error}"
            line = json.dumps({"error": message, "duration": result["duration"]}).encode() + b"\n"
        while line:
            line = line[os.write(RESULT_FD, line) :]
    return 0


def _child(
    request: dict[str, Any], files: dict[str, Any], results: int, work: str, running: int
) -> None:
    """In the forked child: never returns."""
    status = 70
    try:
        os.setsid()
        for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
            os.dup2(files[name].fileno(), fd)
        os.dup2(results, RESULT_FD)
        os.closerange(RESULT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.chdir(work)
        os.environ["HOME"] = os.environ["TMPDIR"] = work
        tempfile.tempdir = None
        _set_limits(request["limits"], running, len(request.get("calls", [None])))
        _text_streams()
        if request["kind"] == "python":
            status = _run_python(request["code"])
        else:
            status = _run_calls(request["calls"])
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """Wait for `pid` up to `timeout` seconds; kill its process group on expiry."""
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        os.close(pidfd)
        timed_out = not ready
    else:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, timed_out


def _children() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                found.append(int(name))
    return found


def _kill_leftovers(own_pid_namespace: bool) -> None:
    """Kill and reap every process a call left behind."""
    if own_pid_namespace:  # kill(-1) reaches every process of the namespace but us and its init
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:  # orphans of a bubblewrap namespace go to its init
                return
    if sys.platform != "linux":
        return
    for _ in range(1000):  # a subreaper: orphans became our children
        children = _children()
        if not children:
            break
        for child in children:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(child, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break


def _read(f: Any, limit: int) -> tuple[bytes, bool]:
    f.seek(0)
    data = f.read(limit + 1)
    return data[:limit], len(data) > limit


def _empty(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _collect(
    pid: int, results: int, expected: int, timeout: float
) -> tuple[list[bytes], int, bool]:
    """Read result lines until the child closes its end; each line gives the next call a fresh
    `timeout`. Kills the child's group when a call overruns or the child writes more than it
    should. Returns the lines, the wait status and whether a call overran."""
    lines: list[bytes] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    overran = finished = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([results], [], [], remaining)[0]:
            overran = True
            break
        chunk = os.read(results, 1 << 16)
        if not chunk:  # every copy of the write end is closed: normally, the child exited
            finished = True
            break
        buffer = buffer + chunk if expected else b""  # a program's writes there are ignored
        while b"\n" in buffer and len(lines) < expected:
            line, _, buffer = buffer.partition(b"\n")
            lines.append(line)
            deadline = time.monotonic() + timeout
        if len(buffer) > MAX_RESULT_BYTES or (b"\n" in buffer and len(lines) >= expected):
            break  # more than it should have written: killed, like a crash
    grace = max(deadline - time.monotonic(), 0.0) if finished else 0.0
    status, late = _wait(pid, grace)
    return lines, status, overran or (finished and late)


def serve_call(request: dict[str, Any], work: str, own_pid_namespace: bool) -> dict[str, Any]:
    """Run one `python` or `calls` request in a forked child; the reply as a dict."""
    files = {n: tempfile.TemporaryFile(dir=work) for n in ("stdin", "stdout", "stderr")}  # noqa: SIM115
    files["stdin"].write((request.get("stdin") or "").encode())
    files["stdin"].seek(0)
    running = 0
    if request["limits"]["max_processes"] is not None:  # the trainer's count sees other workers
        running = max(user_tasks(os.getuid()), int(request.get("host_user_tasks", 0)))
    expected = len(request.get("calls", []))
    read_end, write_end = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(request, files, write_end, work, running)
    os.close(write_end)
    lines, status, timed_out = _collect(pid, read_end, expected, request["timeout"])
    os.close(read_end)
    duration = time.monotonic() - start
    _kill_leftovers(own_pid_namespace)
    limit = request["limits"]["max_output_bytes"]
    stdout, cut_out = _read(files["stdout"], limit)
    stderr, cut_err = _read(files["stderr"], limit)
    for f in files.values():
        f.close()
    _empty(work)
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except ValueError:
            results.append({"error": "the call wrote a malformed result"})
    return {
        "results": results,
        "stdout": stdout.decode("utf-8", "replace"),
        "stderr": stderr.decode("utf-8", "replace"),
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "duration": duration,
        "truncated": cut_out or cut_err,
    }


def _run_trusted(module: str, function: str, args: list[Any]) -> Any:
    target: Any = importlib.import_module(module)
    for part in function.split("."):
        target = getattr(target, part)
    return target(*args)


def serve(config: dict[str, Any], report: dict[str, Any]) -> None:
    """Preload, say ready, then answer requests until stdin closes."""
    control_in = os.fdopen(os.dup(0), "rb")
    control_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)

    def reply(message: dict[str, Any]) -> None:
        control_out.write(json.dumps(message).encode() + b"\n")
        control_out.flush()

    try:
        for name in config["preload"]:
            importlib.import_module(name)
    except BaseException as error:
        reply({"ready": False, "error": f"preloading {name!r}: {type(error).__name__}: {error}"})
        return
    reply({"ready": True, "isolation": report})
    own_pid_namespace = report["pid_isolated"]
    for line in control_in:
        request = json.loads(line)
        if request["kind"] == "warm":  # trusted code from the trainer, run in this process
            try:
                _run_trusted(request["module"], request["function"], request["args"])
                reply({"ok": True})
            except Exception as error:
                reply({"ok": False, "error": f"{type(error).__name__}: {error}"})
            continue
        reply(serve_call(request, config["work"], own_pid_namespace))
    _kill_leftovers(own_pid_namespace)


def main(argv: list[str]) -> None:
    config = json.loads(argv[1])
    os.environ.pop("PWD", None)  # set by bubblewrap's --chdir; the rest is the trainer's choice
    sys.path[:0] = config["sys_path"]
    try:
        report = setup(config)
    except BaseException as error:
        message = {"ready": False, "error": f"set-up: {type(error).__name__}: {error}"}
        os.write(1, json.dumps(message).encode() + b"\n")
        raise SystemExit(1) from None
    serve(config, report)


if __name__ == "__main__":
    main(sys.argv)
