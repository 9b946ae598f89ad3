"""The evaluation's retrieval numbers worked out by hand: the T2V/V2T metrics with tied scores and
several positives, dual-softmax rescoring against its formula, the official ``_match`` re-ranking of
the top k (pure function, through the aligner's matching head with a stand-in fusion, and through
ContrastiveStage's test loop), zero-shot classes from prompt templates.

Ties (iv2_lightning.metrics): a query's rank is the expected rank of its best positive when tied
candidates are ordered at random, ``1 + h + n / (p + 1)`` (h candidates strictly above, p positives
and n negatives tied with it), and R@k the expected hit; so one positive tied with one negative at
the top counts as rank 1.5 and half a hit at R@1.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.metrics import (
    dual_softmax,
    match_retrieval_scores,
    positives_from_ids,
    rerank_top_k,
    retrieval_metrics,
    retrieval_scores,
)
from iv2_lightning.stages.contrastive import ContrastiveStage

SMALL = dict(
    encoder={"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8},
    text=dict(dim=32, depth=1, num_heads=2),
    audio=dict(dim=32, depth=1, num_heads=2),
    fusion=dict(dim=32, num_heads=2),
    embed_dim=16,
)


def _tied_example():
    """Four clips; clips 1 and 2 share an id and an embedding, clip 3 has clip 0's embedding but its
    own id, text 3 is equally close to every clip."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = F.normalize(e1 + e2, dim=0)
    video = torch.stack([e1, e2, e2, e1])
    text = torch.stack([e1, e2, e2, diag])
    ids = torch.tensor([0, 1, 1, 2])
    return video, text, ids


def test_stage_retrieval_scores_by_hand_with_ties():
    video, text, ids = _tied_example()
    m = retrieval_scores(video, text, ids)
    # T2V. text 0: its clip ties with clip 3 at the top -> rank 1.5, half a hit at 1.
    #      texts 1, 2: both clips of id 1 on top -> rank 1. text 3: all four tie, one positive ->
    #      rank 1 + 3/2 = 2.5, a quarter of a hit at 1, certain at 5.
    assert m["t2v_r1"] == pytest.approx(100 * (0.5 + 1 + 1 + 0.25) / 4)
    assert m["t2v_r5"] == m["t2v_r10"] == pytest.approx(100.0)
    assert m["t2v_medr"] == pytest.approx((1 + 1.5) / 2)  # median of 1, 1, 1.5, 2.5
    assert m["t2v_meanr"] == pytest.approx((1.5 + 1 + 1 + 2.5) / 4)
    # V2T. clip 0: text 0 scores 1, text 3 only 0.71 -> rank 1; clips 1, 2: texts 1, 2 -> 1;
    #      clip 3: its text (0.71) is below text 0 (1.0) -> rank 2, no hit at 1.
    assert m["v2t_r1"] == pytest.approx(75.0)
    assert m["v2t_medr"] == pytest.approx(1.0)
    assert m["v2t_meanr"] == pytest.approx(1.25)


def _dual_softmax_by_formula(sim: list[list[float]]) -> torch.Tensor:
    """``s[i][j] * exp(s[i][j]) / sum_q exp(s[q][j])``, written out."""
    rows, cols = len(sim), len(sim[0])
    col_sums = [sum(math.exp(sim[q][j]) for q in range(rows)) for j in range(cols)]
    return torch.tensor(
        [[sim[i][j] * math.exp(sim[i][j]) / col_sums[j] for j in range(cols)] for i in range(rows)]
    )


def test_dual_softmax_scores_follow_the_formula_in_both_directions():
    video, text, ids = _tied_example()
    t2v = (text @ video.T).tolist()
    v2t = (video @ text.T).tolist()
    expect_t2v, expect_v2t = _dual_softmax_by_formula(t2v), _dual_softmax_by_formula(v2t)
    assert torch.allclose(dual_softmax(torch.tensor(t2v)), expect_t2v, atol=1e-6)
    m = retrieval_scores(video, text, ids)
    pos = positives_from_ids(ids, ids)
    for name, scores, positive in (("t2v", expect_t2v, pos), ("v2t", expect_v2t, pos.T)):
        ref = retrieval_metrics(scores, positive)
        for k in ("r1", "r5", "r10", "medr", "meanr"):
            assert m[f"{name}_{k}_dsl"] == pytest.approx(ref[k], abs=1e-6), (name, k)


