"""Multi-turn generation: seconds per `generate_turns` call, vLLM in the process
(`VLLMEngine`) vs grpokit's `TransformersEngine`.

Workload: SmolLM2-135M-Instruct, 2 chat prompts x 8 completions, at most 256 completion tokens per
row (the model's and the appended ones together), temperature 1. Every turn that ends with EOS
gets the same reply appended (REPLY, ChatML; ready at once, no tool runs), for up to 2 rounds,
so a row has up to 3 model turns. Engines:

    transformers     TransformersEngine.generate_turns (default configuration: bf16 sampler copy;
                     each row's KV cache kept across turns), under bf16 autocast as the trainer
    vllm             VLLMEngine.generate_turns: one vLLM request per model turn, the history
                     served by the prefix cache, rows never waiting for each other
    vllm-reprefill   multi_turn.reprefill_turns on the same VLLMEngine: one `generate` per turn
                     on the rows still going, all of them waiting for the turn's slowest row
    vllm-nocache     VLLMEngine.generate_turns with enable_prefix_caching=False (every turn
                     prefills the whole history)

vLLM's prefix cache is emptied before every call (a training step's weight update does that), so
no call reuses an earlier call's prompts. Printed per engine: median wall and CPU (process)
seconds of `--repeats` calls after one warm-up, model and appended tokens per call (mean), model
tokens per wall second, for `generate_turns` on vLLM the later turns' prefix tokens and how many
came from the prefix cache, and the 1-minute load average before and after. Before each engine
the script waits (up to `--wait` s) for the load average to fall below `--max-load`. No
assertion on timings.

Environment: bench/.venv-vllm (bench/requirements-vllm.txt). Usage:
    PYTHONPATH=src bench/.venv-vllm/bin/python bench/bench_vllm_turns.py --threads 1
    PYTHONPATH=src bench/.venv-vllm/bin/python bench/bench_vllm_turns.py --engines vllm \
        --block-size 32   # vLLM's CPU default is 128 tokens: the cache reuses whole blocks only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine core in-process

import torch

from grpokit.engines.base import GenerationOutput, SamplingParams
from grpokit.engines.models import load_causal_lm
from grpokit.engines.multi_turn import reprefill_turns
from grpokit.engines.transformers_engine import TransformersEngine

sys.path.insert(0, str(Path(__file__).parent))
from bench_generation import chat_prompt_ids

REPLY = "\n<|im_start|>user\nTool result: 42. Go on.<|im_end|>\n<|im_start|>assistant\n"


class FixedReplies:
    """A `TurnHandler` appending `reply` after each of a row's first `rounds` turns (when it
    fits), ready at once."""

    def __init__(self, reply: list[int], rounds: int) -> None:
        self.reply, self.rounds = reply, rounds
        self.used: dict[int, int] = {}

    def end_turn(self, row: int, turn_ids: list[int], room: int) -> Future[list[int] | None] | None:
        if self.used.get(row, 0) >= self.rounds:
            return None
        self.used[row] = self.used.get(row, 0) + 1
        future: Future[list[int] | None] = Future()
        future.set_result(self.reply if len(self.reply) < room else None)
        return future


def call(name: str, engine: Any, prompt_ids: list[list[int]], args: Any) -> GenerationOutput:
    """One multi-turn call of engine `name`."""
    kwargs: dict[str, Any] = dict(
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=1.0),
        turns=FixedReplies(args.reply_ids, args.rounds),
    )
    if name == "transformers":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return engine.generate_turns(prompt_ids, **kwargs)  # type: ignore[no-any-return]
    engine.llm.reset_prefix_cache()
    if name == "vllm-reprefill":
        return reprefill_turns(engine, prompt_ids, **kwargs)
    return engine.generate_turns(prompt_ids, **kwargs)  # type: ignore[no-any-return]


def time_engine(name: str, engine: Any, prompt_ids: list[list[int]], args: Any) -> None:
    load_before = wait_for_quiet(args)
    walls, cpus, model_tokens, appended, prefix, cached = [], [], [], [], 0, 0
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        wall, cpu = time.perf_counter(), time.process_time()
        out = call(name, engine, prompt_ids, args)
        if i == 0:  # warm-up
            continue
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert out.tool_mask is not None
        model_tokens.append(int(out.model_mask.sum()))
        appended.append(int((out.completion_mask * (1 - out.tool_mask)).sum()))
        stats = getattr(engine, "last_turn_stats", None)
        if stats is not None and name != "vllm-reprefill":
            prefix, cached = prefix + stats.prefix_tokens, cached + stats.cached_tokens
    cache = f"  later-turn prefix {prefix // args.repeats}, cached {cached // args.repeats}"
    print(
        f"{name:15} {args.threads:>3} {statistics.median(walls):7.2f} "
        f"{statistics.median(cpus):7.2f} {statistics.mean(model_tokens):7.0f} "
        f"{statistics.mean(appended):7.0f} {sum(model_tokens) / sum(walls):6.0f}  "
        f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}"
        + (cache if name in ("vllm", "vllm-nocache") else ""),
        flush=True,
    )


def wait_for_quiet(args: argparse.Namespace) -> float:
    """Wait up to `args.wait` s for the 1-minute load average to drop below `args.max_load`."""
    deadline = time.monotonic() + args.wait
    while os.getloadavg()[0] > args.max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["transformers", "vllm", "vllm-reprefill", "vllm-nocache"],
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="replies appended per row")
    parser.add_argument(
        "--block-size", type=int, default=None, help="vLLM's KV block size (default: vLLM's)"
    )
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=120, help="max seconds to wait for quiet")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    prompt_ids = chat_prompt_ids(tokenizer)
    args.reply_ids = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    print(
        f"{args.model}: {len(prompt_ids)} prompts x {args.num_generations} completions, "
        f"max {args.max_new_tokens} completion tokens, up to {args.rounds} replies of "
        f"{len(args.reply_ids)} tokens, prompt lengths {[len(p) for p in prompt_ids]}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'engine':15} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'model':>7} {'append':>7} "
        f"{'tok/s':>6}  load before -> after",
        flush=True,
    )
    if "transformers" in args.engines:
        time_engine("transformers", TransformersEngine(model, tokenizer), prompt_ids, args)
    longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
    blocks = {} if args.block_size is None else {"block_size": args.block_size}
    vllm_names = [n for n in ("vllm", "vllm-reprefill") if n in args.engines]
    if vllm_names or "vllm-nocache" in args.engines:
        from grpokit.engines.vllm_engine import VLLMEngine

        if vllm_names:
            engine = VLLMEngine(model, tokenizer, max_model_len=longest, **blocks)
            torch.set_num_threads(args.threads)
            for name in vllm_names:
                time_engine(name, engine, prompt_ids, args)
        if "vllm-nocache" in args.engines:
            plain = VLLMEngine(
                model, tokenizer, max_model_len=longest, enable_prefix_caching=False, **blocks
            )
            torch.set_num_threads(args.threads)
            time_engine("vllm-nocache", plain, prompt_ids, args)


if __name__ == "__main__":
    main()
