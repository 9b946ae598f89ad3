"""Tube, random and attention-guided masks: exact counts, structure, sampling by attention."""

import pytest
import torch

from iv2_lightning.models.masking import attention_guided_mask, make_mask, random_mask, tube_mask


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.8, 0.9])
@pytest.mark.parametrize(("t", "s"), [(8, 64), (4, 49), (3, 10)])
def test_every_kind_masks_exactly_round_ratio_n(ratio, t, s):
    n = t * s
    g = torch.Generator().manual_seed(0)
    att = torch.rand(5, t, s, generator=g)
    for mask in (
        tube_mask(5, t, s, ratio, generator=g),
        random_mask(5, n, ratio, generator=g),
        attention_guided_mask(att, ratio, generator=g),
    ):
        assert mask.shape == (5, n) and mask.dtype == torch.bool
        assert mask.sum(1).tolist() == [round(ratio * n)] * 5


def test_tube_mask_repeats_one_spatial_mask_over_time():
    t, s = 8, 64  # round(0.75 * 512) = 384 = 48 full tubes
    mask = tube_mask(4, t, s, 0.75, generator=torch.Generator().manual_seed(1)).reshape(4, t, s)
    assert torch.equal(mask, mask[:, :1].expand_as(mask))
    assert not torch.equal(mask[0], mask[1])  # different samples, different tubes


def test_tube_mask_with_a_remainder_masks_one_partial_tube():
    t, s = 8, 64  # round(0.9 * 512) = 461 = 57 full tubes + 5 frames of one more
    mask = tube_mask(3, t, s, 0.9, generator=torch.Generator().manual_seed(2)).reshape(3, t, s)
    per_position = mask.sum(1)  # how many frames each spatial position is masked in
    for row in per_position:
        counts = torch.bincount(row, minlength=t + 1)
        assert counts[t] == 57 and counts[5] == 1 and counts[0] == s - 58


def test_random_mask_is_not_a_tube():
    mask = random_mask(2, 8 * 64, 0.75, generator=torch.Generator().manual_seed(0)).reshape(2, 8, 64)
    assert not torch.equal(mask, mask[:, :1].expand_as(mask))


def test_attention_guided_mask_keeps_attended_tokens_more_often():
    t, s = 4, 16
    att = torch.full((1, t, s), 0.01)
    att[..., :4] = 1.0  # the teacher attends to the first four positions of each frame
    kept = torch.zeros(t, s)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        kept += (~attention_guided_mask(att, 0.75, generator=g))[0].reshape(t, s).float()
    assert kept[:, :4].mean() > 5 * kept[:, 4:].mean()
    # every frame keeps its share: 16 visible tokens over 4 frames
    mask = attention_guided_mask(att, 0.75, generator=g).reshape(t, s)
    assert (~mask).sum(1).tolist() == [4, 4, 4, 4]


def test_attention_guided_mask_never_keeps_zero_weight_tokens_when_enough_weight():
    att = torch.zeros(2, 2, 8)
    att[..., :2] = 1.0
    mask = attention_guided_mask(att, 0.75, generator=torch.Generator().manual_seed(0)).reshape(2, 2, 8)
    assert not mask[..., :2].any() and mask[..., 2:].all()


def test_make_mask_dispatch_and_errors():
    assert make_mask("tube", 2, (4, 2, 2), 0.5).shape == (2, 16)
    with pytest.raises(ValueError, match="mask kind must be 'tube', 'random' or 'attention'; got 'block'"):
        make_mask("block", 2, (4, 2, 2), 0.5)
    with pytest.raises(ValueError, match="needs the teacher's attention"):
        make_mask("attention", 2, (4, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"attention must be \[B, T, S\] = \(2, 4, 4\); got \(2, 4, 5\)"):
        make_mask("attention", 2, (4, 2, 2), 0.5, attention=torch.rand(2, 4, 5))
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\); got 1.0"):
        random_mask(2, 10, 1.0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        attention_guided_mask(-torch.ones(1, 2, 3), 0.5)
