"""Generation-engine benchmark: seconds per `generate` call for each optimisation, one at a time.

Workload (issue 5): SmolLM2-135M-Instruct, 2 prompts x 8 completions, at most 128 new tokens,
temperature 1, called under bf16 autocast as the trainer does. Mode "fixed" forces every completion
to 128 tokens (`min_new_tokens`), so every variant does identical work; "natural" stops at EOS.

Variants (each a `TransformersEngine` configuration):
    plain        model.generate on G-times-repeated prompts, fp32 weights under autocast
    hf+bf16      model.generate from the bf16 sampler copy
    lean         own decode loop, no prefill sharing, fp32 weights under autocast
    lean+share   own decode loop, each prompt prefilled once for its G completions
    lean+share+bf16   the default engine on a bf16-native CPU

Printed per variant and thread count: median wall seconds per call, median CPU seconds per call
(process time; steadier than wall time on a shared machine when running one thread), completion
tokens per second (wall) and the load average. No assertion on timings.

Usage:
    python bench/bench_generation.py --mode fixed natural --threads 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from grpokit.generation import SamplingParams, TransformersEngine
from grpokit.models import load_causal_lm

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(decode="hf", bf16_sampler=False),
    "hf+bf16": dict(decode="hf", bf16_sampler=True),
    "lean": dict(share_prompt_prefill=False, bf16_sampler=False),
    "lean+share": dict(bf16_sampler=False),
    "lean+share+bf16": dict(bf16_sampler=True),
}


def chat_prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The prompts rendered with the chat template, as token-id lists."""
    out = []
    for text in PROMPTS:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def time_calls(
    engine: TransformersEngine, prompt_ids: list[list[int]], args: argparse.Namespace, mode: str
) -> tuple[list[float], list[float], int]:
    """Run one warm-up call, then `args.repeats` timed calls; `(wall s, cpu s, tokens of last)`."""
    kwargs = {"min_new_tokens": args.max_new_tokens} if mode == "fixed" else {}
    sampling = SamplingParams(generation_kwargs=kwargs)
    walls, cpus, tokens = [], [], 0
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = engine.generate(
                prompt_ids,
                num_generations=args.num_generations,
                max_new_tokens=args.max_new_tokens,
                sampling=sampling,
            )
        if i > 0:  # call 0 is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        tokens = int(out.completion_mask.sum())
    return walls, cpus, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mode", nargs="+", default=["fixed", "natural"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(args.model)
    model.eval()
    prompt_ids = chat_prompt_ids(tokenizer)
    print(
        f"{args.model}: {len(prompt_ids)} prompts x {args.num_generations} completions, "
        f"max {args.max_new_tokens} new tokens, prompt lengths {[len(p) for p in prompt_ids]}"
    )
    header = f"{'mode':8} {'variant':16} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'tok/s':>7}  load"
    print(header)
    for mode in args.mode:
        for name in args.variants:
            for threads in args.threads:
                engine = TransformersEngine(model, tokenizer, num_threads=threads, **VARIANTS[name])
                walls, cpus, tokens = time_calls(engine, prompt_ids, args, mode)
                wall = statistics.median(walls)
                load = os.getloadavg()[0]
                print(
                    f"{mode:8} {name:16} {threads:>3} {wall:7.2f} {statistics.median(cpus):7.2f} "
                    f"{tokens / wall:7.0f}  {load:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
