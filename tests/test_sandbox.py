"""The sandbox contains hostile code, and the reasoning-gym reward verifies answers inside it.

Every hostile program below must end as a failed result while this process carries on. The
hostile tests run once per isolation mode this machine offers: `namespaces` (where Linux allows
them), `bwrap` (where bubblewrap is installed) and `process` (process boundary and limits only);
assertions that only namespaces can make true are skipped, with the reason, where the mode lacks
them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from grpokit.sandbox import (
    SandboxLimits,
    SandboxPool,
    SandboxWorker,
    call_in_sandbox,
    capabilities,
    run_python,
)
from grpokit.sandbox.pool import spread_chunks

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox tests need Linux")

LIMITS = SandboxLimits(
    timeout=1.0,
    cpu_seconds=1,
    memory_bytes=64 << 20,
    max_processes=8,
    max_file_bytes=1 << 20,
    max_open_files=32,
    max_output_bytes=4096,
)
MODES = [
    *(["namespaces"] if capabilities().namespaces else []),
    *(["bwrap"] if shutil.which("bwrap") else []),
    "process",
]


@pytest.fixture(scope="module", params=MODES)
def worker(request: pytest.FixtureRequest) -> Iterator[SandboxWorker]:
    with SandboxWorker(limits=LIMITS, isolation=request.param) as w:
        yield w


def _marker() -> str:
    """A `sleep` argument no other process on the machine has (to find leftovers by)."""
    return f"{1000 + random.random():.12f}"


def _processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(name))
    return found


def _still_works(worker: SandboxWorker) -> None:
    result = worker.run_python("print(6 * 7)")
    assert (result.stdout, result.exit_code) == ("42\n", 0)


# ---------------------------------------------------------------------------------------------
# Ordinary code
# ---------------------------------------------------------------------------------------------


def test_program_io_exit_status_and_truncation(worker: SandboxWorker) -> None:
    result = worker.run_python(
        "import sys\nprint(sys.stdin.read().upper())\nsys.exit(3)", stdin="hello"
    )
    assert (result.stdout, result.exit_code, result.ok) == ("HELLO\n", 3, False)

    result = worker.run_python("def f():\n    raise ValueError('boom')\nf()")
    assert result.exit_code == 1
    assert result.stderr.startswith('Traceback (most recent call last):\n  File "<sandbox>"')
    assert result.stderr.endswith("ValueError: boom\n")

    result = worker.run_python("print('x' * 10000)")
    assert result.ok and result.truncated
    assert result.stdout == "x" * LIMITS.max_output_bytes


def test_calls_return_values_errors_and_crashes(worker: SandboxWorker) -> None:
    assert worker.call("math", "fsum", [[0.1] * 10]).value == 1.0
    raised = worker.call("json", "loads", ["{nope"])
    assert not raised.ok and not raised.crashed
    assert raised.error is not None and raised.error.startswith("JSONDecodeError: ")
    unserialisable = worker.call("builtins", "set", [[1]])
    assert unserialisable.error is not None and "not JSON-serialisable" in unserialisable.error
    crashed = worker.call("os", "abort")
    assert crashed.crashed and crashed.killed_by == "SIGABRT" and crashed.value is None


def test_call_many_blames_only_the_culprit(worker: SandboxWorker) -> None:
    calls = [
        ("math", "sqrt", [4]),
        ("time", "sleep", [30]),  # overruns its timeout: the rest continue in a new child
        ("math", "sqrt", [9]),
        ("os", "abort", []),  # crashes the child: the rest are re-run one process each
        ("math", "sqrt", [16]),
    ]
    results = worker.call_many(calls, timeout=0.5)
    assert [r.value for r in results] == [2.0, None, 3.0, None, 4.0]
    assert results[1].timed_out and results[1].killed_by == "SIGKILL"
    assert results[3].killed_by == "SIGABRT" and not results[3].timed_out


def test_one_shot_functions() -> None:
    assert run_python("print(sum(range(10)))", limits=LIMITS).stdout == "45\n"
    assert call_in_sandbox("statistics", "median", [[3, 1, 2]], limits=LIMITS).value == 2


def test_sandbox_package_is_the_bottom_layer() -> None:
    # Imported alone, it brings in no other grpokit module and not torch.
    code = (
        "import sys, grpokit.sandbox\n"
        "print(sorted(m for m in sys.modules if m.startswith('grpokit')), 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    modules = ["grpokit", "grpokit.sandbox", "grpokit.sandbox.capabilities"]
    modules += ["grpokit.sandbox.packages", "grpokit.sandbox.pool", "grpokit.sandbox.results"]
    modules += ["grpokit.sandbox.worker"]
    assert out.stdout == f"{modules} False\n", out.stderr


def test_spread_chunks_keeps_equal_keys_apart() -> None:
    # Round-robin over a, b, c: a0 b2 c4 | a1 b3. Size 2 cuts after two.
    assert spread_chunks("aabbc", 2) == [[0, 2], [4, 1], [3]]
    assert spread_chunks("aaa", 5) == [[0], [1], [2]]
    assert spread_chunks("abcabc", 8) == [[0, 1, 2], [3, 4, 5]]
    assert spread_chunks("", 3) == []


# ---------------------------------------------------------------------------------------------
# Hostile code
# ---------------------------------------------------------------------------------------------


def test_fork_bomb_is_limited_and_killed(worker: SandboxWorker) -> None:
    marker = _marker()
    code = f"""
