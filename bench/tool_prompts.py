"""Which prompt makes a small model call a tool: tool-call rate, validity and accuracy of
SmolLM2-135M-Instruct with the `calculator` tool on 3-digit products, for several prompt styles.

Each style renders the same held-out questions (reasoning-gym `products`, 3 x 3 digits, seeds
after the example's training range) with the `chatml_tools` template and the calculator's schema,
and samples one multi-turn rollout per question greedily and `--samples` at temperature 1 (one
round of tool calls, `--max-tokens` completion tokens), through grpokit's own rollout path.

Styles (examples/tools_calculator.yaml uses "calls2"):
    schemas   the question alone (the template's tool preamble lists the calculator)
    system    plus a system prompt asking to call the calculator for arithmetic
    full2     two example exchanges before the question: question, call, reply, answer
    calls2    two example exchanges before the question: question, then only the call

Usage:
    python bench/tool_prompts.py --styles schemas,system,full2,calls2 --questions 8

Prints one JSON line per style and decoding: `call_rate` (completions with a call), `valid`
(calls that parsed and ran without error / calls), `accuracy` (the last number of the answer is
the product), `prompt_tokens`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

QUESTION = (
    "Solve the following multiplication: {a} * {b}. Give only the result as your final answer."
)
SYSTEM = (
    "You are a helpful assistant. For any arithmetic, call the calculator tool, then give the "
    "final number."
)
EXAMPLES = ((12, 34), (205, 17))


def call(a: int, b: int) -> dict[str, Any]:
    function = {"name": "calculator", "arguments": {"expression": f"{a} * {b}"}}
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": function}],
    }


def prompt(style: str, question: str) -> list[dict[str, Any]]:
    """The conversation of one question in `style` (module docstring)."""
    turns: list[dict[str, Any]] = []
    if style == "system":
        turns.append({"role": "system", "content": SYSTEM})
    for a, b in EXAMPLES if style in ("full2", "calls2") else ():
        turns += [{"role": "user", "content": QUESTION.format(a=a, b=b)}, call(a, b)]
        if style == "full2":
            turns += [
                {"role": "tool", "name": "calculator", "content": str(a * b)},
                {"role": "assistant", "content": str(a * b)},
            ]
    return [*turns, {"role": "user", "content": question}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", default="schemas,system,full2,calls2")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import reasoning_gym
    import torch

    from grpokit.data.prompts import completion_text
    from grpokit.engines.base import SamplingParams
    from grpokit.engines.models import load_causal_lm
    from grpokit.engines.transformers_engine import TransformersEngine
    from grpokit.tools import ToolCalling
    from grpokit.tools.calculator import calculator_tool
    from grpokit.tools.chat import CHATML_TOOLS_TEMPLATE
    from grpokit.train.rollout import RolloutPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_causal_lm("smollm2-135m-instruct")
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    tools = ToolCalling.from_functions([calculator_tool()], max_iterations=1, timeout=10)
    data = reasoning_gym.create_dataset(
        "products", seed=5000, size=args.questions, min_terms=2, max_terms=2, min_digits=3,
        max_digits=3,
    )  # fmt: skip
    entries = [data[i] for i in range(args.questions)]
    engine = TransformersEngine(model, tok)
    torch.manual_seed(0)
    for style in args.styles.split(","):
        rows = [{"prompt": prompt(style, e["question"])} for e in entries]
        for mode, sampling, g in (
            ("greedy", SamplingParams(top_k=1), 1),
            ("temperature 1", SamplingParams(), args.samples),
        ):
            pipeline = RolloutPipeline(
                engine=engine,
                tokenizer=tok,
                reward_funcs=[],
                sampling=sampling,
                num_generations=g,
                max_new_tokens=args.max_tokens,
                tool_calling=tools,
            )
            batch = pipeline.tokenize(rows)
            gen = pipeline.generate(batch.prompt_ids)
            completions, _ = pipeline.decode([r["prompt"] for r in rows for _ in range(g)], gen)
            answers = [e["answer"] for e in entries for _ in range(g)]
            correct = 0
            for completion, answer in zip(completions, answers, strict=True):
                numbers = re.findall(r"-?\d[\d,]*", completion_text(completion))
                correct += bool(numbers) and numbers[-1].replace(",", "") == answer
            calls, errors = gen.turns.calls, gen.turns.errors
            result = {
                "style": style,
                "decoding": mode,
                "completions": len(completions),
                "call_rate": sum(c > 0 for c in calls) / len(calls),
                "valid": (sum(calls) - sum(errors)) / max(1, sum(calls)),
                "accuracy": correct / len(completions),
                "prompt_tokens": len(batch.prompt_ids[0]),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
