"""The process's host memory under glibc: keeping freed blocks for reuse, returning them.

glibc's allocator serves torch's CPU tensors. `retain_freed_memory` keeps what finished tensors
free inside the process so the next micro-batch reuses it instead of page-faulting it in again;
`release_freed_memory` hands what is kept back to the OS. Elsewhere (not Linux, not glibc) both
change nothing. Effects on step time and peak RSS: bench/RESULTS.md.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("grpokit")


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory in the process (Linux only).

    By default glibc serves each large allocation (>= 128 KB to 32 MB, adaptively) with its own
    `mmap` and unmaps it on free, and trims the heap top above 128 KB, so a training step's
    activations, logits and gradients are page-faulted in afresh every step (system time that
    grows with the step's memory; measured in bench/RESULTS.md). `mallopt(M_MMAP_MAX, 0)` serves
    large blocks from the heap and `mallopt(M_TRIM_THRESHOLD, -1)` never shrinks it, so freed
    blocks are reused by the next step. Process-wide and never undone.

    Returns:
        True when both settings were applied; False elsewhere (not Linux, not glibc), which
        changes nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    m_trim_threshold, m_mmap_max = -1, -4
    applied = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, -1) == 1
    logger.info("retain_freed_memory: %s", "applied" if applied else "not available")
    return applied


def release_freed_memory() -> bool:
    """Return the freed memory glibc keeps (`retain_freed_memory`) to the OS (Linux only).

    `malloc_trim(0)`: the kept pages are dropped, the address space stays; what is used again
    is page-faulted in again. When the trainer calls it: `KeptMemory`. Peak RSS and cost:
    bench/RESULTS.md.

    Returns:
        True when glibc's `malloc_trim` ran (whether or not it released anything); False
        elsewhere (not Linux, not glibc), which changes nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache
