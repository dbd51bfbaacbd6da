"""Attention layers: ``SelfAttention`` (one head, the textbook's W_Q, W_K, W_V) and ``MultiHeadAttention``.

Layers take x of shape (B, N, d_model) and return (B, N, d_model) — or (B, N, d_v) for ``SelfAttention``.
Inside, heads use the legend of ``selfattn.api``: (B, H, N, D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from selfattn import score_mods
from selfattn.api import attention, attention_weights


class SelfAttention(nn.Module):
    """One attention head as the textbook draws it: q_i = x_i·W_Q, k_i = x_i·W_K, v_i = x_i·W_V,
    y_i = Σ_j softmax_j(q_i·k_j / √d_k) v_j.

    >>> layer = SelfAttention(d_in=16, d_k=8)
    >>> layer(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_in: int, d_k: int, d_v: int | None = None, *, causal: bool = False,
                 backend: str | None = None):
        super().__init__()
        d_v = d_k if d_v is None else d_v
        for name, value in (("d_in", d_in), ("d_k", d_k), ("d_v", d_v)):
            _check_positive_int(name, value)
        self.d_in, self.d_k, self.d_v, self.causal, self.backend = d_in, d_k, d_v, causal, backend
        std = 1.0 / math.sqrt(d_in)
        self.W_Q = nn.Parameter(torch.randn(d_in, d_k) * std)
        self.W_K = nn.Parameter(torch.randn(d_in, d_k) * std)
        self.W_V = nn.Parameter(torch.randn(d_in, d_v) * std)

    def forward(self, x: Tensor, *, mask=None, return_weights: bool = False):
        """x (B, N, d_in) -> y (B, N, d_v); with ``return_weights`` also the weights (B, N, N)."""
        _check_input(x, self.d_in, "SelfAttention")
        q = (x @ self.W_Q)[:, None]  # (B, 1, N, d_k)
        k = (x @ self.W_K)[:, None]  # (B, 1, N, d_k)
        v = (x @ self.W_V)[:, None]  # (B, 1, N, d_v)
        y = attention(q, k, v, causal=self.causal, mask=mask, backend=self.backend)[:, 0]  # (B, N, d_v)
        if not return_weights:
            return y
        return y, attention_weights(q, k, causal=self.causal, mask=mask)[:, 0]  # (B, N, N)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_k={self.d_k}, d_v={self.d_v}, causal={self.causal}"


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer): rotates pairs (x_i, x_{i+D/2}) of q and k by position·θ_i, so
    q_m·k_n depends on m − n only. The half-split pairing matches GPT-NeoX and Llama."""

    def __init__(self, d_head: int, base: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got d_head={d_head}")
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float64) / d_head)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, H, N, D), positions (N,) or (B, N) -> x rotated, same shape and dtype."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (.., N, D/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, N, D/2)
        cos = torch.cat((angles.cos(), angles.cos()), -1)
        sin = torch.cat((angles.sin(), angles.sin()), -1)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with learned W_Q, W_K, W_V, W_O; grouped-query attention when n_kv_heads < n_heads;
    optional causal mask and rotary positions.

    >>> mha = MultiHeadAttention(d_model=32, n_heads=4, n_kv_heads=2, causal=True, rotary=True)
    >>> mha(torch.randn(2, 7, 32)).shape
    torch.Size([2, 7, 32])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_kv_heads: int | None = None,
        d_head: int | None = None,
        causal: bool = False,
        rotary: bool = False,
        rope_base: float = 10000.0,
        bias: bool = False,
        backend: str | None = None,
        alibi: bool = False,
        sinks: bool = False,
        softcap: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        _check_positive_int("d_model", d_model)
        _check_positive_int("n_heads", n_heads)
        _check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head explicitly")
            d_head = d_model // n_heads
        _check_positive_int("d_head", d_head)
        self.d_model, self.n_heads, self.n_kv_heads, self.d_head = d_model, n_heads, n_kv_heads, d_head
        self.causal, self.backend = causal, backend
        self.W_Q = nn.Linear(d_model, n_heads * d_head, bias=bias)
        self.W_K = nn.Linear(d_model, n_kv_heads * d_head, bias=bias)
        self.W_V = nn.Linear(d_model, n_kv_heads * d_head, bias=bias)
        self.W_O = nn.Linear(n_heads * d_head, d_model, bias=bias)
        self.rotary = RotaryEmbedding(d_head, rope_base) if rotary else None
        # score modifiers (selfattn.score_mods): soft-capping, then ALiBi; learnable sinks; dropout when training
        self.softcap = softcap
        mods = [score_mods.softcap(softcap)] if softcap is not None else []
        if alibi:
            self.register_buffer("alibi_slopes", score_mods.alibi_slopes(n_heads), persistent=False)
        else:
            self.alibi_slopes = None
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        score_mods.check_dropout(dropout, 0)
        self.dropout = dropout
        self._mods = mods

    def attention_options(self) -> dict:
        """The score_mod, sinks and dropout this layer passes to ``selfattn.attention`` (empty when none)."""
        mods = list(self._mods) + ([score_mods.alibi(self.alibi_slopes)] if self.alibi_slopes is not None else [])
        extra = {}
        if mods:
            mod = mods[0]
            for m in mods[1:]:
                mod = mod >> m
            extra["score_mod"] = mod
        if self.sinks is not None:
            extra["sinks"] = self.sinks
        if self.training and self.dropout > 0:
            extra["dropout_p"] = self.dropout
        return extra

    def project(self, x: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, d_model) -> q (B, H_q, N, D), k and v (B, H_kv, N, D), rotated when rotary is on."""
        B, N, _ = x.shape
        q = self.W_Q(x).view(B, N, self.n_heads, self.d_head).transpose(1, 2)  # (B, H_q, N, D)
        k = self.W_K(x).view(B, N, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, N, D)
        v = self.W_V(x).view(B, N, self.n_kv_heads, self.d_head).transpose(1, 2)  # (B, H_kv, N, D)
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(N, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def forward(self, x: Tensor, *, mask=None, positions: Tensor | None = None, cache=None,
                return_weights: bool = False):
        """x (B, N, d_model) -> y (B, N, d_model); with ``return_weights`` also (B, H_q, N, N_k).

        ``positions`` (N,) are the rotary positions (default 0..N-1, or continuing the cache). ``cache``, when
        given, is an object with ``length`` and ``update(k, v) -> (k_all, v_all)`` (see ``selfattn.decode``):
        the new keys and values are appended and the queries attend to everything cached (bottom-right causal),
        through ``cache.attend(q, k, v, causal=, mask=, backend=)`` when the cache has one.
        """
        _check_input(x, self.d_model, "MultiHeadAttention")
        B, N, _ = x.shape
        if positions is None and cache is not None:
            positions = torch.arange(cache.length, cache.length + N, device=x.device)
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H_kv, N_k, D)
        attend = getattr(cache, "attend", attention)  # a cache may bring its decoding attention (split-KV)
        extra = self.attention_options()
        out = attend(q, k, v, causal=self.causal, mask=mask, backend=self.backend, **extra)  # (B, H_q, N, D)
        y = self.W_O(out.transpose(1, 2).reshape(B, N, self.n_heads * self.d_head))  # (B, N, d_model)
        if not return_weights:
            return y
        return y, attention_weights(q, k, causal=self.causal, mask=mask, score_mod=extra.get("score_mod"),
                                    sinks=extra.get("sinks"))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"d_head={self.d_head}, causal={self.causal}, rotary={self.rotary is not None}"
                + (f", softcap={self.softcap}" if self.softcap is not None else "")
                + (", alibi=True" if self.alibi_slopes is not None else "")
                + (", sinks=True" if self.sinks is not None else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_input(x, d: int, layer: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} takes a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"{layer} expects x of shape (B, N, {d}), got {tuple(x.shape)}; for one sequence use x[None]")


