"""What the benchmarks time: the s14-sized encoders (ours, Hugging Face ``VideoMAEModel`` and
``TimesformerModel`` as the peers), one training step of each, the stage-1 step, and the code
before a performance fix (torch's composite RMSNorm) for the before/after rows.

The peers are built from their Hugging Face configs at the InternVideo2-S/14 sizes (arXiv
2403.15377) and randomly initialised, so no weights are downloaded. Library imports are made inside
the functions, so the memory children start from a bare interpreter + torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from benchmarks.config import FRAMES, HEADS, IMAGE, MLP, PATCH, WIDTH


def s14_encoder(depth: int, attention: str = "joint", **kw):
    from iv2_lightning.models import build_video_encoder

    return build_video_encoder("s14", depth=depth, attention=attention, **kw).train()


def videomae(depth: int):
    from transformers import VideoMAEConfig, VideoMAEModel

    cfg = VideoMAEConfig(
        hidden_size=WIDTH,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=PATCH,
        tubelet_size=1,
        num_frames=FRAMES,
        image_size=IMAGE,
        attn_implementation="sdpa",
    )
    return VideoMAEModel(cfg).train()


def timesformer(depth: int):
    from transformers import TimesformerConfig, TimesformerModel

    cfg = TimesformerConfig(
        hidden_size=WIDTH,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=PATCH,
        num_frames=FRAMES,
        image_size=IMAGE,
        attention_type="divided_space_time",
    )
    return TimesformerModel(cfg).train()


def ours_step(model, video, mask=None) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        out = model(video, mask=mask)
        (out.tokens.square().mean() + out.pooled.square().mean()).backward()

    return step


def hf_step(model, pixel_values) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixel_values).last_hidden_state.square().mean().backward()

    return step


@contextlib.contextmanager
def torch_rmsnorm():
    """The code before the fix: torch's composite CPU RMSNorm."""
    from iv2_lightning.models.layers import RMSNorm

    old = RMSNorm.fast
    RMSNorm.fast = False
    try:
        yield
    finally:
        RMSNorm.fast = old


def before_rmsnorm(step: Callable[[], None]) -> Callable[[], None]:
    def call():
        with torch_rmsnorm():
            step()

    return call


def stage1(preset: str, mask_ratio: float, **kw):
    from iv2_lightning.stages import MaskedVideoStage

    stage = MaskedVideoStage(
        preset=preset, target="pixels", mask_type="tube", mask_ratio=mask_ratio, log_images=False, **kw
    ).train()
    opt = stage.configure_optimizers()["optimizer"]
    return stage, opt


def stage_step(stage, opt, batch) -> Callable[[], None]:
    def step():
        out = stage.compute_loss(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def video_batch(video: torch.Tensor):
    from iv2_lightning.data.batch import VideoBatch

    return VideoBatch(video=video, sample_id=torch.arange(video.shape[0]))


def tiny_stage1():
    """The tiny stage-1 step of configs/stage1/tiny.yaml with the pixel target: (stage, optimiser)."""
    return stage1(
        "tiny",
        0.75,
        encoder={"patch_size": 16, "tubelet_size": 2, "layerscale_init": None},
        decoder_dim=96,
        decoder_depth=1,
        decoder_heads=4,
        lr=2e-3,
    )


def tiny_clips(n: int) -> torch.Tensor:
    """A batch of the embedded synthetic clips at the tiny geometry (8 x 64 x 64), normalised."""
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8, image_size=64, batch_size=n, modalities=[], train_size=n, val_size=0, test_size=0
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader())).video
