"""DeepSpeed ZeRO-2 and ZeRO-3 (through accelerate) train as one process does.

The scenarios of tests/distributed_worker.py (`run_deepspeed_scenarios`) run on 2 processes under
`accelerate launch --config_file examples/accelerate/zero{2,3}.yaml` (DeepSpeed's CPU accelerator,
gloo, 127.0.0.1), and on 1 process here (on 2 DDP processes for the scenario with two optimizer
steps per generation round, where each process trains its own slice of its share per step), with
the same global batch and a deterministic generation engine. The DeepSpeed engine accumulates
the micro-batches' gradients, averages them over the processes, clips them to `max_grad_norm`
and steps; the final parameters must agree with the reference up to float summation order, and
so must the logged loss and gradient norm (the first step's norm, 1.10, is above
`max_grad_norm` = 1: clipped by the engine, as by one process).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from grpokit.engines.models import cpu_bf16
from grpokit.errors import ConfigError
from grpokit.train import distributed as dist
from grpokit.train.config import GRPOConfig
from tests import distributed_worker as worker
from tests.test_distributed import (
    ROOT,
    _free_port,
    _launch,
    _max_diff,
    _metrics,
    _params,
    _wait_all,
    assert_adapter_saved,
    assert_lora_checkpoints,
    assert_lora_trained,
    assert_merged_saved,
    assert_server_follows,
    assert_vllm_server_only,
    recomputed,
    served_weights,
    vllm_servers,
)

pytest.importorskip("deepspeed")

STAGES = (2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The DeepSpeed scenarios under ZeRO-2 and ZeRO-3 on 2 processes each, and the DDP reference
    of the old_logprobs scenario, in the background; the single-process references here."""
    one, ddp = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("ddp")
    script = str(ROOT / "tests" / "distributed_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    command = [*torchrun, script, str(ddp), "old_logprobs"]
    launched = [(_launch(command, ddp / "launch.log"), ddp)]
    outs = [tmp_path_factory.mktemp(f"zero{stage}") for stage in STAGES]
    with vllm_servers(outs) as served:
        for stage, out in zip(STAGES, outs, strict=True):
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
            command += [str(ROOT / "examples" / "accelerate" / f"zero{stage}.yaml")]
            command += ["--main_process_ip", "127.0.0.1"]
            command += ["--main_process_port", str(_free_port())]
            env = served[str(out)]["env"]
            launched.append((_launch([*command, script, str(out)], out / "launch.log", env), out))
        try:
            worker.run_deepspeed_references(one)
        finally:  # an error here still ends the launched runs
            codes = _wait_all([proc for proc, _ in launched], timeout=500)
        vllm = {
            f"zero{stage}": {n: served_weights(s) for n, s in served[str(out)]["servers"].items()}
            for stage, out in zip(STAGES, outs, strict=True)
        }
    for code, (_, out) in zip(codes, launched, strict=True):
        assert code == 0, (out / "launch.log").read_text()[-3000:]
    zero = {f"zero{stage}": out for stage, out in zip(STAGES, outs, strict=True)}
    return {"one": one, "ddp": ddp, **zero, "vllm": vllm}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", sorted(worker.VLLM_SERVER_SCENARIOS))
def test_a_vllm_server_follows_the_policy_under_zero(
    runs: dict[str, Any], stage: int, scenario: str
) -> None:
    """`vllm_mode="server"` under ZeRO-2 and ZeRO-3: process 0 pushes what a step changed
    (under ZeRO-3 gathered from the partitions for it, `VLLMServerEngine.sync_parameters`)."""
    run = f"zero{stage}"
    assert_server_follows(runs["vllm"][run][scenario], _params(runs[run] / scenario))


def _whole_numel(name: str = "model.embed_tokens.weight") -> int:
    return worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()[name].numel()


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", worker.DEEPSPEED_SCENARIOS)
def test_zero_on_two_processes_trains_as_one(
    runs: dict[str, Path], stage: int, scenario: str
) -> None:
    reference = "ddp" if scenario in worker.SCENARIOS_DEEPSPEED_ONLY else "one"
    one, zero = runs[reference] / scenario, runs[f"zero{stage}"] / scenario
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
    assert _max_diff(_params(one), initial) > 0.05  # the weights moved (lr 0.05, 3 steps)
    # Measured: at most 3.6e-6 (ZeRO-3, dapo); float summation order only.
    assert _max_diff(_params(one), _params(zero)) < 1e-5
    m1, m2 = _metrics(one), _metrics(zero)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]  # one writer
    assert [r["step"] for r in m2] == ([2, 3] if reference == "ddp" else [1, 2, 3])
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("loss", "grad_norm", "learning_rate", "reward", "num_tokens"):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
    # ZeRO-3 partitions the parameters (each process holds none of the first one's elements
    # outside a gathering); under ZeRO-2 every process holds the whole weights.
    local = {int((zero / f"local_numel_{rank}.txt").read_text()) for rank in (0, 1)}
    assert local == ({0} if stage == 3 else {_whole_numel()})
    # Under ZeRO-2 each optimizer step gathered the updated weights as one broadcast per
    # process over gloo (`dist.gather_by_broadcasts_over_gloo`); ZeRO-3's gathers are its own.
    gathers = {int((zero / f"broadcast_gathers_{rank}.txt").read_text()) for rank in (0, 1)}
    if stage == 2:
        (count,) = gathers
        assert count >= len(m2), count
    # The engine's training forwards passed on the position ids and kept only the completion
    # positions' logits (`core.logprobs.training_wrapper`).
    for rank in (0, 1):
        named = json.loads((zero / f"forward_arguments_{rank}.json").read_text())
        assert {"logits_to_keep", "position_ids", "input_ids"} <= set(named), (rank, named)
    # The decoder layers recomputed their activations where the scenario asks.
    checkpointing = worker.ALL_SCENARIOS[scenario].get("gradient_checkpointing", False)
    assert recomputed(zero) == checkpointing
    # The generation engine's bf16 copy got the whole trained weights (gathered under ZeRO-3):
    # exactly the weights rounded to bf16.
    assert float((zero / "engine_gap.txt").read_text()) == 0.0
    # The final model was written whole by the main process.
    from safetensors.torch import load_file

    final = load_file(str(zero / "final_model" / "model.safetensors"))
    assert _max_diff(final, {k: _params(zero)[k] for k in final}) == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_zero_processes_keep_or_recompute_forwards_as_one_process(
    runs: dict[str, Path], stage: int
) -> None:
    # Each process keeps the activations of its small training forwards and of the last layer
    # of somewhat larger ones, and recomputes the rest, and the two processes still train as
    # one. Each forward is judged by the larger of the two processes' sizes and shares its
    # prompts where both processes' do, so both run it alike: ZeRO-3 gathers a layer around its
    # recomputation too, and ZeRO-2 reduces the gradients in the order the backward readies
    # them. Under ZeRO-2 forwards that recompute share their prompts too (2 processes deciding
    # by their own sizes were 0.17 away from one process's weights); under ZeRO-3 they do not.
    one, zero = runs["one"] / "kept_activations", runs[f"zero{stage}"] / "kept_activations"
    assert _max_diff(_params(one), _params(zero)) < 1e-5
    for r1, r2 in zip(_metrics(one), _metrics(zero), strict=True):
        for key in ("loss", "grad_norm", "reward"):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
    counts = [json.loads((zero / f"kept_forwards_{rank}.json").read_text()) for rank in (0, 1)]
    for rank, kept in enumerate(counts):
        assert kept["recomputed"] > 0 and kept["last_kept"] > kept["kept"], (rank, kept)
        assert kept["kept"] > 0, (rank, kept)  # some forwards keep every layer's activations
    assert counts[0] == counts[1]  # the same layers kept on both processes
    shared = [json.loads((zero / f"shared_forwards_{rank}.json").read_text()) for rank in (0, 1)]
    assert shared[0] == shared[1]
    if stage == 2:
        assert shared[0]["recomputing"] > 0, shared
    else:
        assert shared[0]["recomputing"] == 0, shared


