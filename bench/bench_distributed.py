"""Step time of grpokit on 1 process (plain `python`), 1 process under `torchrun`, 2 processes
under `torchrun` (gloo, DDP), and 2 processes under FSDP2 or DeepSpeed ZeRO-2 / ZeRO-3
(`accelerate launch` with examples/accelerate/fsdp2.yaml, zero2.yaml or zero3.yaml), on the bar
workload of bench_grpo.py: SmolLM2-135M-Instruct, 2 prompts x 8 completions of 128 tokens
("fixed" mode) per optimizer step, bf16 autocast, dapo.

The global batch is the same in every setting: with 2 processes each generates and trains on one
prompt's 8 completions (`per_device_train_batch_size` 8 instead of 16), and the machine's cores
are split between the processes (`--threads` per process = cores / processes).

Usage:
    python bench/bench_distributed.py --steps 3 --warmup 1
    python bench/bench_distributed.py --settings torchrun2 --steps 2 --warmup 0 \
        --max-completion-length 32                                    # a smoke run

`--set FIELD=VALUE` overrides GRPOConfig fields (e.g. `beta=0.04`, `max_forward_tokens=null`);
`--no-share-prompts` forwards each prompt with every row (`GRPOTrainer.share_prompts` off);
`--lora R` trains a LoRA adapter of rank R on every linear layer (alpha 2R) instead of all weights.

The processes are launched in the environment `grpokit train` gives them (`app.launch.
launch_environment`: `MALLOC_ARENA_MAX=1` without CUDA).

Each setting prints the median `step_time` of the measured steps and the main process's median
phase times (metrics.jsonl of the run).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import bench_grpo  # noqa: E402  (the shared workload, prompts and reward)

SETTINGS = ("python1", "torchrun1", "torchrun2", "fsdp2", "zero2", "zero3")


def worker(spec: dict[str, Any]) -> None:
    """Train the workload in this process (one of the launched ones when under torchrun)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit import GRPOConfig, GRPOTrainer

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, spec["cores"] // processes))
    wl = bench_grpo.Workload(**spec["workload"])
    kwargs = wl.config_kwargs(spec["output_dir"], spec["warmup"] + spec["steps"])
    kwargs["per_device_train_batch_size"] = wl.completions_per_step // processes
    kwargs.update(spec["overrides"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        rank = spec["lora"]
        peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=bench_grpo.length_reward,
        args=GRPOConfig(**kwargs),
        train_dataset=Dataset.from_list(bench_grpo.prompt_rows(spec["prompts"])),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.share_prompts = spec["share_prompts"]
    trainer.train()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PHASES = ("time/generation", "time/forward_backward", "time/optimizer", "time/weight_sync")
"""The phase timers printed beside the step time (the main process's, from metrics.jsonl)."""


def run_setting(setting: str, spec: dict[str, Any]) -> list[dict[str, float]]:
    """Run one setting in subprocesses; the metrics records of its measured steps."""
    spec_file = Path(spec["output_dir"]) / "spec.json"
    spec_file.write_text(json.dumps(spec))
    script = [str(Path(__file__).resolve()), "--worker", str(spec_file)]
    if setting == "python1":
        command = [sys.executable, *script]
    elif setting in ("fsdp2", "zero2", "zero3"):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        command += [str(REPO_DIR / "examples" / "accelerate" / f"{setting}.yaml")]
        command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
        command += script
    else:
        processes = setting.removeprefix("torchrun")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            processes,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            *script,
        ]
    from grpokit.app.launch import launch_environment  # as `grpokit train` launches them

    env = launch_environment()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR / "src"), str(BENCH_DIR)])
    log = Path(spec["output_dir"]) / "run.log"
    with log.open("w") as out:
        code = subprocess.call(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{setting} failed (exit {code}); see {log}")
    records = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").open()]
    return [r for r in records if r["step"] > spec["warmup"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (dropped)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=bench_grpo.DEFAULT_MODEL)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="GRPOConfig overrides (VALUE read as JSON), e.g. beta=0.04",
    )
    parser.add_argument(
        "--no-share-prompts",
        action="store_true",
        help="forward each prompt with every row (GRPOTrainer.share_prompts)",
    )
    parser.add_argument(
        "--lora", type=int, default=0, metavar="R", help="train a LoRA adapter of rank R"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    from transformers import AutoTokenizer

    model_path = str(bench_grpo.resolve_model(args.model))
    prompts = bench_grpo.equal_length_prompts(AutoTokenizer.from_pretrained(model_path))
    workload = bench_grpo.Workload(mode="fixed", max_completion_length=args.max_completion_length)
    overrides = bench_grpo.config_overrides(args.set)
    share = not args.no_share_prompts
    print(
        f"model {model_path}; workload {workload.name}; {args.cores} cores; overrides "
        f"{overrides or 'none'}; share_prompts {share}; LoRA rank {args.lora or 'none'}"
    )
    for setting in args.settings:
        out = tempfile.mkdtemp(prefix=f"dist-{setting}-")
        spec = {
            "workload": asdict(workload),
            "model_path": model_path,
            "prompts": prompts,
            "warmup": args.warmup,
            "steps": args.steps,
            "cores": args.cores,
            "output_dir": out,
            "overrides": overrides,
            "share_prompts": share,
            "lora": args.lora,
        }
        records = run_setting(setting, spec)
        times = [r["step_time"] for r in records]
        shown = ", ".join(f"{t:.2f}" for t in times)
        medians = {name: statistics.median(r.get(name, 0.0) for r in records) for name in PHASES}
        phases = ", ".join(f"{n.removeprefix('time/')} {t:.2f}" for n, t in medians.items())
        print(f"{setting:10s} median step {statistics.median(times):.2f} s  (steps: {shown})")
        print(f"{'':10s} median phases (main process, s): {phases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