def _glibc() -> Any:
    """glibc loaded through ctypes (once per process), or None (not Linux, or another C
    library: musl has a `mallopt` that does nothing and no `gnu_get_libc_version`)."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux `/proc/self/statm`), or None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def private_file_mappings() -> list[tuple[int, int]]:
    """The `[start, end)` address ranges of this process's private mappings of files (Linux
    `/proc/self/maps`: a path, and `p` in the permissions), sorted; [] elsewhere."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[1].endswith("p") or parts[5].startswith("["):
                    continue  # anonymous, shared, or the heap / stack / vdso
                low, high = (int(part, 16) for part in parts[0].split("-"))
                ranges.append((low, high))
    except OSError:
        return []
    return sorted(ranges)


def own_file_mapped(tensors: Iterable[Any]) -> int:
    """Give each CPU tensor that is a view of a file mapping memory of its own (`tensor.data` =
    a copy; the values, the `Parameter` objects and the ties between them stay).

    A safetensors checkpoint loaded in its own dtype stays a private mapping of the file, so
    the first write to a parameter, in the first optimizer step, copies each of its 4 KiB pages
    on a fault of its own (about 3 s of that step for SmolLM2-135M's 513 MiB on a 2-core
    virtual machine; bench/RESULTS.md). A copy made now is written once, in large pages where
    torch asks for them (`huge_pages`). For the parameters the optimizer writes; frozen ones
    are best left mapped (the page cache holds them, shared).

    Returns:
        How many tensors were copied (0 where nothing is file-mapped, or not Linux).
    """
    ranges = private_file_mappings()
    if not ranges:
        return 0
    starts = [low for low, _ in ranges]
    copied = 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
            continue
        address = tensor.untyped_storage().data_ptr()
        index = bisect.bisect_right(starts, address) - 1
        if index >= 0 and address < ranges[index][1]:
            tensor.data = tensor.detach().clone()
            copied += 1
    return copied


def huge_pages() -> str:
    """Whether torch's CPU allocator puts large tensors on transparent huge pages in this process
    (`grpokit.prefer_huge_pages`; its effect on step time and peak RSS: bench/RESULTS.md).

    Probes a fresh 4 MiB tensor: torch marks such a block `madvise(MADV_HUGEPAGE)` (the `hg`
    flag of its mapping in `/proc/self/smaps`) only if `THP_MEM_ALLOC_ENABLE=1` was set when it
    made its first CPU allocation, the one moment it reads the variable.

    Returns:
        "applied"; "off" (the user set `THP_MEM_ALLOC_ENABLE` to something other than 1);
        "missed" (the variable is 1 but torch read it before: something allocated a CPU tensor
        before grpokit was imported); "unavailable" (not Linux, or the kernel's THP mode is
        `never`).
    """
    import torch

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode_file:
            mode = mode_file.read()
    except OSError:
        return "unavailable"
    if "[never]" in mode:
        return "unavailable"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        return "off"
    probe = torch.empty(4 * 2**20, dtype=torch.uint8)
    return "applied" if "hg" in mapping_fields(probe.data_ptr()).get("VmFlags", []) else "missed"


def mapping_fields(address: int) -> dict[str, list[str]]:
    """The fields of the mapping that holds `address`, as `/proc/self/smaps` lists them: e.g.
    `{"AnonHugePages": ["2048", "kB"], "VmFlags": ["rd", "wr", ..., "hg"], ...}` ({} if no
    mapping holds it, or not Linux)."""
    fields: dict[str, list[str]] = {}
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                parts = line.split()
                if not parts:
                    continue
                head = parts[0]
                if "-" in head and not head.endswith(":"):
                    if inside:
                        break  # the mapping that held it has ended
                    low, high = (int(part, 16) for part in head.split("-"))
                    inside = low <= address < high
                elif inside:
                    fields[head.rstrip(":")] = parts[1:]
    except OSError:
        return {}
    return fields


def log_huge_pages() -> str:
    """Log `huge_pages()` once per trainer: a warning naming the fix when it was missed."""
    state = huge_pages()
    if state == "missed":
        logger.warning(
            "huge pages: not applied. torch made its first CPU allocation before grpokit was "
            "imported and keeps 4 KiB pages for large tensors (slower steps, higher peak RSS: "
            "bench/RESULTS.md). Import grpokit before transformers, trl or any code that makes "
            "tensors, or set THP_MEM_ALLOC_ENABLE=1 in the environment."
        )
    else:
        logger.info("huge pages for large CPU tensors: %s", state)
    return state


class KeptMemory:
    """When the trainer hands what glibc keeps (`retain_freed_memory`) back to the OS.

    Kept blocks are reused only where a later tensor fits them. Each release makes the next
    phases page-fault their memory in again (about 1 s a step on the benchmark workload:
    bench/RESULTS.md), so by default it happens only when kept memory is piling up: before a
    generation, when the process's resident memory is more than `growth` above its reference,
    what it was before the generation that followed two full steps (the run's third, or the
    second after a release: the first step faults its activations and gradients in, the second
    shows the working set with the blocks glibc keeps). Completions of changing lengths leave
    kept blocks unused, and without this the resident memory would creep up over a long run. With
    `every_phase` (`GRPOConfig.release_freed_memory`) it happens before every phase instead:
    generation, each training micro-batch, the optimizer step (the lowest peak, for more step
    time).

    Args:
        active: whether glibc keeps freed memory here (`retain_freed_memory` applied); if not,
            nothing is ever released.
        every_phase: release before every phase rather than on growth.
        growth: the fraction of resident memory above the reference that triggers a release.
        resident: reads the resident bytes (None where unknown: then only `every_phase`
            releases).
    """

    def __init__(
        self,
        active: bool,
        every_phase: bool,
        growth: float = 0.25,
        resident: Callable[[], int | None] = resident_bytes,
    ) -> None:
        self.active, self.every_phase, self.growth = active, every_phase, growth
        self._resident = resident
        self._generations = 0
        self._reference: int | None = None
        self.releases = 0

    def before_generation(self) -> bool:
        """Called before each generation; True when kept memory was released."""
        if not self.active:
            return False
        if self.every_phase:
            return self._release()
        self._generations += 1
        rss = self._resident()
        if rss is None:
            return False
        if self._reference is None:
            if self._generations >= 3:  # two full steps have run since the start or a release
                self._reference = rss
            return False
        if rss <= self._reference * (1 + self.growth):
            return False
        logger.info(
            "returning glibc's kept memory to the OS: resident %.0f MiB, more than %.0f%% above "
            "the %.0f MiB after two full steps",
            rss / 2**20,
            100 * self.growth,
            self._reference / 2**20,
        )
        self._reference, self._generations = None, 1  # set again two full steps on
        return self._release()

    def before_phase(self) -> bool:
        """Called before each training micro-batch and before the optimizer step; True when kept
        memory was released (only with `every_phase`)."""
        return self.active and self.every_phase and self._release()

    def _release(self) -> bool:
        released = release_freed_memory()
        self.releases += int(released)
        return released
