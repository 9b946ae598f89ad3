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
