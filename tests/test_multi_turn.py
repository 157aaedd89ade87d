"""Multi-turn rollouts: the transformers engine's KV-cache path, the re-prefill path of any
engine, a model trained to call a tool end to end, the loss seeing only the model's tokens, and
GRPOTrainer(tools=...)."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.core.logprobs import model_completion_logprobs
from grpokit.core.losses import LossOptions, policy_loss
from grpokit.engines.base import GenerationOutput, SamplingParams
from grpokit.engines.base import left_pad as pad_left
from grpokit.engines.multi_turn import generate_with_turns, reprefill_turns
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.errors import ConfigError, DataError
from grpokit.rewards.scoring import build_reward_functions
from grpokit.tools import ToolCalling
from grpokit.train.rollout import RolloutPipeline
from tests.tiny import (
    ScriptedEngine,
    add,
    calculator_script,
    call,
    correct,
    make_causal_lm,
    make_tokenizer,
    make_tool_tokenizer,
    one_step_trainer,
    read_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPLY = "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
# The transcript of a completion that calls add(2, 3), gets 5 and answers "It is 5".
ADD_THEN_ANSWER = [
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
        ],
    },
    {"role": "tool", "name": "add", "content": "5"},
    {"role": "assistant", "content": "It is 5"},
]


class ScriptedTurns:
    """A turn handler that appends `reply` after each of a row's first `rounds` turns; rows in
    `slow` get their reply from another thread a little later (their steps are holes meanwhile)."""

    def __init__(self, reply: list[int], rounds: int, slow: tuple[int, ...] = ()) -> None:
        self.reply, self.rounds, self.slow = reply, rounds, slow
        self.turns: dict[int, list[list[int]]] = defaultdict(list)
        self.inference_mode: list[bool] = []  # at each call

    def end_turn(self, row: int, turn_ids: list[int], room: int) -> Future[list[int] | None] | None:
        self.turns[row].append(list(turn_ids))
        self.inference_mode.append(torch.is_inference_mode_enabled())
        if len(self.turns[row]) > self.rounds:
            return None
        future: Future[list[int] | None] = Future()
        value = self.reply if len(self.reply) < room else None
        if row in self.slow:
            threading.Timer(0.05, future.set_result, args=(value,)).start()
        else:
            future.set_result(value)
        return future


def tool_pipeline(
    engine: Any,
    tok: Any,
    tool_calling: ToolCalling,
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    environments: Any = None,
) -> RolloutPipeline:
    """A multi-turn `RolloutPipeline` with `tool_calling` and no reward functions (sampling: the
    defaults unless given)."""
    return RolloutPipeline(
        engine=engine,
        tokenizer=tok,
        reward_funcs=[],
        sampling=sampling or SamplingParams(),
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        tool_calling=tool_calling,
        environments=environments,
    )


def segments(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """Runs of equal `mask` values: `[(mask value, ids), ...]`."""
    out: list[tuple[int, list[int]]] = []
    for token, m in zip(ids, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(token)
        else:
            out.append((m, [token]))
    return out


# ---- the transformers engine's KV-cache path ----------------------------------------------------
@pytest.mark.parametrize("share", [True, False])
def test_kv_cache_turns_match_a_fresh_forward(share: bool) -> None:
    """Across turns, waits (holes in the cache) and appended replies, every sampled token's
    log-prob equals the log-prob of a fresh forward over prompt + whole completion: the cache
    holds exactly the conversation."""
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    engine = TransformersEngine(
        model, tok, bf16_sampler=False, return_logprobs=True, share_prompt_prefill=share
    )
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    handler = ScriptedTurns(reply, rounds=2, slow=(1, 2))
    eos = tok.eos_token_id
    sampling = SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 4.0}})
    torch.manual_seed(0)
    prompts = [tok("hello")["input_ids"], tok("hi")["input_ids"]]
    gen = engine.generate_turns(
        prompts, num_generations=2, max_new_tokens=60, sampling=sampling, turns=handler
    )
    assert gen.tool_mask is not None and gen.sampling_logprobs is not None
    n_model_turns = 0
    for row in range(4):
        length = int(gen.completion_mask[row].sum())
        assert (
            gen.completion_mask[row, :length].all() and not gen.completion_mask[row, length:].any()
        )
        ids = gen.completion_ids[row, :length].tolist()
        parts = segments(ids, gen.tool_mask[row, :length].tolist())
        # model turns alternate with the scripted reply; the turns the handler saw are the
        # model's segments, each ending with EOS (the last may be cut by max_new_tokens).
        assert [m for m, _ in parts] == [1, 0] * (len(parts) // 2) + [1] * (len(parts) % 2)
        assert all(part == reply for m, part in parts if m == 0)
        model_parts = [part for m, part in parts if m == 1]
        assert model_parts[: len(handler.turns[row])] == handler.turns[row]
        assert bool(gen.is_truncated[row]) == (ids[-1] != eos)
        n_model_turns += len(model_parts)
        assert (gen.sampling_logprobs[row, :length][gen.tool_mask[row, :length] == 0] == 0).all()
    assert n_model_turns > 4  # the script did run several turns
    # The decode loop runs in inference mode; the handler (the user's tools) and the returned
    # tensors do not.
    assert handler.inference_mode and not any(handler.inference_mode)
    assert not any(t.is_inference() for t in (gen.completion_ids, gen.sampling_logprobs))
    input_ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)
    attention = torch.cat([gen.prompt_mask, gen.completion_mask], dim=1)
    fresh, _ = model_completion_logprobs(model, input_ids, attention, gen.completion_ids.shape[1])
    model_tokens = gen.model_mask.bool()
    torch.testing.assert_close(
        gen.sampling_logprobs[model_tokens], fresh[model_tokens], atol=2e-5, rtol=0
    )


def test_kv_cache_turns_stop_at_the_budget_and_drop_replies_that_do_not_fit() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok, bf16_sampler=False)
    eos = tok.eos_token_id
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    handler = ScriptedTurns(reply, rounds=100)
    # EOS always sampled: each turn is one token; a reply fits while the room left exceeds it.
    sampling = SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 100.0}})
    budget = 2 * (len(reply) + 1) + 5
    gen = engine.generate_turns(
        [tok("a")["input_ids"]],
        num_generations=1,
        max_new_tokens=budget,
        sampling=sampling,
        turns=handler,
    )
    ids = gen.completion_ids[0, : int(gen.completion_mask[0].sum())].tolist()
    # [EOS, reply, EOS, reply, EOS]: a third reply (room 4) no longer fits, so the row ends.
    assert ids == [eos, *reply, eos, *reply, eos]
    assert not bool(gen.is_truncated[0])
    assert len(handler.turns[0]) == 3


# ---- the re-prefill path, with a scripted engine -------------------------------------------------
def test_reprefill_turns_with_any_engine() -> None:
    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, calculator_script)
    setting = ToolCalling.from_functions([add], max_iterations=3)
    pipeline = tool_pipeline(engine, tok, setting, num_generations=4, max_new_tokens=400)
    prompts = [[{"role": "user", "content": "2+3?"}]]
    batch = pipeline.tokenize([{"prompt": prompts[0]}])
    assert "Tools: add" in tok.decode(batch.prompt_ids[0])
    gen = pipeline.generate(batch.prompt_ids)
    completions, ids = pipeline.decode(prompts * 4, gen)
    assert gen.turns.calls == [1, 0, 2, 3] and gen.turns.errors == [0, 0, 1, 0]
    assert completions[0] == ADD_THEN_ANSWER
    assert completions[1] == [{"role": "assistant", "content": "5"}]
    assert completions[2][1]["content"] == "Error: unknown tool 'sub'; the tools are: add."
    assert [m["role"] for m in completions[2]] == [
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    # g=3 calls forever: 3 rounds run, the 4th call ends the rollout with that turn.
    assert [m["role"] for m in completions[3]].count("tool") == 3
    assert len(completions[3]) == 7 and not bool(gen.is_truncated[3])
    # Each call continued only the rows with a reply, one completion each.
    assert engine.calls[0] == (1, 4, 400)
    assert [c[0] for c in engine.calls[1:]] == [3, 2, 1]
    # The token ids are the prompt's continuation: model segments are the scripted answers.
    parts = segments(ids[0], gen.tool_mask[0, : len(ids[0])].tolist())
    assert tok.decode(parts[0][1]) == call(2, 3)
    assert tok.decode(parts[1][1]) == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(parts[2][1]) == "It is 5<|im_end|>"


def test_reprefill_turns_budget_counts_tool_tokens() -> None:
    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, lambda text, turn, g: call(2, 3) if turn == 0 else "x" * 50)
    setting = ToolCalling.from_functions([add])
    first = len(tok(call(2, 3))["input_ids"])
    budget = first + 40
    handler = setting.turns(tok, [setting.tools])
    gen = reprefill_turns(
        engine,
        [tok("p")["input_ids"]],
        num_generations=1,
        max_new_tokens=budget,
        sampling=SamplingParams(),
        turns=handler,
    )
    handler.close()
    assert int(gen.completion_mask[0].sum()) == budget and bool(gen.is_truncated[0])
    assert int(gen.tool_mask[0, :budget].eq(0).sum()) == len(
        tok("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    )


# ---- a model that calls a tool: transformers engine, real tool, end to end -----------------------
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>'
ANSWER = "It is 5<|im_end|>"


def memorize_tool_call(
    question: str = "2+3?", lr: float = 1e-2, steps: int = 400, **model_overrides: Any
) -> tuple[Any, Any]:
    """A tiny model trained (memorised, Adam at `lr` for at most `steps` steps) to answer the user
    message `question` by calling add(2, 3), then, after the reply "5", with ANSWER; and its tool
    tokenizer."""
    tok = make_tool_tokenizer()
    setting = ToolCalling.from_functions([add])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        tools=setting.schemas(),
        tokenize=False,
        add_generation_prompt=True,
    )
    reply = "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    parts = [tok(x, add_special_tokens=False)["input_ids"] for x in (prompt, CALL, reply, ANSWER)]
    seq = torch.tensor([[token for part in parts for token in part]])
    weight = torch.tensor(
        [w for part, w in zip(parts, (0, 1, 0, 1), strict=True) for _ in part], dtype=torch.float
    )
    torch.manual_seed(0)
    model = make_causal_lm(tok, **{"hidden_size": 64, "intermediate_size": 128, **model_overrides})
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits = model(seq).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="none")
        loss = (losses * weight[1:]).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 1e-3:
            break
    return model.eval(), tok


@pytest.fixture(scope="module")
def tool_caller() -> tuple[Any, Any]:
    """A tiny model trained (memorised) to call add(2, 3) for "2+3?", then answer from the reply."""
    return memorize_tool_call()


def test_transformers_engine_runs_the_models_tool_call(tool_caller: tuple[Any, Any]) -> None:
    model, tok = tool_caller
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        calls.append((a, b))
        return a + b

    engine = TransformersEngine(model, tok, bf16_sampler=False, return_logprobs=True)
    setting = ToolCalling.from_functions([add], timeout=10)
    pipeline = tool_pipeline(
        engine,
        tok,
        setting,
        num_generations=2,
        max_new_tokens=120,
        sampling=SamplingParams(top_k=1),
    )
    prompts = [[{"role": "user", "content": "2+3?"}]]
    batch = pipeline.tokenize([{"prompt": prompts[0]}])
    gen = pipeline.generate(batch.prompt_ids)
    completions, ids = pipeline.decode(prompts * 2, gen)
    assert calls == [(2, 3), (2, 3)]
    for row in range(2):
        assert completions[row] == ADD_THEN_ANSWER
        text = tok.decode(ids[row])
        assert text == CALL + "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n" + ANSWER
        model_text = tok.decode(
            [t for t, m in zip(ids[row], gen.tool_mask[row].tolist(), strict=False) if m]
        )
        assert model_text == CALL + ANSWER
    # The decode path through generate_with_turns and the model's own path give the same tokens.
    assert gen.turns.calls == [1, 1] and not gen.is_truncated.any()


# ---- the loss sees only the model's tokens -------------------------------------------------------
def test_gradient_is_zero_on_tool_tokens_and_equals_the_single_turn_gradient() -> None:
    """A completion [A, R, B] (model turn A, tool reply R, model turn B) under the dapo loss
    (token sum / loss tokens): d loss / d logprob is 0 on R, and the parameter gradient equals
    that of two single-turn completions, A after the prompt and B after prompt + A + R, with the
    same advantage and the same token count."""
    tok = make_tokenizer()
    model = make_causal_lm(tok).train()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, a, r, b = (
        enc("q?"),
        enc("call<|im_end|>"),
        enc("\n<|im_start|>tool\n7"),
        enc("ok<|im_end|>"),
    )
    completion = torch.tensor([a + r + b])
    tool_mask = torch.tensor([[1] * len(a) + [0] * len(r) + [1] * len(b)])
    advantage = torch.tensor([0.7])
    items = float(len(a) + len(b))

    logprobs, _ = model_completion_logprobs(
        model,
        torch.cat([torch.tensor([prompt]), completion], 1),
        torch.ones(1, len(prompt) + completion.shape[1], dtype=torch.long),
        completion.shape[1],
    )
    logprobs.retain_grad()
    loss, _ = policy_loss(
        logprobs,
        None,
        advantage,
        tool_mask,
        LossOptions(loss_type="dapo"),
        num_items_in_batch=items,
    )
    model.zero_grad()
    loss.backward()
    per_token = logprobs.grad[0]
    assert (per_token[len(a) : len(a) + len(r)] == 0).all()
    # on the model's tokens: -advantage / items each (ratio 1 on-policy)
    expected = torch.full((len(a) + len(b),), -0.7 / items)
    model_positions = tool_mask[0].bool()
    torch.testing.assert_close(per_token[model_positions], expected)
    multi = {k: p.grad.clone() for k, p in model.named_parameters()}

    # The same tokens as two single-turn completions (B sees A and R as its prompt).
    p1, m1 = pad_left([prompt, prompt + a + r], tok.pad_token_id)
    width = max(len(a), len(b))
    c = torch.full((2, width), tok.pad_token_id)
    cm = torch.zeros(2, width, dtype=torch.long)
    c[0, : len(a)], cm[0, : len(a)] = torch.tensor(a), 1
    c[1, : len(b)], cm[1, : len(b)] = torch.tensor(b), 1
    single, _ = model_completion_logprobs(
        model, torch.cat([p1, c], 1), torch.cat([m1, cm], 1), width
    )
    loss2, _ = policy_loss(
        single,
        None,
        advantage.repeat(2),
        cm,
        LossOptions(loss_type="dapo"),
        num_items_in_batch=items,
    )
    model.zero_grad()
    loss2.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, multi[name], atol=1e-6, rtol=1e-4, msg=name)
    torch.testing.assert_close(loss, loss2)


# ---- GRPOTrainer(tools=...) ---------------------------------------------------------------------
CALC = Dataset.from_list(
    [
        {"prompt": [{"role": "user", "content": q}], "answer": a}
        for q, a in [("2+3?", "5"), ("1+1?", "2")]
    ]
)


def test_trainer_with_tools_masks_tool_tokens_and_logs_turns(tmp_path: Path) -> None:
    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, calculator_script)
    trainer = one_step_trainer(
        tmp_path,
        tok,
        correct,
        CALC,
        generation_engine=engine,
        tools=[add],
        config=dict(
            num_generations=4,
            max_completion_length=300,
            logging_steps=1,
            learning_rate=1e-2,
            seed=0,
            log_completions=True,
            max_tool_calling_iterations=2,
        ),
    )
    seen: list[Any] = []
    build = trainer.build_rollout_batch

    def spy(gen: GenerationOutput, advantages: torch.Tensor) -> Any:
        batch = build(gen, advantages)
        seen.append((gen, batch))
        return batch

    trainer.build_rollout_batch = spy  # type: ignore[method-assign]
    trainer.train()
    gen, batch = seen[0]
    assert torch.equal(batch.loss_mask, gen.completion_mask * gen.tool_mask)
    assert (batch.loss_mask.sum(1) < batch.completion_mask.sum(1)).sum() == 3  # 3 rows used tools
    logged = read_metrics(tmp_path)
    metrics = next(m for m in logged if "tools/call_frequency" in m)
    # g=0: 1 call, g=1: none, g=2: 2 (one unknown tool), g=3: 2 (cut at 2 rounds): per prompt
    assert metrics["tools/call_frequency"] == pytest.approx(5 / 4)
    assert metrics["tools/failure_frequency"] == pytest.approx(1 / 5)
    assert metrics["tools/turns_mean"] == pytest.approx((2 + 1 + 3 + 3) / 4)
    assert metrics["completions/mean_length"] == pytest.approx(
        float(gen.model_mask.sum(1).float().mean())
    )
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert rows[0]["completion"][1] == {"role": "tool", "name": "add", "content": "5"}


def test_trainer_refuses_bad_tools_and_templates(tmp_path: Path) -> None:
    def undocumented(a: int) -> int:
        return a

    args = GRPOConfig(output_dir=str(tmp_path), bf16=False, max_steps=1, save_strategy="no")
    for tok, tools, error in [
        (make_tool_tokenizer(), [undocumented], "undocumented"),
        (make_tokenizer(), [add], "chat template does not render"),
    ]:
        with pytest.raises(ConfigError, match=error):
            GRPOTrainer(
                make_causal_lm(tok),
                correct,
                args=args,
                train_dataset=CALC,
                processing_class=tok,
                tools=tools,
            )
    with pytest.raises(ValueError, match="max_tool_calling_iterations"):
        GRPOConfig(max_tool_calling_iterations=-1)
    with pytest.raises(ValueError, match="tool_call_parser"):
        GRPOConfig(tool_call_parser="xml")


def test_plain_prompts_with_tools_are_refused() -> None:
    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, calculator_script)
    setting = ToolCalling.from_functions([add])
    pipeline = tool_pipeline(engine, tok, setting, num_generations=1, max_new_tokens=10)
    with pytest.raises(DataError, match="conversational prompts"):
        pipeline.tokenize([{"prompt": "2+3?"}])


def test_generate_with_turns_uses_the_engines_own_path() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok, bf16_sampler=False)
    eos = tok.eos_token_id
    handler = ScriptedTurns([], rounds=0)
    gen = generate_with_turns(
        engine,
        [tok("a")["input_ids"]],
        num_generations=1,
        max_new_tokens=5,
        sampling=SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 100.0}}),
        turns=handler,
    )
    assert gen.completion_ids[0, :1].tolist() == [eos] and gen.tool_mask is not None
    assert handler.turns[0] == [[eos]]


# ---- environment_factory ------------------------------------------------------------------------
class Counter:
    """An environment: a counter the model increments; the reward is its final value."""

    made = 0

    def __init__(self) -> None:
        Counter.made += 1
        self.value = 0
        self.start = 0

    def reset(self, **row: Any) -> str:
        self.start = int(row["start"])
        self.value = self.start
        return f" Start at {self.start}."

    def increment(self, by: int) -> str:
        """Add to the counter.

        Args:
            by: How much.
        """
        self.value += by
        return str(self.value)

    def get_reward(self) -> float:
        return float(self.value - self.start)

    def _private(self) -> None:
        pass


def counter_script(text: str, turn: int, g: int) -> str:
    """Every rollout increments its counter by 2 once, then stops."""
    if turn == 0:
        return '<tool_call>{"name": "increment", "arguments": {"by": 2}}</tool_call><|im_end|>'
    return "done<|im_end|>"


def test_trainer_with_an_environment_factory(tmp_path: Path) -> None:
    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, counter_script)
    seen: dict[str, Any] = {}

    def spy(completions: list[Any], environments: list[Any], **kwargs: Any) -> list[float]:
        seen["environments"], seen["prompts"] = environments, kwargs["prompts"]
        return [0.0] * len(completions)

    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "count"}], "start": s} for s in (3, 7)]
    )
    trainer = one_step_trainer(
        tmp_path,
        tok,
        [spy],
        data,
        generation_engine=engine,
        environment_factory=Counter,
        config=dict(
            num_generations=2,
            max_completion_length=200,
            logging_steps=1,
            seed=0,
            shuffle_dataset=False,
        ),
    )
    assert [f.name for f in trainer.reward_funcs] == ["spy", "Counter"]
    trainer.train()
    envs = seen["environments"]
    assert len(envs) == 4 and len({id(e) for e in envs}) == 4  # one instance per rollout
    assert sorted(e.start for e in envs) == [3, 3, 7, 7]
    assert all(e.value == e.start + 2 for e in envs)  # each rollout's call hit its own instance
    # As in TRL, the reward functions see each prompt with its environment's reset text.
    assert seen["prompts"] == [
        [{"role": "user", "content": f"count Start at {e.start}."}] for e in envs
    ]
    logged = read_metrics(tmp_path)
    metrics = next(m for m in logged if "rewards/Counter/mean" in m)
    assert metrics["rewards/Counter/mean"] == pytest.approx(2.0)
    assert metrics["tools/call_frequency"] == pytest.approx(1.0)


def test_environments_refilled_after_a_skipped_prompt_are_fresh_instances(tmp_path: Path) -> None:
    tok = make_tool_tokenizer()
    seen: dict[str, Any] = {}

    def spy(completions: list[Any], environments: list[Any], **kwargs: Any) -> list[float]:
        seen["environments"] = environments
        return [0.0] * len(completions)

    # Row 1 is too long and skipped: the batch (2 prompts) is refilled with row 2, after rows 0
    # and 1 took instances 0-1 and 2-3; row 2's rollouts must get new ones (4-5), not row 0's.
    rows = [("count", 3), ("count " + "x" * 200, 5), ("count", 7)]
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": c}], "start": s} for c, s in rows]
    )
    trainer = GRPOTrainer(
        make_causal_lm(tok, max_position_embeddings=1024),
        [spy],
        train_dataset=data,
        processing_class=tok,
        generation_engine=ScriptedEngine(tok, counter_script),
        environment_factory=Counter,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=200,
            max_prompt_length=120,
            prompt_length_policy="skip",
            max_steps=1,
            bf16=False,
            save_strategy="no",
            shuffle_dataset=False,
        ),
    )
    trainer.train()
    envs = seen["environments"]
    assert len({id(e) for e in envs}) == 4  # one instance per rollout
    assert [e.start for e in envs] == [3, 3, 7, 7]
    assert all(e.value == e.start + 2 for e in envs)  # each rollout's call hit its own instance
    assert trainer.state.prompts_over_length == 2  # row 1's 2 rollout prompts


def test_environment_prompts_and_bad_environments() -> None:
    from grpokit.tools.environments import Environments

    tok = make_tool_tokenizer()
    engine = ScriptedEngine(tok, counter_script)
    pipeline = tool_pipeline(
        engine,
        tok,
        ToolCalling(),
        num_generations=2,
        max_new_tokens=200,
        environments=Environments(Counter),
    )
    batch = pipeline.tokenize([{"prompt": [{"role": "user", "content": "count"}], "start": 5}])
    assert len(batch.prompt_ids) == 2 and len(batch.environments) == 2
    text = tok.decode(batch.prompt_ids[0])
    assert "Tools: increment" in text and "count Start at 5.<|im_end|>" in text
    gen = pipeline.generate(batch.prompt_ids, environments=batch.environments)
    assert engine.calls[0][:2] == (2, 1)  # one prompt per rollout
    assert [e.value for e in batch.environments] == [7, 7]
    # The pipeline's own path (evaluation's) also scores the prompts with the reset text.
    prompts_seen: list[Any] = []

    def spy(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        prompts_seen.extend(prompts)
        return [0.0] * len(completions)

    pipeline.reward_funcs = build_reward_functions([spy])
    pipeline.run([{"prompt": [{"role": "user", "content": "count"}], "start": 4}])
    assert prompts_seen == [[{"role": "user", "content": "count Start at 4."}]] * 2

    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: x
            """
            return x

    with pytest.raises(ConfigError, match="NoReset has no reset"):
        Environments(NoReset)

    def increment(by: int) -> str:
        """Clash.

        Args:
            by: x
        """
        return ""

    with pytest.raises(ConfigError, match="have the name of a tool"):
        Environments(Counter, ToolCalling.from_functions([increment]).tools)
    del gen


