"""Training on several processes (grpokit.train.distributed) equals training on one.

The scenarios of tests/distributed_worker.py run once on 1 process (here) and once on 2 processes
under `torchrun` (gloo, 127.0.0.1), with the same global batch and a deterministic generation
engine: the final parameters must agree up to float summation order, and so must the logged
metrics that do not depend on how rows are grouped into micro-batches. The launcher, the process
group, DDP's gradient averaging and the checkpoints are the real ones.

Adam is invariant to a constant scale of the gradient, so parameters alone could not catch a
normaliser that is off by a constant factor (e.g. DDP's averaging left uncompensated): the
logged `loss` and `grad_norm` do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from grpokit.errors import ConfigError
from grpokit.train import distributed as dist
from grpokit.train.config import GRPOConfig
from grpokit.train.microbatch import chunk_loss_tokens, plan_micro_batches
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parent.parent

# Metrics that are the same however the global batch is split: rollout statistics (computed on
# the gathered batch), the global step's loss and the synchronised gradient's norm. Per
# micro-batch means (entropy, clip ratios, kl) are averaged over differently sized micro-batches.
EQUAL_METRICS = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "rewards/letter_reward/mean",
    "rewards/letter_reward/std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
    "completions/mean_terminated_length",
    "num_tokens",
    "loss",
    "grad_norm",
    "learning_rate",
    "epoch",
    "eval_reward",
    "eval_reward_std",
    "eval_frac_reward_zero_std",
    "eval_completions/mean_length",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` (a launcher) in its own process group, output to `log`; `env` adds to
    its environment."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")},
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    with log.open("w") as out:
        return subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )


def _wait_all(launched: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """Exit codes of the launchers, waiting `timeout` seconds in all; on any failure or timeout
    every launcher still running is killed with its workers (its process group)."""
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in launched]
    finally:
        for proc in launched:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def vllm_servers(runs: list[Path]) -> Iterator[dict[str, dict[str, Any]]]:
    """For each run folder, a fake vLLM behind the real `VLLMServer` (tests/test_vllm_client.py)
    per scenario of `worker.VLLM_SERVER_SCENARIOS`, started from another model (seed 1) than the
    trainers' (seed 0); yields, by run folder, the environment that names the servers to its
    launch ("env") and the servers by scenario ("servers"), up until they stop."""
    from tests.test_vllm_client import FakeEngine, serving

    start = worker.make_causal_lm(worker.make_tokenizer(), seed=1)
    with contextlib.ExitStack() as stack:
        made: dict[str, dict[str, Any]] = {}
        for run in runs:
            servers = {
                name: stack.enter_context(serving(FakeEngine(start)))
                for name in worker.VLLM_SERVER_SCENARIOS
            }
            urls = ",".join(server.address for server in servers.values())
            made[str(run)] = {"env": {worker.VLLM_SERVERS: urls}, "servers": servers}
        yield made


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the scenarios on 2 processes with DDP (torchrun) and with FSDP2 (accelerate launch
    with examples/accelerate/fsdp2.yaml), both in the background, and on 1 process here. Both
    launches also sample from vLLM servers (`vllm_servers`), whose final weights are kept under
    "vllm" (by run, then by scenario)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    fsdp = tmp_path_factory.mktemp("fsdp")
    script = str(ROOT / "tests" / "distributed_worker.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    accelerate += [str(ROOT / "examples" / "accelerate" / "fsdp2.yaml")]
    accelerate += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    with vllm_servers([two, fsdp]) as served:
        launched = [
            (
                _launch([*command, script, str(out)], out / "launch.log", served[str(out)]["env"]),
                out,
            )
            for command, out in ((torchrun, two), (accelerate, fsdp))
        ]
        try:
            worker.run_scenarios(one)
        finally:  # an error here still ends the launched runs
            codes = _wait_all([proc for proc, _ in launched], timeout=400)
        vllm = {
            key: {n: served_weights(s) for n, s in served[str(out)]["servers"].items()}
            for key, out in (("two", two), ("fsdp", fsdp))
        }
    for code, (_, out) in zip(codes, launched, strict=True):
        assert code == 0, (out / "launch.log").read_text()[-3000:]
    return {"one": one, "two": two, "fsdp": fsdp, "vllm": vllm}


def served_weights(server: Any) -> dict[str, Any]:
    """What a `VLLMServer` holds: its weights (copies) and the number of pushes it took."""
    return {
        "weights": {name: w.clone() for name, w in server.weights.items()},
        "version": server.version,
    }


def _params(run: Path, name: str = "params.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


LORA_SCALE = 2.0  # lora_alpha / r of the scenarios' adapter (distributed_worker.lora_config)


def base_weights(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT model's weights but its adapters', under the base model's names."""
    return {
        k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
        for k, v in params.items()
        if "lora_" not in k
    }


