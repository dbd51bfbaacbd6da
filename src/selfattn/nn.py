"""Attention layers: ``SelfAttention`` (one head, the textbook's W_Q, W_K, W_V) and ``MultiHeadAttention``.

Layers take x of shape (B, N, d_model) and return (B, N, d_model) — or (B, N, d_v) for ``SelfAttention``.
Inside, heads use the legend of ``selfattn.api``: (B, H, N, D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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
        out = attend(q, k, v, causal=self.causal, mask=mask, backend=self.backend)  # (B, H_q, N, D)
        y = self.W_O(out.transpose(1, 2).reshape(B, N, self.n_heads * self.d_head))  # (B, N, d_model)
        if not return_weights:
            return y
        return y, attention_weights(q, k, causal=self.causal, mask=mask)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"d_head={self.d_head}, causal={self.causal}, rotary={self.rotary is not None}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_input(x, d: int, layer: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer} takes a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"{layer} expects x of shape (B, N, {d}), got {tuple(x.shape)}; for one sequence use x[None]")
