"""`SandboxPool`: several sandbox workers shared by threads, with a bounded queue."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from grpokit.sandbox.capabilities import Capabilities, warn_missing_isolation
from grpokit.sandbox.results import CallResult, SandboxLimits, SandboxResult
from grpokit.sandbox.worker import Call, Isolation, SandboxWorker

R = TypeVar("R")


def spread_chunks(keys: Sequence[Hashable], size: int) -> list[list[int]]:
    """Split `range(len(keys))` into chunks of at most `size` indices, no two with equal keys.

    Indices are taken round-robin over the distinct keys (in order of first appearance), so
    chunks stay full while there are enough distinct keys. `spread_chunks("aabbc", 2)` gives
    `[[0, 2], [4, 1], [3]]`.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    order = [
        group[depth]
        for depth in range(max((len(g) for g in groups.values()), default=0))
        for group in groups.values()
        if depth < len(group)
    ]
    chunks: list[list[int]] = []
    current: list[int] = []
    seen: set[Hashable] = set()
    for index in order:
        if len(current) == size or keys[index] in seen:
            chunks.append(current)
            current, seen = [], set()
        current.append(index)
        seen.add(keys[index])
    if current:
        chunks.append(current)
    return chunks


class SandboxPool:
    """`workers` sandbox workers; each call takes an idle one, so up to `workers` run at once.

    Calls from any thread are safe. `submit_*` return futures and block once `max_pending` calls
    are queued (the bounded queue). A worker that dies or hangs is killed, its call reported as
    failed, and it is restarted for the next call. Logs once per process what isolation this
    machine lacks.

    Args:
        workers: Number of worker processes (default: CPU count, at most 4).
        limits: Resource limits of every call.
        packages: Third-party packages importable inside (see `SandboxWorker`).
        paths: Folders of trusted modules put on the sandbox's `sys.path`.
        preload: Modules each worker imports once at start.
        isolation: `"auto"`, `"namespaces"` or `"process"` (see `SandboxWorker`).
        max_pending: Calls queued or running before `submit_*` blocks (default `8 * workers`).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        limits: SandboxLimits | None = None,
        packages: Sequence[str] = (),
        paths: Sequence[str | os.PathLike[str]] = (),
        preload: Sequence[str] = (),
        isolation: Isolation = "auto",
        max_pending: int | None = None,
    ) -> None:
        count = workers if workers is not None else min(4, os.cpu_count() or 1)
        if count < 1:
            raise ValueError(f"SandboxPool needs workers >= 1, got {count}.")
        self.limits = limits or SandboxLimits()

        def start(_: int) -> SandboxWorker:
            return SandboxWorker(
                limits=self.limits,
                packages=packages,
                paths=paths,
                preload=preload,
                isolation=isolation,
            )

        started: list[SandboxWorker] = []
        with ThreadPoolExecutor(max_workers=count) as starter:
            futures = [starter.submit(start, i) for i in range(count)]
            errors = []
            for future in futures:
                try:
                    started.append(future.result())
                except Exception as error:
                    errors.append(error)
        if errors:
            for worker in started:
                worker.close()
            raise errors[0]
        self._workers = started
        self._idle: queue.SimpleQueue[SandboxWorker] = queue.SimpleQueue()
        for worker in started:
            self._idle.put(worker)
        self._executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="sandbox")
        self._pending = threading.Semaphore(max_pending or 8 * count)
        self._warm_lock = threading.Lock()
        self.capabilities = Capabilities.from_report(started[0].report)
        warn_missing_isolation(self.capabilities)

    def __len__(self) -> int:
        return len(self._workers)

    def _with_worker(self, fn: Callable[[SandboxWorker], R]) -> R:
        worker = self._idle.get()
        try:
            return fn(worker)
        finally:
            self._idle.put(worker)

    def _submit(self, fn: Callable[[SandboxWorker], R]) -> Future[R]:
        self._pending.acquire()
        future = self._executor.submit(self._with_worker, fn)
        future.add_done_callback(lambda _: self._pending.release())
        return future

    def run_python(
        self, code: str, *, stdin: str | None = None, timeout: float | None = None
    ) -> SandboxResult:
        """Run a Python program on an idle worker; see `SandboxWorker.run_python`."""
        return self._with_worker(lambda w: w.run_python(code, stdin=stdin, timeout=timeout))

    def submit_python(
        self, code: str, *, stdin: str | None = None, timeout: float | None = None
    ) -> Future[SandboxResult]:
        """`run_python` in the background; the future holds the `SandboxResult`."""
        return self._submit(lambda w: w.run_python(code, stdin=stdin, timeout=timeout))

    def call(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> CallResult:
        """A trusted function on untrusted arguments; see `SandboxWorker.call`."""
        return self._with_worker(lambda w: w.call(module, function, args, kwargs, timeout=timeout))

    def submit_call(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future[CallResult]:
        """`call` in the background; the future holds the `CallResult`."""
        return self._submit(lambda w: w.call(module, function, args, kwargs, timeout=timeout))

    def map_calls(
        self,
        calls: Sequence[Call],
        *,
        timeout: float | None = None,
        chunk_size: int = 1,
        keys: Sequence[Hashable] | None = None,
    ) -> list[CallResult]:
        """Run many calls across the workers; results in the order of `calls`.

        Args:
            calls: `(module, function, args)` triples.
            timeout: Wall-clock seconds per call (default `limits.timeout`).
            chunk_size: Calls per child process. 1 (the default) gives every call a fresh
                process; larger chunks save a fork per call, at the price of sharing one
                interpreter (see `SandboxWorker.call_many`). Chunks are at most
                `ceil(len(calls) / workers)` long, so every worker gets work.
            keys: One per call; calls with equal keys never share a chunk (give the prompt, so
                that a completion cannot tamper with how its own group-mates are scored).
        """
        if chunk_size < 1:
            raise ValueError(f"map_calls needs chunk_size >= 1, got {chunk_size}.")
        if keys is not None and len(keys) != len(calls):
            raise ValueError(f"map_calls: {len(keys)} keys for {len(calls)} calls.")
        size = max(1, min(chunk_size, -(-len(calls) // len(self._workers))))
        chunks = spread_chunks(list(range(len(calls))) if keys is None else keys, size)

        def run(chunk: list[int]) -> Callable[[SandboxWorker], list[CallResult]]:
            return lambda worker: worker.call_many([calls[i] for i in chunk], timeout=timeout)

        futures = [self._submit(run(chunk)) for chunk in chunks]
        results: list[CallResult | None] = [None] * len(calls)
        for chunk, future in zip(chunks, futures, strict=True):
            for index, result in zip(chunk, future.result(), strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def warm(self, module: str, function: str, args: Sequence[Any] = ()) -> None:
        """Run trusted `module.function(*args)` once in every worker (see `SandboxWorker.warm`)."""
        with self._warm_lock:
            taken = [self._idle.get() for _ in self._workers]
            try:
                for worker in taken:
                    worker.warm(module, function, args)
            finally:
                for worker in taken:
                    self._idle.put(worker)

    def close(self) -> None:
        """Wait for running calls, then stop every worker."""
        self._executor.shutdown(wait=True)
        for worker in self._workers:
            worker.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
