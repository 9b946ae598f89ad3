"""MaskedVideoStage (stage 1): pixel and teacher targets, the raw-pixel term, learning, bad arguments,
the shell (same losses as its torch model, fixed validation masks, the ratio kept in checkpoints, the
reconstruction pictures)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from stage_helpers import TINY, make_batch
from torch.utils.data import DataLoader

from iv2_lightning.callbacks.reconstruction import ReconstructionImages
from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.heads import pixel_reconstruction_loss
from iv2_lightning.models.masked_video import MaskedVideoModel, MaskedVideoOutput
from iv2_lightning.models.teachers import build_teacher
from iv2_lightning.stages.masked import MaskedVideoStage


def stage(**kw):
    torch.manual_seed(0)
    return MaskedVideoStage(encoder=dict(TINY), mask_ratio=0.75, decoder_depth=1, decoder_dim=32, **kw)


def fixed(model, batch):
    """The torch model's output on ``batch`` with the masks of seed 0."""
    return model(batch.video, generator=torch.Generator().manual_seed(0))


def fit_steps(stage, batch, steps=30, lr=3e-3):
    opt = torch.optim.AdamW(stage.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = fixed(stage.model, batch)  # the same mask
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_pixel_target_learns_a_fixed_batch():
    torch.set_num_threads(1)
    model, batch = stage(), make_batch(4)
    losses = fit_steps(model, batch)
    assert losses[-1] < 0.8 * losses[0]


def test_raw_pixel_term_adds_the_unnormalised_reconstruction():
    model, batch = stage(raw_pix_weight=0.5).model, make_batch(4)
    out = fixed(model, batch)
    torch.testing.assert_close(out.loss, out.terms["recon_loss_norm"] + 0.5 * out.terms["recon_loss_raw"])
    # the decoder predicts both targets; the raw half is scored against the pixels themselves
    pred = model.decoder(model.video_encoder(batch.video, mask=out.mask).tokens, out.mask)
    raw = pred.chunk(2, dim=-1)[1]
    expected = pixel_reconstruction_loss(
        raw, batch.video, out.mask, model.tubelet, model.patch, normalize=False
    )
    torch.testing.assert_close(out.terms["recon_loss_raw"], expected.detach())
    assert out.pred.shape[-1] * 2 == pred.shape[-1]


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
    before = [p.clone() for p in model.model.teacher.parameters()]
    losses = fit_steps(model, batch, steps=25)
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.teacher.parameters()))  # frozen


def test_random_teacher_is_the_students_architecture_and_fixed_by_its_seed():
    a = stage(target="teacher", teacher="random").model
    b = stage(target="teacher", teacher="random").model
    c = stage(target="teacher", teacher="random", teacher_seed=1).model
    student_shapes = {k: v.shape for k, v in a.video_encoder.state_dict().items()}
    assert {k: v.shape for k, v in a.teacher.state_dict().items()} == student_shapes
    # the same seed rebuilds the same teacher whatever the global RNG did (a resumed run needs it)
    torch.manual_seed(123)
    assert all(torch.equal(x, y) for x, y in zip(a.teacher.parameters(), b.teacher.parameters()))
    assert not torch.equal(a.teacher.patch_embed.proj.weight, c.teacher.patch_embed.proj.weight)
    # the teacher is never a submodule: not exported, not optimised
    assert not any("teacher" in k for k in a.state_dict())
    # explicit teacher_kwargs build another architecture
    wide = stage(
        target="teacher", teacher="random", teacher_kwargs={**preset_config("tiny", **TINY), "embed_dim": 64}
    ).model
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
    torch_model = model.model
    assert len(torch_model.teachers) == 2 and torch_model.teacher is torch_model.teachers[0]
    assert torch_model.extra_heads[0]["tokens"][0].proj.out_features == 8  # the conv teacher's 2 * channels
    batch = make_batch(4)
    out = fixed(torch_model, batch)
    # the total is the weighted sum of the two teachers' losses
    assert out.loss.item() == pytest.approx(
        out.terms["teacher0_loss"].item() + 0.5 * out.terms["teacher1_loss"].item(), rel=1e-5
    )
    before = fixed(torch_model, batch).terms
    losses = fit_steps(model, batch, steps=25)
    after = fixed(torch_model, batch).terms
    assert losses[-1] < 0.7 * losses[0]
    assert after["teacher1_loss"] < 0.7 * before["teacher1_loss"]  # each teacher is learned, not just one
    assert after["teacher0_loss"] < 0.7 * before["teacher0_loss"]
    assert not any("teacher" in k for k in model.state_dict())


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


