"""Retrieval and zero-shot metrics for the contrastive stage (pure torch, no Lightning).

* :func:`retrieval_metrics`: R@1/5/10, median and mean rank of a similarity matrix with any number
  of positives per query, the protocol of the InternVideo2 zero-shot retrieval evaluation
  (arXiv 2403.15377, Sec. 4.2; MSR-VTT, DiDeMo, ...): a query is a hit at ``k`` when any of its
  positives is among its ``k`` best candidates, and its rank is the rank of its best positive.
* :func:`dual_softmax`: the official evaluation's ``_dsl`` rescoring,
  ``sim * softmax(sim, dim=0)`` (dual softmax loss inference, Cheng et al. 2021, "Improving
  Video-Text Retrieval by Multi-Stream Corpus Alignment and Dual Softmax Loss").
* :func:`rerank_top_k`: the official evaluation's ``_match`` scores: each query's top ``k``
  candidates rescored by another model (the matching head), ranked above all the others.
* :func:`zero_shot_accuracy`: CLIP-style zero-shot classification against class embeddings (the
  mean of the prompt embeddings of each class, Radford et al. 2021).

Ties. Ranks are the *expected* ranks under a uniformly random order of tied candidates, and hits are
expected hits (McSherry & Najork 2008, "Computing information retrieval performance measures
efficiently in the presence of tied scores"). For a query whose best positive scores ``s``, let
``h`` be the number of candidates scoring strictly more than ``s`` (all negatives), and ``p`` and
``n`` the number of positives and negatives scoring exactly ``s``. Then

    rank  = 1 + h + n / (p + 1)
    hit@k = 0                               if k <= h
          = 1 - C(n, m) / C(n + p, m)       with m = k - h, otherwise

(``C(n, m) / C(n + p, m)`` is the chance that the first ``m`` tied candidates are all negatives;
it is 0 when ``m > n``). With one tied positive the rank is the average of the optimistic and the
pessimistic rank. The rule is deterministic, does not depend on candidate order, and gives a
degenerate model that scores everything equally exactly the chance level instead of the best or
the worst possible result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "dual_softmax",
    "expected_ranks",
    "positives_from_ids",
    "rerank_top_k",
    "retrieval_metrics",
    "zero_shot_accuracy",
]

RECALL_AT = (1, 5, 10)


def _check_pair(sim: torch.Tensor, positive: torch.Tensor) -> None:
    if sim.dim() != 2:
        raise ValueError(f"sim must be [Nq, Nc]; got shape {tuple(sim.shape)}")
    if positive.shape != sim.shape:
        raise ValueError(
            f"positive must be a bool [Nq, Nc] = {tuple(sim.shape)}; got {tuple(positive.shape)}"
        )
    if positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool tensor; got dtype {positive.dtype}")


def positives_from_ids(query_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """``[Nq, Nc]`` bool: candidate ``j`` is a positive of query ``i`` when their ids are equal."""
    if query_ids.dim() != 1 or candidate_ids.dim() != 1:
        raise ValueError(
            f"query_ids and candidate_ids must be 1-D; got {tuple(query_ids.shape)} and {tuple(candidate_ids.shape)}"
        )
    return query_ids[:, None] == candidate_ids.to(query_ids.device)[None, :]


def _tie_counts(sim: torch.Tensor, positive: torch.Tensor):
    """(h, p, n) per query as float tensors (see the module docstring), for queries with a positive."""
    sim = sim.double()
    best = sim.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
    higher = (sim > best).sum(dim=1)
    tied = sim == best
    tied_pos = (tied & positive).sum(dim=1)
    tied_neg = (tied & ~positive).sum(dim=1)
    return higher.double(), tied_pos.double(), tied_neg.double()


def expected_ranks(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``[Nq]`` expected 1-based rank of each query's best positive (ties: module docstring).

    Queries without any positive get ``nan``.
    """
    _check_pair(sim, positive)
    h, p, n = _tie_counts(sim, positive)
    ranks = 1.0 + h + n / (p + 1.0)
    return torch.where(positive.any(dim=1), ranks, torch.full_like(ranks, float("nan")))


def _expected_hits(h: torch.Tensor, p: torch.Tensor, n: torch.Tensor, k: int) -> torch.Tensor:
    """Probability that the best positive lands in the top ``k`` under random tie-breaking."""
    m = (k - h).clamp_min(0)
    # C(n, m) / C(n + p, m) = prod_{i < m} (n - i) / (n + p - i); m <= k, so k factors suffice
    miss = torch.ones_like(h)
    for i in range(k):
        factor = ((n - i).clamp_min(0) / (n + p - i).clamp_min(1)).clamp(0, 1)
        miss = torch.where(m > i, miss * factor, miss)
    return torch.where(m > 0, 1.0 - miss, torch.zeros_like(miss))


