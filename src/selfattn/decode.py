"""Decoding with a KV cache: keys and values of past tokens are kept, so each new token costs one query against the
cache (O(N) per token) instead of recomputing the whole sequence (O(N²)).

Two caches, one per layer, both with the interface ``MultiHeadAttention`` expects (``length``, ``update(k, v)``) and
an ``attend`` that picks the decoding attention:

* ``KVCache`` — pre-allocated (B, H_kv, max_len, D) buffers; exact, bounded by ``max_len``.
* ``SlidingWindowCache`` — for unbounded streams: the first ``sinks`` tokens (attention sinks) plus the most recent
  ``window`` tokens, in fixed memory (StreamingLLM, Xiao et al. 2023). Positions inside the cache are kept
  contiguous, as StreamingLLM does: recent keys keep their rotary angle, and the sink keys are re-rotated each step to
  sit just before the oldest recent key, so no query ever sees a distance larger than ``sinks + window``::

      stream  0 1 2 3 ... 90 91 92 93 94 95        sinks=2, window=4, new token at 95
      cache  [0 1]        [92 93 94 95]            sinks act as if they were at 90, 91

One query against a long cache is computed by split-KV (flash-decoding): the cache is cut into chunks that become
extra batch entries of one backend call (``forward_block`` of a backend with ``supports_blocks``, chosen by the
registry, so a GPU backend plugs in), and the partial results are merged by their log-sum-exp (``merge_by_lse``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattn import backends, masks, score_mods
from selfattn.api import attention, make_call

SPLIT_MIN_KEYS = 1024  # below this a single call is as fast as splitting
CHUNK = 512  # keys per split-KV chunk


def split_kv_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, chunk: int = CHUNK,
                       backend: str | None = None, score_mod=None, sinks: Tensor | None = None) -> Tensor:
    """softmax(q·kᵀ·scale)·v with every key visible to every query, the keys cut into chunks of ``chunk``.

    q (B, H_q, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v) -> (B, H_q, N_q, D_v) in q's dtype. Made for
    N_q = 1 (a decoding step); exact for any N_q. The last chunk is zero-padded and its padding masked out.
    ``score_mod`` sees the true positions (query at N_k − N_q + i, keys 0..N_k−1) and batch indices; ``sinks`` (H_q,)
    join the softmax after the chunks are merged.

    >>> q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3000, 8), torch.randn(1, 2, 3000, 8)
    >>> torch.allclose(split_kv_attention(q, k, v), attention(q, k, v), atol=1e-6)
    True
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"split_kv_attention: chunk must be a positive int number of keys, got {chunk!r}")
    whole = make_call(q, k, v, scale=scale, score_mod=score_mod, sinks=sinks)  # validates shapes and dtypes
    B, H_q, N_q, D = q.shape
    H_kv, N_k, D_v = k.shape[1], k.shape[2], v.shape[3]
    if N_k == 0:
        return q.new_zeros(B, H_q, N_q, D_v)
    P = math.ceil(N_k / chunk)
    mod = None if whole.score_mod is None else _chunked(whole.score_mod, P, chunk, N_k - chunk)
    pad = P * chunk - N_k
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    kc = k.unflatten(2, (P, chunk)).transpose(1, 2).reshape(B * P, H_kv, chunk, D)  # (B·P, H_kv, C, D)
    vc = v.unflatten(2, (P, chunk)).transpose(1, 2).reshape(B * P, H_kv, chunk, D_v)  # (B·P, H_kv, C, D_v)
    qc = q[:, None].expand(B, P, H_q, N_q, D).reshape(B * P, H_q, N_q, D)  # (B·P, H_q, N_q, D)
    mask = None
    if pad:
        lengths = torch.full((B, P), chunk, dtype=torch.long)
        lengths[:, -1] = chunk - pad
        mask = masks.key_padding(lengths.flatten().to(q.device))
    call = make_call(qc, kc, vc, scale=whole.scale, mask=mask, score_mod=mod)
    out, lse = choose_block_backend(call, backend).forward_block(call)  # (B·P, H_q, N_q, D_v), (B·P, H_q, N_q)
    out = out.view(B, P, H_q, N_q, D_v)
    lse = lse.view(B, P, H_q, N_q)
    merged, lse = backends.merge_by_lse(list(out.unbind(1)), list(lse.unbind(1)))
    if whole.sinks is not None:
        merged, _ = score_mods.add_sinks(merged, lse, whole.sinks)
    return merged.to(q.dtype)