def assert_lora_trained(params: dict[str, torch.Tensor], initial: dict[str, Any]) -> None:
    """The adapters trained (B starts at 0) and the base weights did not."""
    assert max(v.abs().max().item() for k, v in params.items() if "lora_B" in k) > 0.05
    assert _max_diff(base_weights(params), initial) == 0.0


def merged_by_hand(adapter: dict[str, torch.Tensor], initial: dict[str, Any]) -> dict[str, Any]:
    """The base weights `initial` with W + scale * B @ A at each layer the adapter targets
    (`adapter`: its tensors, as the PEFT model names them or as its file does)."""
    merged = dict(initial)
    for key, a in adapter.items():
        if ".lora_A." in key:
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.split(".lora_A.")[0].replace("base_model.model.", "", 1) + ".weight"
            merged[name] = initial[name] + LORA_SCALE * b @ a
    return merged


def assert_merged_saved(folder: Path, adapter: dict[str, torch.Tensor]) -> None:
    """`folder/model.safetensors` holds the whole base model with `adapter` merged into it."""
    from safetensors.torch import load_file

    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
    merged = load_file(str(folder / "model.safetensors"))
    expected = merged_by_hand(adapter, initial)
    assert set(merged) == set(initial)
    assert {k: v.shape for k, v in merged.items()} == {k: initial[k].shape for k in merged}
    assert _max_diff(merged, expected) < 1e-6
    assert _max_diff(merged, initial) > 0.01  # the adapter changed some weights


def assert_adapter_saved(folder: Path, params: dict[str, torch.Tensor]) -> None:
    """`folder/adapter_model.safetensors` holds exactly the adapters of `params` (the PEFT
    model's weights): only they were saved, whole."""
    from safetensors.torch import load_file

    adapter = load_file(str(folder / "adapter_model.safetensors"))
    lora = {k: v for k, v in params.items() if "lora_" in k}
    assert len(adapter) == len(lora) > 0
    for key, value in adapter.items():
        assert torch.equal(value, lora[key.replace(".weight", ".default.weight")]), key


def assert_server_follows(held: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
    """A vLLM server of a `worker.VLLM_SERVER_SCENARIOS` run took the first push and one per
    optimizer step (3), and holds the trained weights `params` (whole) rounded to bf16: every
    weight of the model, under LoRA with the adapter merged (W + scale B A by hand; the merge
    on shards may round one bf16 step apart)."""
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0)
    names = {name for name, _ in initial.named_parameters()}  # the tied head once
    assert held["version"] == 1 + 3
    assert set(held["weights"]) == names
    expected, tolerance = params, 0.0
    if any("lora_" in k for k in params):
        assert_lora_trained(params, initial.state_dict())
        adapter = {k: v for k, v in params.items() if "lora_" in k}
        expected, tolerance = merged_by_hand(adapter, base_weights(params)), 2**-7
    moved = 0.0
    for name in names:
        whole = expected[name].to(torch.bfloat16).float()
        served = held["weights"][name].float()
        torch.testing.assert_close(served, whole, rtol=tolerance, atol=1e-6, msg=name)
        moved = max(moved, (whole - initial.state_dict()[name]).abs().max().item())
    assert moved > 0.05  # the trained weights, not the ones the trainer started from


def recomputed(run: Path) -> bool:
    """Whether both processes' models recomputed their activations (the same answer on each)."""
    (answer,) = {(run / f"gradient_checkpointing_{rank}.txt").read_text() for rank in (0, 1)}
    return {"True": True, "False": False}[answer]


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scenario", sorted(worker.SCENARIOS))
def test_two_processes_train_as_one(runs: dict[str, Path], scenario: str) -> None:
    one, two = runs["one"] / scenario, runs["two"] / scenario
    shape = worker.SCENARIOS[scenario].get("model_overrides", {})
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0, **shape).state_dict()
    p1, p2 = _params(one), _params(two)
    # The weights moved (lr 0.05, 3 steps) and agree to float summation order.
    if worker.SCENARIOS[scenario].get("lora"):
        assert_lora_trained(p1, initial)
        assert_merged_saved(two / "merged", p2)  # written by the main process
    else:
        assert _max_diff(p1, initial) > 0.05
    assert _max_diff(p1, p2) < 1e-5, _max_diff(p1, p2)
    # DDP kept the two processes' replicas identical.
    assert _max_diff(p2, _params(two, "params_rank1.pt")) == 0.0
    assert recomputed(two) == worker.SCENARIOS[scenario].get("gradient_checkpointing", False)
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2]  # one record per step: one writer
    for r1, r2 in zip(m1, m2, strict=True):
        assert set(r1) == set(r2)
        for key in EQUAL_METRICS:
            if key in r1:
                assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)


@pytest.mark.parametrize("run", ["two", "fsdp"])
@pytest.mark.parametrize("scenario", sorted(worker.VLLM_SERVER_SCENARIOS))
def test_a_vllm_server_follows_the_policy_under_ddp_and_fsdp2(
    runs: dict[str, Any], run: str, scenario: str
) -> None:
    """`vllm_mode="server"` on 2 processes: process 0 pushes (under FSDP2 every process gathers
    each whole tensor in turn), so the server samples from the policy at every step."""
    assert_server_follows(runs["vllm"][run][scenario], _params(runs[run] / scenario))