class MultiheadAttention(nn.Module):
    """A drop-in for ``torch.nn.MultiheadAttention`` computed by ``selfattn.attention``: the same constructor, the same
    ``forward`` arguments and returns, the same parameter names (a torch state_dict loads as is).

    torch's mask conventions are kept at this boundary: in ``attn_mask`` and ``key_padding_mask`` a bool True means
    "may NOT attend" (the opposite of selfattn's masks) and a float is added to the scores. ``is_causal=True`` is
    torch's hint that ``attn_mask`` is the causal mask (top-left, N_q = N_k); here it selects selfattn's causal mask
    and the dense ``attn_mask`` may be left out. Differences: the weights of a query with every key masked are zeros
    (torch returns NaN); ``dropout`` in training mode drops weights with selfattn's counter-based dropout (seeded from
    torch's global generator, so ``torch.manual_seed`` repeats it), and the returned weights are before dropout.

    >>> mha = MultiheadAttention(embed_dim=16, num_heads=4, batch_first=True)
    >>> x = torch.randn(2, 5, 16)
    >>> y, w = mha(x, x, x)
    >>> y.shape, w.shape
    (torch.Size([2, 5, 16]), torch.Size([2, 5, 5]))
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: str | None = None):
        super().__init__()
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        _check_positive_int("kdim", self.kdim)
        _check_positive_int("vdim", self.vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn, self.backend = dropout, batch_first, add_zero_attn, backend
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:  # torch's initialisation
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query (L, N, E_q) (or (N, L, E_q) with batch_first, or unbatched (L, E_q)); key (S, N, kdim); value
        (S, N, vdim). key_padding_mask (N, S); attn_mask (L, S) or (N·num_heads, L, S).

        Returns (out (L, N, E), weights (N, L, S) averaged over heads, or (N, num_heads, L, S), or None)."""
        batched = query.dim() == 3
        _check_mha_inputs(query, key, value, batched, self.embed_dim, self.kdim, self.vdim)
        if not batched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, _ = query.shape  # now (N, L, E): batch first
        H, D = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        n_extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, -1)], 1)  # (B, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, -1)], 1)
            n_extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(B, 1, k.shape[2])], 1)  # (B, S + 1, E)
            v = torch.cat([v, v.new_zeros(B, 1, v.shape[2])], 1)
            n_extra += 1
        S = k.shape[1]
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = k.view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        causal = bool(is_causal)
        if causal and L != S:
            raise ValueError(f"is_causal=True needs as many queries as keys, got L={L} and S={S}; pass the mask as "
                             "attn_mask instead")
        if causal:
            attn_mask = None  # torch's hint: attn_mask is the causal mask, which selfattn knows without reading it
        mask, bias = _torch_masks(attn_mask, key_padding_mask, B, H, L, S - n_extra, n_extra, batched, q.dtype)
        drop = dict(dropout_p=self.dropout) if self.training and self.dropout > 0 else {}  # torch's, in training
        out = attention(q, k, v, causal=causal, mask=mask, bias=bias, backend=self.backend, **drop)  # (B, H, L, D)
        y = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))  # (B, L, E)
        weights = None
        if need_weights:
            weights = attention_weights(q, k, causal=causal, mask=mask, bias=bias)  # (B, H, L, S)
            if average_attn_weights:
                weights = weights.mean(1)  # (B, L, S)
        if not batched:
            return y[0], None if weights is None else weights[0]
        return (y if self.batch_first else y.transpose(0, 1)), weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight[:E], self.in_proj_weight[E:2 * E], self.in_proj_weight[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        F = torch.nn.functional
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}")