def _chunked(mod: score_mods.ScoreMod, P: int, chunk: int, shift: int) -> score_mods.ScoreMod:
    """``mod`` as seen from chunk c of batch element b (batch index b·P + c of the chunked call): the true batch
    index, query positions moved by ``shift`` = N_k − chunk, key positions by c·chunk."""
    return score_mods.ScoreMod(lambda s, b, h, q, k: mod.score_mod(s, b // P, h, q + shift, k + (b % P) * chunk),
                               mod.name, None, mod.captures)


def choose_block_backend(call, name: str | None = None):
    """The first registered backend (in priority order) that computes blocks (``supports_blocks``) and can serve
    ``call``; a named one must do both. The error lists every backend and why not."""
    if name is not None:
        chosen = backends.choose(call, name)
        if not chosen.supports_blocks:
            able = [n for n, b in backends.REGISTRY.items() if b.supports_blocks]
            raise backends.BackendError(f"backend {name!r} cannot compute blocks (supports_blocks=False); split-KV "
                                        f"decoding needs one of {able}, or backend=None to choose")
        return chosen
    why = {}
    for n, b in backends.REGISTRY.items():
        reasons = ([] if b.supports_blocks else ["does not compute blocks"]) + (b.not_supported_reasons(call)
                                                                                or b.auto_reasons(call))
        if not reasons:
            return b
        why[n] = reasons
    raise backends.BackendError(f"no backend can compute split-KV blocks for {call.describe()}:\n"
                                + "\n".join(f"  {n}: {'; '.join(r)}" for n, r in why.items()))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, mask=None, backend=None,
                     **extra) -> Tensor:
    """The attention a cache runs: split-KV for a single query against many keys, the ordinary call otherwise.

    A single query (N_q = 1) with bottom-right causal alignment sees every cached key, so no mask is needed.
    ``extra`` are ``score_mod``, ``sinks`` (both served by split-KV) and dropout (which needs the ordinary call)."""
    if q.shape[2] == 1 and mask is None and k.shape[2] >= SPLIT_MIN_KEYS and not extra.get("dropout_p"):
        return split_kv_attention(q, k, v, backend=backend, score_mod=extra.get("score_mod"),
                                  sinks=extra.get("sinks"))
    return attention(q, k, v, causal=causal, mask=mask, backend=backend, **extra)


def _check_kv(k: Tensor, v: Tensor, like: Tensor) -> None:
    if k.shape[:2] != like.shape[:2] or k.shape[3] != like.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"cache holds (B, H_kv, ·, D) = {tuple(like.shape[:2])}, {like.shape[3]}, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}; make one cache per layer with matching sizes")


