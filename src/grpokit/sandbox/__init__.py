"""A sandbox for untrusted code: everything model-written that gets executed or evaluated.

The model being trained writes whatever earns reward, so its text is treated as hostile wherever
something may execute it: a verifier that `eval`s or `sympy`-parses an answer, a Python tool, a
test-based code reward. Such work runs in a separate worker process (see `docs/SECURITY.md`):

- new network, PID and mount namespaces where the platform allows (Linux, as root or with
  unprivileged user namespaces): no network at all, every mount read-only but a private folder,
  a private `/proc`, every process killed with the worker;
- no capabilities, `no_new_privs`, and as root the user `nobody` where the interpreter is
  readable by it;
- resource limits per call (CPU seconds, address space, processes, file size, open files) and a
  wall-clock timeout that kills the call's whole process group;
- an environment of its own (nothing inherited, no tokens), a private working folder emptied
  after each call, and an isolated interpreter (`python -I -S`) whose `sys.path` holds the standard
  library and allow-listed packages only: grpokit, torch and transformers are not importable.

Where namespaces are not available the process boundary and the limits remain, and
`capabilities()` (logged once by `SandboxPool`) says what is missing.

Public API: `run_python`, `call_in_sandbox` (one worker per call), `SandboxWorker`,
`SandboxPool` (warm workers for throughput), `SandboxLimits`, `SandboxResult`, `CallResult`,
`SandboxError`, `capabilities`, `Capabilities`.

This package is the bottom layer: it imports nothing from the rest of grpokit.
"""

from grpokit.sandbox.capabilities import Capabilities, capabilities, warn_missing_isolation
from grpokit.sandbox.pool import SandboxPool
from grpokit.sandbox.results import CallResult, SandboxError, SandboxLimits, SandboxResult
from grpokit.sandbox.worker import SandboxWorker, call_in_sandbox, run_python, sandbox_environment

__all__ = [
    "CallResult",
    "Capabilities",
    "SandboxError",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResult",
    "SandboxWorker",
    "call_in_sandbox",
    "capabilities",
    "run_python",
    "sandbox_environment",
    "warn_missing_isolation",
]
