"""The one decoding loop and the one nucleus sampler of the package (models/generation.py), driven by
hand-made step functions whose next-token distribution is known."""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.models.generation import Generation, generate_tokens, nucleus_sample

EOS, PAD = 2, 0


def scripted(rows: list[list[int]], vocab: int = 10):
    """A step that makes row ``i`` say ``rows[i]`` (then EOS), whatever it said before."""

    def step(ids: torch.Tensor, state):
        t = 0 if state is None else state
        logits = torch.full((ids.shape[0], vocab), -10.0)
        for i, row in enumerate(rows):
            logits[i, row[t] if t < len(row) else EOS] = 10.0
        return logits, t + 1

    return step


def test_greedy_stops_at_eos_and_pads_after():
    prompt = torch.tensor([[1], [1], [1]])
    out = generate_tokens(scripted([[5, 6], [7], [4, 4, 4, 4]]), prompt, 6, eos_id=EOS, pad_id=PAD)
    assert isinstance(out, Generation)
    assert out.ids.tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]]
    assert out.lengths.tolist() == [2, 1, 4]
    assert out.new_tokens(1) == [[5, 6], [7], [4, 4, 4, 4]]
    # max_new_tokens ends a row that has not said EOS
    short = generate_tokens(scripted([[4, 4, 4, 4]]), prompt[:1], 3, eos_id=EOS, pad_id=PAD)
    assert short.ids.tolist() == [[1, 4, 4, 4]] and short.lengths.tolist() == [3]


def test_stop_ends_a_row_after_the_token_that_stops_it():
    prompt = torch.tensor([[1, 3], [1, 3]])
    out = generate_tokens(
        scripted([[5, 9, 6], [5, 6, 6]]), prompt, 5, eos_id=EOS, pad_id=PAD, stop=lambda tokens: 9 in tokens
    )
    assert out.new_tokens(2) == [[5, 9], [5, 6, 6]]
    assert out.ids[0, 4:].tolist() == [PAD] * (out.ids.shape[1] - 4)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = nucleus_sample(logits, top_p=0.7, generator=gen)
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it: only tokens 0 and 1, in proportion 5:3
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.04)
    # the most likely token always stays, so a tiny top_p is the argmax
    assert nucleus_sample(logits[:3], top_p=1e-6).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sample(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        nucleus_sample(logits, top_p=0.5, temperature=0.0)


def test_same_generator_seed_same_tokens():
    torch.manual_seed(0)
    table = torch.randn(10, 10)

    def step(ids, state):
        return table[ids[:, -1]], None

    prompt = torch.tensor([[1], [3], [4]])

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return generate_tokens(
            step, prompt, 8, eos_id=EOS, pad_id=PAD, top_p=0.9, temperature=1.5, generator=gen
        ).ids

    assert torch.equal(run(4), run(4))
    assert len({str(run(s).tolist()) for s in range(5)}) > 1
    with pytest.raises(ValueError, match="prompt must be"):
        generate_tokens(step, torch.tensor([1, 2]), 3, eos_id=EOS, pad_id=PAD)
