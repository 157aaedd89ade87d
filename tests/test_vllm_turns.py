"""Multi-turn tool calling on real vLLM: `VLLMEngine.generate_turns` (colocate), a
`grpokit vllm-serve` server with `VLLMServerEngine.generate_turns`, and a GRPO run with tools on
vLLM. Skipped where vLLM is not installed.

The tool caller is a tiny model memorised to answer QUESTION by calling add(2, 3) and, after the
reply "5", with "It is 5" (greedy decoding makes the rollout exact). Run in the vLLM environment
(bench/requirements-vllm.txt):
    PYTHONPATH=src bench/.venv-vllm/bin/python -m pytest tests/test_vllm_turns.py -q
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.core.logprobs import model_completion_logprobs
from grpokit.engines.base import GenerationOutput, SamplingParams
from grpokit.engines.vllm_client import VLLMServerEngine
from grpokit.engines.vllm_engine import VLLMEngine
from grpokit.tools import ToolCalling
from grpokit.train.rollout import RolloutPipeline
from tests.test_multi_turn import ANSWER, CALL, REPLY, ScriptedTurns, memorize_tool_call, segments
from tests.test_vllm_engine import BF16_ATOL_MAX, BF16_ATOL_MEAN
from tests.test_vllm_server import START_TIMEOUT, free_port, vllm_serve
from tests.tiny import make_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

# Long enough that prompt + tool call fill a 128-token KV block (vLLM's CPU block size), so the
# turn after the tool reply can be served from the prefix cache.
QUESTION = "2+3? Please use the add tool to compute the sum, then answer with it."
TOOL_REPLY = "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
BLOCK = 128  # vLLM's default KV block size on a CPU
MAX_MODEL_LEN = 256
# head_dim 32 (one of vLLM's CPU attention sizes); small enough to memorise the rollout quickly
CALLER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def tool_caller() -> tuple[Any, Any]:
    return memorize_tool_call(QUESTION, lr=3e-3, steps=800, **CALLER)


@pytest.fixture(scope="module")
def colocate(tool_caller: tuple[Any, Any]) -> VLLMEngine:
    model, tok = tool_caller
    return VLLMEngine(model, tok, max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=64 << 20)


def add_recording(calls: list[tuple[int, int]]) -> Any:
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first.
            b: The second.
        """
        calls.append((a, b))
        return a + b

    return add


def trainer_logprob_gap(model: Any, gen: GenerationOutput) -> torch.Tensor:
    """|sampling_logprobs - the fp32 model's log-probs of the same sequence| at the model's
    tokens (`model_mask`), each row's prompt + whole completion in one forward."""
    with torch.no_grad():
        expected, _ = model_completion_logprobs(
            model,
            torch.cat([gen.prompt_ids, gen.completion_ids], 1),
            torch.cat([gen.prompt_mask, gen.completion_mask], 1),
            gen.completion_ids.shape[1],
        )
    assert gen.sampling_logprobs is not None
    return (gen.sampling_logprobs - expected)[gen.model_mask.bool()].abs()


