"""The oracle: attention computed exactly in the textbook's order, in float64. Every fast path is tested against it.

    Q = X·W_Q,  K = X·W_K,  V = X·W_V                     (project, when given X and the weights)
    S = Q·Kᵀ                                              (raw scores, N_q × N_k)
    S = S · scale            scale = 1/√d_k by default   (keeps the softmax from saturating as d_k grows)
    S = score_mod(S, b, h, q_idx, kv_idx)                 (optional: soft-capping, ALiBi, relative bias)
    S = S + bias;  S[~mask] = −∞                          (mask: True = visible)
    P = exp(S − m) / (exp(sink − m) + Σ_j exp(S − m))     (softmax, m the row maximum; the sink term only with sinks)
    P = P ∘ keep / (1 − p)                                (optional dropout; keep from score_mods.dropout_keep)
    Y = P·V                                               (N_q × d_v, one vector per token)

A row whose keys are all masked has P = 0, Y = 0 and log-sum-exp −∞ (never NaN).

Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: (B, H, N, D); see ``selfattn.api``.
This module materialises the N_q × N_k matrix on purpose: it is slow and memory-hungry, and it is plain.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from selfattn import score_mods
from selfattn.masks import Mask, grid
from selfattn.masks import causal as causal_mask

# The oracle keeps about this many float64 N_q x N_k matrices alive at once (scores, exp, weights, mask, autograd).
_MATRICES_ALIVE = 6


class Steps(NamedTuple):
    """Every intermediate of one attention call, in the textbook's order (float64)."""

    q: Tensor  # (B, H_q, N_q, D)
    k: Tensor  # (B, H_q, N_k, D)   K repeated per query head (GQA)
    v: Tensor  # (B, H_q, N_k, D_v)
    scores: Tensor  # (B, H_q, N_q, N_k)  Q·Kᵀ
    scaled: Tensor  # score_mod(scores · scale) (+ bias)
    masked: Tensor  # −∞ where the mask hides a key
    weights: Tensor  # softmax over the last dimension (and the sink); rows of zeros where everything is masked
    lse: Tensor  # (B, H_q, N_q)  log (exp(sink) + Σ_j exp(masked)), −∞ for fully masked rows without a sink
    out: Tensor  # (B, H_q, N_q, D_v)
    modified: Tensor | None = None  # score_mod(scores · scale), before the bias; None without a score_mod
    sink_weight: Tensor | None = None  # (B, H_q, N_q) the sink's share of each row; None without sinks
    dropped: Tensor | None = None  # weights ∘ keep / (1 − p), what multiplies V; None without dropout


class TooLargeError(MemoryError):
    """The N_q x N_k matrix of this call would not fit in memory; use a tiled backend."""


