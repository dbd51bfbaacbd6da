"""Packed variable-length sequences, FlashAttention's way: ``varlen_attention(q, k, v, cu_seqlens)``.

A batch of sequences of different lengths is packed end to end into one tensor, without padding, and described by
``cu_seqlens`` (n_seqs + 1,): sequence s holds the rows ``cu_seqlens[s]`` to ``cu_seqlens[s + 1] - 1``. Shapes
(T = cu_seqlens[-1] packed tokens; the rest of the legend is in ``selfattn.api``)::

    q (T, H_q, D)   k (T, H_kv, D)   v (T, H_kv, D_v)   ->   out (T, H_q, D_v),  lse (T, H_q)

This is a thin layer, not another kernel: the tensors are viewed as one batch element (1, H, T, D) and attended with
``masks.packed(cu_seqlens)`` — the ``masks.document`` mask of the packing — joined with ``causal()`` or
``sliding_window(w)``, so every backend of the registry serves it and skips the blocks between sequences. Causal and
windowed attention apply within each sequence (a sequence never sees another one)::

    cu_seqlens = [0, 2, 5], causal=True        k0 k1 | k2 k3 k4
                                          q0    1  .  |  .  .  .
                                          q1    1  1  |  .  .  .
                                          q2    .  .  |  1  .  .
                                          q3    .  .  |  1  1  .
                                          q4    .  .  |  1  1  1

The mask is remembered per ``cu_seqlens`` tensor (and its version, so an in-place change is seen): the layers of a
model that pass the same tensor reuse one Mask, so the ids are built and the values checked once, and the Triton
backend translates the mask once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from selfattn import masks
from selfattn.api import attention
from selfattn.masks import Mask

# cu_seqlens tensor -> {(T, device, causal, window, version): Mask}; forgotten when the tensor is freed
_MASKS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MAX_PER_TENSOR = 8


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
    cu_seqlens_k: Tensor | None = None,
    score_mod=None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed=None,
):
    """Attention within each of the packed sequences ``cu_seqlens`` describes (``flash_attn_varlen_func``'s layout).

    Args:
        q, k, v: (T, H_q, D), (T, H_kv, D), (T, H_kv, D_v); same dtype and device. H_q is a multiple of H_kv
            (grouped-query attention). Any strides: they are viewed, not copied.
        cu_seqlens: integer tensor (n_seqs + 1,): 0 = cu_seqlens[0] <= cu_seqlens[1] <= ... <= cu_seqlens[-1] = T
            (int32 as flash-attn takes it, or int64; on any device). Empty sequences are allowed.
        causal: each query sees the keys of its own sequence up to itself.
        window: a causal sliding window: each query sees the ``window`` most recent positions of its own sequence,
            itself included. Needs ``causal=True`` (a window here is always causal).
        scale: multiplies q·kᵀ; default 1/√D.
        backend: a registered backend name or None to choose automatically (see ``selfattn.attention``).
        return_lse: also return the log-sum-exp (T, H_q) in float32 (−inf for rows that see nothing).
        cu_seqlens_k: only for code written for flash-attn's (cu_seqlens_q, cu_seqlens_k): it must describe the
            same packing as ``cu_seqlens`` (queries and keys packed alike); a different key packing is refused.
        score_mod, sinks, dropout_p, dropout_seed: as for ``selfattn.attention``. The modifier sees packed
            positions (0..T-1); kv_idx − q_idx, what ALiBi and relative biases read, is the same within a sequence.

    Returns:
        out (T, H_q, D_v) in the input dtype (a transposed view of a (1, H_q, T, D_v) result), or (out, lse).
        Rows of a sequence that see no key are zeros.

    Examples:
        >>> import torch, selfattn
        >>> cu_seqlens = torch.tensor([0, 3, 10], dtype=torch.int32)  # two sequences: 3 and 7 tokens
        >>> q = k = v = torch.randn(10, 4, 16)                         # (T, H, D)
        >>> selfattn.varlen_attention(q, k, v, cu_seqlens, causal=True).shape
        torch.Size([10, 4, 16])
    """
    T = _check_packed(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    _check_window(window, causal)
    _check_same_packing(cu_seqlens, cu_seqlens_k)
    mask = packed_mask(cu_seqlens, T, q.device, causal=causal, window=window)
    # (T, H, D) -> (1, H, T, D): a view; the batch is the one packed row
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, lse = attention(q4, k4, v4, mask=mask, scale=scale, backend=backend, return_lse=True, score_mod=score_mod,
                         sinks=sinks, dropout_p=dropout_p, dropout_seed=dropout_seed)
    out = out[0].transpose(0, 1)  # (1, H_q, T, D_v) -> (T, H_q, D_v)
    return (out, lse[0].transpose(0, 1)) if return_lse else out  # lse (1, H_q, T) -> (T, H_q)


def packed_mask(cu_seqlens: Tensor, T: int, device: torch.device | str | None = None, *, causal: bool = False,
                window: int | None = None) -> Mask:
    """``masks.packed(cu_seqlens)`` (& ``causal()`` or ``sliding_window(window)``) on ``device``, remembered per
    cu_seqlens tensor so that repeated calls (a model's layers) get the same Mask object without redoing its O(T)
    work. Under ``torch.compile`` nothing is remembered and the values are not checked (that would break the graph)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be an integer torch.Tensor (n_seqs + 1,), got {type(cu_seqlens).__name__};"
                        " build it with torch.tensor([0, len_0, len_0 + len_1, ...], dtype=torch.int32)")
    device = torch.device(device) if device is not None else cu_seqlens.device
    if torch.compiler.is_compiling() or cu_seqlens.is_inference():  # an inference tensor has no version counter,
        return _build(cu_seqlens, T, device, causal, window)  # so a change in place could not be seen: build anew
    key = (T, str(device), causal, window, cu_seqlens._version)
    per_tensor = _MASKS.get(cu_seqlens)
    if per_tensor is None:
        per_tensor = _MASKS[cu_seqlens] = {}
    if key not in per_tensor:
        if len(per_tensor) >= _MAX_PER_TENSOR:
            per_tensor.clear()
        per_tensor[key] = _build(cu_seqlens, T, device, causal, window)
    return per_tensor[key]


def _build(cu_seqlens: Tensor, T: int, device: torch.device, causal: bool, window: int | None) -> Mask:
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D (n_seqs + 1,), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool or cu_seqlens.is_complex():
        raise TypeError(f"cu_seqlens must be an integer tensor (int32 or int64), got {cu_seqlens.dtype}; "
                        "convert with .to(torch.int32)")
    mask = masks.packed(cu_seqlens.to(device), total=T)
    if window is not None:
        return masks.sliding_window(window) & mask
    return masks.causal() & mask if causal else mask


# ------------------------------------------------------------------------------------------------------ validation


def _check_packed(q, k, v) -> int:
    """The packed layout (T, H, D) of q, k, v; returns T. The rest (dtypes, heads, head dims) is api's to check."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must be packed as (T, H, D) (T tokens of every sequence end to end), got shape "
                f"{tuple(t.shape)}; from a padded (B, N, H, D) batch keep the real tokens, e.g. "
                f"{name}[padding_mask] with padding_mask (B, N) True on real tokens"
            )
    T, T_k, T_v = q.shape[0], k.shape[0], v.shape[0]
    if not T == T_k == T_v:
        raise ValueError(f"q, k, v must hold the same packed tokens, got T = {T}, {T_k}, {T_v}; varlen_attention "
                         "packs queries and keys alike (self-attention)")
    return T


def _check_window(window, causal: bool) -> None:
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int number of positions or None, got {window!r}")
    if window < 1:
        raise ValueError(f"window={window}: the window must be at least 1 (the query itself), or None for no window")
    if not causal:
        raise ValueError(f"window={window} is a causal sliding window (the {window} most recent positions of the "
                         "query's own sequence, itself included); pass causal=True with it")


def _check_same_packing(cu_seqlens, cu_seqlens_k) -> None:
    if cu_seqlens_k is None or cu_seqlens_k is cu_seqlens:
        return
    same = (isinstance(cu_seqlens_k, Tensor) and isinstance(cu_seqlens, Tensor)
            and cu_seqlens_k.shape == cu_seqlens.shape
            and torch.equal(cu_seqlens_k.to(cu_seqlens.device, cu_seqlens.dtype), cu_seqlens))
    if not same:
        raise ValueError(
            "cu_seqlens_k describes a different packing of the keys than cu_seqlens does of the queries "
            f"({_show(cu_seqlens_k)} vs {_show(cu_seqlens)}); varlen_attention supports self-attention packing only "
            "(one cu_seqlens for queries and keys). For chunked prefill or cross-attention, call selfattn.attention "
            "per sequence (causal=True aligns the last query with the last key), or pad the batch and pass "
            "mask=selfattn.masks.key_padding(lengths)"
        )


def _show(t) -> str:
    if not isinstance(t, Tensor):
        return repr(t)
    values = t.flatten()[:8].tolist()
    return f"{values}{'...' if t.numel() > 8 else ''}"
