"""NextTokenStage: stage 3 of the InternVideo2 curriculum, next-token prediction on captions and dialogue.

InternVideo2 (arXiv 2403.15377, Sec. 3.3) ends its curriculum by connecting the video encoder to a
language model and training on video captions and video question answering with the usual
next-token loss; the official stage 3 is VideoChat2 (Li et al., "MVBench", CVPR 2024;
OpenGVLab/Ask-Anything): video features → a Q-Former (BLIP-2, Li et al. 2023) of learnable queries
→ a Linear into the LLM's embedding space → prepended to the text as a prefix. Here:

* video tokens (optionally fused with audio and ASR-speech tokens by the shared ``fusion`` module,
  so those modalities can inform the text) → :class:`~iv2_lightning.models.resampler.QueryResampler`
  → ``[B, num_queries, lm_dim]`` prefix;
* the language model is the built-in :class:`~iv2_lightning.models.heads.CausalDecoder` in prefix
  mode, a randomly initialised two-layer GPT-2 (``lm="gpt2-tiny"``, for tests), or any local
  Hugging Face causal LM folder fed with ``inputs_embeds = [prefix ; token embeddings]``;
* the loss is the next-token cross-entropy on caption tokens (after an optional ``prompt``) plus
  the one on the answer tokens of the question/answer turns (``dialogue_target_mask``), so the model
  is never trained to produce the questions;
* ``caption()`` and ``chat()`` decode greedily or with nucleus sampling; ``chat`` builds its prompt
  in exactly the ``"Q: {q} A:"`` / ``" {a}\\n"`` format of
  :class:`~iv2_lightning.data.batch.VideoCollate`, so inference sees what training saw;
* validation/test log the loss, teacher-forced token accuracy, and on the first
  ``val_generate_batches`` batches BLEU-4/BLEU-1, ROUGE-L and, for synthetic clips, whether the
  generated caption names the right colour, shape and direction. Every epoch aggregate is a
  torchmetrics state, so the numbers are exact across DDP ranks and every rank logs the same keys.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.data.synthetic import attributes_from_text
from iv2_lightning.models.fusion import CrossModalFusion
from iv2_lightning.models.heads import CausalDecoder, next_token_loss
from iv2_lightning.models.resampler import QueryResampler
from iv2_lightning.stages.base import BaseStage

log = logging.getLogger(__name__)

#: the built-in language model's defaults (``lm_config`` overrides them)
BUILTIN_LM_DEFAULTS: dict[str, Any] = {"dim": 256, "depth": 2, "num_heads": 4, "max_length": 256}
#: ``lm="gpt2-tiny"``: a randomly initialised GPT-2 this small (``lm_config`` overrides GPT2Config fields)
GPT2_TINY_DEFAULTS: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 2}
#: the attributes a synthetic caption must name for ``caption_attr_acc``
CAPTION_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "direction")
#: how many (clip, generated, reference) rows are written to TensorBoard per evaluation epoch
TEXT_SAMPLES = 4

_HF_HINT = "pip install 'iv2-lightning[hf]'"


# ------------------------------------------------------------------------------------------------
# prompt formats (shared by training data and inference)
# ------------------------------------------------------------------------------------------------


def dialogue_prompt_ids(
    tokenizer: Any, question: str, history: Sequence[tuple[str, str]] = (), bos_id: int | None = None
) -> list[int]:
    """Token ids of a dialogue up to the point where the model must answer ``question``.

    The format is :meth:`VideoCollate._dialogue`'s: BOS, then every past turn as
    ``encode("Q: {q} A:") + encode(" {a}\\n")``, then ``encode("Q: {question} A:")``; each piece is
    encoded on its own, as the collate does, so the ids match the training sequences exactly.
    """
    ids = [tokenizer.bos_id if bos_id is None else bos_id]
    for q, a in history:
        ids += tokenizer.encode(f"Q: {q} A:") + tokenizer.encode(f" {a}\n")
    return ids + tokenizer.encode(f"Q: {question} A:")


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------


class _Ratio(Metric):
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
    # a stage that fuses audio/speech is also scored on the video alone (what the sound adds)
    "caption_attr_acc_video_only",
    *(f"caption_{a}_acc_video_only" for a in CAPTION_ATTRIBUTES),
    "generated",  # den counts generated captions with a reference (gates the BLEU computation)
)


def _eval_metrics() -> nn.ModuleDict:
    metrics: dict[str, Metric] = {k: _Ratio() for k in _RATIO_KEYS}
    # BLEU's states are fixed-size count tensors, so a rank that generated nothing still syncs
    metrics["bleu"] = BLEUScore(n_gram=4)
    metrics["bleu1"] = BLEUScore(n_gram=1)
    return nn.ModuleDict(metrics)


@dataclass
class _Losses:
    loss: torch.Tensor
    caption_loss: torch.Tensor | None = None
    dialogue_loss: torch.Tensor | None = None
    caption_correct: torch.Tensor | None = None
    caption_total: torch.Tensor | None = None
    answer_correct: torch.Tensor | None = None
    answer_total: torch.Tensor | None = None


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability reaches ``top_p``."""
    probs = logits.float().softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    pick = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


