"""Checkpoint round trips, manifests and damage, safe loading, atomic writes, discovery, rotation,
resumable prompt order."""

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM, get_scheduler

from grpokit.train import checkpoint as ckpt
from grpokit.train.loggers import keep_records_until, reduce_metrics
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


def _trained(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """A tiny model after one AdamW step, its tokenizer, optimizer and scheduler."""
    tok = make_tokenizer()
    model = make_causal_lm(tok, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, tok, optimizer, scheduler


def _save(path: Path, step: int = 1, **kwargs: Any) -> Path:
    model, tok, optimizer, scheduler = _trained()
    return ckpt.save_checkpoint(
        path,
        model=model,
        tokenizer=tok,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"global_step": step, "data_index": 3},
        config={"seed": 1},
        **kwargs,
    )


def _load(path: Path) -> dict[str, Any]:
    model, _, optimizer, scheduler = _trained(seed=5)
    return ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)


def _reseal(path: Path) -> None:
    """Rewrite the manifest for the files as they are now (as an attacker who can write the
    folder could), so that only the loader stands between a crafted file and the process."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"] = {
        f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in path.iterdir()
        if f.name != ckpt.MANIFEST
    }
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_save_and_load_checkpoint_round_trip(tmp_path: Path) -> None:
    model, tok, optimizer, scheduler = _trained()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.standard_normal()  # numpy's state now holds a cached Gaussian too
    path = ckpt.save_checkpoint(
        tmp_path / "checkpoint-1",
        model=model,
        tokenizer=tok,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"global_step": 1, "data_index": 3},
        config={"seed": 1},
    )
    expected_draws = (random.random(), np.random.standard_normal(), *torch.rand(3).tolist())
    # Loadable with from_pretrained (Hugging Face format).
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(reloaded.model.embed_tokens.weight, saved["model.embed_tokens.weight"])

    fresh = make_causal_lm(tok, seed=5)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    fresh_sched = get_scheduler("linear", fresh_opt, num_warmup_steps=1, num_training_steps=10)
    random.seed(99)
    np.random.seed(99)
    state = ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert state == {"global_step": 1, "data_index": 3}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    draws = (random.random(), np.random.standard_normal(), *torch.rand(3).tolist())
    assert draws == expected_draws


def test_torch_files_carry_no_zip_crc_and_the_manifest_still_catches_a_flipped_byte(
    tmp_path: Path,
) -> None:
    # optimizer.pt and scheduler.pt are written without torch's per-record CRC-32 (the
    # manifest's SHA-256 verifies them); torch's own setting is left as it was.
    from torch.utils.serialization import config

    assert config.save.compute_crc32 is True
    path = _save(tmp_path / "checkpoint-1")
    assert config.save.compute_crc32 is True
    for name in (ckpt.OPTIMIZER, ckpt.SCHEDULER):
        with zipfile.ZipFile(path / name) as archive:
            entries = archive.infolist()
        assert entries and all(e.CRC == 0 for e in entries if e.file_size > 0), name
    assert _load(path) == {"global_step": 1, "data_index": 3}
    data = bytearray((path / ckpt.OPTIMIZER).read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes
    (path / ckpt.OPTIMIZER).write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=f"hash mismatch in {ckpt.OPTIMIZER}"):
        _load(path)


def test_manifest_lists_every_file_and_nothing_is_pickled_but_optimizer_state(
    tmp_path: Path,
) -> None:
    path = _save(
        tmp_path / "checkpoint-7", step=7, extra=lambda d: (d / "extra.bin").write_bytes(b"ab")
    )
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["format_version"] == ckpt.FORMAT_VERSION and manifest["step"] == 7
    files = {p.name for p in path.iterdir()} - {ckpt.MANIFEST}
    assert set(manifest["files"]) == files
    assert {"model.safetensors", "extra.bin", *ckpt.REQUIRED_FILES} <= files
    # sha256("ab") worked out by hashlib's reference value.
    assert manifest["files"]["extra.bin"] == {
        "size": 2,
        "sha256": "fb8e20fc2e4c3f248c60c39bd652f3c1347298bb977b8b4d5903b85055620603",
    }
    assert sorted(p.name for p in path.glob("*.pt")) == ["optimizer.pt", "scheduler.pt"]
    json.loads((path / ckpt.RNG_STATE).read_text())  # plain JSON
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7"]  # no temporary folder left
    assert ckpt.verify_checkpoint(path) == manifest


def _flip_first_byte(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(bytes([data[0] ^ 1]) + data[1:])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: os.truncate(p / "model.safetensors", 100), "torn file model.safetensors"),
        (lambda p: os.truncate(p / ckpt.TRAINER_STATE, 0), "torn file trainer_state.json (0 bytes"),
        (lambda p: _flip_first_byte(p / "optimizer.pt"), "hash mismatch in optimizer.pt"),
        (lambda p: (p / ckpt.MANIFEST).unlink(), "missing manifest.json"),
        (lambda p: os.truncate(p / ckpt.MANIFEST, 10), "unreadable manifest.json"),
        (lambda p: (p / ckpt.RNG_STATE).unlink(), "missing file rng_state.json"),
        (lambda p: (p / "model-2.safetensors").write_bytes(b"x"), "unexpected file model-2"),
        (lambda p: shutil.move(p, p.with_name("checkpoint-2")), "manifest.json is of step 1"),
    ],
    ids=["torn", "empty", "hash", "no-manifest", "torn-manifest", "missing", "extra", "renamed"],
)
def test_a_damaged_checkpoint_is_refused_with_its_reason(
    tmp_path: Path, damage: Callable[[Path], Any], reason: str
) -> None:
    path = _save(tmp_path / "checkpoint-1")
    damage(path)
    path = ckpt.list_checkpoints(tmp_path)[0]
    with pytest.raises(ckpt.CheckpointError, match=re.escape(reason)):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(reason)):
        _load(path)


class _RunsCode:
    """Pickles to a call of os.system: loading it with full unpickling runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt"])