def run_tool_rollout(engine: Any, model: Any, tok: Any) -> None:
    """Two greedy rollouts through the real tool pipeline: each calls add(2, 3), gets "5"
    appended, continues and ends; tokens, tool_mask, log-probs and prefix-cache reuse checked."""
    calls: list[tuple[int, int]] = []
    pipeline = RolloutPipeline(
        engine=engine,
        tokenizer=tok,
        reward_funcs=[],
        sampling=SamplingParams(top_k=1),
        num_generations=2,
        max_new_tokens=120,
        tool_calling=ToolCalling.from_functions([add_recording(calls)], timeout=10),
    )
    prompts = [[{"role": "user", "content": QUESTION}]]
    batch = pipeline.tokenize([{"prompt": prompts[0]}])
    gen = pipeline.generate(batch.prompt_ids)
    completions, ids = pipeline.decode(prompts * 2, gen)
    assert calls == [(2, 3), (2, 3)] and gen.turns.calls == [1, 1]
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    call, reply, answer = enc(CALL), enc(TOOL_REPLY), enc(ANSWER)
    assert gen.tool_mask is not None
    for row in range(2):
        assert completions[row] == [
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
        # model turn, the tool's reply (tool_mask 0), model turn; nothing after the final EOS
        assert segments(ids[row], gen.tool_mask[row, : len(ids[row])].tolist()) == [
            (1, call),
            (0, reply),
            (1, answer),
        ]
        assert int(gen.completion_mask[row].sum()) == len(call) + len(reply) + len(answer)
    assert not gen.is_truncated.any()
    assert gen.sampling_logprobs is not None
    assert (gen.sampling_logprobs[gen.tool_mask == 0] == 0).all()
    gap = trainer_logprob_gap(model, gen)
    assert float(gap.mean()) <= BF16_ATOL_MEAN and float(gap.max()) <= BF16_ATOL_MAX
    # The answer turn continued prompt + call + reply: the full blocks of prompt + call (written
    # by the first turn) came from the prefix cache, only the rest was prefilled.
    prompt = len(batch.prompt_ids[0])
    stats = engine.last_turn_stats
    assert stats is not None and stats.requests == 2
    assert stats.prefix_tokens == 2 * (prompt + len(call) + len(reply))
    cached_at_least = 2 * BLOCK * ((prompt + len(call) - 1) // BLOCK)
    assert cached_at_least >= 2 * BLOCK
    assert cached_at_least <= stats.cached_tokens < stats.prefix_tokens


# ---- colocate ------------------------------------------------------------------------------------
def test_colocate_runs_the_models_tool_call(
    colocate: VLLMEngine, tool_caller: tuple[Any, Any]
) -> None:
    model, tok = tool_caller
    run_tool_rollout(colocate, model, tok)


def test_colocate_turns_match_a_fresh_forward_on_a_random_model(
    colocate: VLLMEngine, tool_caller: tuple[Any, Any]
) -> None:
    """A random model, EOS made likely (logit_bias), every turn answered by a scripted reply
    (some rows' replies late, so other rows go on meanwhile): model and reply segments
    alternate, the handler saw exactly the model's turns, each row stays within its budget and
    is truncated exactly when its last turn has no EOS, and every sampled token's log-prob is
    the fp32 model's on the whole sequence (bf16 tolerance)."""
    _, tok = tool_caller
    random_model = make_causal_lm(tok, seed=3, **CALLER)
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    handler = ScriptedTurns(reply, rounds=2, slow=(1, 2))
    eos = tok.eos_token_id
    sampling = SamplingParams(generation_kwargs={"logit_bias": {eos: 3.0}, "seed": 11})
    prompts = [tok("hello there")["input_ids"], tok("hi")["input_ids"]]
    budget = 80
    colocate.update_weights(random_model)
    try:
        gen = colocate.generate_turns(
            prompts, num_generations=2, max_new_tokens=budget, sampling=sampling, turns=handler
        )
    finally:
        colocate.update_weights(tool_caller[0])
    assert gen.tool_mask is not None and gen.sampling_logprobs is not None
    replies = 0
    for row in range(4):
        length = int(gen.completion_mask[row].sum())
        assert length <= budget and not gen.completion_mask[row, length:].any()
        ids = gen.completion_ids[row, :length].tolist()
        parts = segments(ids, gen.tool_mask[row, :length].tolist())
        assert [m for m, _ in parts] == [1, 0] * (len(parts) // 2) + [1] * (len(parts) % 2)
        assert all(part == reply for m, part in parts if m == 0)
        replies += sum(1 for m, _ in parts if m == 0)
        model_parts = [part for m, part in parts if m == 1]
        assert model_parts[: len(handler.turns[row])] == handler.turns[row]
        assert bool(gen.is_truncated[row]) == (ids[-1] != eos)
        assert bool(gen.is_truncated[row]) == (length == budget and ids[-1] != eos)
    assert replies >= 4  # the script did run several turns
    assert (gen.sampling_logprobs[gen.tool_mask == 0] == 0).all()
    gap = trainer_logprob_gap(random_model, gen)
    assert float(gap.mean()) <= BF16_ATOL_MEAN and float(gap.max()) <= BF16_ATOL_MAX


def test_colocate_turns_stop_at_the_budget(
    colocate: VLLMEngine, tool_caller: tuple[Any, Any]
) -> None:
    """EOS forced: each turn is one EOS; replies are appended while they fit, then the row ends
    (not truncated). EOS forbidden: the first turn runs to the budget (truncated, no reply)."""
    _, tok = tool_caller
    eos = tok.eos_token_id
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    prompt = [tok("a")["input_ids"]]
    budget = 2 * (len(reply) + 1) + 5
    handler = ScriptedTurns(reply, rounds=100)
    forced = SamplingParams(generation_kwargs={"logit_bias": {eos: 100.0}})
    gen = colocate.generate_turns(
        prompt, num_generations=1, max_new_tokens=budget, sampling=forced, turns=handler
    )
    # [EOS, reply, EOS, reply, EOS]: a third reply (room 4) no longer fits, so the row ends.
    assert gen.completion_ids[0].tolist() == [eos, *reply, eos, *reply, eos]
    assert not bool(gen.is_truncated[0]) and len(handler.turns[0]) == 3
    never = ScriptedTurns(reply, rounds=100)
    forbidden = SamplingParams(generation_kwargs={"logit_bias": {eos: -100.0}})
    gen = colocate.generate_turns(
        prompt, num_generations=2, max_new_tokens=9, sampling=forbidden, turns=never
    )
    assert gen.completion_mask.tolist() == [[1] * 9] * 2 and bool(gen.is_truncated.all())
    assert gen.tool_mask is not None and bool(gen.tool_mask.all()) and not never.turns
    assert not colocate.busy


# ---- GRPO with tools on vLLM colocate ------------------------------------------------------------
def test_grpo_with_tools_on_vllm_colocate(tool_caller: tuple[Any, Any], tmp_path: Path) -> None:
    """Two GRPO steps through GRPOTrainer(tools=..., use_vllm=True): the rollouts run the tool
    on vLLM, the loss sees only the model's tokens, the turn after the tool reply reuses the
    prefix cache, and vLLM samples from the updated policy afterwards."""
    model, tok = tool_caller
    policy = copy.deepcopy(model)
    calls: list[tuple[int, int]] = []

    def first_of_each_pair(completions: list[Any], **kwargs: Any) -> list[float]:
        # the greedy completions are equal: reward them unequally so the policy does move
        return [float(i % 2 == 0) for i in range(len(completions))]

    trainer = GRPOTrainer(
        policy,
        first_of_each_pair,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": QUESTION}]}]),
        processing_class=tok,
        tools=[add_recording(calls)],
        args=GRPOConfig(
            output_dir=str(tmp_path),
            use_vllm=True,
            vllm_max_model_length=MAX_MODEL_LEN,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=120,
            max_steps=2,
            top_k=1,
            beta=0.0,
            learning_rate=1e-3,
            logging_steps=1,
            bf16=False,
            save_strategy="no",
            report_to="none",
            seed=0,
        ),
    )
    assert isinstance(trainer.engine, VLLMEngine)
    seen: list[Any] = []
    build = trainer.build_rollout_batch

    def spy(gen: GenerationOutput, advantages: torch.Tensor) -> Any:
        batch = build(gen, advantages)
        seen.append((gen, batch))
        return batch

    trainer.build_rollout_batch = spy  # type: ignore[method-assign]
    trainer.train()
    assert len(seen) == 2 and calls == [(2, 3)] * 4
    for gen, batch in seen:
        assert gen.sampling_logprobs is not None and gen.tool_mask is not None
        assert torch.equal(batch.loss_mask, gen.completion_mask * gen.tool_mask)
        assert (batch.loss_mask.sum(1) < batch.completion_mask.sum(1)).all()
    stats = trainer.engine.last_turn_stats
    assert stats is not None and stats.requests == 2 and stats.cached_tokens >= 2 * BLOCK
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "tools/call_frequency" in m]
    assert len(steps) == 2
    for metrics in steps:
        assert metrics["tools/call_frequency"] == pytest.approx(1.0)
        assert metrics["tools/failure_frequency"] == pytest.approx(0.0)
        assert metrics["tools/turns_mean"] == pytest.approx(2.0)
    # After the steps vLLM holds the policy's weights: its log-probs are the policy's.
    moved = zip(policy.parameters(), model.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in moved)
    last = seen[-1][0]
    gen = trainer.engine.generate_turns(
        [last.prompt_ids[0][last.prompt_mask[0].bool()].tolist()],
        num_generations=1,
        max_new_tokens=120,
        sampling=SamplingParams(),
        turns=ScriptedTurns(tok(TOOL_REPLY, add_special_tokens=False)["input_ids"], rounds=1),
    )
    gap = trainer_logprob_gap(policy, gen)
    assert float(gap.mean()) <= BF16_ATOL_MEAN and float(gap.max()) <= BF16_ATOL_MAX


# ---- server mode ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_engine(
    tool_caller: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServerEngine]:
    """A `grpokit vllm-serve` process started from a random model; connecting pushes the tool
    caller's weights into it."""
    model, tok = tool_caller
    folder = tmp_path_factory.mktemp("vllm-turns-server")
    make_causal_lm(tok, seed=1, **CALLER).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    log = folder / "server.log"
    port = free_port()
    process = vllm_serve(
        "--model",
        str(folder / "model"),
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes",
        str(64 << 20),
        log=log,
    )
    try:
        yield VLLMServerEngine(
            model, tok, base_url=f"http://127.0.0.1:{port}", timeout=START_TIMEOUT, group_port=0
        )
    except Exception:
        print(log.read_text()[-3000:])
        raise
    finally:
        process.kill()
        process.wait(30)


def test_server_runs_the_models_tool_call(
    server_engine: VLLMServerEngine, tool_caller: tuple[Any, Any]
) -> None:
    model, tok = tool_caller
    run_tool_rollout(server_engine, model, tok)


def test_server_turns_overlap_and_match_a_fresh_forward(
    server_engine: VLLMServerEngine, tool_caller: tuple[Any, Any]
) -> None:
    """As on colocate, through the server: a random model (pushed), scripted replies, some of
    them late; every row within budget, log-probs of the model's tokens the fp32 model's."""
    model, tok = tool_caller
    random_model = make_causal_lm(tok, seed=3, **CALLER)
    reply = tok(REPLY, add_special_tokens=False)["input_ids"]
    handler = ScriptedTurns(reply, rounds=2, slow=(0, 3))
    eos = tok.eos_token_id
    sampling = SamplingParams(generation_kwargs={"logit_bias": {eos: 3.0}, "seed": 5})
    server_engine.update_weights(random_model)
    try:
        gen = server_engine.generate_turns(
            [tok("hello there")["input_ids"], tok("hi")["input_ids"]],
            num_generations=2,
            max_new_tokens=80,
            sampling=sampling,
            turns=handler,
        )
    finally:
        server_engine.update_weights(model)
    assert gen.tool_mask is not None
    replies = 0
    for row in range(4):
        length = int(gen.completion_mask[row].sum())
        ids = gen.completion_ids[row, :length].tolist()
        parts = segments(ids, gen.tool_mask[row, :length].tolist())
        assert all(part == reply for m, part in parts if m == 0)
        replies += sum(1 for m, _ in parts if m == 0)
        model_parts = [part for m, part in parts if m == 1]
        assert model_parts[: len(handler.turns[row])] == handler.turns[row]
        assert length <= 80 and bool(gen.is_truncated[row]) == (ids[-1] != eos)
    assert replies >= 4
    gap = trainer_logprob_gap(random_model, gen)
    assert float(gap.mean()) <= BF16_ATOL_MEAN and float(gap.max()) <= BF16_ATOL_MAX