def test_dual_softmax_fixes_a_hub_by_hand():
    # clip 0 is close to both texts (a hub): by cosine text 1 finds clip 0 first (0.8 > 0.75).
    # Column softmax: clip 0 -> e^.9, e^.8 over their sum = 0.525, 0.475; clip 1 -> e^.1, e^.75 = 0.343, 0.657.
    # Text 1 then scores clip 0 at 0.8 * 0.475 = 0.380 and clip 1 at 0.75 * 0.657 = 0.493: clip 1 first.
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.75]])
    dsl = dual_softmax(sim)
    assert dsl[1, 0].item() == pytest.approx(0.8 * math.exp(0.8) / (math.exp(0.9) + math.exp(0.8)), abs=1e-6)
    assert dsl[1, 1].item() == pytest.approx(
        0.75 * math.exp(0.75) / (math.exp(0.1) + math.exp(0.75)), abs=1e-6
    )
    eye = torch.eye(2, dtype=torch.bool)
    assert retrieval_metrics(sim, eye)["r1"] == pytest.approx(50.0)
    assert retrieval_metrics(dsl, eye)["r1"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- re-ranking


def test_rerank_top_k_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.6]])
    new = {0: -1.0, 1: 3.0, 2: 0.5}  # the rescoring of the top 3 (columns 0, 1, 2)

    def rescore(rows, cols):
        assert rows.tolist() == [0, 0, 0]
        return torch.tensor([new[c] for c in cols.tolist()])

    out = rerank_top_k(sim, 3, rescore)
    assert out[0].argsort(descending=True).tolist() == [1, 2, 0, 4, 3]  # top 3 by new score, then cosine
    assert [out[0, c].item() for c in (0, 1, 2)] == [-1.0, 3.0, 0.5]  # the new scores themselves
    assert out[0, 4] > out[0, 3] and out[0, 4] < -1.0
    # a positive outside the top k keeps its place; one inside moves by its new score
    for col, rank in ((4, 4.0), (3, 5.0), (1, 1.0), (0, 3.0)):
        positive = torch.zeros(1, 5, dtype=torch.bool)
        positive[0, col] = True
        assert retrieval_metrics(out, positive)["meanr"] == rank, col


def test_rerank_ties_in_the_new_scores_use_the_tie_rule():
    # the rescoring cannot tell the top 2 apart: the positive among them ranks 1.5, half a hit at 1
    out = rerank_top_k(torch.tensor([[0.9, 0.8, 0.1]]), 2, lambda r, c: torch.zeros(len(c)))
    m = retrieval_metrics(out, torch.tensor([[False, True, False]]), recall_at=(1, 2))
    assert m["meanr"] == 1.5 and m["r1"] == pytest.approx(50.0) and m["r2"] == pytest.approx(100.0)


def test_rerank_top_k_checks():
    sim = torch.rand(3, 4)
    everything = rerank_top_k(sim, 10, lambda r, c: -sim[r, c])  # k above the candidates: all rescored
    assert torch.equal(everything.argsort(dim=1), sim.argsort(dim=1, descending=True))
    with pytest.raises(ValueError, match="k must be >= 1"):
        rerank_top_k(sim, 0, lambda r, c: sim[r, c])
    with pytest.raises(ValueError, match="one finite score"):
        rerank_top_k(sim, 2, lambda r, c: torch.zeros(1))
    with pytest.raises(ValueError, match="one finite score"):
        rerank_top_k(sim, 2, lambda r, c: torch.full((len(c),), float("nan")))


