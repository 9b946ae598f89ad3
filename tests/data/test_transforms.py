"""VideoTransform: one crop for all frames, normalisation, shapes."""

import random

import pytest
import torch

from iv2_lightning.data.transforms import VideoTransform


def test_eval_transform_is_a_centre_crop_and_normalises():
    t = VideoTransform(32, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    video = torch.zeros(3, 2, 40, 64, dtype=torch.uint8)
    video[:, :, :, 12:52] = 255  # the centre 40 x 40 square is white
    out = t(video)
    assert out.shape == (3, 2, 32, 32)
    assert torch.allclose(out, torch.ones_like(out))  # (1 - 0.5) / 0.5
    assert torch.allclose(t.denormalize(out), torch.ones_like(out))


def test_train_crop_is_identical_for_every_frame():
    t = VideoTransform(16, train=True, scale=(0.2, 0.5), flip=True)
    frame = torch.randint(0, 256, (3, 1, 48, 48), dtype=torch.uint8)
    video = frame.expand(3, 6, 48, 48).contiguous()
    out = t(video, random.Random(0))
    assert out.shape == (3, 6, 16, 16)
    assert torch.equal(out, out[:, :1].expand_as(out))
    # a different rng gives a different crop
    assert not torch.allclose(out, t(video, random.Random(5)))


def test_flip_is_off_by_default():
    t = VideoTransform(8, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    video = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(3, 2, 8, 8) / 8
    for seed in range(10):
        out = t(video, random.Random(seed))
        assert (out[0, 0, 0, 1:] > out[0, 0, 0, :-1]).all()  # left-to-right order kept


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"video must be \[3, T, H, W\]; got shape \(2, 3, 8, 8\)"):
        VideoTransform(8)(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        VideoTransform(8, mean=(0.5,))