def _import_transformers():
    try:
        import transformers  # optional: only the Hugging Face language models need it
    except ImportError as err:
        raise ImportError(
            f"lm='gpt2-tiny' and local Hugging Face language models need transformers: {_HF_HINT}"
        ) from err
    return transformers


def _clip_name(meta: dict[str, Any], sample_id: int) -> str:
    if meta.get("path"):
        return str(meta["path"])
    if "index" in meta:
        return f"{meta.get('split', 'clip')}:{meta['index']}"
    return str(sample_id)


# ------------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------------


class NextTokenStage(BaseStage):
    """Stage 3: video (+ audio, speech) → Q-Former queries → language model prefix; next-token loss.

    ``lm``: ``"builtin"`` (:class:`CausalDecoder` over the tokenizer's vocabulary, prefix mode;
    ``lm_config`` overrides ``dim``, ``depth``, ``num_heads``, ``max_length``, ``mlp_ratio``),
    ``"gpt2-tiny"`` (a random two-layer GPT-2, no download; ``lm_config`` overrides GPT2Config fields)
    or a local Hugging Face causal-LM folder (``lm_config`` goes to ``from_pretrained``; set
    ``tokenizer`` to the same folder so the ids match the LM's vocabulary).
    ``num_queries``/``resampler_depth``: the Q-Former's size; ``resampler`` overrides its ``dim``,
    ``num_heads``, ``mlp_ratio``. ``use_audio``/``use_speech``: fuse audio / ASR tokens into the
    video tokens with ``fusion`` before the resampler (``text``, ``audio``, ``fusion`` configure
    those modules; ``init_from`` a stage-2 export fills them). ``prompt``: text put between BOS and
    the caption, in training and in :meth:`caption` (not counted by the loss).
    ``val_generate_batches``: how many validation/test batches also decode captions for BLEU,
    ROUGE-L and attribute accuracy (decoding is slow). ``pooled_token``: put the encoder's pooled clip
    embedding (the attention pool that stage 2 aligns with text), projected to the LM width, in
    front of the resampler's queries, so the prefix is ``num_queries + 1`` tokens (ClipCap's prefix
    next to BLIP-2's Q-Former); it carries stage 2's alignment into stage 3 directly, which matters
    when stage 2 froze the trunk and what it learned lives in the pool.
    """

    stage_name = "stage3"

    def __init__(
        self,
        lm: str = "builtin",
        lm_config: dict[str, Any] | None = None,
        num_queries: int = 16,
        resampler_depth: int = 1,
        resampler: dict[str, Any] | None = None,
        use_audio: bool = False,
        use_speech: bool = False,
        text: dict[str, Any] | None = None,
        audio: dict[str, Any] | None = None,
        fusion: dict[str, Any] | None = None,
        caption_weight: float = 1.0,
        dialogue_weight: float = 1.0,
        label_smoothing: float = 0.0,
        max_new_tokens: int = 40,
        val_generate_batches: int = 2,
        prompt: str = "",
        pooled_token: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if caption_weight < 0 or dialogue_weight < 0 or caption_weight + dialogue_weight <= 0:
            raise ValueError(
                f"caption_weight and dialogue_weight must be >= 0 and not both 0; got {caption_weight}, {dialogue_weight}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if val_generate_batches < 0:
            raise ValueError(f"val_generate_batches must be >= 0; got {val_generate_batches}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        self.lm_name = lm
        self.use_audio = use_audio
        self.use_speech = use_speech
        self.caption_weight = caption_weight
        self.dialogue_weight = dialogue_weight
        self.label_smoothing = label_smoothing
        self.max_new_tokens = max_new_tokens
        self.val_generate_batches = val_generate_batches
        self.prompt = prompt

        tok = self.tokenizer
        # tokenizers without a BOS (GPT-2's) start and end sequences with their EOS, as GPT-2 does
        self.bos_id: int = tok.bos_id if tok.bos_id is not None else tok.eos_id
        self.eos_id: int = tok.eos_id if tok.eos_id is not None else tok.bos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_name!r} has neither a BOS/CLS nor an EOS/SEP token")
        self.prompt_ids: list[int] = tok.encode(prompt) if prompt else []

        # -- modules: the shared ones under their shared names, then the stage's own ------------
        self.video_encoder = self.build_video_encoder()
        context_dim = self.video_encoder.embed_dim
        if use_audio:
            self.audio_encoder = self.build_audio_encoder(audio)
        if use_speech:
            self.text_encoder = self.build_text_encoder(text)
        if use_audio or use_speech:
            dims = {"video": context_dim}
            if use_audio:
                dims["audio"] = self.audio_encoder.embed_dim
            if use_speech:
                dims["speech"] = self.text_encoder.embed_dim
            self.fusion = CrossModalFusion(dims, **(fusion or {}))
            context_dim = self.fusion.dim
        elif text or audio or fusion:
            log.warning("stage3: text/audio/fusion configs are ignored without use_audio or use_speech")

        self.lm, lm_dim = self._build_lm(lm, lm_config)
        self.lm_dim = lm_dim
        self.resampler = QueryResampler(
            context_dim, lm_dim, num_queries=num_queries, depth=resampler_depth, **(resampler or {})
        )
        self.pooled_proj = nn.Linear(self.video_encoder.embed_out_dim, lm_dim) if pooled_token else None
        self.prefix_length = num_queries + int(pooled_token)
        limit = self.max_text_length()
        if limit is not None and 1 + len(self.prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"1 (BOS) + {len(self.prompt_ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                f"language model's {limit} text positions; lower max_new_tokens or raise lm_config.max_length"
            )

        self.eval_metrics = nn.ModuleDict({"val": _eval_metrics(), "test": _eval_metrics()})
        self._text_samples: dict[str, list[tuple[str, str, str]]] = {"val": [], "test": []}
        self.finish_init()

    # -- construction ------------------------------------------------------------------------------

    def _build_lm(self, lm: str, config: dict[str, Any] | None) -> tuple[nn.Module, int]:
        tok = self.tokenizer
        config = dict(config or {})
        if lm == "builtin":
            valid = set(inspect.signature(CausalDecoder.__init__).parameters) - {"self"}
            fixed = {"vocab_size", "mode", "pad_id", "memory_dim"}
            bad = sorted(set(config) - (valid - fixed))
            if bad:
                raise ValueError(
                    f"lm_config keys {bad} are not CausalDecoder overrides; valid: {sorted(valid - fixed)}"
                )
            cfg = {**BUILTIN_LM_DEFAULTS, **config}
            decoder = CausalDecoder(
                vocab_size=tok.vocab_size, mode="prefix", pad_id=tok.pad_id, memory_dim=cfg["dim"], **cfg
            )
            return decoder, cfg["dim"]
        transformers = _import_transformers()
        if lm == "gpt2-tiny":
            cfg = {**GPT2_TINY_DEFAULTS, **config}
            gpt2_config = transformers.GPT2Config(
                vocab_size=tok.vocab_size,
                bos_token_id=self.bos_id,
                eos_token_id=self.eos_id,
                pad_token_id=tok.pad_id,
                **cfg,
            )
            model = transformers.GPT2LMHeadModel(gpt2_config)
        else:
            if not os.path.isdir(lm) or not os.path.isfile(os.path.join(lm, "config.json")):
                raise FileNotFoundError(
                    f"lm {lm!r} is not 'builtin', 'gpt2-tiny' or a local Hugging Face model folder with a "
                    "config.json; iv2_lightning never downloads models at run time: download it once "
                    "(e.g. `huggingface-cli download <repo> --local-dir <folder>`) and pass that folder"
                )
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(lm, local_files_only=True, **config)
            except (OSError, ValueError) as err:
                raise ValueError(f"could not load a causal language model from {lm!r}: {err}") from err
        rows = model.get_input_embeddings().num_embeddings
        if tok.vocab_size > rows:
            raise ValueError(
                f"tokenizer {self.tokenizer_name!r} has {tok.vocab_size} ids but the language model's embedding "
                f"has {rows} rows; use the LM's own tokenizer (tokenizer: <the LM folder>)"
            )
        return model, model.get_input_embeddings().embedding_dim

    @property
    def builtin_lm(self) -> bool:
        return isinstance(self.lm, CausalDecoder)

    def max_text_length(self) -> int | None:
        """How many text tokens (after the prefix) the language model can take, or None if unbounded."""
        if self.builtin_lm:
            return self.lm.max_length
        positions = getattr(self.lm.config, "max_position_embeddings", None)
        return None if positions is None else positions - self.prefix_length

    # -- the model -----------------------------------------------------------------------------------

    def visual_prefix(
        self,
        video: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_frame_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` (+ audio fbank / speech ids when the stage uses them) → the
        language model prefix ``[B, prefix_length, lm_dim]`` (``num_queries``, + 1 with ``pooled_token``)."""
        if video.dim() != 5:
            raise ValueError(f"video must be [B, 3, T, H, W]; got {tuple(video.shape)}")
        out = self.video_encoder(video)
        tokens = out.tokens
        mask = None
        if self.use_audio or self.use_speech:
            toks: dict[str, torch.Tensor] = {"video": tokens}
            masks: dict[str, torch.Tensor] = {}
            present: dict[str, torch.Tensor] = {}
            if self.use_audio and audio is not None:
                a = self.audio_encoder(audio, audio_frame_mask)
                toks["audio"], masks["audio"] = a.tokens, a.mask
                present["audio"] = audio_mask if audio_mask is not None else a.mask.new_ones(a.mask.shape[0])
            if self.use_speech and speech_ids is not None:
                s_mask = speech_ids != self.tokenizer.pad_id if speech_mask is None else speech_mask.bool()
                s = self.text_encoder(speech_ids, s_mask, token_type=1)  # type 1 = speech (ASR)
                toks["speech"], masks["speech"] = s.tokens, s_mask
                present["speech"] = s_mask.any(dim=1)
            fused = self.fusion(toks, masks, present)
            tokens, mask = fused.fused, fused.fused_mask
        prefix = self.resampler(tokens, mask)
        if self.pooled_proj is not None:
            prefix = torch.cat([self.pooled_proj(out.pooled)[:, None].to(prefix.dtype), prefix], dim=1)
        return prefix

    def batch_prefix(self, batch: VideoBatch) -> torch.Tensor:
        return self.visual_prefix(
            batch.video,
            audio=batch.audio,
            audio_frame_mask=batch.audio_frame_mask,
            audio_mask=batch.audio_mask,
            speech_ids=batch.speech_ids,
            speech_mask=batch.speech_mask,
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """The language model prefix of ``video [B, 3, T, H, W]``: ``[B, prefix_length, lm_dim]``."""
        return self.visual_prefix(video)

    def lm_logits(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, L, V]`` at the text positions of ``[prefix ; ids]`` (``mask``: True = real token)."""
        if self.builtin_lm:
            return self.lm(ids, mask, memory=prefix)
        q = prefix.shape[1]
        embeds = self.lm.get_input_embeddings()(ids)
        inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        attention = None
        if mask is not None:
            attention = torch.cat([mask.new_ones(prefix.shape[:2]), mask], dim=1).long()
        return self.lm(inputs_embeds=inputs, attention_mask=attention).logits[:, q:]

    # -- losses --------------------------------------------------------------------------------------

    def caption_sequences(self, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(ids, mask, target)`` ``[B, L]`` for the caption loss: ``BOS + prompt + caption + EOS``,
        ``target`` True on the caption tokens and EOS. None when the batch has no captions.

        The collate's ids are used as they are when they already have that form (the built-in
        tokenizer, no prompt); otherwise rows are rebuilt, adding BOS/EOS where a tokenizer does not
        (GPT-2's) so that every caption ends, and :meth:`caption` knows where to start.
        """
        if batch.caption_ids is None or batch.caption_mask is None:
            return None
        ids, mask = batch.caption_ids, batch.caption_mask.bool()
        lengths = mask.sum(dim=1)
        has = lengths > 0
        last = ids.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
        well_formed = bool(
            (~has | ((ids[:, 0] == self.bos_id) & (last == self.eos_id) & (lengths >= 2))).all()
        )
        if not self.prompt_ids and well_formed:
            return ids, mask, mask
        rows, targets = [], []
        for row, row_mask in zip(ids.tolist(), mask.tolist()):
            body = [i for i, m in zip(row, row_mask) if m]
            if not body:
                rows.append([self.bos_id])
                targets.append([False])
                continue
            if body[0] == self.bos_id:
                body = body[1:]
            if body and body[-1] == self.eos_id:
                body = body[:-1]
            head = [self.bos_id, *self.prompt_ids]
            rows.append([*head, *body, self.eos_id])
            targets.append([False] * len(head) + [True] * (len(body) + 1))
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long, device=ids.device)
        out_mask = torch.zeros(len(rows), width, dtype=torch.bool, device=ids.device)
        out_target = torch.zeros_like(out_mask)
        for i, (r, t) in enumerate(zip(rows, targets)):
            out[i, : len(r)] = torch.tensor(r, device=ids.device)
            out_mask[i, : len(r)] = True
            out_target[i, : len(t)] = torch.tensor(t, device=ids.device)
        return out, out_mask, out_target

    def _sequence_loss(
        self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.lm_logits(prefix, ids, mask)
        loss = next_token_loss(logits, ids, target, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            counted = target[:, 1:].bool()
            correct = ((logits[:, :-1].argmax(dim=-1) == ids[:, 1:]) & counted).sum()
        return loss, correct, counted.sum()

    def _losses(self, batch: VideoBatch, prefix: torch.Tensor | None = None) -> _Losses:
        captions = self.caption_sequences(batch) if self.caption_weight > 0 else None
        dialogue = (
            (batch.dialogue_ids, batch.dialogue_mask, batch.dialogue_target_mask)
            if self.dialogue_weight > 0 and batch.dialogue_ids is not None
            else None
        )
        if captions is None and dialogue is None:
            raise ValueError(
                "NextTokenStage got a batch with neither captions nor dialogue turns (with a non-zero weight); "
                "the DataModule's modalities must include 'caption' and/or 'qa'"
            )
        prefix = self.batch_prefix(batch) if prefix is None else prefix
        out = _Losses(loss=prefix.new_zeros(()))
        if captions is not None:
            out.caption_loss, out.caption_correct, out.caption_total = self._sequence_loss(prefix, *captions)
            out.loss = out.loss + self.caption_weight * out.caption_loss
        if dialogue is not None:
            ids, mask, target = dialogue
            out.dialogue_loss, out.answer_correct, out.answer_total = self._sequence_loss(
                prefix, ids, mask.bool(), target.bool()
            )
            out.loss = out.loss + self.dialogue_weight * out.dialogue_loss
        return out

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        """``loss`` = caption_weight · caption loss + dialogue_weight · answer loss; ``token_acc`` is the
        teacher-forced next-token accuracy on caption tokens (on answer tokens when the batch has no
        captions), ``answer_acc`` the one on answer tokens."""
        parts = self._losses(batch)
        out: dict[str, torch.Tensor] = {"loss": parts.loss}
        if parts.caption_loss is not None:
            out["caption_loss"] = parts.caption_loss.detach()
        if parts.dialogue_loss is not None:
            out["dialogue_loss"] = parts.dialogue_loss.detach()
            out["answer_acc"] = parts.answer_correct / parts.answer_total.clamp_min(1)
        if parts.caption_total is not None and bool(parts.caption_total > 0):
            out["token_acc"] = parts.caption_correct / parts.caption_total
        elif parts.answer_total is not None:
            out["token_acc"] = parts.answer_correct / parts.answer_total.clamp_min(1)
        return out

    # -- decoding ------------------------------------------------------------------------------------

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no autograd, restoring every submodule's own mode afterwards (frozen parts stay in eval)."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _check_length(self, num_tokens: int, what: str) -> None:
        limit = self.max_text_length()
        if limit is not None and num_tokens > limit:
            raise ValueError(
                f"{what}: {num_tokens} text tokens exceed the language model's {limit} positions; "
                "use fewer max_new_tokens, a shorter history or a longer lm_config.max_length"
            )

    def _hf_step(self, prefix, ids, cache):
        """Next-token logits of a Hugging Face LM, reusing its key/value cache between steps."""
        params = inspect.signature(self.lm.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache``; speak whichever this version knows
        cache_kw = "cache" if "cache" in params else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        if cache is None:
            embeds = self.lm.get_input_embeddings()(ids)
            inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
            out = self.lm(inputs_embeds=inputs, use_cache=True, **extra)
        else:
            total = prefix.shape[1] + ids.shape[1]
            attention = torch.ones(ids.shape[0], total, dtype=torch.long, device=ids.device)
            out = self.lm(
                inputs_embeds=self.lm.get_input_embeddings()(ids[:, -1:]),
                attention_mask=attention,
                use_cache=True,
                **{cache_kw: cache},
                **extra,
            )
        return out.logits[:, -1], out.get(cache_kw)

    @torch.no_grad()
    def decode(
        self,
        prefix: torch.Tensor,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        top_p: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        stop_text: str | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """The new token ids for every row of ``prefix [B, Q, lm_dim]`` after the shared ``prompt_ids``;
        greedy when ``top_p`` is None, else nucleus sampling at ``temperature``. A row stops at EOS
        (not returned) or, with ``stop_text``, once its decoded text contains it."""
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self._check_length(len(prompt_ids) + max_new_tokens, "decode")
        b = prefix.shape[0]
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=prefix.device)[None].repeat(b, 1)
        done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
        new: list[list[int]] = [[] for _ in range(b)]
        cache = None
        for _ in range(max_new_tokens):
            if self.builtin_lm:
                logits = self.lm(ids, None, memory=prefix)[:, -1]
            elif use_cache:
                logits, cache = self._hf_step(prefix, ids, cache)
            else:
                logits = self.lm_logits(prefix, ids)[:, -1]
            logits = logits[:, : self.tokenizer.vocab_size]  # an LM's spare embedding rows are no tokens
            if top_p is None:
                nxt = logits.argmax(dim=-1)
            else:
                nxt = _nucleus(logits.float() / temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, self.tokenizer.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            stopped = nxt == self.eos_id
            for i, token in enumerate(nxt.tolist()):
                if done[i] or stopped[i]:
                    continue
                new[i].append(token)
                if stop_text is not None and stop_text in self.tokenizer.decode(new[i]):
                    stopped[i] = True
            done = done | stopped
            if bool(done.all()):
                break
        return new

    def _prefix_of(self, video: torch.Tensor | VideoBatch) -> torch.Tensor:
        """The LM prefix of a video tensor ``[B, 3, T, H, W]`` or of a batch (with its audio/speech)."""
        if isinstance(video, VideoBatch):
            return self.batch_prefix(video.to(self.device))
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be [B, 3, T, H, W] or a VideoBatch; got {shape}")
        return self.visual_prefix(video.to(self.device))

    def caption(
        self,
        video: torch.Tensor | VideoBatch,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Captions of ``video [B, 3, T, H, W]`` (or of a :class:`VideoBatch`, whose audio/speech the
        stage then fuses); greedy when ``top_p`` is None, else nucleus sampling (seed with
        ``torch.manual_seed`` or pass a ``generator`` for reproducible samples)."""
        with self._inference():
            prefix = self._prefix_of(video)
            rows = self.decode(
                prefix,
                [self.bos_id, *self.prompt_ids],
                max_new_tokens or self.max_new_tokens,
                top_p=top_p,
                temperature=temperature,
                generator=generator,
            )
        return [self.tokenizer.decode(r).strip() for r in rows]

    def chat(
        self,
        video: torch.Tensor | VideoBatch,
        question: str,
        history: list[tuple[str, str]] | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """Answer ``question`` about one clip (``[3, T, H, W]``, ``[1, 3, T, H, W]`` or a one-clip batch)
        after the earlier ``(question, answer)`` turns in ``history``. The prompt is the training
        format (:func:`dialogue_prompt_ids`); the answer ends at the newline that closes a turn.
        When the dialogue does not fit the LM, the oldest turns are dropped."""
        if isinstance(video, torch.Tensor) and video.dim() == 4:
            video = video[None]
        if len(video) != 1:
            raise ValueError(f"chat takes one clip; got a batch of {len(video)}")
        max_new = max_new_tokens or self.max_new_tokens
        turns = list(history or [])
        ids = dialogue_prompt_ids(self.tokenizer, question, turns, bos_id=self.bos_id)
        limit = self.max_text_length()
        while turns and limit is not None and len(ids) + max_new > limit:
            turns = turns[1:]
            ids = dialogue_prompt_ids(self.tokenizer, question, turns, bos_id=self.bos_id)
        with self._inference():
            prefix = self._prefix_of(video)
            new = self.decode(
                prefix,
                ids,
                max_new,
                top_p=top_p,
                temperature=temperature,
                generator=generator,
                stop_text="\n",
            )[0]
        return self.tokenizer.decode(new).split("\n", 1)[0].strip()

    # -- evaluation ----------------------------------------------------------------------------------

    def validation_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test")

    def predict_step(
        self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, str]]:
        captions = self.caption(batch)
        names = [
            _clip_name(m, int(s)) for m, s in zip(batch.meta or [{}] * len(batch), batch.sample_id.tolist())
        ]
        return [{"clip": n, "caption": c} for n, c in zip(names, captions)]

    def on_validation_epoch_start(self) -> None:
        self._text_samples["val"] = []

    def on_test_epoch_start(self) -> None:
        self._text_samples["test"] = []

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _eval_step(self, batch: VideoBatch, batch_idx: int, split: str) -> None:
        metrics = self.eval_metrics[split]
        prefix = self.batch_prefix(batch)
        parts = self._losses(batch, prefix)
        n = len(batch)
        metrics["loss"].update(parts.loss * n, n)
        if parts.caption_loss is not None:
            weight = parts.caption_total
            metrics["caption_loss"].update(parts.caption_loss * weight, weight)
            metrics["token_acc"].update(parts.caption_correct, parts.caption_total)
        if parts.dialogue_loss is not None:
            weight = parts.answer_total
            metrics["dialogue_loss"].update(parts.dialogue_loss * weight, weight)
            metrics["answer_acc"].update(parts.answer_correct, parts.answer_total)
        if batch_idx < self.val_generate_batches:
            self._generation_metrics(batch, prefix, split)
            if self.use_audio or self.use_speech:
                self._generation_metrics(batch, self.visual_prefix(batch.video), split, suffix="_video_only")

    def _generation_metrics(
        self, batch: VideoBatch, prefix: torch.Tensor, split: str, suffix: str = ""
    ) -> None:
        """Greedy captions from ``prefix`` scored against the references (BLEU, ROUGE-L, text samples)
        and the clips' attributes; with a ``suffix`` only the attribute accuracies, under that suffix."""
        metrics = self.eval_metrics[split]
        rows = self.decode(prefix, [self.bos_id, *self.prompt_ids], self.max_new_tokens)
        generated = [self.tokenizer.decode(r).strip() for r in rows]
        has_caption = batch.present("caption").tolist()
        preds = [g for g, h in zip(generated, has_caption) if h]
        refs = [c for c, h in zip(batch.captions, has_caption) if h]
        if preds and not suffix:
            metrics["bleu"].update(preds, [[r] for r in refs])
            metrics["bleu1"].update(preds, [[r] for r in refs])
            rouge = rouge_score(preds, refs, rouge_keys="rougeL")["rougeL_fmeasure"]
            metrics["rouge_l"].update(rouge * len(preds), len(preds))
            metrics["generated"].update(len(preds), len(preds))

        metas = batch.meta or [{} for _ in generated]
        truth = [m.get("attributes") for m in metas]
        scored = [
            (g, t)
            for g, t in zip(generated, truth)
            if isinstance(t, dict) and all(a in t for a in CAPTION_ATTRIBUTES)
        ]
        if scored:
            found = [attributes_from_text(g) for g, _ in scored]
            per = {a: [f.get(a) == t[a] for f, (_, t) in zip(found, scored)] for a in CAPTION_ATTRIBUTES}
            for a, ok in per.items():
                metrics[f"caption_{a}_acc{suffix}"].update(sum(ok), len(ok))
            metrics[f"caption_attr_acc{suffix}"].update(sum(all(x) for x in zip(*per.values())), len(scored))
        if suffix:
            return
        samples = self._text_samples[split]
        for i in range(len(generated)):
            if len(samples) >= TEXT_SAMPLES:
                break
            meta = metas[i] if i < len(metas) else {}
            samples.append((_clip_name(meta, int(batch.sample_id[i])), generated[i], batch.captions[i]))

    def _log_epoch(self, split: str) -> None:
        metrics = self.eval_metrics[split]
        values: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            # a metric nobody updated this epoch is expected (no dialogue, no attributes, ...)
            warnings.filterwarnings("ignore", message=".*compute.*called before the.*update.*")
            for key in _RATIO_KEYS:
                values[key] = metrics[key].compute()  # a collective under DDP: every rank runs it
            if values["generated"].isfinite():
                values["bleu"] = metrics["bleu"].compute()
                values["bleu1"] = metrics["bleu1"].compute()
        del values["generated"]
        for key, value in values.items():
            if math.isfinite(float(value)):
                # already reduced over ranks by torchmetrics, so identical everywhere; sync_dist only
                # keeps Lightning's epoch-level bookkeeping uniform across ranks
                self.log(f"{split}/{key}", value, prog_bar=key == "loss", sync_dist=True)
        for metric in metrics.values():
            metric.reset()
        self._write_text_samples(split)

    def _write_text_samples(self, split: str) -> None:
        samples = self._text_samples[split]
        if (
            not samples
            or self._trainer is None
            or self.trainer.sanity_checking
            or not self.trainer.is_global_zero
        ):
            return

        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        table = "| clip | generated | reference |\n|---|---|---|\n" + "\n".join(
            f"| {cell(n)} | {cell(g)} | {cell(r)} |" for n, g, r in samples
        )
        for logger in self.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(f"{split}/captions", table, global_step=self.global_step)