def test_ddp_forwards_each_shared_prompt_once(runs: dict[str, Path]) -> None:
    # The shared_prompts scenario trained as one process did (test_two_processes_train_as_one),
    # its replicas identical, through forwards that passed each prompt once: the training
    # forwards (DDP's wrapper took their completion passes) and the reference and old
    # log-probs' passes without gradients, on both processes.
    def counts(run: Path, scenario: str, rank: int) -> dict[str, int]:
        return json.loads((run / scenario / f"shared_forwards_{rank}.json").read_text())

    one = counts(runs["one"], "shared_prompts", 0)
    assert one["training"] > 0 and one["no_grad"] > 0
    assert counts(runs["one"], "shared_prompts_unused", 0)["training"] > 0
    for rank in (0, 1):
        # (how many depends on the process's rows: a micro-batch of one group whose advantages
        # are all 0 is skipped, or padded in, on its own process)
        two = counts(runs["two"], "shared_prompts", rank)
        assert two["training"] > 0 and two["no_grad"] > 0, (rank, two)
        # the LoRA run's reference pass (the adapter off) shares its prompts too
        passes = {"shared_prompts_unused": ["training"], "static_graph": ["training"]}
        for scenario, kinds in {**passes, "lora": ["training", "no_grad"]}.items():
            two = counts(runs["two"], scenario, rank)
            assert all(two[kind] > 0 for kind in kinds), (scenario, rank, two)
        # the other scenarios forward each prompt with every row
        assert counts(runs["two"], "dapo", rank) == {"training": 0, "no_grad": 0, "recomputing": 0}
    assert (runs["two"] / "shared_prompts_unused" / "find_unused_parameters_0.txt").read_text() == (
        "True"
    )


@pytest.mark.parametrize("launch", ["two", "fsdp"])
def test_processes_keep_or_recompute_each_forward_by_its_own_size(
    runs: dict[str, Path], launch: str
) -> None:
    # The kept_activations scenario trained as one process did (test_two_processes_train_as_one,
    # test_fsdp2_on_two_processes_trains_as_one) with both kinds of training forward on each
    # process: those of at most `keep_up_to` tokens kept their activations, larger ones
    # recomputed them in backward, some of those but in their last layer
    # (`ActivationBound.kept_layers`). Under DDP both kinds shared their prompts; under FSDP2
    # none that recomputed (`GRPOTrainer._recomputing_forwards_share`).
    run = runs[launch] / "kept_activations"
    for rank in (0, 1):
        kept = json.loads((run / f"kept_forwards_{rank}.json").read_text())
        assert kept["kept"] > 0 and kept["recomputed"] > 0, (rank, kept)
        assert kept["last_kept"] > kept["kept"], (rank, kept)
        shared = json.loads((run / f"shared_forwards_{rank}.json").read_text())
        if launch == "two":
            assert shared["recomputing"] > 0, (rank, shared)
        else:
            assert shared["recomputing"] == 0, (rank, shared)


def test_environments_on_two_processes_train_as_one(runs: dict[str, Path]) -> None:
    one, two = runs["one"] / "environments", runs["two"] / "environments"
    # Tool calls change each rollout's own environment, whose get_reward() is a reward; long
    # prompts are skipped and refilled on either process. dapo's update does not depend on the
    # order of the rows, which refilling changes across the processes.
    assert _max_diff(_params(one), _params(two)) < 1e-5
    for r1, r2 in zip(_metrics(one), _metrics(two), strict=True):
        for key in ("loss", "grad_norm", "reward", "reward_std", "rewards/Tally/mean"):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
        assert r1["prompts/over_length"] == r2["prompts/over_length"] > 0
        assert r1["num_tokens"] == r2["num_tokens"]

    def counts(path: Path) -> list[int]:  # instances made, resets, prompts over length
        return [int(x) for x in path.read_text().split()]

    made, resets, over_length = counts(one / "environments_0.txt")
    ranks = [counts(two / f"environments_{rank}.txt") for rank in (0, 1)]
    # Every rollout drawn was reset once, by the process that owns it; none by both.
    assert ranks[0][1] + ranks[1][1] == resets and 0 < ranks[0][1] < resets
    assert max(r[0] for r in ranks) < made  # each process made only its own instances
    assert [r[2] for r in ranks] == [over_length] * 2  # the global count, on every process


