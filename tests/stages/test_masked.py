"""MaskedVideoStage (stage 1): pixel and teacher targets, the raw-pixel term, learning, bad arguments."""

import pytest
import torch
from stage_helpers import TINY, make_batch

from iv2_lightning.models.backbone import preset_config
from iv2_lightning.models.heads import pixel_reconstruction_loss
from iv2_lightning.stages.masked import MaskedVideoStage


def stage(**kw):
    torch.manual_seed(0)
    return MaskedVideoStage(encoder=dict(TINY), mask_ratio=0.75, decoder_depth=1, decoder_dim=32, **kw)


def fit_steps(model, batch, steps=30, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model._losses(batch, generator=torch.Generator().manual_seed(0))  # the same mask
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_pixel_target_learns_a_fixed_batch():
    torch.set_num_threads(1)
    model, batch = stage(), make_batch(4)
    losses = fit_steps(model, batch)
    assert losses[-1] < 0.8 * losses[0]


def test_raw_pixel_term_adds_the_unnormalised_reconstruction():
    model, batch = stage(raw_pix_weight=0.5), make_batch(4)
    out = model._losses(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], out["recon_loss_norm"] + 0.5 * out["recon_loss_raw"])
    # the decoder predicts both targets; the raw half is scored against the pixels themselves
    pred = model.decoder(model.video_encoder(batch.video, mask=out["_mask"]).tokens, out["_mask"])
    raw = pred.chunk(2, dim=-1)[1]
    expected = pixel_reconstruction_loss(
        raw, batch.video, out["_mask"], model.tubelet, model.patch, normalize=False
    )
    torch.testing.assert_close(out["recon_loss_raw"], expected.detach())
    assert out["_pred"].shape[-1] * 2 == pred.shape[-1]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"raw_pix_weight": -1.0}, "raw_pix_weight"),
        ({"raw_pix_weight": 1.0, "norm_pix": False}, "norm_pix=True"),
        ({"mask_type": "attention"}, "needs target='teacher'"),
        ({"target": "teacher"}, "needs `teacher`"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
    ],
)
def test_bad_arguments_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MaskedVideoStage(encoder=dict(TINY), **kw)


def test_teacher_target_distils_a_frozen_encoder():
    torch.set_num_threads(1)
    kwargs = preset_config("tiny", **TINY)
    model = stage(
        target="teacher", teacher="iv2_lightning.models.backbone.VideoEncoder", teacher_kwargs=kwargs
    )
    batch = make_batch(4)
    before = [p.clone() for p in model.teacher.parameters()]
    losses = fit_steps(model, batch, steps=25)
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))  # frozen


def test_random_teacher_is_the_students_architecture_and_fixed_by_its_seed():
    a = stage(target="teacher", teacher="random")
    b = stage(target="teacher", teacher="random")
    c = stage(target="teacher", teacher="random", teacher_seed=1)
    student_shapes = {k: v.shape for k, v in a.video_encoder.state_dict().items()}
    assert {k: v.shape for k, v in a.teacher.state_dict().items()} == student_shapes
    # the same seed rebuilds the same teacher whatever the global RNG did (a resumed run needs it)
    torch.manual_seed(123)
    assert all(torch.equal(x, y) for x, y in zip(a.teacher.parameters(), b.teacher.parameters()))
    assert not torch.equal(a.teacher.patch_embed.proj.weight, c.teacher.patch_embed.proj.weight)
    # the teacher is never a submodule: not exported, not optimised
    assert not any(k.startswith("teacher") for k in a.state_dict())
    # explicit teacher_kwargs build another architecture
    wide = stage(
        target="teacher", teacher="random", teacher_kwargs={**preset_config("tiny", **TINY), "embed_dim": 64}
    )
    assert wide.teacher.embed_dim == 64 and a.teacher.embed_dim == a.video_encoder.embed_dim


def test_random_teacher_target_learns_a_fixed_batch():
    torch.set_num_threads(1)
    model = stage(target="teacher", teacher="random")
    losses = fit_steps(model, make_batch(4), steps=25)
    assert losses[-1] < 0.7 * losses[0]


