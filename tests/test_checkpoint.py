"""Checkpoint round trips, resumable prompt order, checkpoint discovery and rotation."""

import random

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, get_scheduler

from grpokit.train import checkpoint as ckpt
from grpokit.train.loggers import reduce_metrics
from grpokit.train.prompt_sampler import PromptSampler
from tests.tiny import make_causal_lm, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(sampler: PromptSampler, n: int) -> list[int]:
    return [sampler.next()["i"] for _ in range(n)]


def test_sampler_shuffles_per_epoch_and_resumes_exactly() -> None:
    ds = Dataset.from_list([{"i": i} for i in range(5)])
    first = PromptSampler(ds, seed=3, shuffle=True)
    order = _rows(first, 12)  # crosses two epoch boundaries
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order[:5] != order[5:10]  # a new permutation each epoch (seed + epoch)
    resumed = PromptSampler(ds, seed=3, shuffle=True)
    _rows(resumed, 7)
    position = (resumed.epoch, resumed.index)
    again = PromptSampler(ds, seed=3, shuffle=True)
    again.restore(*position)
    assert _rows(again, 5) == order[7:12]
    assert PromptSampler(ds, seed=0, shuffle=False).next()["i"] == 0


def test_sampler_iterable_dataset_resumes_by_skipping() -> None:
    ds = IterableDataset.from_generator(lambda: ({"i": i} for i in range(4)))
    sampler = PromptSampler(ds, seed=0, shuffle=True)
    assert sampler.size is None
    assert _rows(sampler, 6) == [0, 1, 2, 3, 0, 1]
    sampler.restore(1, 1)
    assert _rows(sampler, 3) == [1, 2, 3]


def test_save_and_load_checkpoint_round_trip(tmp_path) -> None:
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    scheduler.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(1)
    torch.manual_seed(1)
    path = ckpt.save_checkpoint(
        tmp_path / "checkpoint-1",
        model=model,
        tokenizer=tok,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"global_step": 1, "data_index": 3},
        config={"seed": 1},
    )
    expected_draws = (random.random(), torch.rand(3))
    # Loadable with from_pretrained (Hugging Face format).
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(reloaded.model.embed_tokens.weight, saved["model.embed_tokens.weight"])

    fresh = make_causal_lm(tok, seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = get_scheduler("linear", fresh_opt, num_warmup_steps=1, num_training_steps=10)
    random.seed(99)
    state = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state == {"global_step": 1, "data_index": 3}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    assert (random.random(), *torch.rand(3).tolist()) == (
        expected_draws[0],
        *expected_draws[1].tolist(),
    )


def test_latest_and_rotate(tmp_path) -> None:
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / ckpt.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-99").mkdir()  # no trainer state: not a checkpoint
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="not a grpokit checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-99", model=None, optimizer=None, scheduler=None)


def test_reduce_metrics() -> None:
    values = {
        "completions/min_length": [3.0, 2.0],
        "completions/max_length": [3.0, 5.0],
        "ratio/max": [1.1, 1.3],
        "clip_ratio/low_mean": [0.0, 0.5],
        "kl": [float("nan"), 2.0],
        "entropy": [float("nan")],
    }
    out = reduce_metrics(values)
    assert out["completions/min_length"] == 2.0 and out["completions/max_length"] == 5.0
    assert out["ratio/max"] == 1.3 and out["clip_ratio/low_mean"] == 0.25
    assert out["kl"] == 2.0 and out["entropy"] != out["entropy"]  # NaN when nothing finite
