"""Crash safety: a run killed anywhere, or left with torn files or a full disk, resumes to weights
equal (torch.equal) to those of the uninterrupted run.

Every run is `tests/crash_worker.py`'s: a tiny Llama, 3 optimizer steps, a checkpoint after each
(with the synced reference model inside), at most two kept. The worker forks one child process
per run, so the cost of importing torch is paid once. Each case: a first child dies (SIGKILL at a
chosen point, or `OSError(ENOSPC)` from a writer), or its newest checkpoint is damaged; a second
child resumes with `resume_from_checkpoint=True` and must finish with the uninterrupted run's
final model and reference model, metrics and completions logged once per step, and no hidden
temporary file or folder left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import grpokit
from grpokit.train import checkpoint as ckpt
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.slow

MAX_STEPS = 3
KILL_POINTS = 24  # spread evenly over the run's points, plus any kind of point not hit by those
WEIGHT_FILES = ("model.safetensors", "ref_model.safetensors")

Run = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("crash")
    model = save_tiny_model(str(root / "model"))
    repo = Path(__file__).resolve().parent.parent
    src = Path(grpokit.__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), str(repo), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, str(repo / "tests" / "crash_worker.py"), model],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    names = Counter[str]()

    def run(name: str, output_dir: Path, **job: Any) -> dict[str, Any]:
        names[name] += 1
        log = root / f"{name}-{names[name]}.log"
        job = {"output_dir": str(output_dir), "log": str(log), **job}
        proc.stdin.write(json.dumps(job) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        answer = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        answer["log"] = log.read_text() if log.exists() else ""
        return answer

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(worker: Run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: its final tensors and the labels of all its points, in order."""
    out = tmp_path_factory.mktemp("reference")
    trace = out.parent / "trace.json"
    answer = worker("reference", out / "run", trace=str(trace))
    assert answer["exit_code"] == 0, answer["log"][-3000:]
    final = out / "run" / f"checkpoint-{MAX_STEPS}"
    return {
        "tensors": {name: load_file(final / name) for name in WEIGHT_FILES},
        "labels": json.loads(trace.read_text()),
    }


def check_finished_like_reference(answer: dict[str, Any], out: Path, ref: dict[str, Any]) -> None:
    assert answer["exit_code"] == 0, answer["log"][-3000:]
    final = out / f"checkpoint-{MAX_STEPS}"
    ckpt.verify_checkpoint(final)
    for name in WEIGHT_FILES:
        got, want = load_file(final / name), ref["tensors"][name]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"{out}: {name} {key}"
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    # N = 4 completions per step, each logged once.
    assert _steps(out / "completions.jsonl") == [1] * 4 + [2] * 4 + [3] * 4
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def _steps(jsonl: Path) -> list[int]:
    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines()]


def kind(label: str) -> str:
    """The part of the run a point belongs to: generation, reward, update or checkpoint."""
    return label.split("/")[0]


def choose_kill_points(labels: list[str], count: int) -> list[int]:
    """`count` points (1-based) spread evenly over the run, plus the first point of every label
    that none of those hits (each checkpoint file's fsync, the rename, the reward, ...)."""
    n = len(labels)
    picks = {round(1 + i * (n - 1) / (count - 1)) for i in range(count)}
    hit = {labels[k - 1].split(" ")[0] for k in picks}
    for k, label in enumerate(labels, start=1):
        if label.split(" ")[0] not in hit:
            picks.add(k)
            hit.add(label.split(" ")[0])
    return sorted(picks)


def test_sigkill_anywhere_resumes_to_the_uninterrupted_weights(
    worker: Run, reference: dict[str, Any], tmp_path: Path
) -> None:
    labels = reference["labels"]
    points = choose_kill_points(labels, KILL_POINTS)
    assert len(points) >= 20
    kinds = Counter(kind(labels[k - 1]) for k in points)
    assert {"generation", "reward", "update", "checkpoint"} <= set(kinds)
    for k in points:
        out = tmp_path / f"kill-{k}"
        killed = worker("kill", out, kill_at=k)
        assert killed["signal"] == signal.SIGKILL, (k, labels[k - 1], killed["log"][-2000:])
        resumed = worker("resume", out)
        check_finished_like_reference(resumed, out, reference)
    print(f"\nSIGKILL at {len(points)} points of {len(labels)}: {dict(kinds)}")


# How each kind of damage to the newest checkpoint is done, and the reason it is skipped for.
TEARS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "truncated weights": (
        "model.safetensors",
        lambda f: os.truncate(f, f.stat().st_size // 2),
        "torn file model.safetensors",
    ),
    "empty trainer state": ("trainer_state.json", lambda f: os.truncate(f, 0), "torn file"),
    "flipped optimizer byte": (
        "optimizer.pt",
        lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]),
        "hash mismatch in optimizer.pt",
    ),
    "flipped reference byte": (
        "ref_model.safetensors",
        lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])),
        "hash mismatch in ref_model.safetensors",
    ),
    "no manifest": ("manifest.json", lambda f: f.unlink(), "missing manifest.json"),
    "no rng state": ("rng_state.json", lambda f: f.unlink(), "missing file rng_state.json"),
}


def test_torn_newest_checkpoint_is_skipped_with_its_reason(
    worker: Run, reference: dict[str, Any], tmp_path: Path
) -> None:
    labels = reference["labels"]
    third_round = [k for k, label in enumerate(labels, 1) if label == "generation/start"][2]
    base = tmp_path / "base"
    assert worker("kill", base, kill_at=third_round)["signal"] == signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(base)] == ["checkpoint-1", "checkpoint-2"]
    for name, (file, tear, reason) in TEARS.items():
        out = tmp_path / name.replace(" ", "-")
        shutil.copytree(base, out)
        tear(out / "checkpoint-2" / file)
        resumed = worker("torn", out)
        assert f"skipping {out / 'checkpoint-2'}: {reason}" in resumed["log"], name
        assert "resumed from" in resumed["log"] and "checkpoint-1 at step 1" in resumed["log"]
        check_finished_like_reference(resumed, out, reference)
    print(f"\ntorn checkpoints skipped: {len(TEARS)}")


def test_disk_full_mid_checkpoint_keeps_the_previous_one(
    worker: Run, reference: dict[str, Any], tmp_path: Path
) -> None:
    labels = reference["labels"]
    fsyncs = [label for label in labels if label.startswith("checkpoint/fsync")]
    manifest_of_3 = [i for i, label in enumerate(fsyncs, 1) if label.endswith("manifest.json")][2]
    cases = {
        # optimizer.pt of checkpoint-2 is the 3rd torch.save: half written, then ENOSPC.
        "torch.save of checkpoint-2": ({"call": "torch.save", "nth": 3}, 2),
        # fsync of checkpoint-3's manifest fails.
        "fsync of checkpoint-3's manifest": ({"call": "fsync", "nth": manifest_of_3}, 3),
    }
    for name, (fault, step) in cases.items():
        out = tmp_path / name.split(" ")[0]
        failed = worker("enospc", out, enospc=fault)
        assert failed["exit_code"] == 1 and "No space left on device" in failed["log"], name
        assert not (out / f"checkpoint-{step}").exists()
        assert ckpt.latest_checkpoint(out) == out / f"checkpoint-{step - 1}"
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
        check_finished_like_reference(worker("resume", out), out, reference)
    print(f"\ndisk-full failures recovered: {len(cases)}")
