"""Evaluation metrics of generated text: stage 3's captions and answers, as torchmetrics states.

InternVideo2 evaluates its stage-3 model on video captioning and question answering (arXiv
2403.15377, Sec. 4.4); captioning benchmarks report BLEU-4 (Papineni et al. 2002) and ROUGE-L
(Lin 2004), which :class:`CaptionMetrics` computes with torchmetrics. On the synthetic clips, whose
captions name a colour, a shape and a direction, it also scores whether a generated caption names
the right ones (``caption_attr_acc``), the number the tiny curriculum's target reads.

Every aggregate is a torchmetrics state (:class:`RatioMetric` for the averages), so the epoch values
are exact over DDP ranks whatever the batch sizes, and every rank computes the same keys. The
retrieval metrics of stage 2 live in :mod:`iv2_lightning.metrics`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore

from iv2_lightning.data.synthetic import attributes_from_text

__all__ = ["CAPTION_ATTRIBUTES", "VIDEO_ONLY", "CaptionMetrics", "RatioMetric"]

#: the attributes a synthetic caption must name for ``caption_attr_acc``
CAPTION_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction")
#: the suffix of the attribute accuracies of captions decoded from the video alone
VIDEO_ONLY = "_video_only"


class RatioMetric(Metric):
    """``sum(numerator) / sum(denominator)`` over an epoch and over ranks; NaN when nothing was counted
    (the caller then does not log it: every rank sees the same synced NaN, so all skip together)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("num", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("den", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, num: torch.Tensor | float, den: torch.Tensor | float) -> None:
        self.num += torch.as_tensor(num, dtype=torch.float32, device=self.num.device).detach()
        self.den += torch.as_tensor(den, dtype=torch.float32, device=self.den.device).detach()

    def compute(self) -> torch.Tensor:
        return self.num / self.den if self.den > 0 else torch.full_like(self.num, float("nan"))


_RATIO_KEYS = (
    "loss",
    "caption_loss",
    "dialogue_loss",
    "token_acc",
    "answer_acc",
    "rouge_l",
    "caption_attr_acc",
    *(f"caption_{a}_acc" for a in CAPTION_ATTRIBUTES),
    # a model that fuses audio/speech is also scored on the video alone (what the sound adds)
    f"caption_attr_acc{VIDEO_ONLY}",
    *(f"caption_{a}_acc{VIDEO_ONLY}" for a in CAPTION_ATTRIBUTES),
    "generated",  # den counts generated captions with a reference (gates the BLEU computation)
)


class CaptionMetrics(nn.ModuleDict):
    """One evaluation split's aggregates: the teacher-forced losses and accuracies, BLEU-4/BLEU-1 and
    ROUGE-L of generated captions, and the attribute accuracies of synthetic clips.

    Update with :meth:`update_losses`, :meth:`update_captions` and :meth:`update_attributes`; at the
    end of the epoch :meth:`compute` (on every rank: it is a collective under DDP) returns the values
    that were counted at all, then :meth:`reset`.
    """

    def __init__(self) -> None:
        metrics: dict[str, Metric] = {k: RatioMetric() for k in _RATIO_KEYS}
        # BLEU's states are fixed-size count tensors, so a rank that generated nothing still syncs
        metrics["bleu"] = BLEUScore(n_gram=4)
        metrics["bleu1"] = BLEUScore(n_gram=1)
        super().__init__(metrics)

    def update_losses(
        self,
        batch_size: int,
        loss: torch.Tensor,
        caption_loss: torch.Tensor | None = None,
        dialogue_loss: torch.Tensor | None = None,
        caption_correct: torch.Tensor | None = None,
        caption_total: torch.Tensor | None = None,
        answer_correct: torch.Tensor | None = None,
        answer_total: torch.Tensor | None = None,
    ) -> None:
        """One batch's losses (means) and token counts; each loss is weighted by the tokens it
        averages, so the epoch value is the mean over all tokens."""
        self["loss"].update(loss * batch_size, batch_size)
        if caption_loss is not None:
            self["caption_loss"].update(caption_loss * caption_total, caption_total)
            self["token_acc"].update(caption_correct, caption_total)
        if dialogue_loss is not None:
            self["dialogue_loss"].update(dialogue_loss * answer_total, answer_total)
            self["answer_acc"].update(answer_correct, answer_total)

    def update_captions(self, generated: Sequence[str], references: Sequence[str]) -> None:
        """BLEU and ROUGE-L of generated captions against their references (one each)."""
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated captions but {len(references)} references")
        if not generated:
            return
        generated, refs = list(generated), [[r] for r in references]
        self["bleu"].update(generated, refs)
        self["bleu1"].update(generated, refs)
        rouge = rouge_score(generated, list(references), rouge_keys="rougeL")["rougeL_fmeasure"]
        self["rouge_l"].update(rouge * len(generated), len(generated))
        self["generated"].update(len(generated), len(generated))

    def update_attributes(
        self,
        generated: Sequence[str],
        attributes: Sequence[Mapping[str, Any] | None],
        suffix: str = "",
    ) -> None:
        """Whether each caption names its clip's colour, shape and direction (clips whose
        ``attributes`` lack one of them are not scored); ``suffix`` names another set of keys
        (:data:`VIDEO_ONLY`)."""
        scored = [
            (g, t)
            for g, t in zip(generated, attributes)
            if isinstance(t, Mapping) and all(a in t for a in CAPTION_ATTRIBUTES)
        ]
        if not scored:
            return
        found = [attributes_from_text(g) for g, _ in scored]
        per = {a: [f.get(a) == t[a] for f, (_, t) in zip(found, scored)] for a in CAPTION_ATTRIBUTES}
        for a, ok in per.items():
            self[f"caption_{a}_acc{suffix}"].update(sum(ok), len(ok))
        self[f"caption_attr_acc{suffix}"].update(sum(all(x) for x in zip(*per.values())), len(scored))

    def compute(self) -> dict[str, torch.Tensor]:
        """The epoch values that were counted (NaN-free), already reduced over ranks."""
        values: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            # a metric nobody updated this epoch is expected (no dialogue, no attributes, ...)
            warnings.filterwarnings("ignore", message=".*compute.*called before the.*update.*")
            for key in _RATIO_KEYS:
                values[key] = self[key].compute()  # a collective under DDP: every rank runs it
            if values["generated"].isfinite():
                values["bleu"] = self["bleu"].compute()
                values["bleu1"] = self["bleu1"].compute()
        del values["generated"]
        return {k: v for k, v in values.items() if math.isfinite(float(v))}

    def reset(self) -> None:
        for metric in self.values():
            metric.reset()
