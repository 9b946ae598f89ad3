"""VideoClassifier alone, in a plain PyTorch loop: it learns, its loss smooths labels as asked, and
the frame-wise encoder gives the order-free control."""

import pytest
import torch
import torch.nn.functional as F

from iv2_lightning.models.backbone import build_video_encoder
from iv2_lightning.models.classifier import VideoClassifier

TINY = {"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}


def quadrant_clips(n=16, seed=0):
    """Which quadrant holds the bright square (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    video = torch.randn(n, 3, 4, 32, 32, generator=g) * 0.1
    for i, label in enumerate(labels.tolist()):
        top, left = 16 * (label // 2), 16 * (label % 2)
        video[i, :, :, top + 4 : top + 12, left + 4 : left + 12] += 1.0
    return video, labels


def test_learns_in_a_plain_loop():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VideoClassifier(build_video_encoder("tiny", **TINY), num_classes=4, label_smoothing=0.0)
    video, labels = quadrant_clips()
    logits = model(video)
    assert isinstance(logits, torch.Tensor) and logits.shape == (16, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = model.loss(model(video), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (model(video).argmax(1) == labels).float().mean() == 1.0


def test_loss_uses_the_models_label_smoothing_unless_told_otherwise():
    model = VideoClassifier(build_video_encoder("tiny", **TINY), num_classes=4, label_smoothing=0.2)
    logits, labels = torch.randn(8, 4), torch.arange(8) % 4
    torch.testing.assert_close(
        model.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.2)
    )
    torch.testing.assert_close(
        model.loss(logits, labels, label_smoothing=0.0), F.cross_entropy(logits, labels)
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        VideoClassifier(build_video_encoder("tiny", **TINY), num_classes=4, label_smoothing=1.5)


def test_the_frame_wise_control_cannot_see_the_order_of_the_frames():
    torch.manual_seed(0)
    encoder = build_video_encoder("tiny", **TINY, frame_wise=True, pool="mean")
    model = VideoClassifier(encoder, num_classes=4, pool="mean").eval()
    video, _ = quadrant_clips(4)
    video = video + torch.randn_like(video)  # frames that differ
    reversed_video = video.flip(2)
    with torch.no_grad():
        torch.testing.assert_close(model(video), model(reversed_video), atol=1e-5, rtol=1e-5)
    # the divided-attention encoder does see it
    ordered = VideoClassifier(build_video_encoder("tiny", **TINY), num_classes=4).eval()
    with torch.no_grad():
        assert not torch.allclose(ordered(video), ordered(reversed_video), atol=1e-5)


def two_window_clips(n=16, seed=0):
    """Two windows of 4 frames, one red and one green; the label is which comes first. The set of
    windows is the same for both labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    video = torch.randn(n, 3, 8, 32, 32, generator=g) * 0.1
    for i, label in enumerate(labels.tolist()):
        first, second = (slice(0, 4), slice(4, 8)) if label == 0 else (slice(4, 8), slice(0, 4))
        video[i, 0, first] += 1.0
        video[i, 1, second] += 1.0
    return video, labels


@pytest.mark.parametrize("aggregate", ["transformer", "mean"])
def test_the_hte_head_learns_the_order_of_windows_and_the_mean_cannot(aggregate):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    temporal = {"window": 4, "tokens_per_window": 2, "depth": 2, "aggregate": aggregate}
    model = VideoClassifier(
        build_video_encoder("tiny", **TINY), num_classes=2, label_smoothing=0.0, temporal=temporal
    )
    # the trunk keeps its keys; the HTE's own layers are under temporal_encoder., without a second trunk copy
    keys = model.state_dict().keys()
    assert {k for k in keys if k.startswith("video_encoder.")} == {
        f"video_encoder.{k}" for k in model.video_encoder.state_dict()
    }
    assert not any(k.startswith("temporal_encoder.encoder.") for k in keys)
    video, labels = two_window_clips()
    model.video_encoder.requires_grad_(False)  # a probe: only the HTE and the head train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(60):
        loss = model.loss(model(video), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(video).argmax(1) == labels).float().mean().item()
        swapped = torch.cat([video[:, :, 4:], video[:, :, :4]], dim=2)
        same = torch.allclose(model(video), model(swapped), atol=1e-5)
    if aggregate == "transformer":
        assert acc == 1.0 and not same
    else:  # the windows' mean is the same for both orders: the logits are, the accuracy is chance
        assert same and acc == 0.5
