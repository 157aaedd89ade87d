"""VLLMEngine on a tiny Llama (vLLM in this process). Skipped where vLLM is not installed.

Run in the vLLM environment (bench/requirements-vllm.txt):
    bench/.venv-vllm/bin/python -m pytest tests/test_vllm_engine.py -q
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from grpokit.engines.base import SamplingParams
from grpokit.engines.vllm_engine import VLLMEngine
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


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Any, Any, VLLMEngine]]:
    tok = make_tokenizer()
    model = make_causal_lm(tok, **TINY)
    engine = VLLMEngine(model, tok, max_model_len=128, kv_cache_memory_bytes=64 << 20)
    yield tok, model, engine
    engine.update_weights(model)


def test_completions_masks_and_padding(setup: tuple[Any, Any, VLLMEngine]) -> None:
    tok, _, engine = setup
    ids = prompts(tok)
    out = engine.generate(ids, num_generations=3, max_new_tokens=12, sampling=SamplingParams())
    n, t = out.completion_ids.shape
    assert n == 6 and 1 <= t <= 12
    assert out.prompt_ids.shape == out.prompt_mask.shape == (6, len(ids[1]))
    for row in range(n):  # left-padded, the G completions of a prompt consecutive
        prompt = ids[row // 3]
        assert out.prompt_ids[row, -len(prompt) :].tolist() == prompt
        assert out.prompt_mask[row].sum() == len(prompt)
    assert int(out.completion_ids.max()) < len(tok)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for row in range(n):
        tokens, mask = out.completion_ids[row].tolist(), out.completion_mask[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else t
        assert mask == [1] * length + [0] * (t - length)
        assert tokens[length:] == [pad] * (t - length)
        assert bool(out.is_truncated[row]) == (eos not in tokens)
        assert tok.decode(tokens[:length])  # decodes
    assert out.sampling_logprobs is not None
    assert (out.sampling_logprobs[out.completion_mask == 0] == 0).all()
    assert (out.sampling_logprobs[out.completion_mask == 1] < 0).all()


def test_min_new_tokens_forces_full_length(setup: tuple[Any, Any, VLLMEngine]) -> None:
    tok, model, engine = setup
    sampling = SamplingParams(generation_kwargs={"min_new_tokens": 8})
    engine.update_weights(dominated_by(model, tok.eos_token_id))
    try:
        out = engine.generate(prompts(tok), num_generations=2, max_new_tokens=8, sampling=sampling)
        # EOS is forbidden for 8 tokens: no row ends early, all are truncated
        assert out.completion_mask.shape == (4, 8) and bool(out.completion_mask.all())
        assert bool(out.is_truncated.all())
        short = engine.generate(
            prompts(tok), num_generations=2, max_new_tokens=8, sampling=SamplingParams()
        )
        # without it, every completion is the single EOS token
        assert short.completion_ids.tolist() == [[tok.eos_token_id]] * 4
        assert short.completion_mask.tolist() == [[1]] * 4
        assert not short.is_truncated.any()
    finally:
        engine.update_weights(model)


def test_update_weights_changes_the_samples(setup: tuple[Any, Any, VLLMEngine]) -> None:
    tok, model, engine = setup
    a = tok.convert_tokens_to_ids("a")
    sampling = SamplingParams(temperature=1.0)
    before = engine.generate(prompts(tok), num_generations=4, max_new_tokens=10, sampling=sampling)
    assert (before.completion_ids != a).any()
    engine.update_weights(dominated_by(model, a))
    after = engine.generate(prompts(tok), num_generations=4, max_new_tokens=10, sampling=sampling)
    assert (after.completion_ids == a).all() and after.is_truncated.all()
    engine.update_weights(model)
    again = engine.generate(prompts(tok), num_generations=4, max_new_tokens=10, sampling=sampling)
    assert (again.completion_ids != a).any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_the_trainer(
    setup: tuple[Any, Any, VLLMEngine], temperature: float
) -> None:
    """vLLM's log-prob of each sampled token (bf16) vs the trainer's fp32 log_softmax(logits / T)
    on the same completions: mean |diff| <= 0.01 and max |diff| <= 0.05 nats per token."""
    tok, model, engine = setup
    sampling = SamplingParams(temperature=temperature, top_k=20, repetition_penalty=1.2)
    out = engine.generate(prompts(tok), num_generations=4, max_new_tokens=16, sampling=sampling)
    diff = logprob_gap(model, out, temperature)
    assert float(diff.mean()) <= BF16_ATOL_MEAN, float(diff.mean())
    assert float(diff.max()) <= BF16_ATOL_MAX, float(diff.max())


def test_seed_reproduces_and_unknown_kwargs_fail(setup: tuple[Any, Any, VLLMEngine]) -> None:
    tok, _, engine = setup
    seeded = SamplingParams(generation_kwargs={"seed": 7})
    one = engine.generate(prompts(tok), num_generations=3, max_new_tokens=10, sampling=seeded)
    two = engine.generate(prompts(tok), num_generations=3, max_new_tokens=10, sampling=seeded)
    assert torch.equal(one.completion_ids, two.completion_ids)
    assert len({tuple(row) for row in one.completion_ids.tolist()}) == 6  # all differ
    with pytest.raises(ValueError, match="not_a_field"):
        engine.generate(
            prompts(tok),
            num_generations=1,
            max_new_tokens=4,
            sampling=SamplingParams(generation_kwargs={"not_a_field": 1}),
        )
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(
            prompts(tok), num_generations=1, max_new_tokens=500, sampling=SamplingParams()
        )


def test_peft_model_sends_merged_weights(setup: tuple[Any, Any, VLLMEngine]) -> None:
    """The base weights are the dominated model's except o_proj/down_proj (random); the LoRA
    adapters on those cancel them exactly, so only base + adapter merged makes "a" dominate.
    The PEFT model's own weights are unchanged afterwards, bit for bit (merged out of place)."""
    peft = pytest.importorskip("peft")
    tok, model, engine = setup
    a = tok.convert_tokens_to_ids("a")
    base = dominated_by(model, a)
    with torch.no_grad():
        originals = dict(model.named_parameters())
        for name, param in base.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.copy_(originals[name])
    config = peft.LoraConfig(r=128, lora_alpha=128, target_modules=["o_proj", "down_proj"])
    lora = peft.get_peft_model(base, config)
    with torch.no_grad():  # scaling * B @ A == -W: the adapter cancels the base weight
        for module in lora.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                u, s, vh = torch.linalg.svd(module.base_layer.weight)  # [out, in], rank <= 128
                module.lora_A["default"].weight.copy_(vh[:128])
                module.lora_B["default"].weight.copy_(-(u[:, :128] * s[:128]))
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    sampling = SamplingParams()
    try:
        engine.update_weights(lora)
        out = engine.generate(prompts(tok), num_generations=2, max_new_tokens=6, sampling=sampling)
        assert (out.completion_ids == a).all()
        for key, value in lora.state_dict().items():
            assert torch.equal(value, before[key]), key
    finally:
        engine.update_weights(model)