def project(x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q_i = x_i·W_Q, k_i = x_i·W_K, v_i = x_i·W_V for every row x_i of x (..., N, d_model)."""
    return x @ w_q, x @ w_k, x @ w_v


def steps(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: Mask | Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    q_pos0: int | None = None,
    k_pos0: int = 0,
    score_mod=None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> Steps:
    """Run the textbook computation in float64 and keep every step. q (B, H_q, N_q, D); k (B, H_kv, N_k, D);
    v (B, H_kv, N_k, D_v); H_q a multiple of H_kv. ``mask`` is a Mask or a bool tensor (True = visible).
    Query row i sits at position ``q_pos0 + i`` (default N_k − N_q, bottom-right), key j at ``k_pos0 + j``.
    ``score_mod`` (a function or ``selfattn.score_mods.ScoreMod``), ``sinks`` (H_q,) and dropout (``dropout_p``,
    ``dropout_seed``) are described in ``selfattn.score_mods``."""
    B, H_q, N_q, D = q.shape
    H_kv, N_k = k.shape[1], k.shape[2]
    check_fits(B * H_q * N_q * N_k)
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    group = H_q // H_kv
    k = k.repeat_interleave(group, dim=1)  # (B, H_q, N_k, D): the oracle may copy, the backends must not
    v = v.repeat_interleave(group, dim=1)  # (B, H_q, N_k, D_v)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    scores = q @ k.transpose(-2, -1)  # (B, H_q, N_q, N_k)
    scaled = scores * scale
    modified = None
    positions = grid(B, H_q, N_q, N_k, q.device, q_pos0=N_k - N_q if q_pos0 is None else q_pos0, k_pos0=k_pos0)
    if score_mod is not None:
        scaled = modified = score_mods.apply(score_mods.as_score_mod(score_mod), scaled, *positions)
    if bias is not None:
        scaled = scaled + bias.to(torch.float64)
    visible = dense_visible(mask, causal, B, H_q, N_q, N_k, q.device, q_pos0=q_pos0, k_pos0=k_pos0)
    masked = scaled if visible is None else scaled.masked_fill(~visible, -math.inf)

    row_max = masked.amax(dim=-1, keepdim=True)  # (B, H_q, N_q, 1)
    sink = None if sinks is None else sinks.to(torch.float64).view(1, H_q, 1, 1)
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all-masked rows: −∞ → 0
    e = torch.exp(masked - row_max)
    total = e.sum(dim=-1, keepdim=True)
    sink_weight = None
    if sink is not None:
        e_sink = torch.exp(sink - row_max)  # (B, H_q, N_q, 1): one more column, whose value is zero
        total = total + e_sink
        sink_weight = (e_sink / total).squeeze(-1)
    weights = torch.where(total > 0, e / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(e))
    lse = (row_max + torch.log(total)).squeeze(-1)  # log(0) = −∞ for fully masked rows
    dropped = None
    if dropout_p:
        keep = score_mods.dropout_keep(dropout_seed, dropout_p, *positions)
        dropped = weights * keep / (1.0 - dropout_p)
    out = (weights if dropped is None else dropped) @ v  # (B, H_q, N_q, D_v)
    return Steps(q, k, v, scores, scaled, masked, weights, lse, out, modified, sink_weight, dropped)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    mask: Mask | Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
    return_weights: bool = False,
    q_pos0: int | None = None,
    k_pos0: int = 0,
    score_mod=None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
):
    """softmax(Q·Kᵀ·scale + bias, masked)·V in float64. Returns ``out`` or a tuple (out, [lse], [weights]).

    >>> q = k = v = torch.eye(2, dtype=torch.float64).view(1, 1, 2, 2)
    >>> attention(q, k, v, causal=True)[0, 0]
    tensor([[1.0000, 0.0000],
            [0.3302, 0.6698]], dtype=torch.float64)
    """
    s = steps(q, k, v, scale=scale, mask=mask, bias=bias, causal=causal, q_pos0=q_pos0, k_pos0=k_pos0,
              score_mod=score_mod, sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed)
    extra = ([s.lse] if return_lse else []) + ([s.weights] if return_weights else [])
    return (s.out, *extra) if extra else s.out


def dense_visible(mask, causal, B, H, N_q, N_k, device, *, q_pos0=None, k_pos0=0) -> Tensor | None:
    """The effective mask as a dense bool tensor (True = visible), or None when nothing is masked."""
    visible = None
    if causal:
        visible = causal_mask().dense(B, H, N_q, N_k, device, q_pos0=q_pos0, k_pos0=k_pos0)
    if mask is not None:
        m = mask.dense(B, H, N_q, N_k, device, q_pos0=q_pos0, k_pos0=k_pos0) if isinstance(mask, Mask) else mask
        visible = m if visible is None else visible & m
    return visible


def available_memory_bytes() -> int:
    """Memory the OS would give us now (MemAvailable on Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bytes_needed(n_scores: int) -> int:
    return n_scores * 8 * _MATRICES_ALIVE


# Below this the check is skipped: every machine selfattn runs on has this much to spare, and reading
# /proc/meminfo on each small call (decoding, tests) would cost more than the attention itself.
_ALWAYS_FITS_BYTES = 256 << 20


def memory_shortfall(n_scores: int) -> str | None:
    """Why ``n_scores`` float64 scores (with the oracle's intermediates) would not fit in memory now, or None."""
    need = bytes_needed(n_scores)
    if need <= _ALWAYS_FITS_BYTES:
        return None
    have = available_memory_bytes()
    if need <= have // 2:
        return None
    return (f"{n_scores:,} float64 scores need ~{need / 2**30:.1f} GiB with their intermediates, more than half the "
            f"{have / 2**30:.1f} GiB available")


def check_fits(n_scores: int) -> None:
    shortfall = memory_shortfall(n_scores)
    if shortfall is not None:
        raise TooLargeError(f"the reference computation materialises the N_q x N_k matrix: {shortfall}; use a tiled "
                            "backend, which needs O(N) memory")