@pytest.mark.parametrize("stage", STAGES)
def test_zero_forwards_each_shared_prompt_once(runs: dict[str, Path], stage: int) -> None:
    # The shared_reference scenario trained as one process did
    # (test_zero_on_two_processes_trains_as_one): its training forwards (the prompt pass on the
    # engine's module, the completions through the engine) and its reference log-probs' passes
    # forwarded each shared prompt once on both processes; under ZeRO-3, which gathers each
    # layer around every call, the two processes made the same shared passes.
    def counts(scenario: str, rank: int) -> dict[str, int]:
        path = runs[f"zero{stage}"] / scenario / f"shared_forwards_{rank}.json"
        return json.loads(path.read_text())

    for rank in (0, 1):
        shared = counts("shared_reference", rank)
        assert shared["training"] > 0 and shared["no_grad"] > 0, (rank, shared)
        assert counts("dapo", rank) == {"training": 0, "no_grad": 0, "recomputing": 0}
    if stage == 3:
        assert counts("shared_reference", 0) == counts("shared_reference", 1)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_trains_a_lora_adapter_as_one_process(runs: dict[str, Path], stage: int) -> None:
    # The adapter trained by the engine (only its weights in the optimizer; under ZeRO-3 the
    # frozen base weights partitioned too), its reference log-probs with the adapter off, each
    # shared prompt forwarded once: as one process trained it.
    one, zero = runs["one"] / "lora", runs[f"zero{stage}"] / "lora"
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
    trained = _params(zero)
    assert_lora_trained(trained, initial)
    assert _max_diff(_params(one), trained) < 1e-5
    for r1, r2 in zip(_metrics(one), _metrics(zero), strict=True):
        for key in ("loss", "grad_norm", "reward", "learning_rate"):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
    # The engine's bf16 copy got the trained adapters (gathered under ZeRO-3).
    assert float((zero / "engine_gap.txt").read_text()) == 0.0
    counts = [json.loads((zero / f"shared_forwards_{r}.json").read_text()) for r in (0, 1)]
    assert all(c["training"] > 0 and c["no_grad"] > 0 for c in counts), counts
    if stage == 3:
        assert counts[0] == counts[1]
    # The final adapter, whole, and the merged model built from the gathered weights.
    assert_adapter_saved(zero / "final_model", trained)
    assert_merged_saved(zero / "merged", trained)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_lora_checkpoints_hold_the_whole_adapter_and_resume_exactly(
    runs: dict[str, Path], stage: int
) -> None:
    assert_lora_checkpoints(runs[f"zero{stage}"])


