"""bench/gpu_check.py: skips without a GPU, and its checks (run here with `--device cpu` on a
tiny model) pass on a correct run and catch a sampler copy that missed the last weight sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit.engines import device
from grpokit.engines.transformers_engine import TransformersEngine

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_a_gpu_it_says_so_and_skips() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(BENCH.parent / "src")}
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: skipped: no CUDA device")
    assert "--device cpu" in done.stdout  # says how to run the checks anyway
    assert "steps:" not in done.stdout  # nothing was trained


def test_the_checks_pass_on_a_correct_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--device", "cpu", "--max-completion-length", "8"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.rstrip().endswith("gpu_check: all checks passed")
    assert "step 1: loss" in out and "step 2: loss" in out
    assert "[ok] every loss is finite" in out
    assert "peak RSS:" in out


def test_a_stale_sampler_copy_fails_the_check(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An engine that never copies the optimizer's updates into its sampler: the last step's
    # update is missing from the bf16 copy (only a bf16 copy can go stale).
    monkeypatch.setattr(TransformersEngine, "update_weights", lambda self, model: None)
    monkeypatch.setattr(device, "bf16_supported", lambda device_type=None: True)  # a bf16 copy
    assert gpu_check.main(["--device", "cpu", "--max-completion-length", "8"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "[FAIL]" in line]
    assert len(failed) == 1 and "sampler copy equals the policy after the sync" in failed[0]
    assert out.rstrip().endswith("gpu_check: FAILED 1 check(s)")


def test_collective_checks_on_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two processes simulated: rank 1 of 2 over gloo, where every collective sees both
    # processes' values (the other process holds rank 0 and the same ones).
    import torch

    from grpokit.train.distributed import World

    def all_reduce(tensor: torch.Tensor, op: object = None) -> None:
        if op == torch.distributed.ReduceOp.SUM:
            tensor.mul_(2)  # the other process's equal share

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        parts[0].copy_(tensor - 1)  # rank 0's
        parts[1].copy_(tensor)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    assert gpu_check.collective_checks(World()) == []  # one process: nothing to check
    checks = gpu_check.collective_checks(World(num_processes=2, process_index=1))
    assert [ok for ok, _ in checks] == [True, True, True], checks
    assert "over 2 processes (gloo): [2.0, 2.0] on cpu" in checks[0][1]
    # A sum that comes back wrong fails its check.
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None: None)
    checks = gpu_check.collective_checks(World(num_processes=2, process_index=1))
    assert [ok for ok, _ in checks] == [False, True, True], checks
