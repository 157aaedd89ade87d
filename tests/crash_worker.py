"""Fork server for tests/test_crash_safety.py: runs tiny GRPO trainings that die on purpose.

Started once as `python tests/crash_worker.py MODEL_DIR`; it imports torch, transformers and
grpokit once, then reads one JSON job per line on stdin, runs each in a forked child process and
answers one JSON line on stdout: `{"exit_code": int, "signal": int}` (signal 9 = SIGKILL).

A job is `{"output_dir", "log", "kill_at": k | null, "enospc": {"call", "nth"} | null,
"trace": path | null}`. The child trains `run_config()` (3 optimizer steps, a checkpoint after
each) with `resume_from_checkpoint=True` when output_dir holds a checkpoint. Every "point" of the
run counts: the start and end of each generation and each decode forward of the sampler, each
reward call, each forward of the policy in the update, before and after each optimizer step, and
in checkpoint writing each `os.fsync` (files, manifest, folders) and each `os.rename`. With
`kill_at=k` the child SIGKILLs itself at point k; with `enospc` the n-th `torch.save` (the file
written half, then `OSError(ENOSPC)`) or `os.fsync` call fails as a full disk would. `trace`
writes the labels of every point, in order.

Only public hooks are used: an injected generation engine, the reward function, torch forward
and optimizer-step hooks, and the stdlib/torch writers.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.train.checkpoint import list_checkpoints

PROMPTS = [{"prompt": p} for p in ["ab", "cd", "ef", "gh", "ij", "kl"]]


def run_config(output_dir: str) -> GRPOConfig:
    """The run every job trains: KL with a synced reference model (so the reference is part of
    every checkpoint), completions logged, at most two checkpoints kept."""
    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        max_steps=3,
        learning_rate=1e-2,
        beta=0.1,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.5,
        logging_steps=1,
        log_completions=True,
        save_steps=1,
        save_total_limit=2,
        bf16=False,
        seed=0,
    )


class Points:
    """Counts the points of a run; kills the process or fails a write where the job says."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.kill_at: int | None = job.get("kill_at")
        self.enospc: dict[str, Any] | None = job.get("enospc")
        self.trace: str | None = job.get("trace")
        self.count = 0
        self.calls: dict[str, int] = {}
        self.phase = "start"
        self.labels: list[str] = []

    def point(self, label: str) -> None:
        self.count += 1
        if self.trace is not None:
            self.labels.append(label)
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def fail_now(self, call: str) -> bool:
        self.calls[call] = self.calls.get(call, 0) + 1
        fault = self.enospc
        return bool(fault and fault["call"] == call and fault["nth"] == self.calls[call])

    def save_trace(self) -> None:
        if self.trace is not None:
            Path(self.trace).write_text(json.dumps(self.labels))


def install_writer_faults(points: Points) -> None:
    real_fsync, real_rename, real_save = os.fsync, os.rename, torch.save

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        points.point(f"checkpoint/fsync {name}")
        if points.fail_now("fsync"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        points.point(f"checkpoint/rename {Path(dst).name}")
        real_rename(src, dst)
        points.point(f"checkpoint/renamed {Path(dst).name}")

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        if points.fail_now("torch.save"):
            size = os.path.getsize(f)
            os.truncate(f, size // 2)  # the part that fitted on the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(f))

    os.fsync, os.rename, torch.save = fsync, rename, save  # type: ignore[assignment]


class PointEngine:
    """The default transformers engine, created on first use (after the trainer prepared and
    possibly restored the model), with points around and inside each generation."""

    def __init__(self, model: Any, tokenizer: Any, points: Points) -> None:
        self.model, self.tokenizer, self.points = model, tokenizer, points
        self.inner: TransformersEngine | None = None

    def generate(self, prompt_ids: Any, **kwargs: Any) -> Any:
        self.points.phase = "generation"
        self.points.point("generation/start")
        if self.inner is None:
            self.inner = TransformersEngine(self.model, self.tokenizer)
            sampler = self.inner.sampler_model
            if sampler is not self.model:
                sampler.model.layers[0].register_forward_pre_hook(
                    lambda *_: self.points.point("generation/forward")
                )
        out = self.inner.generate(prompt_ids, **kwargs)
        self.points.point("generation/end")
        return out

    def update_weights(self, model: Any) -> None:
        if self.inner is not None:
            self.inner.update_weights(model)


def run_job(model_dir: str, job: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    points = Points(job)
    install_writer_faults(points)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        points.phase = "reward"
        points.point("reward")
        points.phase = "update"
        return [float(sum(map(ord, c)) % 7) for c in completions]

    def on_forward(*_: Any) -> None:
        points.point(f"{points.phase}/forward")

    def after_step(*_: Any) -> None:
        points.point("update/after optimizer.step")
        points.phase = "checkpoint"

    trainer = GRPOTrainer(
        model,
        reward,
        args=run_config(job["output_dir"]),
        train_dataset=PROMPTS,
        processing_class=tokenizer,
        generation_engine=PointEngine(model, tokenizer, points),
    )
    trainer.model.model.layers[0].register_forward_pre_hook(on_forward)
    trainer.optimizer.register_step_pre_hook(lambda *_: points.point("update/optimizer.step"))
    trainer.optimizer.register_step_post_hook(after_step)
    resume = True if list_checkpoints(job["output_dir"]) else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        points.save_trace()


def child(model_dir: str, job: dict[str, Any]) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    code = 0
    try:
        run_job(model_dir, job)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    model_dir = sys.argv[1]
    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(model_dir, job)
        _, status = os.waitpid(pid, 0)
        answer = {
            "exit_code": os.waitstatus_to_exitcode(status),
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        }
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
