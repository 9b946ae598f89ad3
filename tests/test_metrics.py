"""Retrieval and zero-shot metrics against rankings and formulas worked out by hand, and the
torchmetrics ``Metric``s that accumulate them over an evaluation epoch."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from iv2_lightning.metrics import (
    RetrievalMetric,
    ZeroShotAccuracy,
    class_prompts_from,
    dual_softmax,
    expected_ranks,
    match_retrieval_scores,
    positives_from_ids,
    retrieval_metrics,
    retrieval_scores,
    zero_shot_accuracy,
)


def test_ranks_and_recall_without_ties():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # positive 0 is best: rank 1
            [0.8, 0.1, 0.7, 0.6],  # positive 1 is last: rank 4
            [0.1, 0.5, 0.4, 0.3],  # positives 2 and 3: the best (col 2) has one above it: rank 2
        ]
    )
    positive = torch.tensor(
        [[True, False, False, False], [False, True, False, False], [False, False, True, True]]
    )
    assert expected_ranks(sim, positive).tolist() == [1.0, 4.0, 2.0]
    m = retrieval_metrics(sim, positive, recall_at=(1, 2, 5))
    assert m["r1"] == pytest.approx(100 / 3)
    assert m["r2"] == pytest.approx(200 / 3)
    assert m["r5"] == pytest.approx(100.0)
    assert m["medr"] == 2.0
    assert m["meanr"] == pytest.approx(7 / 3)
    assert m["num_queries"] == 3.0


def test_ties_by_hand():
    # query 0: its only positive (col 1) ties with 3 negatives, one negative is above.
    #   h = 1, p = 1, n = 3: rank = 1 + 1 + 3/2 = 3.5 (average of optimistic 2 and pessimistic 5);
    #   hit@1 = 0 (a negative is strictly above); hit@2: the positive must come first of the 4 tied: 1/4;
    #   hit@3: first or second of 4: 1/2; hit@5: certain.
    # query 1: two positives (cols 0, 2) tie with one negative (col 3) at the top; col 1 is below.
    #   h = 0, p = 2, n = 1: rank = 1 + 1/3; hit@1 = 2/3 (a positive is first), hit@2 = 1.
    # query 2: everything ties (a collapsed model): one positive among 5, rank = 1 + 4/2 = 3,
    #   hit@k = k/5 (chance).
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.9, 0.5, 0.5],
            [0.7, 0.1, 0.7, 0.7, 0.2],
            [0.3, 0.3, 0.3, 0.3, 0.3],
        ]
    )
    positive = torch.tensor(
        [
            [False, True, False, False, False],
            [True, False, True, False, False],
            [False, False, False, True, False],
        ]
    )
    assert expected_ranks(sim, positive).tolist() == pytest.approx([3.5, 4 / 3, 3.0])
    m = retrieval_metrics(sim, positive, recall_at=(1, 2, 3, 5))
    assert m["r1"] == pytest.approx(100 * (0 + 2 / 3 + 1 / 5) / 3)
    assert m["r2"] == pytest.approx(100 * (1 / 4 + 1 + 2 / 5) / 3)
    assert m["r3"] == pytest.approx(100 * (1 / 2 + 1 + 3 / 5) / 3)
    assert m["r5"] == pytest.approx(100.0)
    assert m["medr"] == pytest.approx(3.0)
    assert m["meanr"] == pytest.approx((3.5 + 4 / 3 + 3.0) / 3)


def test_ties_equal_the_average_over_all_tie_orders():
    """The rule is the exact expectation over every order of the tied candidates (brute force)."""
    sim = torch.tensor([[0.4, 0.4, 0.4, 0.9, 0.4, 0.1], [0.2, 0.2, 0.2, 0.2, 0.8, 0.8]])
    positive = torch.tensor(
        [[True, False, True, False, False, False], [False, True, False, False, False, True]]
    )
    for q in range(2):
        ranks, hits = [], {k: [] for k in (1, 2, 3, 4)}
        for order in itertools.permutations(range(6)):
            # sort by score, ties broken by this permutation's position
            key = sorted(range(6), key=lambda j: (-float(sim[q, j]), order.index(j)))
            best = min(key.index(j) for j in range(6) if positive[q, j]) + 1
            ranks.append(best)
            for k in hits:
                hits[k].append(best <= k)
        m = retrieval_metrics(sim[q : q + 1], positive[q : q + 1], recall_at=(1, 2, 3, 4))
        assert m["meanr"] == pytest.approx(sum(ranks) / len(ranks))
        for k, h in hits.items():
            assert m[f"r{k}"] == pytest.approx(100 * sum(h) / len(h))


def test_order_of_candidates_does_not_matter():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (6, 9), generator=g).float()  # many ties
    positive = torch.rand(6, 9, generator=g) < 0.3
    positive[:, 0] = True
    perm = torch.randperm(9, generator=g)
    assert retrieval_metrics(sim, positive) == retrieval_metrics(sim[:, perm], positive[:, perm])


def test_queries_without_positive_are_left_out():
    sim = torch.tensor([[0.9, 0.1], [0.3, 0.4]])
    positive = torch.tensor([[True, False], [False, False]])
    m = retrieval_metrics(sim, positive)
    assert m["num_queries"] == 1.0 and m["r1"] == 100.0
    assert math.isnan(expected_ranks(sim, positive)[1].item())
    with pytest.raises(ValueError, match="no query has a positive"):
        retrieval_metrics(sim, torch.zeros(2, 2, dtype=torch.bool))


def test_bad_inputs():
    with pytest.raises(ValueError, match="bool"):
        retrieval_metrics(torch.zeros(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match=r"\[Nq, Nc\]"):
        retrieval_metrics(torch.zeros(2, 3), torch.eye(2, dtype=torch.bool))


def test_positives_from_ids():
    pos = positives_from_ids(torch.tensor([3, 5, 3]), torch.tensor([5, 3, 7, 3]))
    assert pos.tolist() == [
        [False, True, False, True],
        [True, False, False, False],
        [False, True, False, True],
    ]


def test_dual_softmax_by_hand():
    sim = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]])
    # column j: softmax over the queries (dim 0) of sim[:, j] / t
    for t in (1.0, 0.5):
        col0 = [math.exp(v / t) for v in (1.0, 0.5, 0.0)]
        col1 = [math.exp(v / t) for v in (0.0, 2.0, 1.0)]
        expect = [
            [1.0 * col0[0] / sum(col0), 0.0 * col1[0] / sum(col1)],
            [0.5 * col0[1] / sum(col0), 2.0 * col1[1] / sum(col1)],
            [0.0 * col0[2] / sum(col0), 1.0 * col1[2] / sum(col1)],
        ]
        assert torch.allclose(dual_softmax(sim, temperature=t), torch.tensor(expect), atol=1e-6)
    # the official form with the default temperature
    assert torch.allclose(dual_softmax(sim), sim * sim.softmax(dim=0))


def test_dual_softmax_demotes_a_hub_candidate():
    # candidate 0 is close to every query (a hub); query 1's true match is candidate 1
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.75], [0.9, 0.2]])
    assert sim[1].argmax() == 0
    assert dual_softmax(sim, temperature=0.05)[1].argmax() == 1


def test_zero_shot_accuracy():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    video = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2], [0.3, 1.0], [5.0, 5.1]])
    labels = torch.tensor([0, 1, 2, 0, -100])  # row 3 is wrong (class 1 is closer), row 4 unlabelled
    assert zero_shot_accuracy(video, classes, labels) == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no row has a label"):
        zero_shot_accuracy(video, classes, torch.full((5,), -100))
    with pytest.raises(ValueError, match="class embeddings"):
        zero_shot_accuracy(video, classes, torch.tensor([0, 1, 2, 3, 0]))


# ----------------------------------------------------------------------------- torchmetrics


def _match(tokens, masks):
    """A stand-in matching head: the masked sum of the video tokens times that of the text tokens."""
    v = (tokens["video"] * masks["video"][..., None]).sum(dim=(1, 2))
    return v * (tokens["text"] * masks["text"][..., None]).sum(dim=(1, 2))


def test_retrieval_metric_over_batches_equals_the_functions_on_the_whole_set():
    g = torch.Generator().manual_seed(0)
    n = 9
    video = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=-1)
    text = torch.nn.functional.normalize(video + torch.randn(n, 6, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 5, 5, 6])
    present = torch.ones(n, dtype=torch.bool)
    present[4] = False
    # three batches whose clips hold 2, 4 and 3 tokens (the kept tokens are padded at compute)
    widths, cuts = (2, 4, 3), (0, 3, 6, 9)
    tokens = [{m: torch.randn(3, w, 5, generator=g) for m in ("video", "text")} for w in widths]
    masks = [{m: torch.rand(3, w, generator=g) < 0.8 for m in ("video", "text")} for w in widths]
    metric = RetrievalMetric(rerank_k=3, match=_match, chunk=4)
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        metric.update(video[lo:hi], text[lo:hi], ids[lo:hi], present[lo:hi], tokens[i], masks[i])
    got = metric.compute()
    expect = retrieval_scores(video, text, ids, present)
    width = max(widths)
    cat = {"video": video, "text": text, "sample_id": ids, "text_present": present}
    for m in ("video", "text"):
        cat[f"{m}_tokens"] = torch.cat([F.pad(t[m], (0, 0, 0, width - t[m].shape[1])) for t in tokens])
        cat[f"{m}_mask"] = torch.cat([F.pad(k[m], (0, width - k[m].shape[1])) for k in masks])
    expect.update(match_retrieval_scores(cat, _match, k=3))
    assert set(got) == set(expect) and any(k.endswith("_match") for k in got)
    for k, v in expect.items():
        assert float(got[k]) == pytest.approx(v, abs=1e-5), k
    metric.reset()
    plain = RetrievalMetric()
    plain.update(video, text, ids, torch.zeros(n, dtype=torch.bool))
    assert plain.compute() == {}  # no caption: nothing to score
    with pytest.raises(ValueError, match="needs a match function"):
        RetrievalMetric(rerank_k=2)


def test_zero_shot_metric_skips_labels_without_a_class_with_one_warning():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    video = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.2], [0.3, 1.0], [5.0, 5.1], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 0, -100, 7])  # as test_zero_shot_accuracy, plus a label 7 of 3 classes
    metric = ZeroShotAccuracy()
    with pytest.warns(UserWarning, match="labels up to 7 but only 3 classes"):
        metric.update(video[:3], classes, labels[:3] + torch.tensor([0, 0, 5]))  # 7 again: warned here
    metric.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per metric, not once per batch
        metric.update(video[:3], classes, labels[:3])
        metric.update(video[3:], classes, labels[3:])
    assert float(metric.compute()) == pytest.approx(75.0)  # the rows of zero_shot_accuracy's example
    assert float(metric.compute()) == pytest.approx(zero_shot_accuracy(video[:5], classes, labels[:5]))
    empty = ZeroShotAccuracy()
    empty.update(video, classes, torch.full((6,), -100))
    assert math.isnan(float(empty.compute()))


def test_class_prompts_from_templates_and_label_order():
    assert class_prompts_from() is None and class_prompts_from(label_names=["b", "a"]) is None
    assert class_prompts_from({"a": ["x"], "b": ["y", "z"]}, ["b", "a"]) == {"b": ["y", "z"], "a": ["x"]}
    assert class_prompts_from(zeroshot_classes=["up"], prompt_templates=["go {}", "{}!"]) == {
        "up": ["go up", "up!"]
    }
    with pytest.raises(ValueError, match="label_names"):
        class_prompts_from({"a": ["x"]}, ["a", "b"])
