"""`torch_compile`: TRL's fields resolved as transformers resolves them, each decoder block compiled
once for all layers, generation left eager, and the same training as without compiling."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._inductor

from grpokit import GRPOConfig
from grpokit.core.logprobs import model_completion_logprobs
from grpokit.engines.base import SamplingParams
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.errors import ConfigError
from grpokit.train import build
from grpokit.train.config_checks import COMPILE_MODES
from tests.test_trainer import make_trainer, params
from tests.tiny import make_causal_lm, make_tokenizer, read_metrics

GRAPHS: list[torch.fx.GraphModule] = []


@torch._dynamo.register_backend
def counting_eager(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A backend that records each graph dynamo hands it and runs it eagerly."""
    del example_inputs
    GRAPHS.append(graph)
    return graph.forward


@pytest.fixture(autouse=True)
def fresh_compilations() -> Any:
    torch._dynamo.reset()
    GRAPHS.clear()
    yield
    torch._dynamo.reset()


def test_the_compile_fields_resolve_as_in_transformers() -> None:
    assert (GRPOConfig().torch_compile, GRPOConfig().torch_compile_backend) == (False, None)
    on = GRPOConfig(torch_compile=True)
    assert (on.torch_compile_backend, on.torch_compile_mode) == ("inductor", None)
    # Setting the backend or the mode turns compiling on, as transformers' TrainingArguments do.
    by_mode = GRPOConfig(torch_compile_mode="max-autotune")
    assert (by_mode.torch_compile, by_mode.torch_compile_backend) == (True, "inductor")
    by_backend = GRPOConfig(torch_compile_backend="aot_eager")
    assert (by_backend.torch_compile, by_backend.torch_compile_backend) == (True, "aot_eager")
    with pytest.raises(ValueError, match="torch_compile_mode must be one of"):
        GRPOConfig(torch_compile_mode="fastest")
    # Every mode torch knows, and no other.
    assert set(COMPILE_MODES) == {None, *torch._inductor.list_mode_options()}


