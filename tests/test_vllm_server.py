"""`grpokit vllm-serve` with real vLLM, and `VLLMServerEngine` against it. Skipped where vLLM is
not installed.

One server process (the `grpokit vllm-serve` entry point, on 127.0.0.1 and a free port) serves
the whole module; the last test kills it. Run serially in the vLLM environment
(bench/requirements-vllm.txt):
    PYTHONPATH=src bench/.venv-vllm/bin/python -m pytest tests/test_vllm_server.py -q
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from grpokit.engines.base import SamplingParams
from grpokit.engines.vllm_client import VLLMServerEngine, VLLMServerError
from tests.tiny import (
    BF16_ATOL_MAX,
    BF16_ATOL_MEAN,
    TINY,
    dominated_by,
    length_trainer,
    logprob_gap,
    make_causal_lm,
    make_tokenizer,
    prompts,
    train_and_check_the_engine_follows,
)

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0  # seconds for the server to load (vLLM's start on a busy 2-core CPU)


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    port: int
    model_dir: str
    tok: Any
    model: Any
    engine: VLLMServerEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_serve(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """`grpokit vllm-serve ARGS` in a new process (this interpreter, this checkout's source)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    code = "import sys; from grpokit.app.cli import main; sys.exit(main())"
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code, "vllm-serve", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("vllm-server")
    tok = make_tokenizer()
    model = make_causal_lm(tok, **TINY)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    port = free_port()
    log = folder / "server.log"
    process = vllm_serve(
        "--model",
        str(folder / "model"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "128",
        "--kv-cache-memory-bytes",
        str(64 << 20),
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        engine = VLLMServerEngine(model, tok, base_url=url, timeout=START_TIMEOUT, group_port=0)
        yield Served(process, url, log, port, str(folder / "model"), tok, model, engine)
    except VLLMServerError:
        print(log.read_text()[-3000:])
        raise
    finally:
        process.kill()
        process.wait(30)


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def test_server_describes_itself_and_a_taken_port_is_refused(
    served: Served, tmp_path: Path
) -> None:
    assert get(served.url + "/health")["status"] == "ok"
    info = get(served.url + "/info")
    assert info["protocol"] == "grpokit-vllm-server/1" and info["model"] == served.model_dir
    assert (info["max_model_len"], info["dtype"], info["device"]) == (128, "bfloat16", "cpu")
    names = {n for n, _ in served.model.named_parameters()}
    assert set(info["weights"]) == names
    assert info["weights"]["model.embed_tokens.weight"] == [len(served.tok), 128]  # tied head
    second = vllm_serve(
        "--model", served.model_dir, "--port", str(served.port), log=tmp_path / "second.log"
    )
    assert second.wait(120) == 2  # fails at once, before loading any model
    assert "cannot listen on 127.0.0.1" in (tmp_path / "second.log").read_text()


def test_completions_masks_and_padding(served: Served) -> None:
    tok, engine = served.tok, served.engine
    ids = prompts(tok)
    out = engine.generate(ids, num_generations=3, max_new_tokens=12, sampling=SamplingParams())
    n, t = out.completion_ids.shape
    assert n == 6 and 1 <= t <= 12
    assert out.prompt_ids.shape == out.prompt_mask.shape == (6, len(ids[1]))
    for row in range(n):  # left-padded, the G completions of a prompt consecutive
        prompt = ids[row // 3]
        assert out.prompt_ids[row, -len(prompt) :].tolist() == prompt
        assert out.prompt_mask[row].sum() == len(prompt)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for row in range(n):
        tokens, mask = out.completion_ids[row].tolist(), out.completion_mask[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else t
        assert mask == [1] * length + [0] * (t - length)
        assert tokens[length:] == [pad] * (t - length)
        assert bool(out.is_truncated[row]) == (eos not in tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_the_trainer(served: Served, temperature: float) -> None:
    """As in colocate mode: mean |diff| <= 0.01, max <= 0.05 nats per token (bf16 server)."""
    sampling = SamplingParams(temperature=temperature, top_k=20, repetition_penalty=1.2)
    out = served.engine.generate(
        prompts(served.tok), num_generations=4, max_new_tokens=16, sampling=sampling
    )
    gap = logprob_gap(served.model, out, temperature)
    assert float(gap.mean()) <= BF16_ATOL_MEAN and float(gap.max()) <= BF16_ATOL_MAX


def greedy_hf(model: Any, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_weight_update_changes_the_outputs(served: Served) -> None:
    """Greedy completions follow the pushed weights: a model dominated by "a" makes the server
    write "a"s, as transformers' greedy decode of that model does; after pushing a perturbed
    copy of every weight, the server's log-probs are that copy's (bf16 tolerance), not the
    original's; pushing the original back restores them."""
    tok, model, engine = served.tok, served.model, served.engine
    a = tok.convert_tokens_to_ids("a")
    greedy = SamplingParams(temperature=0.0)
    ids = prompts(tok)
    before = engine.generate(ids, num_generations=1, max_new_tokens=8, sampling=greedy)
    assert (before.completion_ids != a).any()
    dominated = dominated_by(model, a)
    try:
        engine.update_weights(dominated)
        after = engine.generate(ids, num_generations=1, max_new_tokens=8, sampling=greedy)
        for row, prompt in enumerate(ids):
            assert after.completion_ids[row].tolist() == greedy_hf(dominated, prompt, 8) == [a] * 8

        perturbed = make_causal_lm(tok, seed=5, **TINY)  # every weight different
        with torch.no_grad():  # logits ~4x larger than the random init's: clearly other log-probs
            perturbed.get_input_embeddings().weight.mul_(4.0)
        engine.update_weights(perturbed)
        out = engine.generate(ids, num_generations=4, max_new_tokens=12, sampling=SamplingParams())
        assert float(logprob_gap(perturbed, out).max()) <= BF16_ATOL_MAX
        assert float(logprob_gap(model, out).mean()) > 10 * BF16_ATOL_MEAN
    finally:
        engine.update_weights(model)
    again = engine.generate(ids, num_generations=1, max_new_tokens=8, sampling=greedy)
    assert torch.equal(again.completion_ids, before.completion_ids)


def test_a_request_timeout_is_a_clear_error_and_the_server_survives(served: Served) -> None:
    """A 64 x 100-token request cannot be answered within 50 ms; the next request, with the
    normal timeout, is answered."""
    engine = served.engine
    sampling = SamplingParams(generation_kwargs={"min_new_tokens": 100})
    timeout = engine.connection.timeout
    engine.connection.timeout = 0.05
    try:
        with pytest.raises(VLLMServerError, match="did not reply to a generation request") as e:
            engine.generate([[5, 6]] * 16, num_generations=4, max_new_tokens=100, sampling=sampling)
        assert e.value.kind == "timeout"
    finally:
        engine.connection.timeout = timeout
    out = engine.generate([[5, 6]], num_generations=2, max_new_tokens=4, sampling=SamplingParams())
    assert out.completion_ids.shape[0] == 2


def test_grpo_run_in_server_mode(served: Served, tmp_path: Path) -> None:
    """GRPOTrainer(use_vllm=True, vllm_mode="server"): samples from the server, and after its 2
    optimizer steps the server's log-probs of fresh samples are the trained policy's."""
    tok = served.tok
    model = make_causal_lm(tok, **TINY)
    trainer = length_trainer(
        tmp_path,
        model,
        tok,
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=served.url,
        vllm_group_port=0,
        max_completion_length=8,
        learning_rate=5e-2,
        bf16=False,
        # the first character's code: two completions of a prompt almost never tie (a length
        # reward does whenever both run to max_completion_length, and the step learns nothing)
        reward=lambda completions, **_: [float(ord(c[0])) if c else 0.0 for c in completions],
    )
    assert isinstance(trainer.engine, VLLMServerEngine)
    train_and_check_the_engine_follows(trainer, model, tok)
    # the module's engine notices that the trainer took the weight group, and resends all
    served.engine.update_weights(served.model)
    out = served.engine.generate(
        prompts(tok), num_generations=2, max_new_tokens=8, sampling=SamplingParams()
    )
    assert float(logprob_gap(served.model, out).max()) <= BF16_ATOL_MAX


def test_the_server_going_away_is_a_clear_error(served: Served) -> None:
    """Runs last: kills the module's server. No hang: each call fails at once."""
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(30)
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match="went away during a generation request") as error:
        served.engine.generate(
            prompts(served.tok), num_generations=2, max_new_tokens=4, sampling=SamplingParams()
        )
    assert served.url in str(error.value) and "grpokit vllm-serve" in str(error.value)
    with pytest.raises(VLLMServerError, match="went away during a weight update"):
        served.engine.update_weights(served.model)
    assert time.monotonic() - start < 30  # generous bound: both fail on connection refused
