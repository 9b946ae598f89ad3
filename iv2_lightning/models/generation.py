"""Token-by-token decoding for every language model of the package: one sampler, one loop.

InternVideo2's stage 3 (arXiv 2403.15377, Sec. 3.3) produces captions and answers by decoding a
language model one token at a time. Greedy decoding and nucleus (top-p) sampling (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration") are implemented here once:

* :func:`nucleus_sample` draws one token per row from the smallest set of tokens whose probability
  reaches ``top_p`` (after dividing the logits by ``temperature``);
* :func:`generate_tokens` is the decoding loop. It knows nothing about the model: a *step* function
  maps the ids so far (and a state it may keep, such as a key/value cache) to the next-token logits,
  the split Hugging Face's ``generate`` makes between the model's forward and its decoding strategy.
  The built-in :class:`~iv2_lightning.models.heads.CausalDecoder` and the captioner's Hugging Face
  language models both decode through it;
* :func:`hf_prefix_step` is the step of a Hugging Face causal LM fed with ``inputs_embeds = [prefix ;
  token embeddings]``, reusing its key/value cache between steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

#: ``step(ids [B, L], state) -> (next-token logits [B, V], new state)``; ``state`` is None at first
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]


class Generation(NamedTuple):
    """What :func:`generate_tokens` returns.

    ``ids [B, P + n]``: the prompt, then the new tokens; a row that ended at the end token keeps it
    and is filled with the pad id after it. ``lengths [B]``: how many new tokens each row produced,
    the end token not counted (a row stopped by ``stop`` counts the token that stopped it).
    """

    ids: torch.Tensor
    lengths: torch.Tensor

    def new_tokens(self, prompt_length: int) -> list[list[int]]:
        """The new token ids of every row (without the end token)."""
        return [
            row[prompt_length : prompt_length + n] for row, n in zip(self.ids.tolist(), self.lengths.tolist())
        ]


def check_sampling(top_p: float | None, temperature: float) -> None:
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def nucleus_sample(
    logits: torch.Tensor,
    top_p: float,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, drawn from the smallest set of tokens whose probability
    (of ``softmax(logits / temperature)``) reaches ``top_p``; the most likely token always stays."""
    check_sampling(top_p, temperature)
    probs = (logits.float() / temperature).softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    pick = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    step: StepFn,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_id: int,
    pad_id: int,
    top_p: float | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stop: Callable[[Sequence[int]], bool] | None = None,
) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt [B, P]``: greedy when ``top_p`` is None, else
    nucleus sampling at ``temperature`` (pass a seeded ``generator`` for reproducible samples).

    A row ends at ``eos_id`` or, with ``stop``, once ``stop(its new tokens)`` is true; decoding ends
    when every row has ended. Ended rows receive ``pad_id``.
    """
    check_sampling(top_p, temperature)
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [B, P] token ids; got {tuple(prompt.shape)}")
    start = prompt.shape[1]
    ids = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    lengths = torch.zeros(prompt.shape[0], dtype=torch.long, device=prompt.device)
    state = None
    for _ in range(max_new_tokens):
        logits, state = step(ids, state)
        if top_p is None:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = nucleus_sample(logits, top_p, temperature, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        stopped = nxt == eos_id
        live = ~done & ~stopped
        lengths += live.long()
        if stop is not None:
            for i in live.nonzero().flatten().tolist():
                if stop(ids[i, start : start + int(lengths[i])].tolist()):
                    stopped[i] = True
        done = done | stopped
        if bool(done.all()):
            break
    return Generation(ids, lengths)


def hf_prefix_step(lm: nn.Module, prefix: torch.Tensor, vocab_size: int | None = None) -> StepFn:
    """The decoding step of a Hugging Face causal LM whose input is ``[prefix ; embeddings of ids]``:
    the first call runs the whole input, later calls only the newest token against the key/value
    cache. ``vocab_size`` cuts the logits to the tokenizer's ids (an LM's spare rows are no tokens)."""
    params = inspect.signature(lm.forward).parameters
    # transformers renamed ``past_key_values`` to ``cache``; speak whichever this version knows
    cache_kw = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    embed = lm.get_input_embeddings()

    def step(ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        if cache is None:
            embeds = embed(ids)
            inputs = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
            out = lm(inputs_embeds=inputs, use_cache=True, **extra)
        else:
            total = prefix.shape[1] + ids.shape[1]
            attention = torch.ones(ids.shape[0], total, dtype=torch.long, device=ids.device)
            out = lm(
                inputs_embeds=embed(ids[:, -1:]),
                attention_mask=attention,
                use_cache=True,
                **{cache_kw: cache},
                **extra,
            )
        return out.logits[:, -1, :vocab_size], out.get(cache_kw)

    return step