# -- the shell around the torch model ---------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"raw_pix_weight": 0.5}, {"target": "teacher", "teacher": "random"}])
def test_the_stage_gives_the_losses_of_its_torch_model(kw):
    s, batch = stage(**kw), make_batch(4)
    teachers = [build_teacher("random", default_config=s.encoder_config)] if kw.get("teacher") else []
    target = kw.get("target", "pixels")
    extra = {"raw_pix_weight": kw.get("raw_pix_weight", 0.0)}
    model = MaskedVideoModel(
        VideoEncoder(**s.encoder_config),
        target=target,
        mask_ratio=0.75,
        decoder_depth=1,
        decoder_dim=32,
        teachers=teachers,
        **extra,
    )
    model.load_state_dict(s.model.state_dict())
    torch.manual_seed(5)
    from_stage = s.compute_loss(batch)
    torch.manual_seed(5)
    out = model(batch.video)
    assert isinstance(out, MaskedVideoOutput)
    assert set(from_stage) == {"loss", *out.terms}
    torch.testing.assert_close(from_stage["loss"], out.loss, rtol=0, atol=0)
    for k, v in out.terms.items():
        torch.testing.assert_close(from_stage[k], v, rtol=0, atol=0)
    term = "reconstruction" if target == "pixels" else "distillation"
    assert s.batch_contract() == {term: ["video"]}


class ImageLogger(Logger):
    """A logger whose ``experiment`` records ``add_image`` calls (what TensorBoard's writer offers)."""

    def __init__(self):
        super().__init__()
        self.images = []

    name = "images"
    version = 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, image, step):
        self.images.append((tag, image, step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_validation_masks_are_fixed_the_ratio_survives_a_checkpoint_and_pictures_are_drawn(tmp_path):
    s = stage()
    assert [type(c) for c in s.configure_callbacks()] == [ReconstructionImages]
    assert stage(log_images=False).configure_callbacks() == []
    assert stage(target="teacher", teacher="random").configure_callbacks() == []
    batch = make_batch(4)
    loader = DataLoader([batch, make_batch(4, seed=1)], batch_size=None)
    logger = ImageLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    first = trainer.validate(s, loader, verbose=False)[0]
    second = trainer.validate(s, loader, verbose=False)[0]
    # the same masks every epoch: an unchanged model scores exactly the same
    assert first["val/recon_loss"] == second["val/recon_loss"]
    assert first["val/recon_loss_ratio"] == second["val/recon_loss_ratio"] == 1.0
    assert s.first_val_loss == pytest.approx(first["val/recon_loss"], rel=1e-6)

    # one picture per loop, from the first batch: masked input, reconstruction, target
    assert [tag for tag, _, _ in logger.images] == ["val/masked_recon_target"] * 2
    image = logger.images[0][1]
    assert image.shape == (3, 3 * 32, 4 * 32) and image.min() >= 0 and image.max() <= 1
    video = batch.video[0]
    lo, hi = batch.video[:1].amin(), batch.video[:1].amax()
    target = ((video - lo) / (hi - lo + 1e-6)).clamp(0, 1).permute(0, 2, 1, 3).reshape(3, 32, -1)
    torch.testing.assert_close(image[:, 64:], target)
    mask = s.model.make_mask(batch.video, generator=torch.Generator().manual_seed(10_000))[0]
    visible = ~mask.reshape(4, 4, 4)[0]  # tubelet 1: token frame 0 is frame 0; [4 x 4] patches of 8 px
    pixels = visible.repeat_interleave(8, 0).repeat_interleave(8, 1)
    torch.testing.assert_close(image[:, 32:64, :32][:, pixels], image[:, 64:, :32][:, pixels])

    # the first loss is kept in checkpoints (old ones, without the model. prefix, still load)
    checkpoint = {"state_dict": dict(s.model.state_dict())}
    s.on_save_checkpoint(checkpoint)
    resumed = stage()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.first_val_loss == s.first_val_loss
    assert all(k.startswith("model.") for k in checkpoint["state_dict"])
    resumed.load_state_dict(checkpoint["state_dict"])


def test_cli_takes_one_kwargs_entry_per_teacher_with_null_for_none():
    """`teacher_kwargs: [{...}, null]` from a config or the command line (two teachers, the second
    built from the student's config), as pair_teacher_args documents."""
    from pathlib import Path

    from iv2_lightning.lightning_cli import make_cli

    cli = make_cli(
        [
            "--config",
            str(Path(__file__).resolve().parents[2] / "configs" / "stage1" / "tiny.yaml"),
            "--model.init_args.teacher=[random, random]",
            "--model.init_args.teacher_kwargs=[{preset: tiny, depth: 1, patch_size: 16, tubelet_size: 2}, null]",
            "--data.init_args.train_size=8",
        ],
        run=False,
    )
    first, second = cli.model.model.teachers
    assert len(first.blocks) == 1 and len(second.blocks) == cli.model.encoder_config["depth"]
