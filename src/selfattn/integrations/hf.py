"""selfattn inside Hugging Face transformers: ``attn_implementation="selfattn"``.

    >>> import selfattn.integrations.hf  # registers "selfattn" with transformers  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_config(config, attn_implementation="selfattn")  # doctest: +SKIP

Importing this module registers ``attention_forward`` with transformers' ``AttentionInterface`` and the mask builder
of transformers' "sdpa" (``sdpa_mask``) with its ``AttentionMaskInterface``, so every model family that supports the
interface (Llama-style with GQA and RoPE, GPT-2, BERT-style encoders, ...) runs its attention on selfattn, with
transformers' own caches for generation. ``output_attentions=True`` returns the weights
(``selfattn.attention_weights``).

Masks: transformers hands the layer either None plus ``is_causal`` (no padding) or a 4-D bool mask (True = attend)
of shape (B, 1, N_q, N_k). None becomes ``causal=True`` — bottom-right aligned, which is what a KV cache needs. A bool
mask is recognised, when it is exactly one, as "keys", "causal & keys" or "sliding_window(w) & keys" (the window of
Mistral, Qwen2, Gemma-3 layers, read off the mask itself), where "keys" is ``masks.key_padding(lengths)`` for right
padding and ``masks.key_range(starts, ends)`` for left padding (batched generation) or both; these ready-made masks
run on the Triton kernels on a GPU and let every tiled backend skip whole blocks without reading N_q x N_k values. Any
other pattern is passed as the dense bool mask. A float mask is an additive bias.

Model variants: ``softcap`` (Gemma-2's logit soft-capping) becomes ``score_mods.softcap``, ``s_aux`` (gpt-oss's
learned sinks) becomes ``sinks=``, and the attention dropout transformers passes in training becomes selfattn's
counter-based dropout, seeded from torch's global generator (``torch.manual_seed`` repeats a training step).

Differences from transformers' eager attention: a query row whose keys are all masked (a left-padding position)
gets zeros (plus the sink's share), not a uniform average; dropout drops other weights than torch's RNG would (the
same ones on every selfattn backend).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import Tensor

import selfattn
from selfattn import masks, score_mods

NAME = "selfattn"


# Callables that see every call's q, k (after rotary), v and its mask, as selfattn gets them (selfattn.explain's
# capture adds one while a model runs); empty, this costs one truth test per call.
recorders: list = []


def register(name: str = NAME, *, backend: str | None = None) -> str:
    """Register selfattn with transformers under ``name`` (done on import with "selfattn"); returns the name.
    ``backend`` pins a backend (e.g. ``register("selfattn-oracle", backend="reference")`` to check a model)."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError as e:
        raise ImportError(f"selfattn.integrations.hf needs transformers with AttentionInterface and "
                          f"AttentionMaskInterface (tested with 5.24): pip install 'selfattn[hf]' ({e})") from e

    AttentionInterface.register(name, attention_forward if backend is None else
                                functools.partial(attention_forward, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, backend: str | None = None, **kwargs):
    """transformers' attention-function signature: query (B, H_q, N_q, D), key (B, H_kv, N_k, D),
    value (B, H_kv, N_k, D_v) -> (out (B, N_q, H_q, D_v), weights (B, H_q, N_q, N_k) or None)."""
    extra = _variants(dropout, kwargs.get("softcap"), kwargs.get("s_aux"), query)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    N_q, N_k = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    mask = None
    if attention_mask is None:
        if causal and 1 < N_q < N_k:
            # transformers passes no mask here only when the cache is empty (a static cache's prefill): the keys past
            # N_q are unwritten slots, and the queries start at position 0 (top-left alignment)
            key, value = key[:, :, :N_q], value[:, :, :N_q]
            bias = None if bias is None else bias[..., :N_q]
    elif attention_mask.dtype == torch.bool:
        causal, mask = False, structured_mask(attention_mask)
    else:
        causal = False
        bias = attention_mask if bias is None else bias + attention_mask
    for record in recorders:
        record(module, query, key, value, causal=causal, mask=mask, bias=bias, scale=scaling)
    out = selfattn.attention(query, key, value, causal=causal, mask=mask, bias=bias, scale=scaling, backend=backend,
                             **extra)
    weights = None
    if _weights_requested(module, kwargs):
        weights = selfattn.attention_weights(query, key, causal=causal, mask=mask, bias=bias, scale=scaling,
                                             score_mod=extra.get("score_mod"), sinks=extra.get("sinks"))
    return out.transpose(1, 2).contiguous(), weights  # (B, N_q, H_q, D_v)


def _variants(dropout, softcap, s_aux, query: Tensor) -> dict:
    """selfattn's arguments for transformers' ``dropout`` (already 0 outside training), ``softcap`` and ``s_aux``."""
    extra = {}
    if dropout:
        extra["dropout_p"] = float(dropout)
    if softcap is not None:
        extra["score_mod"] = score_mods.softcap(float(softcap))
    if s_aux is not None:
        extra["sinks"] = s_aux if s_aux.dtype == query.dtype else s_aux.to(query.dtype)
    return extra


def _weights_requested(module, kwargs) -> bool:
    """output_attentions=True reaches the layer as a kwarg, the config's flag, or (GPT-2, which pops the kwarg) only as
    transformers' active output collector asking for attentions."""
    if kwargs.get("output_attentions") or getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # an older layout of transformers: the kwarg and the config are all there is
        return False
    collecting = _active_collector.get()
    return collecting is not None and ("attentions" in collecting or "cross_attentions" in collecting)


# --------------------------------------------------------------------------------------------- transformers' masks

# The last few bool masks recognised, (weakref, version, selfattn mask), newest last: every layer of a kind passes the
# same tensor, and models that alternate sliding-window and full layers (Gemma-3) pass two.
_recent: list = []
_RECENT = 4


def structured_mask(mask: Tensor) -> masks.Mask | Tensor:
    """A (B or 1, 1, N_q, N_k) bool mask (True = attend) as ``keys``, ``causal() & keys`` or
    ``sliding_window(w) & keys`` with ``keys = key_mask(valid)`` when it is exactly one of those, else the tensor
    itself (a dense mask)."""
    if torch.compiler.is_compiling():
        return mask  # reading the mask's values would break the graph; it travels dense through the custom op
    version = _version(mask)
    for ref, seen, result in _recent:
        if ref() is mask and seen == version:
            return result
    result = _recognise(mask)
    _recent.append((weakref.ref(mask), version, result))
    del _recent[:-_RECENT]
    return result


def _version(t: Tensor) -> int:
    """The tensor's in-place version (a mask edited in place is recognised again); inference tensors have none."""
    return -1 if t.is_inference() else t._version


def _recognise(mask: Tensor) -> masks.Mask | Tensor:
    if mask.dim() != 4 or mask.shape[1] != 1:
        return mask
    N_q, N_k = mask.shape[2], mask.shape[3]
    valid = mask.any(dim=2)[:, 0]  # (B, N_k): keys that some query sees
    by_key = valid[:, None, None, :]  # (B, 1, 1, N_k)
    if torch.equal(mask, by_key.expand_as(mask)):
        return key_mask(valid)
    causal = masks.causal().dense(1, 1, N_q, N_k, mask.device)  # bottom-right: the queries are the newest tokens
    if torch.equal(mask, (by_key & causal).expand_as(mask)):
        return masks.causal() & key_mask(valid)
    window = _window(mask)
    if window is not None and torch.equal(mask, (by_key & window.dense(1, 1, N_q, N_k, mask.device)).expand_as(mask)):
        return window & key_mask(valid)
    return mask


def _window(mask: Tensor) -> masks.Mask | None:
    """The sliding window a (B, 1, N_q, N_k) mask would be, if it is one: one more than the largest distance
    q_pos − k_pos of a visible pair (bottom-right positions); None when no pair looks back from its diagonal."""
    N_q, N_k = mask.shape[2], mask.shape[3]
    first = mask.view(torch.uint8).argmax(-1)  # (B, 1, N_q): each row's first visible key (a view: no N² copy)
    q_pos = torch.arange(N_k - N_q, N_k, device=mask.device)
    largest = torch.where(mask.any(-1), q_pos - first, -1).amax().item()
    return masks.sliding_window(int(largest) + 1) if largest >= 0 else None


def key_mask(valid: Tensor) -> masks.Mask:
    """Key j of batch element b is visible when ``valid[b, j]`` (padding anywhere: left, right, both).
    Right padding becomes ``masks.key_padding(lengths)``, one run of real keys per batch element (left padding, or
    both sides) ``masks.key_range(starts, ends)``: ready-made masks the kernels take. Anything else becomes a Mask
    with an exact block classifier (no kernel form)."""
    n = valid.shape[-1]
    positions = torch.arange(n, device=valid.device)[None]  # (1, N_k)
    lengths = valid.sum(-1)  # (B,)
    if torch.equal(valid, positions < lengths[:, None]):
        return masks.key_padding(lengths)
    starts = torch.where(lengths > 0, valid.int().argmax(-1), n)  # (B,) first real key; N_k when there is none
    ends = starts + lengths
    if torch.equal(valid, (positions >= starts[:, None]) & (positions < ends[:, None])):
        return masks.key_range(starts, None if bool((ends == n).all()) else ends)
    counts = torch.nn.functional.pad(valid.long().cumsum(-1), (1, 0))  # (B, N_k + 1): valid keys before each index

    def mask_mod(b, h, q, k):
        return valid.to(k.device)[b, k.clamp(0, n - 1)] & (k >= 0) & (k < n)

    def block_fn(B, H, q_lo, q_hi, k_lo, k_hi):
        lo, hi = k_lo.clamp(0, n), k_hi.clamp(0, n)  # (1, nK)
        c = counts.to(k_lo.device)
        seen = c[:, hi[0]] - c[:, lo[0]]  # (B, nK) valid keys in each block
        any_ = (seen > 0)[:, None, None, :]
        all_ = (seen == (k_hi - k_lo)[0])[:, None, None, :]
        return masks._state(any_, all_).expand(-1, 1, q_lo.shape[0], -1)

    return masks.Mask(mask_mod, "key_mask", block_fn)


register()  # on import: `import selfattn.integrations.hf` is all a user writes
