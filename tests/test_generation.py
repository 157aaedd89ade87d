"""Generation engine: completion masks and truncation on hand-built ids, then on a tiny model."""

from collections.abc import Iterator

import pytest
import torch

from grpokit.generation import (
    RolloutBatch,
    SamplingParams,
    TransformersEngine,
    completion_mask_from_ids,
    left_pad,
)
from tests.tiny import make_causal_lm, make_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run ~100x faster on one thread than with two threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EOS, PAD = 1, 0


def test_completion_mask_runs_through_first_eos() -> None:
    ids = torch.tensor(
        [
            [5, EOS, 7, 8],  # EOS at 1: mask 1 1 0 0, tokens after EOS become pad
            [5, 6, 7, 8],  # no EOS: truncated, all counted
            [EOS, EOS, 3, 4],  # EOS first: only it counts
            [5, 6, 7, EOS],  # EOS last: all counted, not truncated
        ]
    )
    cleaned, mask, truncated = completion_mask_from_ids(ids, [EOS], PAD)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]
    assert cleaned.tolist() == [
        [5, EOS, PAD, PAD],
        [5, 6, 7, 8],
        [EOS, PAD, PAD, PAD],
        [5, 6, 7, EOS],
    ]


def test_several_eos_ids() -> None:
    ids = torch.tensor([[4, 9, 2], [4, 2, 9]])
    _, mask, truncated = completion_mask_from_ids(ids, [9, 2], PAD)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0]]
    assert not truncated.any()


def test_left_pad() -> None:
    ids, mask = left_pad([[3, 4, 5], [6]], PAD)
    assert ids.tolist() == [[3, 4, 5], [PAD, PAD, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_engine_groups_and_masks_on_tiny_model() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok)
    torch.manual_seed(0)
    out = engine.generate(
        [[5, 6], [7]], num_generations=3, max_new_tokens=6, sampling=SamplingParams()
    )
    assert out.prompt_ids.shape == (6, 2) and out.completion_ids.shape[0] == 6
    # the G completions of a prompt are consecutive rows sharing its left-padded prompt
    assert out.prompt_ids.tolist() == [[5, 6]] * 3 + [[PAD, 7]] * 3
    assert out.prompt_mask.tolist() == [[1, 1]] * 3 + [[0, 1]] * 3
    cleaned, expected_mask, expected_trunc = completion_mask_from_ids(
        out.completion_ids, [tok.eos_token_id], tok.pad_token_id
    )
    assert torch.equal(out.completion_mask, expected_mask)
    assert torch.equal(out.is_truncated, expected_trunc)
    assert torch.equal(out.completion_ids, cleaned)
    assert out.sampling_logprobs is not None and out.sampling_logprobs.shape == cleaned.shape
    assert (out.sampling_logprobs[expected_mask == 0] == 0).all()


def test_engine_stops_at_eos_and_top_k_one_is_greedy() -> None:
    tok = make_tokenizer()
    engine = TransformersEngine(make_causal_lm(tok), tok)
    eos = tok.eos_token_id
    # A huge bias on EOS: every completion is exactly [EOS], mask [1], not truncated.
    forced = SamplingParams(generation_kwargs={"sequence_bias": {(eos,): 100.0}})
    out = engine.generate([[5, 6]], num_generations=2, max_new_tokens=5, sampling=forced)
    assert out.completion_ids.tolist() == [[eos], [eos]]
    assert out.completion_mask.tolist() == [[1], [1]] and not out.is_truncated.any()
    # top_k=1 keeps only the argmax: the G samples of a prompt coincide.
    out = engine.generate(
        [[5, 6]], num_generations=3, max_new_tokens=5, sampling=SamplingParams(top_k=1)
    )
    assert (out.completion_ids == out.completion_ids[0]).all()


def test_rollout_batch_trims_shared_padding() -> None:
    batch = RolloutBatch(
        prompt_ids=torch.tensor([[0, 0, 5], [0, 6, 7], [0, 0, 8]]),
        prompt_mask=torch.tensor([[0, 0, 1], [0, 1, 1], [0, 0, 1]]),
        completion_ids=torch.tensor([[9, 1, 0, 0], [9, 9, 1, 0], [1, 0, 0, 0]]),
        completion_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]),
        loss_mask=torch.ones(3, 4),
        advantages=torch.zeros(3),
    )
    ids, mask, t = batch.trimmed(slice(0, 1))  # row 0: prompt 1 token, completion 2 tokens
    assert t == 2 and ids.tolist() == [[5, 9, 1]] and mask.tolist() == [[1, 1, 1]]
    ids, mask, t = batch.trimmed(slice(0, 3))  # widest prompt 2, longest completion 3
    assert t == 3 and ids.shape == (3, 5)
    assert mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
