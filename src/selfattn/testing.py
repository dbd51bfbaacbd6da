"""Helpers to judge a fast path against the oracle with FlashAttention's rule.

The error of a fast path against the float64 oracle must be at most ``factor`` times the error of the naive
computation done in the same dtype (2× for outputs, 3× for gradients), plus a small floor: a backend is held to
the accuracy its dtype allows, not to a fixed table.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattn import reference


def naive(q, k, v, *, scale=None, mask=None, bias=None, causal=False) -> Tensor:
    """The textbook computation in the inputs' own dtype (no upcast): the yardstick for rounding error."""
    B, H_q, N_q, D = q.shape
    H_kv, N_k = k.shape[1], k.shape[2]
    group = H_q // H_kv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D) if scale is None else scale)
    if bias is not None:  # −inf entries (a float mask) hide their keys like a mask does, so autograd stays finite
        hidden = torch.isneginf(bias)
        s = (s + bias.masked_fill(hidden, 0.0).to(s.dtype)).masked_fill(hidden, -math.inf)
    visible = reference.dense_visible(mask, causal, B, H_q, N_q, N_k, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with every key masked
    return p @ v


def naive_modded(q, k, v, *, scale=None, mask=None, bias=None, causal=False, score_mod=None, sinks=None,
                 dropout_p=0.0, dropout_seed=0) -> Tensor:
    """``naive`` with a score modifier, sinks and dropout (``selfattn.score_mods``), in the inputs' dtype."""
    from selfattn import score_mods
    from selfattn.masks import grid

    B, H_q, N_q, D = q.shape
    H_kv, N_k = k.shape[1], k.shape[2]
    group = H_q // H_kv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D) if scale is None else scale)
    positions = grid(B, H_q, N_q, N_k, q.device, q_pos0=N_k - N_q)
    if score_mod is not None:
        s = score_mods.apply(score_mods.as_score_mod(score_mod), s, *positions)
    if bias is not None:
        s = s + bias.to(s.dtype)
    visible = reference.dense_visible(mask, causal, B, H_q, N_q, N_k, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).view(1, H_q, 1, 1).expand(B, H_q, N_q, 1)], dim=-1)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)[..., :N_k]
    if dropout_p:
        p = p * score_mods.dropout_keep(dropout_seed, dropout_p, *positions) / (1 - dropout_p)
    return p @ v


def naive_grads_from_out(q, k, v, d_out, *, scale=None, mask=None, bias=None, causal=False):
    """(dq, dk, dv) of the naive computation in the inputs' dtype, in the other textbook form of the softmax
    backward: δ = rowsum(dO∘O) from the output (as FlashAttention computes it), dS = P∘(dP − δ). Where the true
    gradient cancels to exactly zero (a row that sees a single key) the autograd form of ``naive`` is exact by
    accident of rounding while this form, like every tiled backward, is off by a few ulps: a yardstick must allow
    both forms."""
    B, H_q, N_q, D = q.shape
    H_kv, N_k = k.shape[1], k.shape[2]
    group = H_q // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k_r, v_r = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k_r.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    visible = reference.dense_visible(mask, causal, B, H_q, N_q, N_k, q.device)
    if visible is not None:
        s = s.masked_fill(~visible, -math.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    d_out = d_out.to(q.dtype)
    out = p @ v_r
    ds = p * (d_out @ v_r.transpose(-2, -1) - (d_out * out).sum(-1, keepdim=True))
    dq = ds @ k_r * scale
    dk = (ds.transpose(-2, -1) @ q * scale).unflatten(1, (H_kv, group)).sum(2)
    dv = (p.transpose(-2, -1) @ d_out).unflatten(1, (H_kv, group)).sum(2)
    return dq, dk, dv


def max_error(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floor_for(dtype: torch.dtype, scale: float = 1.0) -> float:
    return 2 * torch.finfo(dtype).eps * max(1.0, scale)


def check_against_oracle(fast: Tensor, naive_same_dtype: Tensor, oracle: Tensor, *, factor: float = 2.0,
                         what: str = "out", floor: float | None = None) -> tuple[float, float]:
    """Assert |fast − oracle| ≤ factor·|naive − oracle| + floor (max norm); returns (error, allowed)."""
    if fast.shape != oracle.shape:
        raise AssertionError(f"{what}: shape {tuple(fast.shape)} != oracle's {tuple(oracle.shape)}")
    if not torch.isfinite(fast).all():
        raise AssertionError(f"{what}: {int((~torch.isfinite(fast)).sum())} non-finite values")
    magnitude = oracle.abs().max().item() if oracle.numel() else 1.0
    floor = floor_for(fast.dtype, magnitude) if floor is None else floor
    err, err_naive = max_error(fast, oracle), max_error(naive_same_dtype, oracle)
    allowed = factor * err_naive + floor
    if not err <= allowed:
        raise AssertionError(
            f"{what}: error {err:.3e} vs the float64 oracle exceeds {factor}x the naive {fast.dtype} error "
            f"{err_naive:.3e} + floor {floor:.1e} = {allowed:.3e}"
        )
    return err, allowed


def poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill freed memory with NaN so that an output element a kernel forgets to write is likely to read as NaN."""
    t = torch.full((nbytes // 4,), math.nan, dtype=torch.float32)
    del t


__all__ = ["naive", "naive_modded", "naive_grads_from_out", "check_against_oracle", "max_error", "poison_allocator"]
