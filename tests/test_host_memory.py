"""The process's host memory: glibc keeping freed blocks (`retain_freed_memory`), returning
them (`release_freed_memory`) and when the trainer does (`KeptMemory`), and torch's huge-page
allocation set by `import grpokit`."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpokit.train import host_memory
from grpokit.train.host_memory import KeptMemory


def _policy(
    monkeypatch: pytest.MonkeyPatch, resident: list[int | None], **kwargs: object
) -> tuple[KeptMemory, list[str]]:
    """A `KeptMemory` reading `resident` in turn, and the list its releases append to."""
    released: list[str] = []
    monkeypatch.setattr(
        host_memory, "release_freed_memory", lambda: released.append("release") or True
    )
    values = iter(resident)
    return KeptMemory(resident=lambda: next(values), **kwargs), released  # type: ignore[arg-type]


def test_kept_memory_is_released_when_resident_memory_grows_past_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The third generation (two full steps behind it) sets the reference; a release only
    above reference x 1.25, after which the reference is set again two generations later
    (two full steps on fresh pages)."""
    mib = 2**20
    rss = [100, 150, 200, 240, 250, 251, 120, 160, 170, 212, 213]
    policy, released = _policy(monkeypatch, [r * mib for r in rss], active=True, every_phase=False)
    decisions = [policy.before_generation() for _ in rss]
    assert decisions == [False] * 5 + [True] + [False] * 3 + [True, False]
    assert released == ["release"] * 2 and policy.releases == 2
    assert not policy.before_phase()  # micro-batches and the optimizer step: never by default
    assert released == ["release"] * 2


def test_kept_memory_every_phase_inactive_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    policy, released = _policy(monkeypatch, [], active=True, every_phase=True)
    assert policy.before_generation() and policy.before_phase() and policy.before_phase()
    assert released == ["release"] * 3  # resident memory is never read
    policy, released = _policy(monkeypatch, [1, 10, 100], active=False, every_phase=True)
    assert not policy.before_generation() and not policy.before_phase()
    policy, released = _policy(monkeypatch, [1, 10, 100], active=False, every_phase=False)
    assert not any(policy.before_generation() for _ in range(3))
    policy, released = _policy(monkeypatch, [None] * 3, active=True, every_phase=False)
    assert not any(policy.before_generation() for _ in range(3))
    assert released == []


def test_resident_bytes_reads_this_process() -> None:
    """64 MiB of fresh anonymous pages, written, add about 64 MiB (not from the heap, which may
    hold freed blocks for reuse here)."""
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        assert host_memory.resident_bytes() is None
        return
    size = 64 * 2**20
    before = host_memory.resident_bytes()
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    after = host_memory.resident_bytes()
    block.close()
    assert before is not None and after is not None
    assert 56 * 2**20 < after - before < 200 * 2**20


def test_retain_freed_memory_keeps_a_freed_block_resident() -> None:
    """In a fresh process: without the setting, freeing a 256 MB tensor returns its pages to the
    OS (RSS drops); after `retain_freed_memory()` the freed block stays in the process for
    reuse (RSS stays)."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("glibc mallopt is Linux-only")
    script = """
import resource, torch
from grpokit.train.host_memory import retain_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

def drop_after_free():
    x = torch.ones(64 * 2**20)  # 256 MB
    held = rss_mb()
    del x
    return held - rss_mb()

print(drop_after_free())
print(retain_freed_memory())
print(drop_after_free())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    before, applied, after = float(out[0]), out[1], float(out[2])
    assert before > 200  # default glibc: the block was unmapped on free
    assert applied == "True"
    assert after < 20  # retained