def test_two_nodes_on_this_machine_train_as_one(runs: dict[str, Path], tmp_path: Path) -> None:
    # Two `torchrun --nnodes 2` invocations (node ranks 0 and 1, one process each) meet at
    # 127.0.0.1, as two machines would at the main machine's address.
    script = [str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), "grpo"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    torchrun += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
    torchrun += ["--master_port", str(_free_port())]
    nodes = [
        _launch([*torchrun, "--node_rank", str(rank), *script], tmp_path / f"node{rank}.log")
        for rank in (0, 1)
    ]
    codes = _wait_all(nodes, timeout=300)
    for rank, code in enumerate(codes):
        assert code == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    run = tmp_path / "grpo"
    assert _max_diff(_params(runs["one"] / "grpo"), _params(run)) < 1e-5
    assert _max_diff(_params(run), _params(run, "params_rank1.pt")) == 0.0
    # The second node's process is rank 1 of 2 and its machine's local main process.
    second = json.loads((run / "process_1.json").read_text())
    assert second == {
        "rank": 1,
        "local_rank": 0,
        "num_processes": 2,
        "is_world_process_zero": False,
        "is_local_process_zero": True,
    }
    steps = [r["step"] for r in _metrics(run)]
    assert steps == [1, 2, 3]  # one writer


def test_ddp_settings_of_the_config_reach_ddp(runs: dict[str, Path]) -> None:
    assert (runs["two"] / "grpo" / "find_unused_parameters_0.txt").read_text() == "True"
    assert (runs["two"] / "dapo" / "find_unused_parameters_0.txt").read_text() == "False"
    assert (runs["one"] / "grpo" / "find_unused_parameters_0.txt").read_text() == "None"


def test_ddp_static_graph_averages_at_every_backward(runs: dict[str, Path]) -> None:
    # The static_graph scenario trained as one process did, its replicas identical
    # (test_two_processes_train_as_one), over optimizer steps of 2 micro-batches each: under
    # no_sync, torch's DDP with a static graph stops at an internal assertion in the first
    # backward, so every backward averaged the gradients, as the main process warned once.
    for rank in (0, 1):
        assert (runs["two"] / "static_graph" / f"static_graph_{rank}.txt").read_text() == "True"
    assert (runs["two"] / "dapo" / "static_graph_0.txt").read_text() == "False"
    log = (runs["two"] / "launch.log").read_text()
    assert log.count(dist.STATIC_GRAPH_SYNC.split(" (")[0]) == 1


def test_two_processes_log_each_completion_and_evaluate_once(runs: dict[str, Path]) -> None:
    one, two = runs["one"] / "dapo", runs["two"] / "dapo"
    # 3 rounds x 16 completions, every process's, written once by the main process.
    rows1 = (one / "completions.jsonl").read_text().splitlines()
    rows2 = (two / "completions.jsonl").read_text().splitlines()
    assert len(rows1) == len(rows2) == 48
    assert [json.loads(r)["completion"] for r in rows1] == [
        json.loads(r)["completion"] for r in rows2
    ]
    # The 5 evaluation prompts, split 3 + 2 over the processes, give the 1-process metrics.
    evals = [r for r in _metrics(two) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2, 3]


def test_resume_on_two_processes_equals_uninterrupted(runs: dict[str, Path]) -> None:
    two = runs["two"]
    # Dropout draws from each process's own random stream, which the checkpoint restores.
    assert _max_diff(_params(two / "uninterrupted"), _params(two / "resumed")) == 0.0
    checkpoint = two / "resumed" / "checkpoint-2"
    assert (checkpoint / "rng_state.json").exists() and (checkpoint / "rng_state_1.json").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 2
    # The final model was written once, by the main process, and loads.
    saved = torch.load(two / "resumed" / "params.pt", weights_only=True)
    from safetensors.torch import load_file

    final = load_file(str(two / "resumed" / "final_model" / "model.safetensors"))
    assert _max_diff({k: final[k] for k in final}, {k: saved[k] for k in final}) == 0.0


@pytest.mark.parametrize("scenario", worker.FSDP_SCENARIOS)
def test_fsdp2_on_two_processes_trains_as_one(runs: dict[str, Path], scenario: str) -> None:
    one, fsdp = runs["one"] / scenario, runs["fsdp"] / scenario
    assert (fsdp / "parameter_type.txt").read_text() == "DTensor"  # sharded while training
    assert recomputed(fsdp) == worker.SCENARIOS[scenario].get("gradient_checkpointing", False)
    assert _max_diff(_params(one), _params(fsdp)) < 1e-5
    m1, m2 = _metrics(one), _metrics(fsdp)
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("loss", "grad_norm", "reward"):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
    # The engine's bf16 copy gathered the shards: exactly the whole weights rounded to bf16
    # (under LoRA: the adapters, refreshed unmerged, and the frozen base weights).
    assert float((fsdp / "engine_gap.txt").read_text()) == 0.0
    # The final model was gathered and written whole by the main process: under LoRA the
    # adapter, and merged into the base weights on request (`save_model(merged=True)`).
    from safetensors.torch import load_file

    if worker.SCENARIOS[scenario].get("lora"):
        initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
        assert_lora_trained(_params(fsdp), initial)
        assert_adapter_saved(fsdp / "final_model", _params(fsdp))
        assert_merged_saved(fsdp / "merged", _params(fsdp))
        return
    final = load_file(str(fsdp / "final_model" / "model.safetensors"))
    assert _max_diff(final, {k: _params(fsdp)[k] for k in final}) == 0.0