class KVCache:
    """A pre-allocated cache for one attention layer: keys (B, H_kv, max_len, D), values (B, H_kv, max_len, D_v).

    >>> cache = KVCache(1, 2, max_len=16, d_head=8)
    >>> k_all, v_all = cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    >>> cache.length, tuple(k_all.shape)
    (3, (1, 2, 3, 8))
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, d_head: int, d_v: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("max_len", max_len), ("d_head", d_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        d_v = d_head if d_v is None else d_v
        self.k = torch.zeros(batch, n_kv_heads, max_len, d_head, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_kv_heads, max_len, d_v, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens held; also the position of the next token

    def room(self) -> int:
        """How many tokens the next ``update`` may bring."""
        return self.max_len - self.length

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k (B, H_kv, N, D), v (B, H_kv, N, D_v); return views of everything held (B, H_kv, length, ·)."""
        _check_kv(k, v, self.k)
        n = k.shape[2]
        if n > self.room():
            raise ValueError(f"KVCache is full: it holds {self.length} of max_len={self.max_len} tokens and got {n} "
                             "more; allocate a larger max_len, or use SlidingWindowCache for unbounded streams")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def attend(self, q, k, v, *, causal=True, mask=None, backend=None, **extra) -> Tensor:
        return decode_attention(q, k, v, causal=causal, mask=mask, backend=backend, **extra)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class SlidingWindowCache:
    """Fixed memory for unbounded streams: ``sinks`` first tokens plus the ``window`` most recent ones.

    ``rotary`` is the layer's ``RotaryEmbedding`` (keys arrive already rotated at their stream position; the sink keys
    are re-rotated so that cache positions stay contiguous, see the module docstring). ``length`` counts every token
    seen (the stream position of the next one); ``size`` is how many are held (at most ``sinks + window``).
    Rotary angles are computed in float32 from the stream position, so after ~10⁵ tokens the fastest-turning pairs
    carry an angle error of ~10⁻² rad — harmless for sampling, and the reason exactness is tested on shorter streams.
    """

    def __init__(self, batch: int, n_kv_heads: int, d_head: int, *, window: int, sinks: int = 4, rotary=None,
                 d_v: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SlidingWindowCache: window must be a positive int, got {window!r}")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"SlidingWindowCache: sinks must be an int >= 0, got {sinks!r} (StreamingLLM uses 4)")
        self.window, self.sinks, self.rotary = window, sinks, rotary
        self.cache = KVCache(batch, n_kv_heads, sinks + window, d_head, d_v, dtype=dtype, device=device)
        self.sink_k = self.cache.k[:, :, :sinks].clone()  # sink keys as rotated at their own positions 0..sinks-1
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def size(self) -> int:
        return min(self.length, self.capacity)

    def room(self) -> int:
        """Tokens the next ``update`` may bring: all the free slots, or one at a time once the window rolls."""
        return max(1, self.capacity - self.length)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        _check_kv(k, v, self.cache.k)
        n = k.shape[2]
        if self.length + n <= self.capacity:  # still filling: chronological, exactly a KVCache
            self.cache.update(k, v)
            if self.length < self.sinks:
                self.sink_k.copy_(self.cache.k[:, :, :self.sinks])
            self.length += n
            return self.cache.k[:, :, :self.length], self.cache.v[:, :, :self.length]
        if n != 1:
            raise ValueError(f"SlidingWindowCache holds {self.size} of {self.capacity} tokens and got {n} at once; "
                             f"once it rolls it takes one token per step (feed at most room()={self.room()} tokens)")
        slot = self.sinks + (self.length - self.sinks) % self.window  # the oldest recent token's slot
        self.cache.k[:, :, slot] = k[:, :, 0]
        self.cache.v[:, :, slot] = v[:, :, 0]
        self.length += 1
        oldest_recent = self.length - self.window  # stream position of the oldest key still in the window
        if self.sinks and self.rotary is not None:
            shift = torch.tensor([oldest_recent - self.sinks], device=k.device)
            self.cache.k[:, :, :self.sinks] = self.rotary(self.sink_k, shift.expand(self.sinks))
        return self.cache.k, self.cache.v  # slot order, not time order: fine for one query that sees them all

    def attend(self, q, k, v, *, causal=True, mask=None, backend=None, **extra) -> Tensor:
        return decode_attention(q, k, v, causal=causal, mask=mask, backend=backend, **extra)

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.sink_k.numel() * self.sink_k.element_size()


def new_caches(model, batch: int = 1, *, max_len: int | None = None, window: int | None = None, sinks: int = 4):
    """One cache per layer of ``model`` (a ``selfattn.model.GPT``): a ``KVCache`` of ``max_len`` tokens, or with
    ``window`` a ``SlidingWindowCache`` of ``sinks + window`` tokens."""
    if (max_len is None) == (window is None):
        raise ValueError("new_caches: give exactly one of max_len= (a KVCache) or window= (a SlidingWindowCache)")
    p = next(model.parameters())
    caches = []
    for block in model.blocks:
        attn = block.attn
        if window is None:
            caches.append(KVCache(batch, attn.n_kv_heads, max_len, attn.d_head, dtype=p.dtype, device=p.device))
        else:
            caches.append(SlidingWindowCache(batch, attn.n_kv_heads, attn.d_head, window=window, sinks=sinks,
                                             rotary=attn.rotary, dtype=p.dtype, device=p.device))
    return caches