@pytest.mark.parametrize("user_setting", [None, "0"])
def test_importing_grpokit_puts_large_cpu_tensors_on_huge_pages(user_setting: str | None) -> None:
    """In a fresh process, `import grpokit` sets `THP_MEM_ALLOC_ENABLE=1` before torch's first
    allocation unless the user set it: a 64 MiB tensor then lies on transparent huge pages; with
    the user's `0` it keeps 4 KiB pages (told apart where the kernel gives huge pages only on
    request, its `madvise` mode)."""
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("transparent huge pages are Linux-only")
    script = """
import os
import grpokit
import torch
from grpokit.train.host_memory import mapping_fields

x = torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
huge_kb = mapping_fields(x.data_ptr())["AnonHugePages"][0]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge_kb)
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    setting, huge_kb = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert setting == (user_setting or "1")
    mode_file = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = mode_file.read_text() if mode_file.exists() else "[never]"
    if "[never]" in mode or ("[always]" in mode and user_setting == "0"):
        return  # no huge pages at all, or huge pages whatever torch asks
    if user_setting is None:
        assert int(huge_kb) >= 32 * 1024  # most of the 64 MiB
    else:
        assert int(huge_kb) == 0


@pytest.mark.parametrize(
    ("first", "user_setting", "expected"),
    [
        ("import grpokit", None, "applied"),
        ("import torch; torch.ones(3); import grpokit", None, "missed"),
        ("import grpokit", "0", "off"),
    ],
)
def test_huge_pages_tells_whether_torch_applied_them(
    first: str, user_setting: str | None, expected: str
) -> None:
    """`huge_pages()` in a fresh process: "applied" when grpokit was imported before torch's
    first CPU allocation, "missed" (and `log_huge_pages` warns, naming the fix) when a tensor
    was made before, "off" with the user's `THP_MEM_ALLOC_ENABLE=0`; where the kernel never
    gives huge pages, "unavailable" whatever the order."""
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("transparent huge pages are Linux-only")
    script = f"""
import logging, sys
{first}
from grpokit.train.host_memory import huge_pages, log_huge_pages, retain_freed_memory

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
retain_freed_memory()  # large blocks from the heap, as in training
print(huge_pages(), log_huge_pages())
"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_setting
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    mode_file = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode_file.exists() or "[never]" in mode_file.read_text():
        expected = "unavailable"
    assert out.stdout.split() == [expected, expected]
    warned = "WARNING huge pages: not applied" in out.stderr
    assert warned == (expected == "missed")
    if warned:
        assert "Import grpokit before transformers" in out.stderr


def test_release_freed_memory_returns_a_kept_block_to_the_os() -> None:
    """In a fresh process with `retain_freed_memory()`: a freed 256 MB block below a live one
    (a hole inside the heap, not its top) stays resident until `release_freed_memory()`, which
    returns its pages; the live block keeps its values."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux":
        pytest.skip("glibc malloc_trim is Linux-only")
    script = """
import resource, torch
from grpokit.train.host_memory import release_freed_memory, retain_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

print(retain_freed_memory())
hole = torch.ones(64 * 2**20)  # 256 MB
live = torch.full((2**20,), 3.0)  # 4 MB above it
before_free = rss_mb()
del hole
kept = rss_mb()
print(before_free - kept)
print(release_freed_memory())
print(kept - rss_mb())
print(bool((live == 3.0).all()))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) < 20  # freed but kept
    assert out[2] == "True"
    assert float(out[3]) > 200  # returned
    assert out[4] == "True"


def test_parameters_loaded_from_safetensors_get_memory_of_their_own(tmp_path: Path) -> None:
    """A model loaded from safetensors in the file's dtype is a private mapping of the file
    (found by `private_file_mappings`); `own_file_mapped` copies exactly those tensors out of it,
    values, `Parameter` objects and the tied head kept, and finds nothing to copy a second time."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_causal_lm, make_tokenizer

    make_causal_lm(make_tokenizer(), tie_word_embeddings=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    params = list(model.parameters())
    mapped = host_memory.private_file_mappings()

    def in_a_mapping(tensor: torch.Tensor) -> bool:
        address = tensor.untyped_storage().data_ptr()
        return any(low <= address < high for low, high in mapped)

    assert all(in_a_mapping(p) for p in params)  # safetensors maps the file; nothing copied yet
    before = [p.detach().clone() for p in params]
    anonymous = torch.nn.Parameter(torch.ones(3))
    assert host_memory.own_file_mapped([*params, anonymous]) == len(params)
    mapped = host_memory.private_file_mappings()
    assert not any(in_a_mapping(p) for p in params)
    assert list(model.parameters()) == params and model.lm_head.weight is params[0]
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert host_memory.own_file_mapped(params) == 0
