"""Which prompt makes a small model call a tool: tool-call rate, validity and accuracy of
SmolLM2-135M-Instruct with the `calculator` tool on 3-digit products, for several prompt styles.

Each style renders the same held-out questions (the first `--questions` of the held-out split of
`--config`'s task: reasoning-gym `products`, 3 x 3 digits, the questions `grpokit train` evaluates
on) and samples one multi-turn rollout per question greedily and `--samples` at temperature 1
(one round of tool calls, `--max-tokens` completion tokens), through grpokit's own rollout path.
Every style but "none" uses the `chatml_tools` template with the calculator's schema; a call is
parsed and run in every style.

Styles (examples/tools_calculator.yaml uses "calls2"):
    none      the question in the model's own chat template, no tool schema
    schemas   the question alone (the template's tool preamble lists the calculator)
    system    plus a system prompt asking to call the calculator for arithmetic
    full2     two example exchanges before the question: question, call, reply, answer
    calls2    two example exchanges before the question: question, then only the call

Usage:
    python bench/tool_prompts.py --styles none,schemas,system,full2,calls2 --questions 100

Prints one JSON line per style and decoding: `call_rate` (completions with a call), `valid`
(calls that parsed and ran without error / calls), `accuracy` (the last number of the answer is
the product), `turns` (model turns per rollout), `errors` (the failed calls' messages, counted by
their first words), `prompt_tokens` and `seconds`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
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
    parser.add_argument("--styles", default="none,schemas,system,full2,calls2")
    parser.add_argument("--config", default="examples/tools_calculator.yaml")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="0 = greedy only")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    import yaml

    from grpokit.data.prompts import completion_text
    from grpokit.data.tasks import load_task
    from grpokit.engines.base import SamplingParams
    from grpokit.engines.models import load_causal_lm
    from grpokit.engines.transformers_engine import TransformersEngine
    from grpokit.tools import ToolCalling
    from grpokit.tools.calculator import calculator_tool
    from grpokit.tools.chat import CHATML_TOOLS_TEMPLATE
    from grpokit.train.rollout import RolloutPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        task_spec = yaml.safe_load(f)["task"]
    task = load_task({**task_spec, "eval_size": args.questions})
    # The question as the run shows it: the last turn of the task's prompt.
    entries = [
        {"question": row["prompt"][-1]["content"], "answer": row["answer"]}
        for row in task.eval_dataset
    ]
    model, tok = load_causal_lm("smollm2-135m-instruct")
    own_template = tok.chat_template
    tok.chat_template = CHATML_TOOLS_TEMPLATE
    tools = ToolCalling.from_functions([calculator_tool()], max_iterations=1, timeout=10)
    engine = TransformersEngine(model, tok)
    torch.manual_seed(0)
    decodings = [("greedy", SamplingParams(top_k=1), 1)]
    if args.samples:
        decodings.append(("temperature 1", SamplingParams(), args.samples))
    for style in args.styles.split(","):
        rows = [{"prompt": prompt(style, e["question"])} for e in entries]
        for mode, sampling, g in decodings:
            start = time.perf_counter()
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
            prompt_ids = batch.prompt_ids
            if style == "none":  # the model's own template, without the tool schema
                texts = [
                    tok.apply_chat_template(
                        row["prompt"], chat_template=own_template, tokenize=False,
                        add_generation_prompt=True,
                    )
                    for row in rows
                ]  # fmt: skip
                prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
            gen = pipeline.generate(prompt_ids)
            completions, _ = pipeline.decode([r["prompt"] for r in rows for _ in range(g)], gen)
            answers = [e["answer"] for e in entries for _ in range(g)]
            correct = 0
            for completion, answer in zip(completions, answers, strict=True):
                numbers = re.findall(r"-?\d[\d,]*", completion_text(completion))
                correct += bool(numbers) and numbers[-1].replace(",", "") == answer
            calls, errors = gen.turns.calls, gen.turns.errors
            failures = Counter(
                " ".join(str(message["content"]).split()[:4])
                for replies in gen.turns.replies
                for reply in replies
                for message in reply
                if str(message["content"]).startswith("Error")
            )
            result = {
                "style": style,
                "decoding": mode,
                "completions": len(completions),
                "call_rate": sum(c > 0 for c in calls) / len(calls),
                "valid": (sum(calls) - sum(errors)) / max(1, sum(calls)),
                "accuracy": correct / len(completions),
                "turns": sum(1 + len(r) for r in gen.turns.replies) / len(calls),
                "errors": dict(failures.most_common(5)),
                "prompt_tokens": len(prompt_ids[0]),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