@pytest.mark.parametrize("stage", STAGES)
def test_zero_skips_a_nonfinite_step_as_one_process(runs: dict[str, Path], stage: int) -> None:
    one, zero = runs["one"] / "nonfinite", runs[f"zero{stage}"] / "nonfinite"
    # Step 2's forwards are NaN: DeepSpeed finds its gradient norm non-finite and applies no
    # update (skipped_steps 1); grpokit's guard counts it (nonfinite_skipped 1). Steps 1 and 3
    # update as on one process, whose guard skipped step 2 too.
    assert (one / "skipped.txt").read_text() == "1"
    assert (zero / "skipped.txt").read_text() == "1 1"
    assert _max_diff(_params(one), _params(zero)) < 1e-5
    m1, m2 = _metrics(one), _metrics(zero)
    assert [r["loss"] is None for r in m2] == [False, True, False]  # NaN is written null
    assert [r["train/nonfinite_skipped"] for r in m2] == [0, 1, 1]
    # The schedule (linear, 3 steps from 0.05) did not advance on the skipped step: 0.05 x 2/3
    # after steps 1 and 2, 0.05 x 1/3 after step 3, as on one process.
    assert [r["learning_rate"] for r in m2] == [r["learning_rate"] for r in m1]
    assert [r["learning_rate"] for r in m2] == pytest.approx([0.05 * 2 / 3] * 2 + [0.05 / 3])


@pytest.mark.parametrize("stage", STAGES)
def test_zero_checkpoints_hold_whole_states_and_resume_exactly(
    runs: dict[str, Path], stage: int
) -> None:
    zero = runs[f"zero{stage}"]
    assert _max_diff(_params(zero / "uninterrupted"), _params(zero / "resumed")) == 0.0
    checkpoint = zero / "resumed" / "checkpoint-2"
    assert (checkpoint / "rng_state_1.json").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 2
    # The whole weights and the whole optimizer state, in a single process's format: Adam's
    # moments by parameter index with the parameters' shapes, its step count, the groups.
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0)
    assert {k: v.shape for k, v in weights.items()} == {
        k: v.shape for k, v in initial.state_dict().items()
    }
    from grpokit.train.build import make_optimizer

    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    plain = make_optimizer(initial, worker.config(zero / "plain"))  # one process's optimizer
    groups = [[p.shape for p in group["params"]] for group in plain.param_groups]
    shapes = [shape for group in groups for shape in group]
    assert [optimizer["state"][i]["exp_avg"].shape for i in range(len(shapes))] == shapes
    assert {float(s["step"]) for s in optimizer["state"].values()} == {2.0}
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [len(g) for g in groups]
    # It loads into a single process's optimizer as that process's own state would.
    plain.load_state_dict(optimizer)


def test_zero2_and_zero3_checkpoints_agree(runs: dict[str, Path]) -> None:
    # The same training on the same processes, partitioned two ways: the gathered optimizer
    # states agree up to float summation order (measured: 6.5e-9).
    path = "resumed/checkpoint-2/optimizer.pt"
    two = torch.load(runs["zero2"] / path, weights_only=True)["state"]
    three = torch.load(runs["zero3"] / path, weights_only=True)["state"]
    for i in two:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(two[i][key], three[i][key], atol=1e-7, rtol=0), (i, key)