def test_fsdp2_processes_share_prompts_only_where_every_process_does(
    runs: dict[str, Path],
) -> None:
    # Under FSDP2 (which gathers each layer around every call) a forward shares its prompts
    # only where the other process's does too, so both make the same calls (the scenarios
    # trained as one process did: test_fsdp2_on_two_processes_trains_as_one). In the
    # shared_prompts scenario the training forwards and the reference and old log-probs'
    # passes shared. In kept_activations none did (only a forward that keeps its activations
    # may share); both processes still made the same calls.
    def counts(scenario: str, rank: int) -> dict[str, int]:
        return json.loads((runs["fsdp"] / scenario / f"shared_forwards_{rank}.json").read_text())

    for scenario in ("shared_prompts", "kept_activations", "dapo", "lora"):
        assert counts(scenario, 0) == counts(scenario, 1), scenario
    # and under LoRA, the base model a unit of its own, so did the reference pass (adapter off)
    for scenario in ("shared_prompts", "lora"):
        shared = counts(scenario, 0)
        assert shared["training"] > 0 and shared["no_grad"] > 0, (scenario, shared)
    assert counts("dapo", 0) == {"training": 0, "no_grad": 0, "recomputing": 0}


def test_fsdp2_checkpoints_hold_whole_states_and_resume_exactly(runs: dict[str, Path]) -> None:
    fsdp = runs["fsdp"]
    assert _max_diff(_params(fsdp / "uninterrupted"), _params(fsdp / "resumed")) == 0.0
    checkpoint = fsdp / "resumed" / "checkpoint-2"
    assert (checkpoint / "rng_state_1.json").exists()
    # The whole weights, loadable by one process (and the whole optimizer state, by name).
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in initial.items()
    }
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert "model.embed_tokens.weight" in optimizer["state"]


def test_fsdp2_lora_checkpoints_hold_the_whole_adapter_and_resume_exactly(
    runs: dict[str, Path],
) -> None:
    assert_lora_checkpoints(runs["fsdp"])


def assert_lora_checkpoints(run: Path) -> None:
    """The LoRA resume scenario (`worker.LORA_RESUME`) of a sharded run: resumed exactly; its
    checkpoints hold the whole adapter, its optimizer state (Adam's moments of the adapters
    alone) and, with `save_merged`, the base model with the adapter merged, from the gathered
    weights; so does its final model."""
    from safetensors.torch import load_file

    resumed = _params(run / "lora_resumed")
    assert _max_diff(_params(run / "lora_uninterrupted"), resumed) == 0.0
    assert_merged_saved(run / "lora_resumed" / "final_model", resumed)  # save_merged's default
    checkpoint = run / "lora_resumed" / "checkpoint-2"
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert_merged_saved(checkpoint / "merged", adapter)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = [state["exp_avg"].shape for state in optimizer["state"].values()]
    assert sorted(moments) == sorted(value.shape for value in adapter.values())


# ---- the pieces, on one process ------------------------------------------------------------------
def test_chunk_loss_tokens_place_each_process_rows_in_the_global_micro_batches() -> None:
    # 6 rows per process per step, micro-batches of 2 (C = 3): the global step is 12 rows in
    # global micro-batches of 4. Loss tokens per row: 1..6.
    loss_mask = torch.zeros(6, 8)
    for row in range(6):
        loss_mask[row, : row + 1] = 1
    rows = range(0, 6)
    # One process: its own chunks (1+2, 3+4, 5+6).
    assert chunk_loss_tokens(loss_mask, rows, 2).tolist() == [3, 7, 11]
    # Rank 0 of 2: local chunks 0, 1, 2 fall in global chunks 0, 0, 1.
    rank0 = chunk_loss_tokens(loss_mask, rows, 2, num_processes=2, process_index=0)
    assert rank0.tolist() == [10, 11, 0]
    # Rank 1 of 2: local chunks 0, 1, 2 are the global step's chunks 3, 4, 5 -> 1, 2, 2.
    rank1 = chunk_loss_tokens(loss_mask, rows, 2, num_processes=2, process_index=1)
    assert rank1.tolist() == [0, 3, 18]