import os
for _ in range(1000):
    try:
        os.fork()
    except OSError as error:
        print("fork failed:", error, flush=True)
        break
os.execv("/bin/sleep", ["sleep", "{marker}"])
"""
    result = worker.run_python(code, timeout=0.5)
    assert result.timed_out and result.killed_by == "SIGKILL"
    assert "fork failed: [Errno 11] Resource temporarily unavailable" in result.stdout
    assert _processes_with(marker) == []
    _still_works(worker)


def test_infinite_loop_is_stopped(worker: SandboxWorker) -> None:
    result = worker.run_python("while True:\n    pass", timeout=0.5)
    assert not result.ok
    # The 0.5 s wall clock, or RLIMIT_CPU (1 s) if the clock had been longer.
    assert result.killed_by in ("SIGXCPU", "SIGKILL")
    _still_works(worker)


def test_memory_bomb_fails_with_memory_error(worker: SandboxWorker) -> None:
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 23))"
    result = worker.run_python(code, timeout=10.0)  # the limit (64 MiB) must stop it first
    assert result.exit_code == 1 and result.stderr.endswith("MemoryError\n")
    _still_works(worker)


def test_large_file_write_fails_and_the_folder_is_emptied(worker: SandboxWorker) -> None:
    result = worker.run_python("open('big', 'wb').write(b'x' * (8 << 20))")
    assert result.exit_code == 1 and "File too large" in result.stderr
    small = worker.run_python("open('left.txt', 'w').write('x')")
    assert small.ok
    listing = worker.run_python("import os\nprint(sorted(os.listdir('.')))")
    assert listing.stdout == "[]\n"  # each call starts in an emptied folder


def test_writing_outside_its_folder(worker: SandboxWorker, tmp_path: Path) -> None:
    if not worker.report["filesystem_read_only"] and worker.report["user"] != "nobody":
        pytest.skip(f"no read-only mounts in {worker.isolation!r} mode here: {worker.report}")
    target = tmp_path / "escaped.txt"
    result = worker.run_python(f"open({str(target)!r}, 'w').write('x')")
    assert result.exit_code == 1
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert not target.exists()


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"hf_{random.getrandbits(64):x}"
    monkeypatch.setenv("GRPOKIT_TEST_SECRET", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    code = "import os, json\nprint(json.dumps(dict(os.environ)))"
    for mode in MODES:
        result = run_python(code, limits=LIMITS, isolation=mode)  # type: ignore[arg-type]
        env = json.loads(result.stdout)
        assert secret not in result.stdout
        assert set(env) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"} | {
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
        }


def test_socket_to_localhost_gets_no_connection(worker: SandboxWorker) -> None:
    if not worker.report["network_isolated"]:
        pytest.skip(f"no network namespace in {worker.isolation!r} mode here: {worker.report}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        code = f"""
import socket
s = socket.socket()
s.settimeout(0.5)
print(s.connect_ex(("127.0.0.1", {port})))
"""
        result = worker.run_python(code)
        assert result.ok and result.stdout.strip() != "0"  # 0 would be a connection
        with pytest.raises(TimeoutError):
            server.accept()


def test_sleeping_past_the_timeout_is_killed_with_its_children(worker: SandboxWorker) -> None:
    marker = _marker()
    code = f"""
import subprocess, time
subprocess.Popen(["sleep", "{marker}"], start_new_session=True)  # detached: its own session
time.sleep(60)
"""
    start = time.monotonic()
    result = worker.run_python(code, timeout=0.5)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.killed_by == "SIGKILL" and result.exit_code is None
    assert elapsed < 0.5 + 5.0  # 60 s of sleep were cut at the 0.5 s timeout
    assert _processes_with(marker) == []


def test_trainer_modules_are_not_importable(worker: SandboxWorker) -> None:
    for module in ("grpokit", "torch"):
        result = worker.run_python(f"import {module}")
        assert result.stderr.endswith(f"ModuleNotFoundError: No module named '{module}'\n")
    result = worker.run_python("import sys\nprint('\\n'.join(sys.path))")
    assert not any("site-packages" in p or p.endswith("src") for p in result.stdout.split())


def test_calls_cannot_take_over_their_worker(worker: SandboxWorker) -> None:
    # The worker outlives the call and answers for the next ones: it must not be ptrace-able
    # (or writable through /proc) by the code, which runs as the same user.
    code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())  # PTRACE_ATTACH
try:
    open(f"/proc/{os.getppid()}/mem", "r+b")
except OSError as error:
    print(error.errno)
"""
    result = worker.run_python(code)
    assert result.stdout.split() == ["-1", "1", "13"]  # EPERM, then EACCES


