"""TRL side of the benchmark: run TRL's GRPOTrainer on a workload and time its phases.

Runs only inside bench/.venv-trl (TRL is never a grpokit dependency); started by
bench/bench_grpo.py as ``bench/.venv-trl/bin/python bench/trl_runner.py SPEC.json RESULT.json``.

Phases are timed by wrapping the trainer's own methods on the instance (TRL's code is unchanged):

- generation: ``_generate`` (chat template + tokenisation of the prompts, ``model.generate``,
  EOS masking, decoding, length metrics);
- reward: ``_calculate_rewards``;
- logprobs: ``_get_per_token_logps_and_entropies`` when called without grad (old log-probs when
  num_iterations > 1, reference log-probs when beta > 0);
- train_fwd_bwd: ``compute_loss`` (forward with grad + loss) and ``accelerator.backward``;
- optimizer: from the end of the backward to ``on_step_end`` (gradient clipping and norm,
  ``optimizer.step``, scheduler, ``zero_grad``);
- the cycle's wall time runs from ``on_step_begin`` of its first optimizer step to the return of
  ``_maybe_log_save_evaluate`` of its last (logging included).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grpo import (
    PhaseClock,
    WorkerSpec,
    finish_result,
    length_reward,
    matmul_probe,
    maybe_profile,
    peak_rss_mb,
    prompt_rows,
    worker_environment,
)


def run_trl_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Train TRL's GRPOTrainer for warm-up + measured steps; return the timed cycles."""
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec.threads)
    wl = spec.wl
    info = worker_environment(spec.threads)
    info.update(trl=trl.__version__, transformers=transformers.__version__)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=torch.float32)
    config = GRPOConfig(**wl.config_kwargs(spec.output_dir, spec.max_steps))
    clock = PhaseClock(matmul_probe(spec.probe_dtype) if spec.probe_dtype else None)
    marks: dict[str, float] = {}
    counts: dict[str, Any] = {}
    k = wl.num_iterations

    class Timing(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % k == 0:
                clock.start_cycle()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if "backward_end" in marks:
                clock.add("optimizer", time.perf_counter() - marks.pop("backward_end"))

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=config,
        train_dataset=Dataset.from_list(prompt_rows(spec.prompts)),
        processing_class=tokenizer,
        callbacks=[Timing()],
        peft_config=wl.peft_config(),
    )
    info["rss_after_init_mb"] = peak_rss_mb()

    def on_generated(result: Any) -> None:
        prompt_ids, completion_ids = result[0], result[1]
        counts["prompt_lengths"] = [len(ids) for ids in prompt_ids]
        counts["completion_lengths"] = [len(ids) for ids in completion_ids]

    def backward_done(_: Any) -> None:
        marks["backward_end"] = time.perf_counter()

    clock.wrap(trainer, "_generate", "generation", after=on_generated)
    clock.wrap(trainer, "_calculate_rewards", "reward")
    clock.wrap(
        trainer,
        "_get_per_token_logps_and_entropies",
        "logprobs",
        when=lambda: not torch.is_grad_enabled(),
    )
    clock.wrap(trainer, "compute_loss", "train_fwd_bwd")
    clock.wrap(trainer.accelerator, "backward", "train_fwd_bwd", after=backward_done)
    original_log = trainer._maybe_log_save_evaluate

    def log_save_evaluate(*args: Any, **kwargs: Any) -> Any:
        result = original_log(*args, **kwargs)
        if trainer.state.global_step % k == 0:
            clock.end_cycle(
                prompt_lengths=counts.get("prompt_lengths"),  # type: ignore[arg-type]
                completion_lengths=counts.get("completion_lengths"),  # type: ignore[arg-type]
            )
        return result

    trainer._maybe_log_save_evaluate = log_save_evaluate  # type: ignore[method-assign]
    with maybe_profile(spec.profile, Path(spec.output_dir) / "profile.pstats"):
        trainer.train()
    return finish_result(spec, clock, info)


def main() -> int:
    spec = WorkerSpec(**json.loads(Path(sys.argv[1]).read_text()))
    result = run_trl_worker(spec)
    Path(sys.argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
