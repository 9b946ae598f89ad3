"""The generated-text metrics of stage 3 (iv2_lightning/metrics_text.py): epoch averages weighted by
what they count, BLEU/ROUGE-L only when something was generated, attribute accuracies."""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.metrics_text import VIDEO_ONLY, CaptionMetrics, RatioMetric


def test_ratio_is_nan_until_counted_and_sums_over_updates():
    r = RatioMetric()
    with pytest.warns(UserWarning, match="compute"):
        assert r.compute().isnan()
    r.update(torch.tensor(3.0), 4)
    r.update(1, 4)
    assert r.compute().item() == pytest.approx(0.5)


def test_losses_are_weighted_by_the_tokens_they_average():
    m = CaptionMetrics()
    m.update_losses(
        2,
        torch.tensor(1.0),
        caption_loss=torch.tensor(2.0),
        caption_correct=torch.tensor(3),
        caption_total=torch.tensor(10),
    )
    m.update_losses(
        6,
        torch.tensor(3.0),
        caption_loss=torch.tensor(4.0),
        caption_correct=torch.tensor(0),
        caption_total=torch.tensor(30),
    )
    values = m.compute()
    assert values["loss"].item() == pytest.approx((2 * 1 + 6 * 3) / 8)
    assert values["caption_loss"].item() == pytest.approx((10 * 2 + 30 * 4) / 40)
    assert values["token_acc"].item() == pytest.approx(3 / 40)
    # what was never counted is not reported: no dialogue, no generation, no attributes
    assert set(values) == {"loss", "caption_loss", "token_acc"}
    m.reset()
    assert m.compute() == {}


def test_generated_captions_and_attributes():
    m = CaptionMetrics()
    refs = ["a red circle moving left", "a blue square moving up"]
    m.update_captions(refs, refs)
    attributes = [
        {"color": "red", "shape": "circle", "direction": "left"},
        {"color": "blue", "shape": "square", "direction": "up"},
        None,  # a clip without attributes is not scored
    ]
    m.update_attributes([*refs, "anything"], attributes)
    m.update_attributes(
        ["a red square moving left", "a green square moving up", "x"], attributes, suffix=VIDEO_ONLY
    )
    values = m.compute()
    assert values["bleu"].item() == pytest.approx(1.0) and values["rouge_l"].item() == pytest.approx(1.0)
    assert values["caption_attr_acc"].item() == 1.0
    assert values[f"caption_color_acc{VIDEO_ONLY}"].item() == pytest.approx(0.5)
    assert values[f"caption_shape_acc{VIDEO_ONLY}"].item() == pytest.approx(0.5)
    assert values[f"caption_attr_acc{VIDEO_ONLY}"].item() == 0.0
    assert "generated" not in values
    with pytest.raises(ValueError, match="references"):
        m.update_captions(refs, refs[:1])