# ---- the pieces, on one process ------------------------------------------------------------------
def _accelerator(config: dict[str, Any]) -> Any:
    """A stand-in for a 2-process `Accelerator` with DeepSpeed config `config`."""
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)


def test_the_deepspeed_config_is_filled_from_the_grpo_config(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = GRPOConfig(
        per_device_train_batch_size=4, gradient_accumulation_steps=3, num_generations=4
    )
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    dist.configure_deepspeed(_accelerator(config), args)
    # 4 completions per micro-batch x 3 micro-batches x 2 processes = 24 per optimizer step.
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24
    assert config["gradient_clipping"] == args.max_grad_norm == 1.0
    # A value of the DeepSpeed config that contradicts the GRPOConfig is refused.
    with pytest.raises(ConfigError, match=r"gradient_clipping=0\.5 but the GRPOConfig's max_grad"):
        dist.configure_deepspeed(_accelerator({"gradient_clipping": 0.5}), args)
    with pytest.raises(ConfigError, match="enables bf16"):
        dist.configure_deepspeed(_accelerator({"bf16": {"enabled": True}}), args)


def test_deepspeed_missing_or_at_another_stage_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert dist.check_backend_installed() == 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(ConfigError, match="ZeRO stage 1; grpokit trains with ZeRO stage 2 or 3"):
        dist.check_backend_installed()
    monkeypatch.setattr(dist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"ZeRO-1, but the `deepspeed` package is not installed"):
        dist.check_backend_installed()


def test_deepspeed_with_use_cpu_on_a_cuda_machine_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=4, use_cpu=True)
    with pytest.raises(ConfigError, match="use_cpu=True with DeepSpeed on a machine with CUDA"):
        dist.World.from_env(args)  # before any process group is joined


def test_deepspeed_settings_it_cannot_run_are_refused() -> None:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    world = dist.World(num_processes=2, accelerator=accelerator, zero_stage=3)
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=4)
    dist.check_deepspeed_run(world, args, engine=None, prompt_learning=False)  # nothing to refuse
    with pytest.raises(ConfigError, match="a prompt-learning PEFT adapter"):
        dist.check_deepspeed_run(world, args, engine=None, prompt_learning=True)
    compiled = GRPOConfig(per_device_train_batch_size=4, num_generations=4, torch_compile=True)
    with pytest.raises(ConfigError, match="does not support yet: torch_compile"):
        dist.check_deepspeed_run(world, compiled, engine=None, prompt_learning=False)
    assert_vllm_server_only(dist.check_deepspeed_run, world, r"vllm_mode='colocate'.*ZeRO-3")
    sampling_from_the_model = SimpleNamespace(model="m", sampler_model="m")
    with pytest.raises(ConfigError, match="without its own sampler copy"):
        dist.check_deepspeed_run(world, args, engine=sampling_from_the_model, prompt_learning=False)
    plugin.deepspeed_config["scheduler"] = {"type": "WarmupLR"}
    with pytest.raises(ConfigError, match="the DeepSpeed config's 'scheduler'"):
        dist.check_deepspeed_run(world, args, engine=None, prompt_learning=False)


@pytest.mark.skipif(
    not cpu_bf16().native,
    reason="under ZeRO-3 the TransformersEngine samples from its own bf16 copy, which it makes "
    "only on a CPU with native bf16 (without, grpokit refuses the run: check_deepspeed_run)",
)
def test_grpokit_train_under_zero3_through_accelerate(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from grpokit.app.cli import main
    from tests.test_distributed import _run_config
    from tests.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    config = _run_config(tmp_path, model)
    zero3 = str(ROOT / "examples" / "accelerate" / "zero3.yaml")
    # `accelerate launch --config_file zero3.yaml -m grpokit.app.cli train ...`: the
    # TransformersEngine samples from its whole bf16 copy (evaluations before and after, every
    # rollout) while the policy is partitioned; no reward is earned, so every step's plan is
    # empty and the engine steps on the zero gradient of one padding micro-batch per process.
    assert main(["train", config, "--accelerate_config", zero3]) == 0
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # written by one process
    evals = [json.loads(line)["when"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals == ["before", "after"]
    assert (run / "checkpoint-2" / "rng_state_1.json").exists()
    # The final model holds the whole weights (gathered from the partitions).
    saved = load_file(str(Path(model) / "model.safetensors"))
    final = load_file(str(run / "final_model" / "model.safetensors"))
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in saved.items()}