def retrieval_metrics(
    sim: torch.Tensor, positive: torch.Tensor, recall_at: tuple[int, ...] = RECALL_AT
) -> dict[str, float]:
    """Recall@k (percent), median and mean rank of ``sim [Nq, Nc]`` (higher = better match).

    ``positive [Nq, Nc]`` bool marks each query's correct candidates (several allowed). Queries
    without any positive are left out; ``num_queries`` says how many were scored. Returns
    ``{"r1", "r5", "r10", "medr", "meanr", "num_queries"}`` (one ``r<k>`` per ``recall_at``), all
    Python floats; ``medr`` is the median of the expected ranks (the mean of the two middle ones
    for an even count, as ``numpy.median``).
    """
    _check_pair(sim, positive)
    keep = positive.any(dim=1)
    if not bool(keep.any()):
        raise ValueError("retrieval_metrics: no query has a positive candidate")
    sim, positive = sim[keep], positive[keep]
    h, p, n = _tie_counts(sim, positive)
    ranks = 1.0 + h + n / (p + 1.0)
    out = {f"r{k}": 100.0 * float(_expected_hits(h, p, n, k).mean()) for k in recall_at}
    out["medr"] = float(torch.quantile(ranks, 0.5))
    out["meanr"] = float(ranks.mean())
    out["num_queries"] = float(sim.shape[0])
    return out


def dual_softmax(sim: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The official InternVideo2 ``_dsl`` scores: ``sim * softmax(sim / temperature, dim=0)``.

    ``sim`` is ``[Nq, Nc]`` with queries as rows; the softmax runs over ``dim=0``, i.e. over the
    *queries*, for each candidate column: a candidate that is close to many queries (a "hub") has
    its score to each of them shrunk. Ranking then runs along each row as usual. The official code
    applies it to the cosine similarities with temperature 1 (``i2t * i2t.softmax(dim=0)`` and
    ``i2t.T * i2t.T.softmax(dim=0)``), which is the default here.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [Nq, Nc]; got shape {tuple(sim.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    sim = sim.float()
    return sim * (sim / temperature).softmax(dim=0)


def rerank_top_k(
    sim: torch.Tensor, k: int, rescore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``[Nq, Nc]`` scores after re-ranking each query's ``k`` best candidates by ``rescore``.

    ``rescore(rows, cols)`` gets two ``[n]`` index tensors (query ``rows[i]`` with candidate
    ``cols[i]``) and returns ``[n]`` new scores (the official ``_match``: the matching head's
    "match" logit of the fused pair, for the top 128 by cosine). The top ``k`` of each row rank
    above every other candidate of the row, in the order of their new scores; the others keep their
    order by ``sim`` below them (the official code gives them all -100, a tie that the tie rule of
    this module would rank at its average: keeping the cosine order only makes ranks past ``k``
    meaningful, R@n for n <= k is the same). A tie in ``sim`` at the k-th place is broken by
    ``torch.topk``.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [Nq, Nc]; got shape {tuple(sim.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    nq, nc = sim.shape
    k = min(k, nc)
    sim = sim.float()
    top = sim.topk(k, dim=1).indices  # [Nq, k]
    rows = torch.arange(nq, device=sim.device).repeat_interleave(k)
    new = rescore(rows, top.reshape(-1)).float()
    if new.shape != (nq * k,) or not bool(torch.isfinite(new).all()):
        raise ValueError("rerank_top_k: rescore must return one finite score per (row, col) pair")
    new = new.reshape(nq, k)
    floor = new.min() - 1.0 - (sim.max() - sim.min())
    out = sim - sim.max() + floor  # every candidate now scores at most floor < every new score
    return out.scatter(1, top, new)


def zero_shot_accuracy(video_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (percent) of nearest-class-embedding classification.

    ``video_emb [N, E]``, ``class_text_emb [C, E]`` (the normalised mean of each class's prompt
    embeddings), ``labels [N]`` class indices; rows with a negative label (``-100`` = unlabelled)
    are left out. Both sides are L2-normalised here, so the prediction is the class of highest
    cosine similarity (the first such class on an exact tie).
    """
    if video_emb.dim() != 2 or class_text_emb.dim() != 2 or video_emb.shape[1] != class_text_emb.shape[1]:
        raise ValueError(
            f"video_emb [N, E] and class_text_emb [C, E] must share E; got {tuple(video_emb.shape)} and "
            f"{tuple(class_text_emb.shape)}"
        )
    if tuple(labels.shape) != (video_emb.shape[0],):
        raise ValueError(f"labels must be [N] = ({video_emb.shape[0]},); got {tuple(labels.shape)}")
    labelled = labels >= 0
    if not bool(labelled.any()):
        raise ValueError("zero_shot_accuracy: no row has a label")
    if int(labels.max()) >= class_text_emb.shape[0]:
        raise ValueError(
            f"labels go up to {int(labels.max())} but there are only {class_text_emb.shape[0]} class embeddings"
        )
    v = F.normalize(video_emb[labelled].float(), dim=-1)
    c = F.normalize(class_text_emb.float().to(v.device), dim=-1)
    pred = (v @ c.T).argmax(dim=1)
    return 100.0 * float((pred == labels[labelled].to(pred.device)).float().mean())
