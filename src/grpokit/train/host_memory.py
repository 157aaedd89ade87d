"""The process's host memory under glibc: keeping freed blocks for reuse, returning them.

glibc's allocator serves torch's CPU tensors. `retain_freed_memory` keeps what finished tensors
free inside the process so the next micro-batch reuses it instead of page-faulting it in again;
`release_freed_memory` hands what is kept back to the OS. Elsewhere (not Linux, not glibc) both
change nothing. Effects on step time and peak RSS: bench/RESULTS.md.
"""

from __future__ import annotations

import functools
import logging
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

    Kept blocks are reused only where the next tensor fits; the rest stays resident. Generation,
    each training micro-batch and the optimizer step allocate different tensor sizes, so the
    trainer calls this before each of them (`malloc_trim(0)`: the kept pages are dropped, the
    address space stays; each phase then page-faults in only what it uses). Peak RSS and cost:
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
