"""Where the resident memory of a grpokit training process goes, phase by phase.

Runs grpokit's `GRPOTrainer` on the bar workload of `bench_grpo.py` (SmolLM2-135M-Instruct, 2
prompts x 8 completions of 128 tokens, dapo, beta 0, bf16 autocast) for a few optimizer steps and
records, at each phase boundary, the process's resident set (`VmRSS`), the peak since the last
boundary (`VmHWM`, reset at each boundary through `/proc/self/clear_refs`) and glibc's heap
statistics (`mallinfo2`: bytes in use by live allocations and bytes freed but kept by the
allocator). Boundaries come from public hooks only: the trainer's callbacks, a wrapper around the
generation engine, and forward hooks on the policy (the sampler copy is a different module, so
they fire for training and log-prob forwards only).

Printed: one row per phase of each step (peak and end RSS, heap in use and heap free), then the
exact tensor bytes of the components that live across steps (policy weights, gradients, AdamW
moments, the sampler copy and its packed weights). The peak column never includes another phase.

Usage:
    python bench/memory_phases.py [--steps 2] [--set gradient_checkpointing=true ...] [--lora R]

`--set FIELD=VALUE` overrides a `GRPOConfig` field of the workload (VALUE is JSON, else a string):
e.g. `--set max_forward_tokens=null` for one forward per micro-batch instead of the CPU's default
bound.
Measures memory only: it needs no quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> tuple[float, float] | None:
    """(MiB in use by live malloc blocks, MiB freed but kept in the heap), or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / MIB, info.fordblks / MIB