# ---- rollout_func -------------------------------------------------------------------------------
def test_trainer_with_a_rollout_func(tmp_path: Path) -> None:
    tok = make_tokenizer()
    eos = tok.eos_token_id
    received: list[Any] = []

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, Any]:
        received.append((list(prompts), trainer))
        g = trainer.args.num_generations
        prompt_ids = [tok(p)["input_ids"] for p in prompts for _ in range(g)]
        completion_ids = [tok("ab")["input_ids"] + [eos], tok("xyz")["input_ids"]] * len(prompts)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": [[-0.5] * len(c) for c in completion_ids],
            "env_mask": [[1, 0, 1], [1, 1, 1]] * len(prompts),
            "judge": ["good", "bad"] * len(prompts),
        }

    def by_judge(completions: list[Any], judge: list[str], **kwargs: Any) -> list[float]:
        return [float(j == "good") for j in judge]

    trainer = one_step_trainer(
        tmp_path,
        tok,
        by_judge,
        Dataset.from_list([{"prompt": "q1"}, {"prompt": "q2"}]),
        model=make_causal_lm(tok),
        rollout_func=rollout,
        config=dict(
            num_generations=2,
            max_completion_length=8,
            logging_steps=1,
            seed=0,
            shuffle_dataset=False,
        ),
    )
    batches: list[Any] = []
    build = trainer.build_rollout_batch
    trainer.build_rollout_batch = lambda gen, adv: batches.append(build(gen, adv)) or batches[-1]  # type: ignore[method-assign]
    trainer.train()
    assert received[0][0] == ["q1", "q2"] and received[0][1] is trainer
    batch = batches[0]
    assert batch.loss_mask[0].tolist() == [1, 0, 1] and batch.loss_mask[1].tolist() == [1, 1, 1]
    assert batch.advantages.tolist()[:2] == pytest.approx([0.7071, -0.7071], abs=1e-3)
    logged = read_metrics(tmp_path)
    metrics = next(m for m in logged if "completions/clipped_ratio" in m)
    assert metrics["completions/clipped_ratio"] == pytest.approx(0.5)  # "xyz" has no EOS


