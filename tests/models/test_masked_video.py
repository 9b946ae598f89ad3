"""MaskedVideoModel alone, in a plain PyTorch loop: both targets learn, the outputs are a NamedTuple of
tensors, the teachers stay out of parameters() and state_dict(), the masks and the reconstruction."""

import pytest
import torch

from iv2_lightning.models.backbone import build_video_encoder, preset_config
from iv2_lightning.models.heads import norm_pixel_targets, pixel_reconstruction_loss
from iv2_lightning.models.masked_video import MaskedVideoModel, MaskedVideoOutput
from iv2_lightning.models.teachers import ConvFrameTeacher, build_teacher

TINY = {"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}  # tubelet 1: a 4 x 4 x 4 grid


def encoder():
    return build_video_encoder("tiny", **TINY)


def clips(n=4, seed=0):
    return torch.randn(n, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


def train(model, video, steps=25, lr=3e-3):
    """A plain PyTorch loop on one batch with the same masks every step; the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(video, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_pixel_target_learns_in_a_plain_loop_and_returns_a_named_tuple():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MaskedVideoModel(encoder(), mask_ratio=0.75, decoder_dim=32, decoder_depth=1)
    video = clips()
    out = model(video)
    assert isinstance(out, MaskedVideoOutput) and isinstance(out, tuple)
    assert out.loss.requires_grad and out.loss.ndim == 0
    assert set(out.terms) == {"recon_loss"} and not out.terms["recon_loss"].requires_grad
    assert out.mask.dtype == torch.bool and out.mask.shape == (4, 64)
    assert (out.mask.sum(1) == 48).all()  # round(0.75 * 64) hidden in every clip
    assert out.pred.shape == (4, 48, 8 * 8 * 3)
    losses = train(model, video, steps=30)
    assert losses[-1] < 0.8 * losses[0]


def test_teacher_target_learns_and_the_teachers_stay_outside_the_module():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = encoder()
    teachers = [
        build_teacher("random", default_config=preset_config("tiny", **TINY)),
        ConvFrameTeacher(num_frames=4, image_size=32, patch_size=8, tubelet_size=1, channels=4),
    ]
    model = MaskedVideoModel(
        student, target="teacher", mask_ratio=0.75, teachers=teachers, teacher_weights=[1.0, 0.5]
    )
    teacher_params = {id(p) for t in teachers for p in t.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in model.parameters()}
    assert not any("teacher" in k for k in model.state_dict())
    assert model.teacher is teachers[0] and model.teachers == tuple(teachers)
    # the first teacher's heads keep the names of the official conversion
    assert {k.split(".")[0] for k in model.state_dict()} == {
        "video_encoder",
        "token_heads",
        "pool_head",
        "extra_heads",
    }
    model.train()
    assert not any(t.training for t in teachers)  # train() does not reach them

    video = clips()
    out = model(video, generator=torch.Generator().manual_seed(0))
    assert out.pred is None
    assert set(out.terms) == {"recon_loss", "distill_loss", "pool_loss", "teacher0_loss", "teacher1_loss"}
    assert out.loss.item() == pytest.approx(
        out.terms["teacher0_loss"].item() + 0.5 * out.terms["teacher1_loss"].item(), rel=1e-5
    )
    before = [p.clone() for t in teachers for p in t.parameters()]
    losses = train(model, video)
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, (p for t in teachers for p in t.parameters())))


def test_attention_masks_follow_the_teachers_attention():
    torch.manual_seed(0)
    teacher = build_teacher("random", kwargs={"preset": "tiny", **TINY}, seed=3)
    model = MaskedVideoModel(
        encoder(), target="teacher", mask_type="attention", mask_ratio=0.75, teachers=[teacher]
    )
    video = clips()
    out = model(video, generator=torch.Generator().manual_seed(0))
    assert out.mask.shape == (4, 64) and (out.mask.sum(1) == 48).all()
    # the same generator, the same masks; another teacher's attention, other masks
    again = model(video, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, again.mask) and torch.equal(out.loss, again.loss)
    other = MaskedVideoModel(
        encoder(),
        target="teacher",
        mask_type="attention",
        mask_ratio=0.75,
        teachers=[build_teacher("random", kwargs={"preset": "tiny", **TINY}, seed=4)],
    )
    assert not torch.equal(other(video, generator=torch.Generator().manual_seed(0)).mask, out.mask)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruct_inverts_a_perfect_prediction(norm_pix):
    model = MaskedVideoModel(encoder(), mask_ratio=0.5, decoder_dim=32, decoder_depth=1, norm_pix=norm_pix)
    video = clips(2)
    mask = model.make_mask(video, generator=torch.Generator().manual_seed(0))
    perfect = norm_pixel_targets(video, 1, 8, normalize=norm_pix)[mask].reshape(2, 32, -1)
    assert pixel_reconstruction_loss(perfect, video, mask, 1, 8, normalize=norm_pix) < 1e-10
    torch.testing.assert_close(model.reconstruct(video, perfect, mask), video, atol=1e-4, rtol=1e-4)
    # a wrong prediction changes only the hidden patches
    wrong = model.reconstruct(video, torch.zeros_like(perfect), mask)
    changed = (wrong - video).abs().amax(dim=1)  # [B, T, H, W]
    hidden = mask.reshape(2, 4, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert changed[~hidden].max() == 0 and changed[hidden].max() > 0


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_type": "attention"}, "needs target='teacher'"),
        ({"raw_pix_weight": -1.0}, "raw_pix_weight"),
        ({"target": "teacher"}, "at least one teacher module"),
        ({"target": "teacher", "teachers": ["t"], "teacher_weights": [0.0]}, "positive sum"),
        ({"target": "teacher", "teachers": ["t"], "teacher_weights": [1.0, 1.0]}, "give one per teacher"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MaskedVideoModel(encoder(), **kw)


def test_a_teacher_on_another_grid_is_refused():
    teacher = ConvFrameTeacher(num_frames=4, image_size=32, patch_size=16, tubelet_size=1, channels=4)
    with pytest.raises(ValueError, match=r"teacher 0 \(ConvFrameTeacher\) has 17 tokens per clip"):
        MaskedVideoModel(encoder(), target="teacher", teachers=[teacher])
