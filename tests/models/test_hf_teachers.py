"""Pretrained stage-1 teachers from local Hugging Face folders (``models/hf_teachers.py``) and the
official stage-1 wiring of ``MaskedVideoModel``: per-teacher depth and head kind, the frame-averaged
class-token target, learned target position tables, a video teacher on twice the student's frames,
targets resampled onto the student's grid, attention-guided masks from the image teacher.

The teachers are tiny random ``CLIPVisionModelWithProjection`` / ``VideoMAEModel`` saved with
``save_pretrained`` to a temporary folder and loaded by path (no download)."""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.models.backbone import build_video_encoder
from iv2_lightning.models.hf_teachers import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    HFImageTeacher,
    HFVideoTeacher,
)
from iv2_lightning.models.masked_video import MaskedVideoModel
from iv2_lightning.stages import MaskedVideoStage

transformers = pytest.importorskip("transformers")

SIZE, FRAMES = 32, 4  # the student: 4 frames of 32 px, patch 8, tubelet 1 -> grid (4, 4, 4)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("teachers")
    clip = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            image_size=SIZE,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=24,
        )
    )
    clip.save_pretrained(root / "clip")
    mae = transformers.VideoMAEModel(
        transformers.VideoMAEConfig(
            image_size=SIZE,
            patch_size=8,
            num_frames=2 * FRAMES,
            tubelet_size=2,
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    mae.save_pretrained(root / "videomae")
    return {"clip": str(root / "clip"), "videomae": str(root / "videomae")}, clip.eval(), mae.eval()


def _clip(frames=FRAMES, seed=0):
    return torch.randn(2, 3, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_image_teacher_runs_per_frame_in_its_own_pixel_statistics(folders):
    paths, hf, _ = folders
    teacher = HFImageTeacher(paths["clip"])
    video = _clip()
    out = teacher(video, return_hidden=2)
    # what the HF model gives for the frames put into CLIP's normalisation by hand
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    cmean, cstd = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    frames = video.transpose(1, 2).reshape(-1, 3, SIZE, SIZE)
    with torch.no_grad():
        want = hf(pixel_values=(frames * std + mean - cmean) / cstd, output_hidden_states=True)
    last = want.hidden_states[-1].reshape(2, FRAMES, 5, 32)  # 2 x 2 patches + cls per frame
    assert out.grid == (FRAMES, 2, 2) and out.num_prefix == 1 and out.tokens.shape == (2, 1 + FRAMES * 4, 32)
    torch.testing.assert_close(out.tokens[:, 0], last[:, :, 0].mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.tokens[:, 1:], last[:, :, 1:].reshape(2, -1, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.pooled, want.image_embeds.reshape(2, FRAMES, -1).mean(1), atol=1e-5, rtol=1e-5
    )
    assert len(out.hidden_states) == 2 and torch.equal(out.hidden_states[-1], out.tokens)
    assert out.attention.shape == (2, FRAMES * 4) and bool((out.attention >= 0).all())
    per_frame = out.attention.reshape(2, FRAMES, 4).sum(-1)
    assert bool((per_frame <= 1 + 1e-5).all()) and bool((per_frame > 0).all())  # cls -> patches share


def test_video_teacher_matches_videomae_and_names_the_frame_count(folders):
    paths, _, hf = folders
    teacher = HFVideoTeacher(paths["videomae"])
    video = _clip(2 * FRAMES)
    out = teacher(video, return_hidden=1)
    with torch.no_grad():  # no preprocessor file in the folder: ImageNet statistics, as our clips have
        want = hf(pixel_values=video.transpose(1, 2)).last_hidden_state
    torch.testing.assert_close(out.tokens, want, atol=1e-5, rtol=1e-5)
    assert out.grid == (FRAMES, 4, 4) and out.num_prefix == 0
    with pytest.raises(ValueError, match="built for 8 frames"):
        teacher(_clip(FRAMES))


def _model(paths, **kw):
    torch.manual_seed(0)
    student = build_video_encoder("tiny", num_frames=FRAMES, image_size=SIZE, patch_size=8, tubelet_size=1)
    args = dict(
        target="teacher",
        mask_type="attention",
        mask_ratio=0.5,
        teachers=[HFImageTeacher(paths["clip"]), HFVideoTeacher(paths["videomae"])],
        teacher_layers=[2, 1],
        distill_head=["linear", "mlp"],
        cls_target=[True, False],
        pool_target=[True, False],
        target_pos_embed=True,
        frame_stride=2,
        teacher_frames=["student", "all"],
    )
    return MaskedVideoModel(student, **{**args, **kw})


def test_official_stage1_wiring_trains_on_both_teachers(folders):
    paths, _, _ = folders
    model = _model(paths)
    assert [len(model.token_heads), len(model.extra_heads[0]["tokens"])] == [2, 1]
    assert isinstance(model.extra_heads[0]["tokens"][0].proj, torch.nn.Sequential)  # the MLP head
    assert len(model.target_pos) == 2
    video = _clip(2 * FRAMES)  # the video teacher sees 8 frames, the student every other one
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(video, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert out.mask.shape == (2, FRAMES * 16)
    assert set(out.terms) >= {"distill_loss", "pool_loss", "teacher0_loss", "teacher1_loss"}
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.target_pos[0].grad is not None and model.target_pos[0].grad.abs().sum() > 0


def test_attention_guided_mask_keeps_what_the_image_teacher_attends_to(folders):
    paths, _, _ = folders
    model = _model(paths, mask_ratio=0.75)

    class Focused(HFImageTeacher):
        def forward(self, video, return_hidden=0):  # all attention on the top-left patch of each frame
            out = super().forward(video, return_hidden)
            att = torch.full_like(out.attention, 1e-6).reshape(-1, FRAMES, 4)
            att[:, :, 0] = 1.0
            return out._replace(attention=att.reshape(out.attention.shape))

    teacher = Focused(paths["clip"])
    out = model.run_teacher(teacher, _clip(FRAMES), 2)
    mask = model.make_mask(_clip(FRAMES), out, generator=torch.Generator().manual_seed(0))
    # the teacher's 2 x 2 grid is resampled onto the student's 4 x 4: its top-left patch covers the
    # student's top-left 2 x 2, and those are the tokens most often kept
    keep = (~mask).reshape(2, FRAMES, 4, 4).float()
    assert keep[:, :, :2, :2].mean() > 2 * keep[:, :, 2:, 2:].mean()


def test_stage_builds_hf_teachers_from_class_paths(folders):
    paths, _, _ = folders
    stage = MaskedVideoStage(
        preset="tiny",
        encoder={"patch_size": 8, "tubelet_size": 1},
        num_frames=2 * FRAMES,
        image_size=SIZE,
        target="teacher",
        mask_type="attention",
        mask_ratio=0.8,
        teacher=[
            "iv2_lightning.models.hf_teachers.HFImageTeacher",
            "iv2_lightning.models.hf_teachers.HFVideoTeacher",
        ],
        teacher_kwargs=[{"path": paths["clip"]}, {"path": paths["videomae"]}],
        teacher_layers=[2, 1],
        distill_head=["linear", "mlp"],
        cls_target=[True, False],
        pool_target=[True, False],
        target_pos_embed=True,
        frame_stride=2,
        teacher_frames=["student", "all"],
    )
    assert stage.model.video_encoder.num_frames == FRAMES  # the data's 8 frames, every other one
    loss = stage.compute_loss(type("B", (), {"video": _clip(2 * FRAMES)})())["loss"]
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="does not divide"):
        MaskedVideoStage(preset="tiny", num_frames=7, image_size=SIZE, frame_stride=2)


def test_selected_layers_pick_the_official_distillation_blocks():
    """S/B/L distil from blocks 23, 26, 29, 33, 36, 39 of the 1B (interval 3.34 from the top)."""
    from iv2_lightning.models.teachers import SelectedLayers, build_teacher

    kw = dict(preset="tiny", num_frames=4, image_size=32, patch_size=16, tubelet_size=2, depth=6)
    teacher = build_teacher("random", {**kw, "layers": [1, 3, 4]}, seed=3)
    assert isinstance(teacher, SelectedLayers) and teacher.layers == [1, 3, 4]
    video = _clip()
    full = teacher.encoder(video, return_hidden=6)  # every block's output, oldest first
    out = teacher(video, return_hidden=2)
    assert len(out.hidden_states) == 2
    assert torch.equal(out.hidden_states[0], full.hidden_states[3]) and torch.equal(
        out.hidden_states[1], full.hidden_states[4]
    )
    assert torch.equal(out.pooled, full.pooled) and teacher.clip_projector is teacher.encoder.clip_projector
    with pytest.raises(ValueError, match=r"distinct block indices in \[0, 6\)"):
        build_teacher("random", {**kw, "layers": [2, 6]})