class _IdFusion(nn.Module):
    """Stand-in for the fusion: ``pooled`` is 1 where the pair's first video and text token carry the
    same id (the matching head below turns that into the "match" logit); it records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def forward(self, tokens, masks=None, present=None):
        self.seen |= set(tokens)
        same = (tokens["video"][:, 0, 0] == tokens["text"][:, 0, 0]).float()
        return type("Fused", (), {"pooled": same[:, None]})()


class _MatchLogit(nn.Module):
    def forward(self, pooled):
        return torch.cat([torch.zeros_like(pooled), pooled], dim=1)


def _match_cat(audio: bool = False) -> dict[str, torch.Tensor]:
    # cosine t2v (rows texts, columns clips); clip i is text i's only positive:
    #   text 0: its clip second, text 1: its clip third, text 2: its clip first
    sim = torch.tensor([[0.5, 0.9, 0.1], [0.9, 0.1, 0.8], [0.2, 0.3, 0.9]])
    ids = torch.tensor([10, 11, 12])
    tokens = torch.zeros(3, 2, 4)
    tokens[:, 0, 0] = ids.float()
    cat = {
        "text": torch.eye(3),
        "video": sim.T.contiguous(),  # text @ video.T = sim
        "sample_id": ids,
        "text_present": torch.ones(3, dtype=torch.bool),
        "video_tokens": tokens,
        "video_mask": torch.ones(3, 2, dtype=torch.bool),
        "text_tokens": tokens.clone(),
        "text_mask": torch.ones(3, 2, dtype=torch.bool),
    }
    if audio:
        cat["audio_tokens"], cat["audio_mask"] = torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool)
    return cat


def test_stage_match_scores_rerank_the_top_k_with_the_matching_head():
    torch.manual_seed(0)
    stage = ContrastiveStage(**SMALL, rerank_k=2)
    model = stage.model
    model.fusion, model.itm_head = _IdFusion(), _MatchLogit()
    cat = _match_cat()
    cosine = retrieval_scores(cat["video"], cat["text"], cat["sample_id"])
    assert cosine["t2v_r1"] == pytest.approx(100 / 3) and cosine["t2v_meanr"] == pytest.approx(2.0)
    m = match_retrieval_scores(cat, model.match_scores, k=2, chunk=2)  # chunks smaller than the pairs
    # T2V with k = 2: text 0's clip (2nd) moves to 1st; text 1's clip (3rd) is outside the top 2 and
    # stays 3rd; text 2's clip stays 1st. V2T (the transpose) has the same pattern.
    for d in ("t2v", "v2t"):
        assert m[f"{d}_r1_match"] == pytest.approx(200 / 3)
        assert m[f"{d}_r5_match"] == pytest.approx(100.0)
        assert m[f"{d}_medr_match"] == 1.0
        assert m[f"{d}_meanr_match"] == pytest.approx(5 / 3)
    assert model.fusion.seen == {"video", "text"}
    # audio, when the clips have it, goes with its video
    match_retrieval_scores(_match_cat(audio=True), model.match_scores, k=2)
    assert model.fusion.seen == {"video", "text", "audio"}


def test_rerank_needs_the_matching_head():
    with pytest.raises(ValueError, match="needs vtm > 0"):
        ContrastiveStage(**SMALL, rerank_k=4, vtm=0.0)


# ----------------------------------------------------------------------------- zero-shot classes


def test_zeroshot_classes_from_prompt_templates():
    torch.manual_seed(0)
    templates = ["a video of {}", "something moving {}"]
    stage = ContrastiveStage(**SMALL, zeroshot_classes=["left", "up"], prompt_templates=templates).eval()
    assert stage.label_names == ["left", "up"]
    assert stage.zeroshot_prompts == {
        "left": ["a video of left", "something moving left"],
        "up": ["a video of up", "something moving up"],
    }
    with torch.no_grad():
        classes = stage.model.encode_prompts(stage.class_prompts())
        expect = torch.stack(
            [F.normalize(stage.model.encode_text(p).mean(0), dim=0) for p in stage.zeroshot_prompts.values()]
        )
    assert torch.allclose(classes, expect, atol=1e-5)  # CLIP's ensembling: mean of normalised prompts
    bare = ContrastiveStage(**SMALL, zeroshot_classes=["left", "up"])
    assert bare.zeroshot_prompts == {"left": ["left"], "up": ["up"]}
    with pytest.raises(ValueError, match="each hold"):
        ContrastiveStage(**SMALL, zeroshot_classes=["left"], prompt_templates=["no slot"])
    with pytest.raises(ValueError, match="needs zeroshot_classes"):
        ContrastiveStage(**SMALL, prompt_templates=["a {}"])
    # evaluation settings stay out of the saved hyperparameters (a checkpoint does not pin them)
    assert "zeroshot_classes" not in stage.hparams and "prompt_templates" not in stage.hparams


def test_stage_test_loop_reranks_batches_with_and_without_audio_or_captions():
    """The tokens kept for `_match` differ in length and presence between batches (a batch without
    audio, a clip without caption): the epoch end pads them and scores every present caption."""
    import lightning as L

    from iv2_lightning.data.batch import VideoCollate
    from iv2_lightning.data.synthetic import SyntheticVideoDataset

    torch.manual_seed(0)
    stage = ContrastiveStage(**{**SMALL, "encoder": {**SMALL["encoder"], "num_frames": 8}}, rerank_k=3)
    samples = [SyntheticVideoDataset(split="test", size=8, num_frames=8, image_size=32)[i] for i in range(8)]
    samples[6].caption = None
    with_audio = VideoCollate(max_text_length=48)(samples[:4])
    without = VideoCollate(max_text_length=48, modalities=["caption", "label"])(samples[4:])
    assert with_audio.audio is not None and without.audio is None
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.test(
        stage, dataloaders=torch.utils.data.DataLoader([with_audio, without], batch_size=None), verbose=False
    )
    m = trainer.callback_metrics
    for key in ("t2v_r1_match", "v2t_r1_match", "t2v_meanr_match", "t2v_r1", "t2v_r1_dsl"):
        assert math.isfinite(float(m[f"test/{key}"])), key
    assert 1.0 <= float(m["test/t2v_meanr_match"]) <= 8.0