def test_each_decoder_block_is_compiled_and_one_graph_serves_every_layer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    eager = make_causal_lm(tok)  # the same seed: the same weights
    model.config.use_cache = False  # as for training (`prepare_model`); a cache is per layer
    names = [name for name, _ in model.named_parameters()]
    with caplog.at_level(logging.INFO, logger="grpokit"):
        what = build.compile_policy(model, GRPOConfig(torch_compile_backend="counting_eager"))
    layers = model.model.layers
    assert what == f"{len(layers)} LlamaDecoderLayer blocks"
    assert "torch.compile of the policy: 2 LlamaDecoderLayer blocks, backend counting_eager" in (
        caplog.text
    )
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == list(layers) and len(layers) == 2
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints unchanged

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # [2, 6]
    mask = torch.ones_like(ids)
    got, _ = model_completion_logprobs(model, ids, mask, 3)
    want, _ = model_completion_logprobs(eager, ids, mask, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(GRAPHS) == 1  # both layers ran the one compiled graph


def test_a_model_that_names_no_blocks_is_compiled_whole() -> None:
    model = make_causal_lm(make_tokenizer())
    model._no_split_modules = None
    what = build.compile_policy(model, GRPOConfig(torch_compile_backend="counting_eager"))
    assert what == "the whole model"
    assert model._compiled_call_impl is not None
    assert build.compile_policy(model, GRPOConfig()) is None  # torch_compile off


@pytest.fixture
def no_cxx_compiler() -> Any:
    """Inductor's compiler search (`cpp.cxx`) pointed at a compiler that does not exist."""
    from torch._inductor import cpp_builder

    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
            yield
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()


def test_an_unknown_backend_fails_naming_the_known_ones() -> None:
    model = make_causal_lm(make_tokenizer())
    with pytest.raises(ConfigError, match=r"'no_such' is not a torch\.compile backend.*inductor"):
        build.compile_policy(model, GRPOConfig(torch_compile_backend="no_such"))


@pytest.mark.usefixtures("no_cxx_compiler")
def test_inductor_without_a_cxx_compiler_fails_naming_the_fix() -> None:
    assert build._cxx_compiler() is None
    model = make_causal_lm(make_tokenizer())
    with pytest.raises(ConfigError, match=r"no C\+\+ compiler was found.*aot_eager"):
        build.compile_policy(model, GRPOConfig(torch_compile=True))
    # Other backends build no kernels.
    assert build.compile_policy(model, GRPOConfig(torch_compile_backend="aot_eager"))


def test_the_cxx_compiler_is_found_where_inductor_looks() -> None:
    from torch._inductor import cpp_builder

    assert build._cxx_compiler() == cpp_builder.get_cpp_compiler()  # g++ here


def test_generation_runs_eagerly_on_a_compiled_policy() -> None:
    # The sampler is the compiled float32 policy itself (no bf16 copy): prefill and the decode
    # steps call its compiled layers, which must run eagerly; a plain forward compiles.
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    model.config.use_cache = False
    build.compile_policy(model, GRPOConfig(torch_compile_backend="counting_eager"))
    sampling = SamplingParams()
    for decode in ("lean", "hf"):
        engine = TransformersEngine(model, tok, bf16_sampler=False, decode=decode)
        assert engine.sampler_model is model
        out = engine.generate(
            [[5, 6, 7], [8, 9]], num_generations=2, max_new_tokens=4, sampling=sampling
        )
        assert out.completion_ids.shape[0] == 4
    assert GRAPHS == []
    ids = torch.tensor([[5, 6, 7, 8]])
    model_completion_logprobs(model, ids, torch.ones_like(ids), 2)
    assert len(GRAPHS) == 1


def test_the_trainer_compiles_the_policy_and_its_reference(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, torch_compile_backend="aot_eager", beta=0.1)
    for model in (trainer.model, trainer.ref_model):
        layers = model.model.layers
        assert all(layer._compiled_call_impl is not None for layer in layers)
    sampler = trainer.engine.sampler_model  # the bf16 copy here, or the policy itself
    assert sampler is trainer.model or sampler.model.layers[0]._compiled_call_impl is None


def test_a_compiled_run_trains_as_the_eager_one(tmp_path: Path) -> None:
    # Two steps with the KL term (so the reference copy, compiled too, must keep its own
    # weights): inductor's kernels give the eager run's losses, KL and weights up to rounding.
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        trainer = make_trainer(tmp_path / name, torch_compile=compile_, beta=0.1, max_steps=2)
        start = params(trainer)
        trainer.train()
        end = params(trainer)
        records = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        runs[name] = (start, end, [(r["loss"], r["kl"]) for r in records])
    (start, eager_end, eager_metrics), (_, compiled_end, compiled_metrics) = runs.values()
    assert eager_metrics[1][1] > 1e-4  # the second step's KL is real: policy and reference differ
    for (loss, kl), (want_loss, want_kl) in zip(compiled_metrics, eager_metrics, strict=True):
        assert loss == pytest.approx(want_loss, abs=1e-6)
        assert kl == pytest.approx(want_kl, rel=1e-4, abs=1e-7)
    assert max((eager_end[k] - start[k]).abs().max().item() for k in start) > 1e-3
    for key, value in eager_end.items():
        torch.testing.assert_close(compiled_end[key], value, rtol=1e-4, atol=1e-5)


def test_a_lora_policy_compiles_its_blocks_and_trains(tmp_path: Path) -> None:
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tmp_path,
        torch_compile_backend="counting_eager",
        max_steps=1,
        trainer_kwargs={"peft_config": lora},
    )
    layers = trainer.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    start = params(trainer)
    trainer.train()
    assert GRAPHS  # the adapted blocks ran compiled
    changed = {k for k, v in params(trainer).items() if not torch.equal(v, start[k])}
    assert changed and all("lora_" in k for k in changed)