CONV = "iv2_lightning.models.teachers.ConvFrameTeacher"
CONV_KW = {"num_frames": 4, "image_size": 32, "patch_size": 8, "tubelet_size": 1, "channels": 4}


def test_two_teachers_are_distilled_with_their_own_heads_and_weights():
    torch.set_num_threads(1)
    model = stage(
        target="teacher", teacher=["random", CONV], teacher_kwargs=[None, CONV_KW], teacher_weights=[1.0, 0.5]
    )
    assert len(model.teachers) == 2 and model.teacher is model.teachers[0]
    assert model.extra_heads[0]["tokens"][0].proj.out_features == 8  # the conv teacher's 2 * channels
    batch = make_batch(4)
    out = model._losses(batch, generator=torch.Generator().manual_seed(0))
    # the total is the weighted sum of the two teachers' losses
    assert out["loss"].item() == pytest.approx(
        out["teacher0_loss"].item() + 0.5 * out["teacher1_loss"].item(), rel=1e-5
    )
    before = model._losses(batch, generator=torch.Generator().manual_seed(0))
    losses = fit_steps(model, batch, steps=25)
    after = model._losses(batch, generator=torch.Generator().manual_seed(0))
    assert losses[-1] < 0.7 * losses[0]
    assert after["teacher1_loss"] < 0.7 * before["teacher1_loss"]  # each teacher is learned, not just one
    assert after["teacher0_loss"] < 0.7 * before["teacher0_loss"]
    assert not any(k.startswith("teacher") for k in model.state_dict())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"teacher_kwargs": {"channels": 4}}, "give teacher_kwargs as a list of 2 dicts"),
        ({"teacher_kwargs": [None]}, "teacher_kwargs has 1 entries and teacher_weights 2"),
        (
            {"teacher_kwargs": [None, CONV_KW], "teacher_weights": [1.0]},
            "teacher_weights 1; give one per teacher",
        ),
        ({"teacher_kwargs": [None, CONV_KW], "teacher_weights": [0.0, 0.0]}, "positive sum"),
    ],
)
def test_teacher_lists_must_line_up(kw, match):
    with pytest.raises(ValueError, match=match):
        stage(target="teacher", teacher=["random", CONV], **kw)


def test_conv_teacher_tokens_follow_the_students_grid():
    from iv2_lightning.models.teachers import ConvFrameTeacher

    t = ConvFrameTeacher(num_frames=8, image_size=32, patch_size=8, tubelet_size=2, channels=4)
    video = torch.rand(2, 3, 8, 32, 32)
    out = t(video, return_hidden=2)
    assert out.tokens.shape == (2, 1 + 4 * 4 * 4, 16) and out.pooled.shape == (2, 16)
    assert len(out.hidden_states) == 2 and torch.equal(out.hidden_states[-1], out.tokens)
    assert torch.allclose(out.tokens[:, 0], out.tokens[:, 1:].mean(1))
    # frame 3 belongs to tubelet 1 (frames 2-3): changing it moves only that tubelet's tokens
    edited = video.clone()
    edited[:, :, 3] = torch.rand(2, 3, 32, 32)
    diff = (t(edited).tokens[:, 1:] - out.tokens[:, 1:]).abs().reshape(2, 4, 16, 16).amax(dim=(0, 2, 3))
    assert diff[1] > 1e-3 and diff[[0, 2, 3]].max() == 0
    # a change in the top-left corner of frame 0 does not reach the bottom-right token (receptive field)
    corner = video.clone()
    corner[:, :, 0, :4, :4] = 0
    d = (t(corner).tokens[:, 1:] - out.tokens[:, 1:]).abs().reshape(2, 4, 4, 4, 16).amax(dim=(0, 4))
    assert d[0, 0, 0] > 0 and d[0, 3, 3] == 0
    # frozen, and fixed by its seed
    assert not any(p.requires_grad for p in t.parameters())
    again = ConvFrameTeacher(num_frames=8, image_size=32, patch_size=8, tubelet_size=2, channels=4)
    assert torch.equal(again(video).tokens, out.tokens)
    with pytest.raises(ValueError, match="patch_size to be a multiple of 8"):
        ConvFrameTeacher(patch_size=12, image_size=48)