def test_plan_weights_are_shares_of_the_global_step() -> None:
    from grpokit.core.losses import LossOptions

    loss_mask = torch.ones(4, 3)
    loss_mask[0, 2] = 0  # row 0 has 2 loss tokens, the others 3: 11 local tokens
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rows = range(0, 4)
    # Global micro-batch tokens as if the other process held 13 more in the same chunks.
    totals = torch.tensor([5.0 + 6.0, 6.0 + 7.0], dtype=torch.float64)
    place = {"chunk_tokens": totals, "num_processes": 2, "process_index": 0}

    def plan(loss_type: str) -> list[Any]:
        options = LossOptions(loss_type=loss_type, max_completion_length=3)
        return plan_micro_batches(
            advantages, loss_mask, loss_mask, rows, 2, options, bucket_by_length=False, **place
        )

    # dapo divides by the global step's tokens (24) and sums: weight 1.
    dapo = plan("dapo")
    assert [m.loss_weight for m in dapo] == [1.0, 1.0]
    assert float(dapo[0].num_items_in_batch) == 24.0
    # grpo: 2 rows of the global step's 8 -> 1/4 each.
    assert [m.loss_weight for m in plan("grpo")] == [0.25, 0.25]
    # bnpo: rank 0's two local chunks both lie in global chunk 0 (11 tokens): each weighs
    # 1/ga * local tokens / 11 = 1/2 * 5/11 and 1/2 * 6/11.
    weights = [m.loss_weight for m in plan("bnpo")]
    assert weights == pytest.approx([0.5 * 5 / 11, 0.5 * 6 / 11])


def test_a_given_entropy_threshold_replaces_the_micro_batch_quantile() -> None:
    from grpokit.core.losses import high_entropy_mask, top_entropy_threshold

    entropies = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    # Top 40% of the 5 loss tokens 0.1 0.3 0.5 0.7 0.9: the 0.6 quantile, at position
    # 4 * 0.6 = 2.4 of the sorted values, 0.5 + 0.4 * (0.7 - 0.5) = 0.58 -> keeps 0.7 and 0.9.
    own = high_entropy_mask(entropies, mask, 0.4)
    assert own.tolist() == [[False, False, True], [False, True, False]]
    # Another process's five tokens of entropy 0.1 pooled in lower the threshold: sorted
    # 0.1 x 6, 0.3, 0.5, 0.7, 0.9 -> position 9 * 0.6 = 5.4, between 0.1 and 0.3: 0.18, which
    # keeps 0.3, 0.5, 0.7 and 0.9.
    pooled = torch.cat([torch.full((5,), 0.1), entropies[mask]])
    threshold = top_entropy_threshold(pooled, 0.4)
    assert float(threshold) == pytest.approx(0.18)
    given = high_entropy_mask(entropies, mask, 0.4, threshold)
    assert given.tolist() == [[False, True, True], [True, True, False]]


def test_world_shares_cover_the_batch_in_rank_order() -> None:
    shares = [dist.World(num_processes=3, process_index=r).split(8) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 8)]
    assert dist.World(num_processes=2, process_index=1).own_rows(4) == slice(4, 8)
    one = dist.World()
    tensor = torch.arange(3)
    assert one.gather(tensor) is tensor and one.gather_objects("x") == ["x"]
    assert one.gradient_scale == 1.0


def test_collectives_take_tensors_on_the_device_their_backend_reduces() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    # NCCL reduces CUDA tensors only: the loop's CPU counts and masks travel on the GPU.
    assert dist.collective_device("nccl", gpu) == gpu
    assert dist.collective_device("nccl", gpu, held_on=cpu) == gpu
    assert dist.collective_device("xccl", torch.device("xpu", 0)) == torch.device("xpu", 0)
    # gloo and MPI reduce CPU tensors, whatever device the process trains on.
    assert dist.collective_device("gloo", gpu, held_on=gpu) == cpu
    assert dist.collective_device("mpi", cpu) == cpu
    # A group mapping device types to backends leaves a tensor where it is if it is mapped.
    mapped = "cpu:gloo,cuda:nccl"
    assert dist.collective_device(mapped, gpu, held_on=cpu) == cpu
    assert dist.collective_device(mapped, gpu, held_on=gpu) == gpu
    assert dist.collective_device("cuda:nccl", gpu, held_on=cpu) == gpu
    assert dist.collective_device("cuda:nccl", cpu, held_on=cpu) == cpu


def test_world_collectives_send_tensors_to_the_group_device_and_return_them(monkeypatch) -> None:
    # Two processes holding the same tensors, simulated: each collective records the device of
    # what it was given, and the results come back on the caller's device with both shares.
    seen: list[torch.device] = []

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        seen.append(tensor.device)
        assert tensor.is_contiguous()
        for part in parts:
            part.copy_(tensor)

    def all_reduce(tensor: torch.Tensor, op: Any = None) -> None:
        seen.append(tensor.device)
        if op == torch.distributed.ReduceOp.SUM:
            tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    world = dist.World(num_processes=2, accelerator=SimpleNamespace(device=torch.device("cpu")))
    assert world.collective_device(torch.device("cpu")) == torch.device("cpu")
    columns = torch.arange(6).view(2, 3).t()  # not contiguous
    assert world.gather(columns).tolist() == [[0, 3], [1, 4], [2, 5]] * 2
    assert world.gather_ragged(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0, 1.0, 2.0]
    counts = torch.tensor([3, 4])
    assert world.sum(counts).tolist() == [6, 8] and counts.tolist() == [3, 4]  # a new tensor
    assert world.max(7) == 7
    assert seen and set(seen) == {torch.device("cpu")}


