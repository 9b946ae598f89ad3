"""Retrieval and zero-shot metrics for the contrastive stage (torch and torchmetrics, no Lightning).

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
* :func:`retrieval_scores` and :func:`match_retrieval_scores`: the official evaluation's numbers in
  both directions (T2V, V2T; ``_dsl`` and ``_match`` variants) from the embeddings of an epoch.
* :class:`RetrievalMetric` and :class:`ZeroShotAccuracy`: the same as torchmetrics ``Metric``s, so
  a stage updates them batch by batch and they are correct under DDP (their states gather through
  :func:`iv2_lightning.models.distributed.all_gather_rows`).
* :func:`class_prompts_from`: class names in label order → prompts, from prompt templates.

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

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from iv2_lightning.models.distributed import all_gather_rows

__all__ = [
    "RetrievalMetric",
    "ZeroShotAccuracy",
    "class_prompts_from",
    "dual_softmax",
    "expected_ranks",
    "match_retrieval_scores",
    "positives_from_ids",
    "rerank_top_k",
    "retrieval_metrics",
    "retrieval_scores",
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


# ------------------------------------------------------------------------- epoch-level scores

RANK_KEYS = ("r1", "r5", "r10", "medr", "meanr")
#: the modalities whose tokens the matching head re-ranks with (``rerank_k``)
MATCH_MODALITIES = ("video", "text", "audio")


def retrieval_scores(
    video_emb: torch.Tensor,
    text_emb: torch.Tensor,
    sample_ids: torch.Tensor,
    text_present: torch.Tensor | None = None,
) -> dict[str, float]:
    """T2V / V2T R@1/5/10, median and mean rank, with cosine and with dual-softmax scores.

    ``video_emb``/``text_emb [N, E]`` normalised, ``sample_ids [N]``; only texts with
    ``text_present`` are used. A candidate is a hit when it has the query's sample id. Keys:
    ``t2v_r1 ... v2t_meanr`` and the same with ``_dsl`` appended; empty when no text is present.
    """
    if text_present is None:
        text_present = torch.ones_like(sample_ids, dtype=torch.bool)
    out: dict[str, float] = {}
    if not bool(text_present.any()):
        return out
    t, t_ids = text_emb[text_present].float(), sample_ids[text_present]
    t2v = t @ video_emb.float().T
    pos_t2v = positives_from_ids(t_ids, sample_ids)
    for suffix, scores in (("", (t2v, t2v.T)), ("_dsl", (dual_softmax(t2v), dual_softmax(t2v.T)))):
        for name, sim, pos in (("t2v", scores[0], pos_t2v), ("v2t", scores[1], pos_t2v.T)):
            m = retrieval_metrics(sim, pos)
            for k in RANK_KEYS:
                out[f"{name}_{k}{suffix}"] = m[k]
    return out


MatchFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def match_retrieval_scores(
    cat: Mapping[str, torch.Tensor], match: MatchFn, k: int, chunk: int = 256
) -> dict[str, float]:
    """The official ``_match`` evaluation: T2V and V2T R@1/5/10, median and mean rank after each
    query's top ``k`` candidates by cosine are re-ranked by ``match(tokens, masks) -> [n]`` (the
    matching head's "match" logit of the fused pair: the video's tokens, with its audio's when the
    clips have audio, as VTM trained it, and the caption's).

    ``cat`` holds the epoch's ``video``/``text`` embeddings ``[N, E]``, ``sample_id``,
    ``text_present`` and per modality ``<m>_tokens [N, L, D]`` and ``<m>_mask [N, L]`` (``video``,
    ``text``, optionally ``audio``); keys end in ``_match``. Pairs are scored ``chunk`` at a time.
    """
    rows = cat["text_present"].nonzero().squeeze(1)
    if rows.numel() == 0:
        return {}
    sim = cat["text"][rows].float() @ cat["video"].float().T  # [Nt, Nv]
    positive = positives_from_ids(cat["sample_id"][rows], cat["sample_id"])
    with_audio = "audio_tokens" in cat and bool(cat["audio_mask"].any())

    def rescore(text_index: torch.Tensor, video_index: torch.Tensor) -> torch.Tensor:
        scores = []
        for i in range(0, text_index.numel(), chunk):
            t, v = rows[text_index[i : i + chunk]], video_index[i : i + chunk]
            tokens = {"video": cat["video_tokens"][v], "text": cat["text_tokens"][t]}
            masks = {"video": cat["video_mask"][v], "text": cat["text_mask"][t]}
            if with_audio:  # audio travels with its video, as in training
                tokens["audio"], masks["audio"] = cat["audio_tokens"][v], cat["audio_mask"][v]
            scores.append(match(tokens, masks).float())
        return torch.cat(scores)

    out: dict[str, float] = {}
    t2v = rerank_top_k(sim, k, rescore)
    v2t = rerank_top_k(sim.T, k, lambda r, c: rescore(c, r))
    for name, scores, pos in (("t2v", t2v, positive), ("v2t", v2t, positive.T)):
        m = retrieval_metrics(scores, pos)
        for key in RANK_KEYS:
            out[f"{name}_{key}_match"] = m[key]
    return out


def class_prompts_from(
    zeroshot_prompts: Mapping[str, Sequence[str]] | None = None,
    label_names: Sequence[str] | None = None,
    zeroshot_classes: Sequence[str] | None = None,
    prompt_templates: Sequence[str] | None = None,
) -> dict[str, list[str]] | None:
    """Class name → prompts, in label order, from explicit settings (None without prompts or classes).

    ``zeroshot_classes`` (class names in label order) are each put into every template of
    ``prompt_templates`` (``{}`` marks the name; default ``["{}"]``, the bare name) and replace
    ``zeroshot_prompts`` and ``label_names``; otherwise ``zeroshot_prompts`` in the order of
    ``label_names`` (default: the dict order).
    """
    prompts = zeroshot_prompts
    if zeroshot_classes is not None:
        templates = list(prompt_templates or ["{}"])
        if not zeroshot_classes or any("{}" not in t for t in templates):
            raise ValueError(
                "zeroshot_classes needs at least one class and prompt_templates that each hold '{}' for "
                f"the class name; got {zeroshot_classes}, {templates}"
            )
        prompts = {c: [t.replace("{}", c) for t in templates] for c in zeroshot_classes}
        label_names = list(zeroshot_classes)
    elif prompt_templates is not None:
        raise ValueError("prompt_templates needs zeroshot_classes (the class names to put into them)")
    if prompts is None:  # label_names alone order prompts that come later (from the data)
        return None
    names = list(prompts) if label_names is None else list(label_names)
    missing = [n for n in names if n not in prompts or not prompts[n]]
    if missing:
        raise ValueError(
            f"label_names {missing} have no prompts in zeroshot_prompts (classes: {list(prompts)})"
        )
    return {n: list(prompts[n]) for n in names}


# ------------------------------------------------------------------------- torchmetrics


def _unflatten(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of different lengths kept as one ``[sum(lengths), ...]`` tensor → ``[N, max, ...]``,
    zero-padded (row ``i`` holds ``lengths[i]`` consecutive entries of ``flat``)."""
    width = int(lengths.max()) if lengths.numel() else 0
    keep = torch.arange(width, device=flat.device)[None, :] < lengths.to(flat.device)[:, None]
    out = flat.new_zeros((lengths.shape[0], width, *flat.shape[1:]))
    out[keep] = flat
    return out