def _status() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    return {
        key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024  # type: ignore[union-attr]
        for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    }


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PhaseLog:
    """Boundaries of the phases: each `mark(name)` closes the phase `name` that ran since the
    previous mark, recording its peak RSS and the state at its end."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    start: float = field(default_factory=time.perf_counter)

    def mark(self, name: str) -> None:
        status = _status()
        heap = _mallinfo()
        self.rows.append(
            {
                "step": self.step,
                "phase": name,
                "peak_mib": status["VmHWM"],
                "end_mib": status["VmRSS"],
                "anon_mib": status["RssAnon"],
                "file_mib": status["RssFile"],
                "heap_used_mib": heap[0] if heap else float("nan"),
                "heap_free_mib": heap[1] if heap else float("nan"),
                "t": time.perf_counter() - self.start,
            }
        )
        _reset_peak()

    def table(self) -> str:
        head = (
            "| step | phase (ends at) | peak RSS MiB | RSS at end | anon | file | heap in use "
            "| heap free (kept) | t s |"
        )
        out = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            out.append(
                f"| {r['step']} | {r['phase']} | {r['peak_mib']:.0f} | {r['end_mib']:.0f} | "
                f"{r['anon_mib']:.0f} | {r['file_mib']:.0f} | {r['heap_used_mib']:.0f} | "
                f"{r['heap_free_mib']:.0f} | {r['t']:.1f} |"
            )
        peak = max(r["peak_mib"] for r in self.rows)
        out.append(f"\nprocess peak RSS over all phases: {peak:.0f} MiB")
        return "\n".join(out)


def tensor_bytes(trainer: Any) -> dict[str, float]:
    """MiB of the components that live across steps (exact: tensor storage sizes)."""
    import torch

    from grpokit.engines.packed_linear import PackedLinear

    def size(tensors: Any) -> float:
        seen: dict[int, int] = {}
        for t in tensors:
            if not isinstance(t, torch.Tensor) or not t.numel():
                continue
            if t.is_mkldnn:  # an opaque oneDNN tensor (packed weights): no storage to inspect
                seen[id(t)] = t.numel() * t.element_size()
                continue
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values()) / MIB

    model = trainer.model
    out = {
        "policy weights": size(model.parameters()),
        "policy buffers": size(model.buffers()),
        "gradients (now)": size(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer state": size(
            v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0
        ),
    }
    sampler = getattr(trainer.engine, "sampler_model", None)
    if sampler is not None and sampler is not model:
        out["sampler copy parameters"] = size(sampler.parameters())
        layers = [m for m in sampler.modules() if isinstance(m, PackedLinear)]
        out["sampler packed weights"] = size(
            [m.packed for m in layers] + [m.group.packed for m in layers if m.group is not None]
        )  # a fused group's weight once (`size` counts each tensor once)
    if trainer.ref_model is not None:
        out["reference model"] = size(trainer.ref_model.parameters())
    return out


class PhaseEngine:
    """A generation engine wrapper marking the start and end of generation.

    With `fake`, completions are random tokens of full length drawn without the model (the
    training side's memory, minutes faster on a busy machine); the wrapped engine still holds
    its sampler copy and receives every weight update.
    """

    def __init__(self, engine: Any, log: PhaseLog, *, fake: bool = False) -> None:
        self.engine, self.log, self.fake = engine, log, fake
        self.sampler_model = getattr(engine, "sampler_model", None)
        self.calls = 0

    def generate(
        self, prompt_ids: list[list[int]], *, num_generations: int, max_new_tokens: int, **kw: Any
    ) -> Any:
        self.log.mark("before generation (prompts)")
        if self.fake:
            out = self.random_completions(prompt_ids, num_generations, max_new_tokens)
        else:
            out = self.engine.generate(
                prompt_ids, num_generations=num_generations, max_new_tokens=max_new_tokens, **kw
            )
        self.log.mark("generation")
        return out

    def random_completions(self, prompt_ids: list[list[int]], g: int, t: int) -> Any:
        import torch

        from grpokit.engines.base import GenerationOutput, left_pad

        self.calls += 1
        generator = torch.Generator().manual_seed(self.calls)
        ids, mask = left_pad(prompt_ids, self.engine.pad_token_id)  # [B, P]
        n = ids.shape[0] * g
        vocab = int(self.engine.model.config.vocab_size)
        eos = set(self.engine.eos_token_ids)
        completion = torch.randint(0, vocab, (n, t), generator=generator)  # [N, T]
        for token in eos:  # no EOS: every completion runs to T tokens, as in the fixed mode
            completion[completion == token] = (token + 1) % vocab
        return GenerationOutput(
            ids.repeat_interleave(g, dim=0),
            mask.repeat_interleave(g, dim=0),
            completion,
            torch.ones(n, t, dtype=torch.long),
            torch.ones(n, dtype=torch.bool),
        )

    def update_weights(self, model: Any) -> None:
        self.log.mark("scheduler, zero_grad")
        self.engine.update_weights(model)
        self.log.mark("sampler weight sync")

    def discard_trainable_copies(self, model: Any) -> None:
        discard = getattr(self.engine, "discard_trainable_copies", None)
        if callable(discard):
            discard(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0 = none)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--fake-generation",
        action="store_true",
        help="random full-length completions instead of sampling (training-side memory only)",
    )
    args = parser.parse_args()
    log = PhaseLog()
    if not _reset_peak():
        print("warning: /proc/self/clear_refs is not writable; peaks are cumulative")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_grpo

    model_path = bench_grpo.resolve_model(args.model)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from grpokit import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    log.mark("imports")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = bench_grpo.equal_length_prompts(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    log.mark("model load")
    workload = bench_grpo.Workload(lora_rank=args.lora)
    kwargs = workload.config_kwargs(tempfile.mkdtemp(prefix="memory-phases-"), args.steps)
    kwargs.update(bench_grpo.config_overrides(args.set))
    config = GRPOConfig(**kwargs)

    class Marks(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            log.step += 1
            log.mark("between steps (logging)")

        def on_pre_optimizer_step(self, *a: Any, **k: Any) -> None:
            log.mark("backward (after the last forward)")

        def on_optimizer_step(self, *a: Any, **k: Any) -> None:
            log.mark("clip + optimizer.step")

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=bench_grpo.length_reward,
        args=config,
        train_dataset=Dataset.from_list(bench_grpo.prompt_rows(prompts)),
        processing_class=tokenizer,
        callbacks=[Marks()],
        peft_config=workload.peft_config(),
    )
    log.mark("trainer init (sampler copy, packing, optimizer)")
    trainer.engine = PhaseEngine(trainer.engine, log, fake=args.fake_generation)
    trainer.model.register_forward_pre_hook(
        lambda *a: log.mark("rewards, advantages, batch (or previous backward)")
    )
    trainer.model.register_forward_hook(lambda *a: log.mark("forward"))
    trainer.train()
    log.mark("end of training")
    fake = ", random completions" if args.fake_generation else ""
    print(
        f"grpokit memory by phase: {args.model}, bar workload, {args.steps} steps, "
        f"overrides {args.set or 'none'}{fake}; LoRA rank {args.lora or 'none'}; "
        f"torch {torch.__version__}, {args.threads} threads"
    )
    print(log.table())
    print("\ncomponents alive now (MiB, exact tensor bytes):")
    for name, mib in tensor_bytes(trainer).items():
        print(f"  {name}: {mib:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(log.rows, indent=1))


if __name__ == "__main__":
    main()
