"""Generation-engine benchmark: seconds per `generate` call for each optimisation, one at a time.

Workload (issue 5): SmolLM2-135M-Instruct, 2 prompts x 8 completions, at most 128 new tokens,
temperature 1, called under bf16 autocast as the trainer does. Mode "fixed" forces every completion
to 128 tokens (`min_new_tokens`), so every variant does identical work; "natural" stops at EOS.

Variants (each a `TransformersEngine` configuration; each row adds one change to the row above,
except "plain" and "hf+bf16"):
    plain        model.generate on G-times-repeated prompts, fp32 weights under autocast
    hf+bf16      model.generate from the bf16 sampler copy
    lean         own decode loop, no prefill sharing, fp32 weights under autocast
    lean+share   ... each prompt prefilled once for its G completions
    +bf16        ... sampling from the bf16 copy (sdpa attention, as the policy)
    +eager       ... grouped attention in the copy (`core.attention`)
    +icdf        ... drawing by inverse CDF instead of torch.multinomial
    +step        ... decode steps through `engines.llama_decode` instead of transformers'
                 forward: the default engine on a bf16-native CPU (under --lora the copy holds
                 the adapters merged)
    +step-apart  ... under --lora, the copy keeps the PEFT layers, adapters apart
                 (`merge_adapters=False`, as under FSDP2 and ZeRO-3)
    fp32         the float32 policy samples itself, as on a CPU without native bf16: no
                 autocast, grouped attention, linear weights in oneDNN float32 packs
                 (`DecodePacks`, float16 panels off), decode steps through transformers'
                 forward
    fp32+fp16    ... frozen and trainable weights as fbgemm float16 panels (`DecodePacks`
                 repacks the trainable ones at each call, as after an optimizer step)
    fp32+fp16+step ... decode steps through `engines.llama_decode`: the default engine on a
                 CPU without native bf16

The fp32 variants run apart from the others (the trainer's float32 set-up: glibc keeps freed
memory, grouped attention in the policy). With --lora R the policy is wrapped in a LoRA adapter
of rank R on every linear layer (B drawn, so the adapters count): its base weights are frozen,
as in the demo on a CPU without native bf16; without it every weight trains.

With --interleave the variants' engines are built once and called in turn, round after round
(slow drifts of a shared machine then hit every variant alike), and whether every variant drew the
same tokens in each round is printed too.

Printed per variant and thread count: median wall seconds per call, median CPU seconds per call
(process time; steadier than wall time on a shared machine when running one thread), completion
tokens per second (wall) and the 1-minute load average. No assertion on timings.

With --extras, also: the cost of `update_weights` after every parameter changed (a full
fine-tuning step), and the gap between the sampler's `sampling_logprobs` and the trainer's
log-probs (fp32 weights under bf16 autocast) on the same completions.

Usage:
    python bench/bench_generation.py --mode fixed natural --threads 1 --repeats 3 --extras
    python bench/bench_generation.py --mode fixed --variants +icdf +step --threads 2 --interleave
    python bench/bench_generation.py --count-ops   # tensor operations of one decode step
    python bench/bench_generation.py --mode fixed --variants fp32 fp32+fp16 fp32+fp16+step \
        --threads 2 --interleave --max-new-tokens 128 [--lora 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from grpokit.core.logprobs import model_completion_logprobs
from grpokit.engines.base import SamplingParams
from grpokit.engines.models import load_causal_lm
from grpokit.engines.transformers_engine import TransformersEngine

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
)
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": dict(decode="hf", bf16_sampler=False),
    "hf+bf16": dict(decode="hf", bf16_sampler=True, sampler_attention=None),
    "lean": dict(share_prompt_prefill=False, bf16_sampler=False),
    "lean+share": dict(bf16_sampler=False),
    "+bf16": dict(bf16_sampler=True, sampler_attention=None),
    "+eager": dict(bf16_sampler=True, decode_step=False),
    "+icdf": dict(bf16_sampler=True, draw="inverse_cdf", decode_step=False),
    "+step": dict(bf16_sampler=True, draw="inverse_cdf"),
    "+step-apart": dict(bf16_sampler=True, draw="inverse_cdf", merge_adapters=False),
    "fp32": dict(
        bf16_sampler=False,
        fp16_frozen_weights=False,
        fp16_trainable_weights=False,
        decode_step=False,
    ),
    "fp32+fp16": dict(
        bf16_sampler=False,
        fp16_frozen_weights=True,
        fp16_trainable_weights=True,
        decode_step=False,
    ),
    "fp32+fp16+step": dict(
        bf16_sampler=False, fp16_frozen_weights=True, fp16_trainable_weights=True
    ),
}
FP32_VARIANTS = ("fp32", "fp32+fp16", "fp32+fp16+step")


def chat_prompt_ids(tokenizer: Any) -> list[list[int]]:
    """The prompts rendered with the chat template, as token-id lists."""
    out = []
    for text in PROMPTS:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def call(
    engine: TransformersEngine, prompt_ids: list[list[int]], args: argparse.Namespace, mode: str
) -> Any:
    """One `generate` call under bf16 autocast (none for the fp32 variants), as the trainer
    makes it."""
    kwargs = {"min_new_tokens": args.max_new_tokens} if mode == "fixed" else {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
        return engine.generate(
            prompt_ids,
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            sampling=SamplingParams(generation_kwargs=kwargs),
        )


def time_calls(
    engine: Any,
    prompt_ids: list[list[int]],
    args: argparse.Namespace,
    mode: str,
    call_fn: Callable[..., Any] | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
) -> tuple[list[float], list[float], list[int]]:
    """One warm-up call, then `args.repeats` timed calls of `call_fn` (default `call`):
    `(wall s, cpu s, completion tokens)`, one entry per timed call; CPU seconds by `cpu_clock`
    (default: this process's)."""
    call_fn = call_fn or call
    walls, cpus, tokens = [], [], []
    for i in range(args.repeats + 1):
        torch.manual_seed(i)
        wall, cpu = time.perf_counter(), cpu_clock()
        out = call_fn(engine, prompt_ids, args, mode)
        if i > 0:  # call 0 is the warm-up
            walls.append(time.perf_counter() - wall)
            cpus.append(cpu_clock() - cpu)
            tokens.append(int(out.completion_mask.sum()))
    return walls, cpus, tokens


def time_interleaved(
    engines: dict[str, Any], prompt_ids: list[list[int]], args: argparse.Namespace, mode: str
) -> tuple[dict[str, list[float]], list[bool]]:
    """One warm-up round, then `args.repeats` rounds calling each engine once (same seed per
    round): `(wall s per call by variant, whether all variants drew the same tokens, by round)`."""
    walls: dict[str, list[float]] = {name: [] for name in engines}
    same = []
    for i in range(args.repeats + 1):
        outs = []
        for name, engine in engines.items():
            torch.manual_seed(i)
            wall = time.perf_counter()
            outs.append(call(engine, prompt_ids, args, mode).completion_ids)
            if i > 0:
                walls[name].append(time.perf_counter() - wall)
        if i > 0:
            same.append(all(torch.equal(outs[0], out) for out in outs[1:]))
    return walls, same


def count_step_ops(model: Any, tokenizer: Any, prompt_ids: list[list[int]]) -> tuple[int, int]:
    """Tensor operations dispatched by one decode step of the default engine's sampler (16 rows,
    right after the prefill): `(through LlamaDecodeStep, through transformers' forward)`."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from grpokit.engines.base import left_pad, plain_forward

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops += 1
            return func(*args, **(kwargs or {}))

    engine = TransformersEngine(model, tokenizer, bf16_sampler=True)
    if engine.decode_step is None:
        raise SystemExit("this model's sampler has no LlamaDecodeStep")
    forward = plain_forward(engine.sampler_model)
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache, _, positions = engine._prefilled(forward, ids, mask, 8, 8)
        tokens = torch.arange(ids.shape[0] * 8)  # [N]
        step_mask = torch.cat([mask.repeat_interleave(8, 0), mask.new_ones(len(tokens), 1)], 1)
        other = copy.deepcopy(cache)
        with Count() as ours:
            engine.decode_step(tokens, step_mask, positions, cache)
        with Count() as theirs:
            forward(
                input_ids=tokens[:, None],
                attention_mask=step_mask,
                position_ids=positions,
                past_key_values=other,
                use_cache=True,
            )
    return ours.ops, theirs.ops


def update_seconds(engine: Any, model: Any) -> float:
    """Median seconds of `engine.update_weights` (3 calls) after every parameter changed, as in
    a full fine-tuning step."""
    seconds = []
    for _ in range(3):
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.0)  # bumps the version counter: every parameter counts as changed
        start = time.perf_counter()
        engine.update_weights(model)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def report_update_cost(model: Any, tokenizer: Any) -> None:
    """Seconds per `update_weights` after every parameter changed (a full fine-tuning step)."""
    seconds = update_seconds(TransformersEngine(model, tokenizer, bf16_sampler=True), model)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"update_weights, all {millions:.0f}M parameters: {seconds:.3f} s")


def report_logprob_gap(
    model: Any, tokenizer: Any, prompt_ids: list[list[int]], args: argparse.Namespace
) -> None:
    """|sampler - trainer| log-prob statistics over the completion tokens of one natural call
    (under --lora also for the bf16 copy holding the adapters apart)."""
    samplers = {"bf16 copy": {"bf16_sampler": True}, "fp32+autocast": {"bf16_sampler": False}}
    if args.lora:
        samplers["bf16 copy, adapters apart"] = {"bf16_sampler": True, "merge_adapters": False}
    for name, settings in samplers.items():
        engine = TransformersEngine(model, tokenizer, return_logprobs=True, **settings)
        torch.manual_seed(0)
        out = call(engine, prompt_ids, args, "natural")
        print(f"{name} sampler vs fp32+autocast trainer, {logprob_gap_summary(model, out)}")


def logprob_gap_summary(model: Any, out: Any) -> str:
    """Statistics of |out.sampling_logprobs - the trainer's log-probs| (fp32 weights under bf16
    autocast) over the completion tokens of a `GenerationOutput`."""
    t = out.completion_ids.shape[1]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trainer_logprobs, _ = model_completion_logprobs(
            model,
            torch.cat([out.prompt_ids, out.completion_ids], 1),
            torch.cat([out.prompt_mask, out.completion_mask], 1),
            t,
        )  # [N, T]
    mask = out.completion_mask.bool()
    diff = (out.sampling_logprobs - trainer_logprobs) * mask  # [N, T]
    tokens = diff[mask]
    return (
        f"{int(mask.sum())} tokens: mean |diff| {tokens.abs().mean():.4f}, max |diff| "
        f"{tokens.abs().max():.4f}, mean diff {tokens.mean():+.4f}, median |per-sequence sum| "
        f"{diff.sum(1).abs().median():.3f}"
    )


def float32_policy(model: Any) -> Any:
    """The trainer's float32 set-up on a CPU without native bf16: glibc keeps freed memory,
    grouped attention."""
    from grpokit.core.attention import use_grouped_attention
    from grpokit.train.host_memory import retain_freed_memory

    retain_freed_memory()
    use_grouped_attention(model)
    return model


def with_lora(model: Any, lora_rank: int) -> Any:
    """`model` with a LoRA adapter of rank `lora_rank` on every linear layer, B drawn small."""
    import peft

    config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mode", nargs="+", default=["fixed", "natural"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--extras", action="store_true", help="update cost and log-prob gap")
    parser.add_argument("--interleave", action="store_true", help="variants called in turn")
    parser.add_argument("--count-ops", action="store_true", help="operations of one decode step")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = none)")
    args = parser.parse_args()
    args.fp32 = any(name in FP32_VARIANTS for name in args.variants)
    if args.fp32 and not set(args.variants) <= set(FP32_VARIANTS):
        parser.error(f"run the variants {FP32_VARIANTS} apart from the others")
    if args.fp32 and (args.extras or args.count_ops):
        parser.error("--extras and --count-ops measure the bf16 sampler copy")

    model, tokenizer = load_causal_lm(args.model)
    if args.fp32:
        model = float32_policy(model)
    if args.lora:
        model = with_lora(model, args.lora)
    model.eval()
    prompt_ids = chat_prompt_ids(tokenizer)
    print(
        f"{args.model}: {len(prompt_ids)} prompts x {args.num_generations} completions, "
        f"max {args.max_new_tokens} new tokens, prompt lengths {[len(p) for p in prompt_ids]}"
    )
    if args.count_ops:
        ours, theirs = count_step_ops(model, tokenizer, prompt_ids)
        layers = model.config.num_hidden_layers
        print(
            f"one decode step: {ours} operations through LlamaDecodeStep ({ours / layers:.0f} a "
            f"layer), {theirs} through transformers' forward ({theirs / layers:.0f} a layer)"
        )
        return
    if args.interleave:
        torch.set_num_threads(args.threads[0])
        engines = {
            name: TransformersEngine(model, tokenizer, **VARIANTS[name]) for name in args.variants
        }
        for mode in args.mode:
            walls, same = time_interleaved(engines, prompt_ids, args, mode)
            for name, values in walls.items():
                runs = " ".join(f"{v:.2f}" for v in values)
                print(f"{mode:8} {name:14} wall s {runs}; median {statistics.median(values):.2f}")
            print(f"{mode:8} same tokens in every round: {same}; load {os.getloadavg()[0]:.1f}")
        return
    print(f"{'mode':8} {'variant':11} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'tok/s':>6}  load")
    for mode in args.mode:
        for name in args.variants:
            for threads in args.threads:
                engine = TransformersEngine(model, tokenizer, num_threads=threads, **VARIANTS[name])
                walls, cpus, tokens = time_calls(engine, prompt_ids, args, mode)
                wall = statistics.median(walls)
                print(
                    f"{mode:8} {name:11} {threads:>3} {wall:7.2f} {statistics.median(cpus):7.2f} "
                    f"{tokens[-1] / wall:6.0f}  {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    if args.extras:
        torch.set_num_threads(min(args.threads))
        report_update_cost(model, tokenizer)
        report_logprob_gap(model, tokenizer, prompt_ids, args)


if __name__ == "__main__":
    main()
