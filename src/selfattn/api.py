"""The public entry point: ``attention(q, k, v, ...)``, its validation, and ``attention_weights``.

Shape legend (used everywhere in selfattn)
------------------------------------------
    B     batch size
    H_q   query heads;  H_kv key/value heads (grouped-query attention: H_q is a multiple of H_kv, and query head h
          reads key/value head h // (H_q // H_kv); K and V are never copied)
    N_q   query positions;  N_k key/value positions (they may differ)
    D     head dim of queries and keys (d_k);  D_v head dim of values (may differ from D)
    T     packed tokens: sequences of different lengths end to end, described by cu_seqlens (selfattn.varlen)

    q (B, H_q, N_q, D)   k (B, H_kv, N_k, D)   v (B, H_kv, N_k, D_v)   ->   out (B, H_q, N_q, D_v)

This is the layout of ``torch.nn.functional.scaled_dot_product_attention``.

Causal alignment
----------------
``causal=True`` is bottom-right aligned: query i sees key j when ``j <= i + N_k - N_q`` — the last query lines up
with the last key, as when decoding new tokens against a KV cache. torch's ``is_causal=True`` is top-left aligned
(``j <= i``); the two agree only when N_q == N_k. For N_q = 2, N_k = 5::

    selfattn causal=True           torch is_causal=True
         k0 k1 k2 k3 k4                 k0 k1 k2 k3 k4
    q0    1  1  1  1  .             q0   1  .  .  .  .
    q1    1  1  1  1  1             q1   1  1  .  .  .
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from selfattn import backends, masks, ops, score_mods
from selfattn.backends import AttentionCall, choice
from selfattn.masks import Mask


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    mask: Mask | Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
    score_mod=None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | torch.Generator | None = None,
):
    """softmax(q·kᵀ·scale + bias, masked)·v, exactly, on the best backend that can serve the call.

    Args:
        q, k, v: (B, H_q, N_q, D), (B, H_kv, N_k, D), (B, H_kv, N_k, D_v); same dtype and device.
        causal: bottom-right causal mask (see the module docstring); combined with ``mask`` by "and".
        mask: a ``selfattn.masks.Mask`` (or a ``mask_mod(b, h, q_idx, kv_idx)`` function), or a bool tensor
            broadcastable to (B, H_q, N_q, N_k); True means "may attend".
        bias: additive float scores broadcastable to (B, H_q, N_q, N_k) (e.g. ALiBi), added after scaling.
        scale: multiplies q·kᵀ; default 1/√D.
        backend: a registered backend name (``selfattn.backends.names()``) or None to choose automatically.
        return_lse: also return the per-row log-sum-exp (B, H_q, N_q) in float32 (−inf for fully masked rows).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` applied to the scaled scores before the bias
            and the mask, or a ready-made one from ``selfattn.score_mods`` (``softcap``, ``alibi``, ``relative_bias``).
        sinks: (H_q,) per-head logits of one extra softmax column with value zero (gpt-oss); differentiable.
        dropout_p: dropout probability on the weights (pass 0 outside training); ``dropout_seed`` (int or
            torch.Generator; default: drawn from torch's global generator) fixes which weights are dropped, the
            same on every backend (see ``selfattn.score_mods.dropout_keep``).

    Returns:
        out (B, H_q, N_q, D_v) in the input dtype, or (out, lse). Rows with every key masked are zeros.

    Under ``torch.compile`` the call becomes one custom op, ``torch.ops.selfattn.attention`` (see ``selfattn.ops``),
    so ``fullgraph=True`` compiles without graph breaks.

    Examples:
        >>> import torch, selfattn
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> selfattn.attention(q, k, v, causal=True).shape
        torch.Size([1, 2, 5, 8])
    """
    plain = mask is None and bias is None and sinks is None and \
        (score_mod is None or type(score_mod) is score_mods.ScoreMod and score_mod.spec is not None) and \
        type(dropout_p) in (float, int) and dropout_p == 0 and dropout_seed is None and \
        not torch.compiler.is_compiling()  # exact types: a tensor dropout_p goes to validation, which words it
    key = _repeat_key(q, k, v, causal, scale, backend, score_mod) if plain else None
    if key is not None:
        run = choice.MEMO.get(key)
        done = run(q, k, v) if run is not None and (return_lse is True or return_lse is False) else None
        if done is not None:  # (None: a call of this signature the kept function does not serve)
            return done if return_lse else done[0]
    call = make_call(q, k, v, causal=causal, mask=mask, bias=bias, scale=scale, score_mod=score_mod, sinks=sinks,
                     dropout_p=dropout_p, dropout_seed=dropout_seed)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a registered backend's name (str) or None, got {backend!r}; "
                        "see selfattn.backends.names()")
    if call.N_q == 0 or call.N_k == 0:
        out = q.new_zeros(call.B, call.H_q, call.N_q, call.D_v)
        lse = torch.full((call.B, call.H_q, call.N_q), -math.inf, device=q.device)
        if call.sinks is not None:
            lse = call.sinks.detach().float().view(1, -1, 1).expand_as(lse).clone()
    else:
        out, lse = ops.forward(call, backend)  # the custom op while torch.compile traces (see selfattn.ops)
        if key is not None and _seen_twice(score_mod):
            run = backends.choose(call, backend).repeat(call)
            if run is not None:
                if len(choice.MEMO) >= choice.MEMO_MAX:
                    choice.MEMO.clear()
                choice.MEMO[key] = run
    return (out, lse) if return_lse else out


def _repeat_key(q, k, v, causal, scale, backend, score_mod=None) -> tuple | None:
    """The signature under which a plain call (no mask object, bias, sinks or dropout; a ready-made score modifier
    object at most) can skip validation and planning the next time (``Backend.repeat``), or None: shapes, dtypes,
    devices, causal, scale, backend, threads, whether autograd records the call, the modifier object itself, with
    N_k by its bucket (a decoding cache grows by one key a step). Only exact types are keyed (True and 1 hash alike),
    and N_k must equal v's, so whatever validation would reject never matches an entry."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor or \
            (causal is not True and causal is not False) or not (scale is None or type(scale) is float) or \
            not (backend is None or type(backend) is str):
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if score_mod is not None and (grad or score_mod.trains):
        return None  # a modifier's call with gradients goes the whole way
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or not (qs[2] and ks[2] and ks[2] == vs[2]):
        return None  # what only validation can word goes the whole way
    return ("repeat", qs, ks[0], ks[1], choice.n_bucket(ks[2]), ks[3], vs[0], vs[1], vs[3], q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, causal, scale, backend, torch.get_num_threads(), grad, score_mod)


def _seen_twice(score_mod) -> bool:
    """Whether a kept function is worth making for this call: always without a modifier; with one, from the second
    call that passes the same object (a model keeps its ALiBi modifier; one made per call would only fill the
    memo)."""
    if score_mod is None or score_mod.__dict__.get("_repeat_seen"):
        return True
    object.__setattr__(score_mod, "_repeat_seen", True)
    return False


def attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool = False,
    mask: Mask | Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    score_mod=None,
    sinks: Tensor | None = None,
) -> Tensor:
    """The softmax weights (B, H_q, N_q, N_k) in q's dtype, computed by the oracle (O(N_q·N_k) memory on purpose:
    this is for looking, not for speed). Rows with every key masked are zeros. With ``sinks`` a row sums to one
    minus the sink's share."""
    from selfattn import reference

    v = k[..., :0]  # the weights do not depend on V
    call = make_call(q, k, v, causal=causal, mask=mask, bias=bias, scale=scale, allow_empty_dv=True,
                     score_mod=score_mod, sinks=sinks)
    steps = reference.steps(call.q, call.k, call.v, scale=call.scale, mask=call.mask, bias=call.bias,
                            score_mod=call.score_mod, sinks=call.sinks)
    return steps.weights.to(q.dtype)


# ------------------------------------------------------------------------------------------------------ validation


def make_call(q, k, v, *, causal=False, mask=None, bias=None, scale=None, allow_empty_dv=False, score_mod=None,
              sinks=None, dropout_p=0.0, dropout_seed=None, positions: int | None = None) -> AttentionCall:
    """Validate the arguments of ``attention`` and bundle them; every error names the values and the fix.

    ``positions``: the length of the sequence the mask's positions index, when q, k, v are shards of a longer one
    (ring attention); default N_k."""
    _check_tensors(q, k, v)
    B, H_q, N_q, D = q.shape
    N_k = k.shape[2]
    _check_shapes(q, k, v, allow_empty_dv)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    scale = _check_scale(scale, D)
    bias = _check_bias(bias, q, B, H_q, N_q, N_k)
    mask = _check_mask(mask, q, B, H_q, N_q, N_k)
    if mask is not None:
        masks.check_fits(mask, B, N_k if positions is None else positions)
    if causal:
        mask = masks.causal() if mask is None else masks.causal() & mask
    score_mod = None if score_mod is None else score_mods.as_score_mod(score_mod)
    sinks = score_mods.check_sinks(sinks, H_q, q)
    dropout_p, dropout_seed = score_mods.check_dropout(dropout_p, dropout_seed)
    return AttentionCall(q, k, v, scale, mask, bias, causal, score_mod=score_mod, sinks=sinks, dropout_p=dropout_p,
                         dropout_seed=dropout_seed)


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (B, H, N, D), got shape {tuple(t.shape)}; "
                f"for one sequence of one head use {name}[None, None], for (B, N, H, D) use {name}.transpose(1, 2)"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast with .to(dtype)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move with .to()")


def _check_shapes(q, k, v, allow_empty_dv) -> None:
    (B, H_q, _, D), (Bk, H_kv, N_k, Dk), (Bv, H_v, N_v, D_v) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q has B={B}, k B={Bk}, v B={Bv}; they must be equal")
    if D != Dk:
        raise ValueError(f"q and k must share the head dim D: q has D={D}, k has D={Dk}")
    if (H_kv, N_k) != (H_v, N_v):
        raise ValueError(
            f"k and v must have the same heads and positions: k is (H_kv={H_kv}, N_k={N_k}), v is ({H_v}, {N_v})"
        )
    if H_kv == 0 or H_q % H_kv != 0:
        raise ValueError(
            f"got H_q={H_q} query heads and H_kv={H_kv} key/value heads: H_q must be a positive multiple of H_kv "
            "(grouped-query attention)"
        )
    if D == 0 or (D_v == 0 and not allow_empty_dv):
        raise ValueError(f"head dims must be positive, got D={D}, D_v={D_v}")


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {scale!r}; leave it None for 1/sqrt(D) = {1 / math.sqrt(D):.4g}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}; leave it None for 1/sqrt(D) = {1 / math.sqrt(D):.4g}")
    return float(scale)


def _broadcasts(what: str, t: Tensor, target: tuple[int, ...], fix: str) -> None:
    try:
        ok = t.dim() <= 4 and torch.broadcast_shapes(t.shape, target) == torch.Size(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{what} of shape {tuple(t.shape)} does not broadcast to (B, H_q, N_q, N_k) = {target}; {fix}")


def _check_bias(bias, q, B, H_q, N_q, N_k):
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias))}; "
                        "pass a bool tensor as mask= instead")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}; move it with .to(q.device)")
    _broadcasts("bias", bias, (B, H_q, N_q, N_k), "give it shape (B or 1, H_q or 1, N_q, N_k)")
    return bias


def _check_mask(mask, q, B, H_q, N_q, N_k):
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"a mask tensor must be torch.bool (True = may attend), got {mask.dtype}; "
                            "pass additive float scores as bias= instead")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with .to(q.device)")
        _broadcasts("mask", mask, (B, H_q, N_q, N_k), "give it shape (B or 1, H_q or 1, N_q, N_k)")
        return masks.from_tensor(mask, N_q, N_k)
    return masks.as_mask(mask)