def test_pool_restarts_a_worker_killed_by_its_call(tmp_path: Path) -> None:
    # Only possible without a PID namespace, where the call can see (and kill) its worker.
    with SandboxPool(2, limits=LIMITS, isolation="process") as pool:
        futures = [pool.submit_python(f"print({i})") for i in range(6)]
        assert [f.result().stdout for f in futures] == [f"{i}\n" for i in range(6)]
        killed = pool.run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
        assert not killed.ok
        after = [pool.run_python("print('up')").stdout for _ in range(2)]
        assert after == ["up\n", "up\n"]


# ---------------------------------------------------------------------------------------------
# reasoning-gym verifiers in the sandbox
# ---------------------------------------------------------------------------------------------

PAYLOAD_TASKS = ("countdown", "n_queens", "spiral_matrix")


@pytest.fixture(scope="module")
def rg_score() -> object:
    pytest.importorskip("reasoning_gym")
    from grpokit.rewards.builtin import get_reward_function

    return get_reward_function({"name": "reasoning_gym_score", "timeout": 2.0, "workers": 1})


@cache
def _entry(name: str, seed: int = 0) -> str:
    """One entry's column value, as the reasoning_gym task writes it."""
    from grpokit.data.tasks import load_task

    spec = {"kind": "reasoning_gym", "name": name, "size": 1, "seed": seed, "eval_size": 0}
    return str(load_task(spec).train_dataset[0]["reasoning_gym_entry"])


def test_rce_payload_creates_no_file(
    rg_score: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reasoning_gym

    monkeypatch.chdir(tmp_path)
    # The payload is live: run by the verifier in this process it does create its file.
    entry = json.loads(_entry("countdown"))
    reasoning_gym.get_score_answer_fn("countdown")("__import__('os').system('touch live')", entry)
    assert (tmp_path / "live").exists()

    absolute_ok = capabilities().filesystem_read_only or capabilities().user == "nobody"
    for name in PAYLOAD_TASKS:
        for target in (f"pwned_{name}", str(tmp_path / f"pwned_abs_{name}")):
            answer = f"<answer>__import__('os').system('touch {target}')</answer>"
            rg_score(completions=[answer], reasoning_gym_entry=[_entry(name)])  # type: ignore[operator]
        assert not (tmp_path / f"pwned_{name}").exists()  # the call's folder, since deleted
        if absolute_ok:
            assert not (tmp_path / f"pwned_abs_{name}").exists()


def test_scores_equal_the_unsandboxed_verifier(rg_score: object) -> None:
    import reasoning_gym

    rows = []
    for name in ("chain_sum", "basic_arithmetic", "countdown", "n_queens", "number_sorting"):
        for seed in (0, 1):
            raw = _entry(name, seed)
            right = str(json.loads(raw)["answer"])
            for answer in (right, "0", "1 2 3", "[[1, 0], [0, 1]]", right[:-1]):
                rows.append((raw, answer))
    got = rg_score(  # type: ignore[operator]
        completions=[f"<answer>{answer}</answer>" for _, answer in rows],
        reasoning_gym_entry=[raw for raw, _ in rows],
    )
    expected = []
    for raw, answer in rows:
        entry = json.loads(raw)
        verify = reasoning_gym.get_score_answer_fn(entry["metadata"]["source_dataset"])
        try:
            expected.append(float(verify(answer.strip(), entry)))
        except Exception:
            expected.append(0.0)
    assert got == expected
    assert got.count(1.0) >= 10  # every right answer scored 1 (and not everything did)


def test_hanging_verifier_scores_zero_with_a_warning(
    rg_score: object, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _entry("countdown")
    right = json.loads(raw)["answer"]
    completions = ["<answer>__import__('time').sleep(30)</answer>", f"<answer>{right}</answer>"]
    with caplog.at_level("WARNING", logger="grpokit"):
        got = rg_score(completions=completions, reasoning_gym_entry=[raw, raw])  # type: ignore[operator]
    assert got == [0.0, 1.0]
    assert "task 'countdown' failed in the sandbox (timed out)" in caplog.text
