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


def grad_floors(q: Tensor, k: Tensor, v: Tensor, d_out: Tensor, weights: Tensor, *, scale: float | None = None,
                dtype: torch.dtype | None = None) -> tuple[float, float, float]:
    """Floors for (dq, dk, dv) at the magnitude of what a softmax backward sums, not of its result.

    dS = P·(dP − δ) with dP_ij = Σ_d dO_id·v_jd and δ_i = Σ_d dO_id·O_id: two sums of D_v terms that cancel (exactly,
    for a row that sees one key), so their rounding is eps times Σ_d |dO_id|·|v_jd|, the terms' magnitude, however
    small |dS| is. dQ_i = scale·Σ_j dS_ij·k_j carries it times scale·|k| (Σ_j P_ij ≤ 1); dK_j = scale·Σ_i dS_ij·q_i
    times scale·|q| and the weight the key gets over the rows, Σ_i P_ij; dV_j = Σ_i P_ij·dO_i sums that weight times
    |dO|. A backward that recomputes P = exp(S − L) from the float32 log-sum-exp L gets P with a relative error of
    eps·|S| (L is rounded at the scores' magnitude): every floor is scaled by max(1, max |S|). ``weights`` are the
    float64 softmax weights (B, H_q, N_q, N_k); the floors are 2·eps of ``dtype`` (default q's) at those magnitudes,
    never below ``floor_for``'s 2·eps."""
    eps = torch.finfo(dtype or q.dtype).eps
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        s = q.detach().double() @ k.detach().double().repeat_interleave(group, dim=1).transpose(-2, -1)
    s_max = abs(scale) * s.abs().amax().item() if s.numel() else 0.0
    q, k, v, d_out, weights = (t.detach().double().abs() for t in (q, k, v, d_out, weights))
    terms = (d_out @ v.repeat_interleave(group, dim=1).transpose(-2, -1)).amax().item() if d_out.numel() else 0.0
    col_mass = weights.sum(-2).unflatten(1, (k.shape[1], group)).sum(2).amax().item() if weights.numel() else 0.0
    k_max, q_max, do_max = (t.amax().item() if t.numel() else 0.0 for t in (k, q, d_out))
    eps *= max(1.0, s_max)  # P = exp(S − L) from a rounded L carries eps·|S| (a backward that recomputes P from lse)
    return (2 * eps * max(1.0, abs(scale) * k_max * terms),
            2 * eps * max(1.0, abs(scale) * q_max * terms * max(1.0, col_mass)),
            2 * eps * max(1.0, do_max * max(1.0, col_mass)))


def check_backend(backend: str, q: Tensor, k: Tensor, v: Tensor, *, grads: bool = True, **kw) -> Tensor:
    """``selfattn.attention(q, k, v, backend=backend, **kw)`` against the float64 oracle with the rule: the output
    within 2x the naive computation's error in the same dtype, the gradients of q, k, v (for a random d_out) within
    3x, plus the floors above (the naive computation applies the same modifiers, sinks and dropout bits). q, k, v
    require grad when ``grads``. Returns the backend's output."""
    from selfattn import api

    out = api.attention(q, k, v, backend=backend, **kw)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    kw64 = {n: (t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, Tensor) and
                t.is_floating_point() else t) for n, t in kw.items()}
    ref = api.attention(q64, k64, v64, backend="reference", **kw64)
    qn, kn, vn = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    naive = naive_modded(qn, kn, vn, **kw)
    check_against_oracle(out, naive, ref, what=f"{backend} out")
    if grads:
        d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        got = torch.autograd.grad(out, (q, k, v), d_out)
        want = torch.autograd.grad(ref, (q64, k64, v64), d_out.double())
        naive_grads = torch.autograd.grad(naive, (qn, kn, vn), d_out)
        with torch.no_grad():
            weights = api.attention_weights(q64, k64, **{n: t for n, t in kw64.items() if n in (
                "causal", "mask", "bias", "scale", "score_mod", "sinks")})
            floors = grad_floors(q64, k64, v64, d_out.double(), weights, scale=kw.get("scale"), dtype=q.dtype)
        keep = 1.0 - kw.get("dropout_p", 0.0)  # kept weights are scaled by 1 / (1 − p)
        for name, a, r, n, floor in zip("qkv", got, want, naive_grads, floors, strict=True):
            check_against_oracle(a, n, r, factor=3.0, what=f"{backend} d{name}",
                                 floor=max(floor / keep, floor_for(q.dtype, r.abs().max().item())))
    return out


def check_against_third_party(ours: Tensor, theirs: Tensor, theirs_float64: Tensor, *, factor: float = 3.0,
                              what: str = "weights") -> tuple[float, float]:
    """Assert |ours − theirs| ≤ factor·|theirs − theirs_float64| + floor, for a third party's low-precision result
    (eager transformers' float32 output_attentions) that ``ours`` (from the float64 oracle) must equal: the third
    party's own error is measured against the same computation run in float64 on this machine, never assumed. With
    factor 3: theirs' own error, plus ours' inputs carrying the same model's float32 rounding (2x, the oracle rule).
    Returns (difference, allowed)."""
    if ours.shape != theirs.shape:
        raise AssertionError(f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}")
    # entries the float64 run made NaN (eager turns a padded query that sees no key into NaN hidden states in
    # float64, and those reach every score of the keys at those positions) measure nothing: skipped for ``own``
    measured = torch.isfinite(theirs_float64)
    if theirs_float64.numel() and not measured.any():
        raise AssertionError(f"{what}: the float64 result has no finite value to measure the {theirs.dtype} one by")
    magnitude = theirs_float64[measured].abs().max().item() if measured.any() else 1.0
    floor = floor_for(theirs.dtype, magnitude)
    err, own = max_error(ours, theirs), max_error(theirs[measured], theirs_float64[measured])
    allowed = factor * own + floor
    if not err <= allowed:
        raise AssertionError(f"{what}: differs from the {theirs.dtype} result by {err:.3e}, more than {factor}x "
                             f"that result's own error {own:.3e} against float64 + floor {floor:.1e} = {allowed:.3e}")
    return err, allowed


def poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill freed memory with NaN so that an output element a kernel forgets to write is likely to read as NaN."""
    t = torch.full((nbytes // 4,), math.nan, dtype=torch.float32)
    del t


__all__ = ["naive", "naive_modded", "naive_grads_from_out", "check_against_oracle", "check_against_third_party",
           "floor_for", "grad_floors", "max_error", "poison_allocator"]
