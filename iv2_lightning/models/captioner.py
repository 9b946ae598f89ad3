"""VideoCaptioner: InternVideo2's stage 3 as a plain PyTorch model, video → language model prefix → text.

InternVideo2 (arXiv 2403.15377, Sec. 3.3) ends its curriculum by connecting the video encoder to a
language model and training on video captions and video question answering with the usual
next-token loss; the official stage 3 is VideoChat2 (Li et al., "MVBench", CVPR 2024;
OpenGVLab/Ask-Anything): video features → a Q-Former (BLIP-2, Li et al. 2023) of learnable queries
→ a Linear into the LLM's embedding space → prepended to the text as a prefix. Here:

* video tokens (optionally fused with audio and ASR-speech tokens by the shared ``fusion`` module,
  so those modalities can inform the text) → :class:`~iv2_lightning.models.resampler.QueryResampler`
  → ``[B, num_queries, lm_dim]`` prefix, optionally led by the encoder's pooled clip embedding
  (``pooled_token``: ClipCap's prefix next to BLIP-2's Q-Former);
* the language model is the built-in :class:`~iv2_lightning.models.heads.CausalDecoder` in prefix
  mode, a randomly initialised two-layer GPT-2 (``lm="gpt2-tiny"``, for tests), or any local
  Hugging Face causal LM folder fed with ``inputs_embeds = [prefix ; token embeddings]``;
* :meth:`VideoCaptioner.forward` returns the next-token cross-entropy on caption tokens (after an
  optional ``prompt``) and on the answer tokens of question/answer turns (``dialogue_target_mask``),
  so the model is never trained to produce the questions, as a :class:`CaptionerOutput`;
* :meth:`~VideoCaptioner.caption` and :meth:`~VideoCaptioner.chat` decode greedily or with nucleus
  sampling (:mod:`~iv2_lightning.models.generation`); ``chat`` builds its prompt in exactly the
  ``"Q: {q} A:"`` / ``" {a}\\n"`` format of the data's collate (:func:`dialogue_prompt_ids`), so
  inference sees what training saw.

The model takes tensors (or, for ``caption``/``chat``, any object with the fields of
:class:`ClipInputs`, such as a ``VideoBatch``), so it runs in a plain PyTorch loop; the Lightning
shell is :class:`~iv2_lightning.stages.next_token.NextTokenStage` (anomalib's ``torch_model.py`` next
to its ``lightning_model.py``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from iv2_lightning.models.fusion import CrossModalFusion
from iv2_lightning.models.generation import StepFn, check_sampling, generate_tokens, hf_prefix_step
from iv2_lightning.models.heads import CausalDecoder, next_token_loss
from iv2_lightning.models.resampler import QueryResampler

#: the built-in language model's defaults (``lm_config`` overrides them)
BUILTIN_LM_DEFAULTS: dict[str, Any] = {"dim": 256, "depth": 2, "num_heads": 4, "max_length": 256}
#: ``lm="gpt2-tiny"``: a randomly initialised GPT-2 this small (``lm_config`` overrides GPT2Config fields)
GPT2_TINY_DEFAULTS: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 2}
#: the optional inputs the prefix reads besides the video (``VideoBatch`` field names)
PREFIX_FIELDS = ("audio", "audio_frame_mask", "audio_mask", "speech_ids", "speech_mask")
#: the text inputs of the losses (``VideoBatch`` field names)
TEXT_FIELDS = ("caption_ids", "caption_mask", "dialogue_ids", "dialogue_mask", "dialogue_target_mask")
#: every keyword of :meth:`VideoCaptioner.forward` that a batch provides
INPUT_FIELDS = ("video", *TEXT_FIELDS, *PREFIX_FIELDS)

_HF_HINT = "pip install 'iv2-lightning[hf]'"


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


class ClipInputs(Protocol):
    """Clips as :meth:`VideoCaptioner.caption` and :meth:`~VideoCaptioner.chat` read them besides a
    plain video tensor (``VideoBatch`` is one): the video and what the fusion may add to it."""

    video: torch.Tensor
    audio: torch.Tensor | None
    audio_frame_mask: torch.Tensor | None
    audio_mask: torch.Tensor | None
    speech_ids: torch.Tensor | None
    speech_mask: torch.Tensor | None


class CaptionerOutput(NamedTuple):
    """What :meth:`VideoCaptioner.forward` returns (a NamedTuple, so DeepSpeed ZeRO-3 sees its tensors).

    ``loss = caption_weight · caption_loss + dialogue_weight · dialogue_loss`` over the terms the
    inputs allow; a term the inputs lack (or whose weight is 0) leaves its fields None. ``*_correct``
    / ``*_total``: how many of the counted next tokens the teacher-forced argmax gets right, and how
    many were counted (caption tokens + EOS; answer tokens).
    """

    loss: torch.Tensor
    caption_loss: torch.Tensor | None = None
    dialogue_loss: torch.Tensor | None = None
    caption_correct: torch.Tensor | None = None
    caption_total: torch.Tensor | None = None
    answer_correct: torch.Tensor | None = None
    answer_total: torch.Tensor | None = None


def _import_transformers():
    try:
        import transformers  # optional: only the Hugging Face language models need it
    except ImportError as err:
        raise ImportError(
            f"lm='gpt2-tiny' and local Hugging Face language models need transformers: {_HF_HINT}"
        ) from err
    return transformers


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "path", type(tokenizer).__name__))


def build_language_model(
    lm: str, config: dict[str, Any] | None, tokenizer: Any, bos_id: int, eos_id: int
) -> tuple[nn.Module, int]:
    """The language model ``lm`` names and its width: ``"builtin"`` (a prefix-mode
    :class:`CausalDecoder` over the tokenizer's vocabulary; ``config`` overrides its arguments),
    ``"gpt2-tiny"`` (``config`` overrides GPT2Config fields) or a local Hugging Face causal-LM folder
    (``config`` goes to ``from_pretrained``). Never downloads."""
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
            vocab_size=tokenizer.vocab_size,
            mode="prefix",
            pad_id=tokenizer.pad_id,
            memory_dim=cfg["dim"],
            **cfg,
        )
        return decoder, cfg["dim"]
    transformers = _import_transformers()
    if lm == "gpt2-tiny":
        cfg = {**GPT2_TINY_DEFAULTS, **config}
        gpt2_config = transformers.GPT2Config(
            vocab_size=tokenizer.vocab_size,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_id,
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
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"tokenizer {_tokenizer_name(tokenizer)!r} has {tokenizer.vocab_size} ids but the language "
            f"model's embedding has {rows} rows; use the LM's own tokenizer (tokenizer: <the LM folder>)"
        )
    return model, model.get_input_embeddings().embedding_dim


def _check_settings(
    caption_weight: float, dialogue_weight: float, max_new_tokens: int, label_smoothing: float
) -> None:
    if caption_weight < 0 or dialogue_weight < 0 or caption_weight + dialogue_weight <= 0:
        raise ValueError(
            f"caption_weight and dialogue_weight must be >= 0 and not both 0; got {caption_weight}, {dialogue_weight}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}")


class VideoCaptioner(nn.Module):
    """Video (+ audio, speech) → Q-Former queries → language model prefix; next-token losses, decoding.

    ``video_encoder`` (and the optional ``audio_encoder``/``text_encoder``, whose tokens the
    :class:`CrossModalFusion` configured by ``fusion`` joins to the video's) keep the shared names,
    so stage-2 weights load by name. ``tokenizer``: the ids of the captions (a ``ByteTokenizer`` or
    ``HFTokenizer``); tokenizers without a BOS (GPT-2's) start and end sequences with their EOS.
    ``lm``/``lm_config``: see :func:`build_language_model`. ``num_queries``/``resampler_depth``:
    the Q-Former's size; ``resampler`` overrides its ``dim``, ``num_heads``, ``mlp_ratio``.
    ``pooled_token``: put the encoder's pooled clip embedding (the attention pool that stage 2 aligns
    with text), projected to the LM width, in front of the queries, so the prefix is
    ``num_queries + 1`` tokens. ``prompt``: text between BOS and the caption, in training and in
    :meth:`caption` (not counted by the loss). ``max_new_tokens``: the default length of generations.
    """

    def __init__(
        self,
        video_encoder: nn.Module,
        tokenizer: Any,
        lm: str = "builtin",
        lm_config: dict[str, Any] | None = None,
        num_queries: int = 16,
        resampler_depth: int = 1,
        resampler: dict[str, Any] | None = None,
        audio_encoder: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        fusion: dict[str, Any] | None = None,
        pooled_token: bool = False,
        prompt: str = "",
        max_new_tokens: int = 40,
        caption_weight: float = 1.0,
        dialogue_weight: float = 1.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        _check_settings(caption_weight, dialogue_weight, max_new_tokens, label_smoothing)
        self.tokenizer = tokenizer
        self.bos_id: int = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        self.eos_id: int = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(
                f"tokenizer {_tokenizer_name(tokenizer)!r} has neither a BOS/CLS nor an EOS/SEP token"
            )
        self.prompt_ids: list[int] = tokenizer.encode(prompt) if prompt else []
        self.caption_weight = caption_weight
        self.dialogue_weight = dialogue_weight
        self.label_smoothing = label_smoothing
        self.max_new_tokens = max_new_tokens

        # registration order = construction order of the stage before the split, so a seed gives
        # the same initial weights and the state dict keeps its order
        self.video_encoder = video_encoder
        context_dim = video_encoder.embed_dim
        dims = {"video": context_dim}
        if audio_encoder is not None:
            self.audio_encoder = audio_encoder
            dims["audio"] = audio_encoder.embed_dim
        if text_encoder is not None:
            self.text_encoder = text_encoder
            dims["speech"] = text_encoder.embed_dim
        if len(dims) > 1:
            self.fusion = CrossModalFusion(dims, **(fusion or {}))
            context_dim = self.fusion.dim
        self.lm, self.lm_dim = build_language_model(lm, lm_config, tokenizer, self.bos_id, self.eos_id)
        self.resampler = QueryResampler(
            context_dim, self.lm_dim, num_queries=num_queries, depth=resampler_depth, **(resampler or {})
        )
        self.pooled_proj = nn.Linear(video_encoder.embed_out_dim, self.lm_dim) if pooled_token else None
        self.prefix_length = num_queries + int(pooled_token)
        limit = self.max_text_length()
        if limit is not None and 1 + len(self.prompt_ids) + max_new_tokens > limit:
            raise ValueError(
                f"1 (BOS) + {len(self.prompt_ids)} prompt tokens + max_new_tokens {max_new_tokens} exceed the "
                f"language model's {limit} text positions; lower max_new_tokens or raise lm_config.max_length"
            )

    # -- what the model is -------------------------------------------------------------------------

    @property
    def use_audio(self) -> bool:
        return "audio_encoder" in self._modules

    @property
    def use_speech(self) -> bool:
        return "text_encoder" in self._modules

    @property
    def builtin_lm(self) -> bool:
        return isinstance(self.lm, CausalDecoder)

    @property
    def device(self) -> torch.device:
        return self.resampler.query.device

    def max_text_length(self) -> int | None:
        """How many text tokens (after the prefix) the language model can take, or None if unbounded."""
        if self.builtin_lm:
            return self.lm.max_length
        positions = getattr(self.lm.config, "max_position_embeddings", None)
        return None if positions is None else positions - self.prefix_length

    # -- the prefix and the language model ---------------------------------------------------------

    def visual_prefix(
        self,
        video: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_frame_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` (+ audio fbank / speech ids when the model fuses them; absent ones
        are gated off) → the language model prefix ``[B, prefix_length, lm_dim]``."""
        if video.dim() != 5:
            raise ValueError(f"video must be [B, 3, T, H, W]; got {tuple(video.shape)}")
        out = self.video_encoder(video)
        tokens, mask = out.tokens, None
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

    def prefix_of(self, clips: torch.Tensor | ClipInputs) -> torch.Tensor:
        """The prefix of a video tensor ``[B, 3, T, H, W]`` or of clips with audio/speech fields (a
        ``VideoBatch``), moved to the model's device."""
        device = self.device
        if isinstance(clips, torch.Tensor):
            if clips.dim() != 5:
                raise ValueError(f"video must be [B, 3, T, H, W] or a VideoBatch; got {tuple(clips.shape)}")
            return self.visual_prefix(clips.to(device))
        if not isinstance(getattr(clips, "video", None), torch.Tensor):
            raise ValueError(f"video must be [B, 3, T, H, W] or a VideoBatch; got {type(clips).__name__}")
        extra = {f: getattr(clips, f, None) for f in PREFIX_FIELDS}
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        return self.visual_prefix(clips.video.to(device), **extra)

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

    # -- losses ------------------------------------------------------------------------------------

    def caption_sequences(
        self, caption_ids: torch.Tensor | None, caption_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(ids, mask, target)`` ``[B, L]`` for the caption loss: ``BOS + prompt + caption + EOS``,
        ``target`` True on the caption tokens and EOS. None without captions.

        The collate's ids are used as they are when they already have that form (the built-in
        tokenizer, no prompt); otherwise rows are rebuilt, adding BOS/EOS where a tokenizer does not
        (GPT-2's) so that every caption ends, and :meth:`caption` knows where to start.
        """
        if caption_ids is None or caption_mask is None:
            return None
        ids, mask = caption_ids, caption_mask.bool()
        lengths = mask.sum(dim=1)
        has = lengths > 0
        last = ids.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
        well_formed = bool(
            (~has | ((ids[:, 0] == self.bos_id) & (last == self.eos_id) & (lengths >= 2))).all()
        )
        if not self.prompt_ids and well_formed:
            return ids, mask, mask
        head = [self.bos_id, *self.prompt_ids]
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

    def forward(
        self,
        video: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        dialogue_ids: torch.Tensor | None = None,
        dialogue_mask: torch.Tensor | None = None,
        dialogue_target_mask: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_frame_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """The next-token losses of a batch: on the caption tokens (``caption_ids``/``caption_mask``
        from the collate) and on the answer tokens of the dialogue turns (``dialogue_target_mask``).
        ``prefix``: a prefix already computed from these clips (it is then not recomputed)."""
        captions = self.caption_sequences(caption_ids, caption_mask) if self.caption_weight > 0 else None
        dialogue = None
        if self.dialogue_weight > 0 and dialogue_ids is not None:
            dialogue = (dialogue_ids, dialogue_mask.bool(), dialogue_target_mask.bool())
        if captions is None and dialogue is None:
            raise ValueError(
                "VideoCaptioner got a batch with neither captions nor dialogue turns (with a non-zero "
                "weight); the DataModule's modalities must include 'caption' and/or 'qa'"
            )
        if prefix is None:
            prefix = self.visual_prefix(video, audio, audio_frame_mask, audio_mask, speech_ids, speech_mask)
        loss = prefix.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if captions is not None:
            caption_loss, terms["caption_correct"], terms["caption_total"] = self._sequence_loss(
                prefix, *captions
            )
            loss = loss + self.caption_weight * caption_loss
            terms["caption_loss"] = caption_loss
        if dialogue is not None:
            dialogue_loss, terms["answer_correct"], terms["answer_total"] = self._sequence_loss(
                prefix, *dialogue
            )
            loss = loss + self.dialogue_weight * dialogue_loss
            terms["dialogue_loss"] = dialogue_loss
        return CaptionerOutput(loss=loss, **terms)

    # -- decoding ----------------------------------------------------------------------------------

    @contextmanager
    def inference(self) -> Iterator[None]:
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

    def _step(self, prefix: torch.Tensor, use_cache: bool) -> StepFn:
        """The next-token logits over the tokenizer's ids (an LM's spare embedding rows are no tokens)."""
        vocab = self.tokenizer.vocab_size
        if not self.builtin_lm and use_cache:
            return hf_prefix_step(self.lm, prefix, vocab)
        if self.builtin_lm:
            return lambda ids, state: (self.lm(ids, None, memory=prefix)[:, -1, :vocab], None)
        return lambda ids, state: (self.lm_logits(prefix, ids)[:, -1, :vocab], None)

    @torch.no_grad()
    def generate(
        self,
        prefix: torch.Tensor,
        prompt_ids: Sequence[int],
        max_new_tokens: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        stop_text: str | None = None,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """The new token ids for every row of ``prefix [B, Q, lm_dim]`` after the shared ``prompt_ids``;
        greedy when ``top_p`` is None, else nucleus sampling at ``temperature``. A row stops at EOS
        (not returned) or, with ``stop_text``, once its decoded text contains it. ``use_cache``: a
        Hugging Face LM reuses its key/value cache (the built-in LM reruns the prefix; it is small)."""
        check_sampling(top_p, temperature)
        max_new = max_new_tokens or self.max_new_tokens
        self._check_length(len(prompt_ids) + max_new, "generate")
        prompt = torch.tensor(list(prompt_ids), dtype=torch.long, device=prefix.device)[None]
        stop = None if stop_text is None else (lambda tokens: stop_text in self.tokenizer.decode(tokens))
        out = generate_tokens(
            self._step(prefix, use_cache),
            prompt.repeat(prefix.shape[0], 1),
            max_new,
            eos_id=self.eos_id,
            pad_id=self.tokenizer.pad_id,
            top_p=top_p,
            temperature=temperature,
            generator=generator,
            stop=stop,
        )
        return out.new_tokens(prompt.shape[1])

    def captions_of_prefix(self, prefix: torch.Tensor, **sampling: Any) -> list[str]:
        """The caption of every row of ``prefix`` (``sampling``: the options of :meth:`generate`)."""
        rows = self.generate(prefix, [self.bos_id, *self.prompt_ids], **sampling)
        return [self.tokenizer.decode(r).strip() for r in rows]

    def caption(
        self,
        clips: torch.Tensor | ClipInputs,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[str]:
        """Captions of ``clips`` (a video ``[B, 3, T, H, W]``, or a ``VideoBatch`` whose audio/speech the
        model then fuses); greedy when ``top_p`` is None, else nucleus sampling (seed with
        ``torch.manual_seed`` or pass a ``generator`` for reproducible samples)."""
        with self.inference():
            prefix = self.prefix_of(clips)
            return self.captions_of_prefix(
                prefix,
                max_new_tokens=max_new_tokens,
                top_p=top_p,
                temperature=temperature,
                generator=generator,
            )

    def chat(
        self,
        clips: torch.Tensor | ClipInputs,
        question: str,
        history: Sequence[tuple[str, str]] | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        """Answer ``question`` about one clip (``[3, T, H, W]``, ``[1, 3, T, H, W]`` or a one-clip batch)
        after the earlier ``(question, answer)`` turns in ``history``. The prompt is the training
        format (:func:`dialogue_prompt_ids`); the answer ends at the newline that closes a turn.
        When the dialogue does not fit the LM, the oldest turns are dropped."""
        if isinstance(clips, torch.Tensor) and clips.dim() == 4:
            clips = clips[None]
        n = len(clips) if isinstance(clips, torch.Tensor) else len(clips.video)
        if n != 1:
            raise ValueError(f"chat takes one clip; got a batch of {n}")
        max_new = max_new_tokens or self.max_new_tokens
        turns = list(history or [])
        ids = dialogue_prompt_ids(self.tokenizer, question, turns, bos_id=self.bos_id)
        limit = self.max_text_length()
        while turns and limit is not None and len(ids) + max_new > limit:
            turns = turns[1:]
            ids = dialogue_prompt_ids(self.tokenizer, question, turns, bos_id=self.bos_id)
        with self.inference():
            prefix = self.prefix_of(clips)
            new = self.generate(
                prefix,
                ids,
                max_new,
                top_p=top_p,
                temperature=temperature,
                generator=generator,
                stop_text="\n",
            )[0]
        return self.tokenizer.decode(new).split("\n", 1)[0].strip()