def test_a_crafted_pickle_is_refused_without_running_it(tmp_path: Path, file: str) -> None:
    path = _save(tmp_path / "checkpoint-1")
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(f"touch {marker}")}, path / file)
    _reseal(path)  # the manifest matches: only the loader can stop it
    # The file is live: full unpickling would run the command.
    torch.load(path / file, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{file} holds objects other than tensors"):
        _load(path)
    assert not marker.exists()


def test_a_pickled_rng_state_of_the_old_format_is_never_loaded(tmp_path: Path) -> None:
    path = _save(tmp_path / "checkpoint-1")
    marker = tmp_path / "pwned"
    (path / ckpt.RNG_STATE).unlink()
    torch.save({"python": _RunsCode(f"touch {marker}")}, path / "rng_state.pt")
    _reseal(path)
    with pytest.raises(ckpt.CheckpointError, match=r"lists no rng_state\.json"):
        _load(path)
    assert not marker.exists()


def test_failed_write_leaves_nothing_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    import errno

    good = _save(tmp_path / "checkpoint-1")

    def disk_full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path / "checkpoint-2", step=2, extra=disk_full)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert ckpt.latest_checkpoint(tmp_path) == good

    # What a SIGKILL leaves: a half-written temporary folder, and a checkpoint moved aside while
    # being replaced. The first is ignored, then deleted; the second is put back.
    pid = _dead_pid()
    (tmp_path / f".checkpoint-3.tmp-{pid}").mkdir()
    (tmp_path / f".checkpoint-3.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    shutil.move(good, tmp_path / f".checkpoint-1.old-{pid}")
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.remove_temporary_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    ckpt.verify_checkpoint(good)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "stray.txt").write_text("from before")
    path = _save(tmp_path / "checkpoint-1")
    assert not (path / "stray.txt").exists()
    ckpt.verify_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_newest_valid_checkpoint_skips_damaged_ones_and_says_why(tmp_path: Path) -> None:
    for step in (2, 4, 10):
        _save(tmp_path / f"checkpoint-{step}", step=step)
    (tmp_path / "checkpoint-10" / ckpt.MANIFEST).unlink()
    os.truncate(tmp_path / "checkpoint-4" / ckpt.TRAINER_STATE, 0)
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    found, skipped = ckpt.newest_valid_checkpoint(tmp_path)
    assert found == tmp_path / "checkpoint-2"
    assert [(e.path.name, e.reason.split(" (")[0]) for e in skipped] == [
        ("checkpoint-10", "missing manifest.json"),
        ("checkpoint-4", "torn file trainer_state.json"),
    ]
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_checkpoint_just_written(tmp_path: Path) -> None:
    # checkpoint-5 is left from an abandoned run resumed at step 2; checkpoint-4 was just written.
    for step in (1, 2, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.rotate_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-4")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    ckpt.rotate_checkpoints(tmp_path, keep=1, protect=tmp_path / "checkpoint-4")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4"]
    for step in (6, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-7"]


def test_keep_records_until_drops_later_steps_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines))
    assert keep_records_until(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert keep_records_until(tmp_path / "missing.jsonl", 2) == 0


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


# ---- save_model(atomic=True): the grpokit command's final_model ---------------------------------
SAVE_TWICE = """if True:
    import os, signal, sys
    from datasets import Dataset
    import torch
    from grpokit import GRPOConfig, GRPOTrainer
    from tests.tiny import make_causal_lm, make_tokenizer

    tok = make_tokenizer()
    trainer = GRPOTrainer(
        make_causal_lm(tok), lambda completions, **kw: [0.0] * len(completions),
        args=GRPOConfig(output_dir=sys.argv[1], bf16=False, max_completion_length=8),
        train_dataset=Dataset.from_list([{"prompt": "ab"}]), processing_class=tok,
    )
    final = sys.argv[1] + "/final_model"
    trainer.save_model(final, atomic=True)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    real = trainer.model.save_pretrained

    def killed_half_way(path, **kwargs):
        real(path, **kwargs)
        with open(os.path.join(path, "model.safetensors"), "r+b") as f:
            f.truncate(100)  # a torn weights file, then the process dies
        os.kill(os.getpid(), signal.SIGKILL)

    trainer.model.save_pretrained = killed_half_way
    trainer.save_model(final, atomic=True)
"""


def _tiny_trainer(output_dir: Path) -> Any:
    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_tokenizer()
    return GRPOTrainer(
        make_causal_lm(tok),
        lambda completions, **kw: [0.0] * len(completions),
        args=GRPOConfig(output_dir=str(output_dir), bf16=False, max_completion_length=8),
        train_dataset=Dataset.from_list([{"prompt": "ab"}]),
        processing_class=tok,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_an_atomic_save_model_leaves_the_previous_model_or_none(tmp_path: Path) -> None:
    run = tmp_path / "run"
    final = run / "final_model"
    # A process killed while writing final_model the second time: the first one stays, whole,
    # next to the temporary folder the killed writer left (deleted by the next save).
    out = subprocess.run(
        [sys.executable, "-c", SAVE_TWICE, str(run)],
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src") + ":."},
        capture_output=True,
        timeout=600,
    )
    assert out.returncode == -9, out.stderr[-2000:]
    manifest = ckpt.verify_checkpoint(final)  # sealed: every file, size and hash as written
    assert "model.safetensors" in manifest["files"]
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".final_model.tmp-")]
    assert len(leftovers) == 1
    trainer = _tiny_trainer(run)
    first = _weights(final)
    for name, value in trainer.model.state_dict().items():  # same seed: the first save's weights
        assert torch.equal(value, first[name]), name

    # An error while writing (a full disk): the previous model stays, nothing is left behind.
    def disk_full(path: Any, **kwargs: Any) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    real = trainer.model.save_pretrained
    trainer.model.save_pretrained = disk_full
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model(str(final), atomic=True)
    ckpt.verify_checkpoint(final)
    assert all(torch.equal(v, first[k]) for k, v in _weights(final).items())
    assert sorted(p.name for p in run.iterdir()) == ["final_model"]  # the killed one's too

    # A save that completes replaces the folder whole, with the new weights.
    trainer.model.save_pretrained = real
    trainer.save_model(str(final), atomic=True)
    ckpt.verify_checkpoint(final)
    changed = _weights(final)
    assert not all(torch.equal(v, first[k]) for k, v in changed.items())
    assert sorted(p.name for p in run.iterdir()) == ["final_model"]

    # The run's own output_dir cannot be replaced as a whole.
    from grpokit.errors import ConfigError

    with pytest.raises(ConfigError, match="folder of its own"):
        trainer.save_model(atomic=True)
    with pytest.raises(ConfigError, match="folder of its own"):
        trainer.save_model(str(tmp_path), atomic=True)


@pytest.mark.parametrize("tied", [True, False])
def test_merged_copy_is_peft_merge_built_from_the_given_weights(tied: bool) -> None:
    # `merged_copy` merges the adapter as PEFT's own merge_and_unload does on a copy of the
    # model, but from a state dict alone (the whole weights of a sharded model): the same
    # tensors, the output layer still tied to the embeddings where it was, and the model and
    # the state left as they were.
    import copy

    from peft import LoraConfig, get_peft_model

    base = make_causal_lm(make_tokenizer(), seed=0, tie_word_embeddings=tied)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(base, config)
    with torch.no_grad():  # trained adapters: B away from its initial 0
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()

    merged = ckpt.merged_copy(model, state)
    got = merged.state_dict()
    assert set(got) == set(expected) and not any("lora" in k for k in got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        got[q_proj], before[f"base_model.model.{q_proj}".replace(".q_proj.", ".q_proj.base_layer.")]
    )  # the adapter was merged in
    # neither the model nor the state changed, nor share storage with the copy
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not ours & {t.untyped_storage().data_ptr() for t in got.values()}
