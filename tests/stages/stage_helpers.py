"""Tiny model settings and hand-made batches shared by the stage tests (a plain module, not a
conftest, so it cannot collide with the conftest of another test folder)."""

import pytest
import torch

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample

TINY = {"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}


def make_batch(n: int = 4, seed: int = 0, labels: bool = True, frames: int = 4, size: int = 32) -> VideoBatch:
    g = torch.Generator().manual_seed(seed)
    samples = [
        VideoSample(
            video=torch.randn(3, frames, size, size, generator=g),
            sample_id=i,
            caption=f"clip number {i}",
            label=i % 4 if labels else None,
        )
        for i in range(n)
    ]
    return VideoCollate()(samples)


@pytest.fixture
def tiny_encoder():
    return dict(TINY)