class RetrievalMetric(Metric):
    """Text-video retrieval over every clip an evaluation epoch saw (:func:`retrieval_scores`), and
    with ``rerank_k > 0`` the matching head's re-ranking (:func:`match_retrieval_scores`, which calls
    ``match``, e.g. :meth:`~iv2_lightning.models.aligner.VideoTextAligner.match_scores`).

    ``update(video, text, sample_id, text_present, tokens=None, masks=None)``: normalised embeddings
    ``[B, E]`` (``text`` rows without ``text_present`` are ignored) and, for re-ranking, the tokens
    and masks per modality (``video``, ``text``, ``audio``; token counts may differ between batches
    and ranks: each batch is kept as one flat ``[B * L, D]`` tensor with its rows' lengths, and
    padded to the longest at :meth:`compute`). States are lists concatenated over ranks
    (``dist_reduce_fx="cat"``), so the result is that of the whole evaluation set on every rank.
    ``compute`` returns a dict of 0-d tensors, empty when no text was present.
    """

    full_state_update = False

    def __init__(self, rerank_k: int = 0, match: MatchFn | None = None, chunk: int = 256, **kwargs) -> None:
        kwargs.setdefault("dist_sync_fn", all_gather_rows)
        super().__init__(**kwargs)
        if rerank_k < 0:
            raise ValueError(f"rerank_k must be >= 0; got {rerank_k}")
        if rerank_k > 0 and match is None:
            raise ValueError("rerank_k > 0 needs a match function (the matching head's scores)")
        self.rerank_k = rerank_k
        self.match = match
        self.chunk = chunk
        names = ["video", "text", "sample_id", "text_present"]
        if rerank_k > 0:
            names += [f"{m}_{part}" for m in MATCH_MODALITIES for part in ("tokens", "mask", "lengths")]
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        sample_id: torch.Tensor,
        text_present: torch.Tensor,
        tokens: Mapping[str, torch.Tensor] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.video.append(video.detach().float())
        self.text.append(text.detach().float())
        self.sample_id.append(sample_id.detach())
        self.text_present.append(text_present.detach().bool())
        if self.rerank_k <= 0:
            return
        if tokens is None or masks is None or not {"video", "text"} <= set(tokens):
            raise ValueError("RetrievalMetric(rerank_k > 0).update needs the video and text tokens and masks")
        for m, t in tokens.items():
            getattr(self, f"{m}_tokens").append(t.detach().flatten(0, 1))
            getattr(self, f"{m}_mask").append(masks[m].detach().bool().flatten())
            getattr(self, f"{m}_lengths").append(torch.full((t.shape[0],), t.shape[1], device=t.device))

    @staticmethod
    def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        # a list before a sync (one process), a tensor after; nothing kept: empty
        if isinstance(state, list):
            return torch.cat(state) if state else torch.empty(0)
        return state

    def compute(self) -> dict[str, torch.Tensor]:
        cat = {k: self._cat(getattr(self, k)) for k in ("video", "text", "sample_id", "text_present")}
        out = retrieval_scores(cat["video"], cat["text"], cat["sample_id"], cat["text_present"].bool())
        if self.rerank_k > 0 and out:
            for m in MATCH_MODALITIES:
                lengths = self._cat(getattr(self, f"{m}_lengths")).long()
                if lengths.numel() == 0:  # no audio kept (a model without audio)
                    continue
                cat[f"{m}_tokens"] = _unflatten(self._cat(getattr(self, f"{m}_tokens")), lengths)
                cat[f"{m}_mask"] = _unflatten(self._cat(getattr(self, f"{m}_mask")).bool(), lengths)
            out.update(match_retrieval_scores(cat, self.match, self.rerank_k, self.chunk))
        return {k: torch.tensor(v) for k, v in out.items()}