def test_trainer_with_use_vllm_trains_and_keeps_vllm_in_sync(tmp_path: Any) -> None:
    """GRPOConfig(use_vllm=True): the trainer builds a VLLMEngine, samples with it, and after
    each optimizer step vLLM's weights are the policy's (its log-probs of fresh samples match the
    policy's within the bf16 tolerance)."""
    train_with_vllm_in_this_process(tmp_path)


def train_with_vllm_in_this_process(out: Any) -> Any:
    """The run of `test_trainer_with_use_vllm_trains_and_keeps_vllm_in_sync` (on each process of
    a launched run: its own VLLMEngine each); returns the trained model."""
    tok = make_tokenizer()
    model = make_causal_lm(tok, **TINY)
    trainer = length_trainer(
        out,
        model,
        tok,
        use_vllm=True,
        vllm_max_model_length=64,
        max_completion_length=8,
        learning_rate=5e-2,
        bf16=False,
    )
    assert isinstance(trainer.engine, VLLMEngine)
    train_and_check_the_engine_follows(trainer, model, tok)
    return model


def test_each_of_two_ddp_processes_samples_with_its_own_vllm(tmp_path: Any) -> None:
    """Colocated vLLM under `torchrun --nproc_per_node 2` (DDP, gloo): each process builds its
    own VLLMEngine beside the default process group, trains, and its engine follows the policy
    (this test's module run as the launched script); both processes end with the same weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_distributed import ROOT, _free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command += [str(Path(__file__)), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    env.update(OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    weights = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


if __name__ == "__main__":  # a process of test_each_of_two_ddp_processes_samples_with_its_own_vllm
    import os
    import sys
    from pathlib import Path

    folder, rank = Path(sys.argv[1]), os.environ["RANK"]
    trained = train_with_vllm_in_this_process(folder / f"run{rank}")
    torch.save(trained.state_dict(), folder / f"rank{rank}.pt")