# ---- bad input -------------------------------------------------------------------------------
def test_sizes_follow_trl_and_refuse_groups_split_over_processes(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = GRPOConfig(
        per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4
    )
    # As TRL: the generation batch spans the processes; each generates its 8 (2 prompts).
    assert cfg.generation_batch_size == 16 and cfg.steps_per_generation == 2
    assert cfg.prompts_per_generation == 4 and cfg.prompts_per_process == 2
    with pytest.raises(ValueError, match="must be generated on one process"):
        GRPOConfig(per_device_train_batch_size=2, num_generations=4)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size \(4\) x 2 processes"):
        GRPOConfig(per_device_train_batch_size=4, generation_batch_size=12, num_generations=4)


def test_a_config_built_for_another_number_of_processes_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = GRPOConfig(per_device_train_batch_size=4, num_generations=4)
    with pytest.raises(ConfigError, match="built for 2 process"):
        dist.check_config_world(cfg, dist.World())


def test_deepspeed_config_without_deepspeed_fails_before_the_model_loads(monkeypatch) -> None:
    pytest.importorskip("accelerate")
    from grpokit.train.trainer import GRPOTrainer

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(dist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"ZeRO-2, but the `deepspeed` package .*pip install"):
        GRPOTrainer(
            "no/such-model",
            lambda completions, **kw: [0.0] * len(completions),
            args=GRPOConfig(per_device_train_batch_size=4, num_generations=4),
            train_dataset=[{"prompt": "x"}],
        )


# ---- the command line ------------------------------------------------------------------------
def _run_config(tmp_path: Path, model: str, **training: Any) -> str:
    import yaml

    data = tmp_path / "data.jsonl"
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = {
        "model": model,
        "task": {
            "kind": "dataset",
            "path": str(data),
            "columns": {"question": "prompt", "answer": "answer"},
            "format": "plain",
            "eval_fraction": 0.25,
        },
        "rewards": ["accuracy_reward", "answer_format_reward"],
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_completion_length": 6,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 1,
            **training,
        },
        "eval": {"num_prompts": 3, "num_samples": 2, "batch_size": 8},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_grpokit_train_on_two_processes_through_accelerate(tmp_path: Path, capsys) -> None:
    from grpokit.app.cli import main
    from tests.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    config = _run_config(tmp_path, model)
    # `accelerate launch --multi_gpu --num_processes 2 -m grpokit.app.cli train ...`: on a
    # machine without GPUs, two gloo processes.
    assert main(["train", config, "--num_processes", "2"]) == 0
    run = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # written by one process
    evals = [json.loads(line)["when"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals == ["before", "after"]
    assert (run / "checkpoint-2" / "rng_state_1.json").exists()
    assert (run / "final_model" / "model.safetensors").exists()


def test_launched_cpu_processes_allocate_in_glibcs_main_arena(monkeypatch) -> None:
    # Without CUDA the launched processes get MALLOC_ARENA_MAX=1 (gloo's threads then allocate
    # where the trainer keeps freed blocks), unless the user set it; with CUDA nothing changes.
    from grpokit.app import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = launch.launch_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "MALLOC_ARENA_MAX": "1"}
    assert launch.launch_environment({"MALLOC_ARENA_MAX": "4"})["MALLOC_ARENA_MAX"] == "4"
    seen: dict[str, Any] = {}
    monkeypatch.setattr(launch, "launch_command", lambda args, rest: ["true"])
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd, env: seen.update(env) or 0)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert launch.launch_processes(argparse.Namespace(), []) == 0
    assert seen["MALLOC_ARENA_MAX"] == "1" and seen["PATH"] == os.environ["PATH"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "MALLOC_ARENA_MAX" not in launch.launch_environment({"PATH": "/bin"})


def test_gathering_cpu_runs_launched_without_the_arena_setting_are_told_how_to_set_it() -> None:
    # Only runs that gather weights over gloo (FSDP2, ZeRO-3) on CPUs pay for gloo's own arenas;
    # a variable set by the user, GPU processes, DDP and ZeRO-2 get no hint.
    hint = dist.arena_hint(fsdp=True, zero_stage=0, cpu=True, environ={})
    assert hint is not None and "MALLOC_ARENA_MAX=1" in hint and "grpokit train" in hint
    assert dist.arena_hint(fsdp=False, zero_stage=3, cpu=True, environ={}) == hint
    set_already = {"MALLOC_ARENA_MAX": "8"}
    assert dist.arena_hint(fsdp=True, zero_stage=0, cpu=True, environ=set_already) is None
    assert dist.arena_hint(fsdp=True, zero_stage=0, cpu=False, environ={}) is None
    assert dist.arena_hint(fsdp=False, zero_stage=0, cpu=True, environ={}) is None
    assert dist.arena_hint(fsdp=False, zero_stage=2, cpu=True, environ={}) is None


def test_the_arena_hint_reaches_an_fsdp2_run_launched_directly(runs: dict[str, Path]) -> None:
    # `runs` launches FSDP2 with `accelerate launch` and DDP with torchrun, in this environment.
    fsdp_log = (runs["fsdp"] / "launch.log").read_text()
    ddp_log = (runs["two"] / "launch.log").read_text()
    expected = "MALLOC_ARENA_MAX" not in os.environ
    assert (fsdp_log.count("MALLOC_ARENA_MAX is not set") == 1) == expected  # process 0 only
    assert "MALLOC_ARENA_MAX is not set" not in ddp_log


def test_grpokit_train_refuses_bad_multi_process_settings_before_launching(
    tmp_path: Path, capsys
) -> None:
    from grpokit.app.cli import main

    config = _run_config(tmp_path, "no/such-model", per_device_train_batch_size=1)
    assert main(["train", config, "--num_processes", "2"]) == 2
    assert "must be generated on one process" in capsys.readouterr().err
    zero1 = tmp_path / "zero1.yaml"
    zero2 = ROOT / "examples" / "accelerate" / "zero2.yaml"
    zero1.write_text(zero2.read_text().replace("zero_stage: 2", "zero_stage: 1"))
    config = _run_config(tmp_path, "no/such-model")
    assert main(["train", config, "--accelerate_config", str(zero1)]) == 2
    err = capsys.readouterr().err
    assert "asks for DeepSpeed ZeRO stage 1" in err and "examples/accelerate/ddp.yaml" in err
    assert main(["train", config, "--num_processes", "0"]) == 2
    assert "--num_processes must be a positive integer" in capsys.readouterr().err


def test_resuming_with_another_number_of_processes_says_what_changes(tmp_path: Path) -> None:
    from grpokit.train.resume import ResumeConfigError, check_config_changes

    # The config check names the processes when the global batch changed with them ...
    with pytest.raises(ResumeConfigError, match="resume with as many processes"):
        check_config_changes(tmp_path, [("generation_batch_size", 16, 8)], "refuse")
    # ... and a resume that applies the change warns about the data order and sampling streams.
    with pytest.warns(UserWarning, match="written by 2 process"):
        dist.restore_process_rng_state(tmp_path, 2, dist.World(), seed=0)


def test_fsdp_settings_it_cannot_run_are_refused(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        dist.check_backend_installed()
    world = dist.World(num_processes=2, fsdp=True)
    args = GRPOConfig(per_device_train_batch_size=4, num_generations=4)
    dist.check_fsdp_run(world, args, engine=None, prompt_learning=False)  # nothing to refuse
    with pytest.raises(ConfigError, match="a prompt-learning PEFT adapter"):
        dist.check_fsdp_run(world, args, engine=None, prompt_learning=True)
    compiled = GRPOConfig(per_device_train_batch_size=4, num_generations=4, torch_compile=True)
    with pytest.raises(ConfigError, match="does not support yet: torch_compile"):
        dist.check_fsdp_run(world, compiled, engine=None, prompt_learning=False)
    assert_vllm_server_only(dist.check_fsdp_run, world, r"vllm_mode='colocate'.*'server'")


def assert_vllm_server_only(check: Any, world: Any, refusal: str) -> None:
    """`check` (`check_fsdp_run` / `check_deepspeed_run`) accepts a vLLM server and refuses vLLM
    in each process with `refusal`."""
    server = GRPOConfig(
        per_device_train_batch_size=4, num_generations=4, use_vllm=True, vllm_mode="server"
    )
    check(world, server, engine=None, prompt_learning=False)
    colocated = SimpleNamespace(use_vllm=True, vllm_mode="colocate", torch_compile=False)
    with pytest.raises(ConfigError, match=refusal):
        check(world, colocated, engine=None, prompt_learning=False)


@pytest.mark.parametrize("world_size", [None, "2"])
def test_a_launched_process_exits_without_finalization(world_size: str | None) -> None:
    """`exit_launched_process(3)` under a launcher (`WORLD_SIZE=2`) ends the process with code 3
    after flushing what was printed and logged, and runs no `atexit` handler (finalization is
    where DeepSpeed's and gloo's threads can abort a finished run); without a launcher it
    returns and the process exits as usual."""
    script = """
import atexit, logging, sys
from grpokit.train.distributed import exit_launched_process

logging.basicConfig(stream=sys.stderr, level=logging.INFO)
atexit.register(lambda: print("finalized", flush=True))
print("printed", end="")
logging.getLogger("grpokit").info("logged")
exit_launched_process(3)
print(" returned")
"""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert "logged" in out.stderr
    if world_size is None:
        assert (out.returncode, out.stdout) == (0, "printed returned\nfinalized\n")
    else:
        assert (out.returncode, out.stdout) == (3, "printed")