class ZeroShotAccuracy(Metric):
    """Top-1 zero-shot accuracy (percent) over an evaluation epoch (:func:`zero_shot_accuracy` batch
    by batch): ``update(video_emb [B, E], class_emb [C, E], labels [B])``. Rows without a label
    (negative) are left out, and so are rows whose label has no class (``>= C``: e.g. data labelled
    with more classes than the prompts name), with one warning. ``compute`` is NaN when no row counted.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("dist_sync_fn", all_gather_rows)
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self._warned = False

    def update(self, video_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(video_emb.device)
        beyond = labels >= class_emb.shape[0]
        if bool(beyond.any()) and not self._warned:
            self._warned = True
            warnings.warn(
                f"zero-shot accuracy: labels up to {int(labels.max())} but only {class_emb.shape[0]} classes "
                "have prompts; those rows are left out",
                stacklevel=2,
            )
        keep = (labels >= 0) & ~beyond
        if not bool(keep.any()):
            return
        v = F.normalize(video_emb[keep].float(), dim=-1)
        c = F.normalize(class_emb.float().to(v.device), dim=-1)
        pred = (v @ c.T).argmax(dim=1)
        self.correct += (pred == labels[keep]).sum().float()
        self.total += float(keep.sum())

    def compute(self) -> torch.Tensor:
        if float(self.total) == 0:
            return torch.tensor(float("nan"))
        return 100.0 * self.correct / self.total