def _check_mha_inputs(query, key, value, batched: bool, E: int, kdim: int, vdim: int) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"MultiheadAttention: {name} must be a torch.Tensor, got {type(t).__name__}")
    want = 3 if batched else 2
    if query.dim() not in (2, 3) or key.dim() != want or value.dim() != want:
        raise ValueError(f"MultiheadAttention: query, key, value must all be 3-D (batched) or all 2-D (unbatched), "
                         f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    for name, t, d in (("query", query, E), ("key", key, kdim), ("value", value, vdim)):
        if t.shape[-1] != d:
            raise ValueError(f"MultiheadAttention: {name} has {t.shape[-1]} features, expected {d}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"MultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} must have the "
                         "same batch and sequence sizes")


def _torch_masks(attn_mask, key_padding_mask, B, H, L, S, n_extra, batched, dtype):
    """torch's masks (bool True = hidden, float = added) -> selfattn's (bool mask True = visible, additive bias),
    broadcastable to (B, H, L, S + n_extra); the n_extra appended keys (bias_k, zero_attn) are always visible."""
    visible, bias = None, None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (L, S):
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} should be (L, S) = {(L, S)}")
            m = attn_mask[None, None]  # (1, 1, L, S)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == ((B * H) if batched else H, L, S):
            m = attn_mask.view(B, H, L, S)
        else:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} should be (L, S) = {(L, S)} or "
                             f"(N·num_heads, L, S) = {(B * H, L, S)}")
        visible, bias = _split_torch_mask(m, "attn_mask", dtype)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} should be (N, S) = {(B, S)}")
        v2, b2 = _split_torch_mask(key_padding_mask[:, None, None, :], "key_padding_mask", dtype)  # (B, 1, 1, S)
        visible = v2 if visible is None else (visible if v2 is None else visible & v2)
        bias = b2 if bias is None else (bias if b2 is None else bias + b2)
    if n_extra:
        pad = torch.nn.functional.pad
        visible = None if visible is None else pad(visible, (0, n_extra), value=True)
        bias = None if bias is None else pad(bias, (0, n_extra), value=0.0)
    return visible, bias


def _split_torch_mask(m: Tensor, name: str, dtype) -> tuple[Tensor | None, Tensor | None]:
    if m.dtype == torch.bool:
        return ~m, None
    if m.dtype.is_floating_point:
        return None, m.to(dtype)
    raise TypeError(f"{name} must be bool (True = may not attend) or float (added to the scores), got {m.dtype}")