def test_rollout_func_output_errors() -> None:
    from grpokit.tools.environments import rollout_output

    good = {
        "prompt_ids": [[1], [1]],
        "completion_ids": [[2, 3], [4]],
        "logprobs": [[0.0, 0.0], [0.0]],
    }
    gen, extra = rollout_output(good, expected=2, pad_token_id=0, eos_token_ids=[3])
    assert gen.completion_mask.tolist() == [[1, 1], [1, 0]] and gen.is_truncated.tolist() == [
        False,
        True,
    ]
    assert extra == {}
    with pytest.raises(ValueError, match=r"must return the keys \['logprobs'\]"):
        rollout_output(
            {"prompt_ids": [], "completion_ids": []}, expected=2, pad_token_id=0, eos_token_ids=[]
        )
    with pytest.raises(ValueError, match="returned 2 prompt_ids for a batch that needs 4"):
        rollout_output(good, expected=4, pad_token_id=0, eos_token_ids=[])
    bad = {**good, "logprobs": [[0.0], [0.0]]}
    with pytest.raises(ValueError, match="completion 0 has 2 tokens but 1 logprobs"):
        rollout_output(bad, expected=2, pad_token_id=0, eos_token_ids=[])


def test_model_turns_counts_runs_of_the_models_tokens() -> None:
    # completion_mask 1 = a token of the completion; tool_mask 0 = appended for a tool.
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7])
    tool_mask = torch.tensor([[1, 0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1] * 7])
    gen = GenerationOutput(
        prompt_ids=torch.zeros(3, 1, dtype=torch.long),
        prompt_mask=torch.ones(3, 1, dtype=torch.long),
        completion_ids=torch.zeros(3, 7, dtype=torch.long),
        completion_mask=completion_mask,
        is_truncated=torch.zeros(3, dtype=torch.bool),
        tool_mask=tool_mask,
    )
    # row 0: model mask 1 0 0 1 0 1 0 = three runs (a call, a call, the answer); row 1: one turn
    # (the padding after it is not a turn); row 2: an empty completion has none.
    assert gen.model_turns.tolist() == [3, 1, 0]
