"""Sampling from a GPT: temperature, top-k, top-p, a seed, and streaming text as it is produced.

``cache`` chooses how past tokens are kept: "window" (the default: a ``SlidingWindowCache`` with attention sinks, by
default as long as the training context, so the model never sees a distance it was not trained on; fixed memory, for
unbounded streams), "full" (a pre-allocated ``KVCache``: every past token, exact, O(N) per token; text degrades once
it runs past the training context), or "none" (recompute the whole sequence for every token, O(N²) per token: the
yardstick the caches are tested against).

    >>> from selfattn.model import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=1, d_model=32))
    >>> len(generate(model, "def ", max_new_tokens=5, seed=0).encode()) >= 4
    True
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import torch
from torch import Tensor

from selfattn import decode
from selfattn.model import data

CACHES = ("full", "window", "none")
PREFILL_CHUNK = 1024  # prompt tokens per forward pass when filling a cache (bounds the N_q x N_k work per call)


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """logits (B, vocab) -> next tokens (B,). temperature 0 is greedy (argmax); top_k keeps the k likeliest tokens;
    top_p keeps the smallest set whose probability reaches p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always survives (before = 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_settings(*, max_new_tokens, temperature, top_k, top_p, cache, window=None, sinks=4) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if window is not None and cache != "window":
        raise ValueError(f"window={window} is only used with cache='window' (got cache={cache!r})")


@torch.inference_mode()
def stream_tokens(model, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, cache: str = "window",
                  window: int | None = None, sinks: int = 4, return_logits: bool = False) -> Iterator:
    """Yield ``max_new_tokens`` new tokens (B,) one at a time (with ``return_logits``: (tokens, logits (B, vocab)))
    after the prompt (B, T) of token ids. Memory stays fixed with cache="window" however long the stream runs."""
    check_settings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, cache=cache,
                   window=window, sinks=sinks)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be token ids of shape (B, T) with T >= 1, got {tuple(prompt.shape)}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        B, T = prompt.shape
        if cache == "none":
            tokens = prompt
            for _ in range(max_new_tokens):
                logits = model(tokens)[:, -1]  # (B, vocab): the whole sequence again
                nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                tokens = torch.cat((tokens, nxt[:, None]), dim=1)
                yield (nxt, logits) if return_logits else nxt
            return
        if cache == "full":
            caches = decode.new_caches(model, B, max_len=T + max_new_tokens)
        else:
            window = model.config.context - sinks if window is None else window
            caches = decode.new_caches(model, B, window=window, sinks=sinks)
        logits, start = None, 0
        while start < T:  # the prompt, in as large pieces as the caches take
            piece = prompt[:, start:start + min(PREFILL_CHUNK, caches[0].room())]
            logits = model(piece, caches=caches)[:, -1]
            start += piece.shape[1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            yield (nxt, logits) if return_logits else nxt
            if i + 1 < max_new_tokens:
                logits = model(nxt[:, None], caches=caches)[:, -1]
    finally:
        model.train(was_training)


def generate(model, prompt: str = "\n", max_new_tokens: int = 200, *, stream=None, **kwargs) -> str:
    """The text that follows ``prompt``. ``stream``, a callable taking a str (e.g. ``print`` with ``end=""``, or
    ``sys.stdout.write``), receives the text as it is produced; whole UTF-8 characters only. Keyword arguments as
    ``stream_tokens`` (temperature, top_k, top_p, seed, cache, window, sinks)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = data.encode(prompt or "\n")[None].to(next(model.parameters()).device)  # (1, T)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for token in stream_tokens(model, ids, max_new_tokens, **kwargs):
        text = utf8.decode(bytes([int(token[0])]))
        if text:
            pieces.append(text)
            if stream is not None:
                stream(text)
    tail = utf8.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        if stream is not None:
            stream(tail)
    return "".join(pieces)
