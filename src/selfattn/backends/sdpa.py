"""The ``sdpa`` backend: torch's scaled_dot_product_attention kernels, for the calls they express exactly.

SDPA's fused kernels (FlashAttention-2, cuDNN and memory-efficient attention on CUDA; the flash kernel on the CPU)
take no mask, a top-left causal flag, or a dense additive mask. This backend hands them a call only when that means
the same thing as selfattn's call, and declines the rest with the reason:

* no mask; ``causal`` where top-left equals selfattn's bottom-right (queries and keys aligned, N_q == N_k) or where
  every query sees every key (decoding); grouped-query attention (K and V are not copied on the CPU: the kernel
  takes the groups itself where this torch's does, ``cpu_kernel_groups``, else views fold them; on CUDA
  FlashAttention-2 takes them where it does, ``cuda_flash_groups``, and the memory-efficient kernel gets copies);
* any other mask, an additive ``bias``, or an additive ready-made score modifier (ALiBi, relative and T5 biases)
  as one dense float mask, when it is small: at most ``DENSE_MAX_ELEMENTS`` after broadcasting (a key-padding
  mask is (B, 1, 1, N_k) whatever N_q; a causal or window mask is N_q x N_k). Past that the dense mask costs more
  memory than the attention; the tiled, Triton and Flex backends skip masked blocks instead;
* sinks, without gradients: the fused kernel's log-sum-exp lets the sink join each row (``score_mods.add_sinks``).

It declines dropout (selfattn's dropout drops the weights ``score_mods.dropout_keep`` names, the oracle's; SDPA
draws its own), soft-capping and custom score modifiers (they change each score inside the softmax), gradients for a
bias or a modifier's tensors (SDPA's CPU kernel gives none for its mask), and block calls.

How it differs from the oracle: float32 accumulation inside torch's kernels, as SDPA. Every backend returns the
per-row log-sum-exp, which ``torch.nn.functional.scaled_dot_product_attention`` does not; so the backend calls the
kernels SDPA dispatches to directly, with autograd from their derivative formulas: on the CPU
``aten._scaled_dot_product_flash_attention_for_cpu`` (what SDPA runs there; it also skips SDPA's dispatch), on CUDA
``aten._scaled_dot_product_flash_attention`` (FlashAttention-2: fp16/bf16, no mask, D == D_v <= 256) or else
``aten._scaled_dot_product_efficient_attention`` (with the dense mask). SDPA returns NaN (CUDA) or a zero
log-sum-exp (CPU) for a row that sees no key; such rows are set to zeros with lse −inf here.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import masks, score_mods
from selfattn.backends.base import AttentionCall, Backend, dense_rows

# The largest dense mask (elements after broadcasting, e.g. N_q·N_k for a causal mask) built for SDPA: 4M elements,
# 16 MiB in float32, about what a 2k x 2k causal mask takes. Larger masks are left to backends that skip blocks.
DENSE_MAX_ELEMENTS = 1 << 22
FLASH_CUDA_MAX_HEAD_DIM = 256

_FLASH_CPU = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or \
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass(frozen=True)
class _Plan:
    """What the kernel gets: ``causal`` (aligned top-left flag), ``add`` (None or a float mask broadcastable to
    (B, H_q, N_q, N_k), −inf where hidden) and ``dead`` (None or a bool (B or 1, H_q or 1, N_q) of rows that see
    no key)."""

    causal: bool = False
    add: Tensor | None = None
    dead: Tensor | None = None


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Mask or ScoreMod -> {key: _Plan}


def _sees_every_key(call: AttentionCall) -> bool:
    return call.q_start >= call.k_pos0 + call.N_k - 1


def _causal_flag(call: AttentionCall) -> bool | None:
    """For a plain causal mask: True when torch's top-left flag means the same, False when no mask is needed,
    None otherwise."""
    if _sees_every_key(call):
        return False
    if call.N_q == call.N_k and call.q_start == call.k_pos0:
        return True
    return None


def _mask_elements(call: AttentionCall) -> int:
    """Elements of the dense mask this call would need (after broadcasting), without building it."""
    rows = call.N_q
    if call.mask is not None and call.mask.spec is not None and all(
            leaf[0] in ("key_padding", "key_range") for leaf in _leaves(call.mask.spec)):
        rows = 1  # a mask of keys only: (B, 1, 1, N_k)
    heads = call.H_q if call.score_mod is not None else 1
    return call.B * heads * rows * call.N_k


def _leaves(spec: tuple) -> list[tuple]:
    if spec[0] in ("and", "or"):
        return _leaves(spec[1]) + _leaves(spec[2])
    return [spec]


def _needs_dense(call: AttentionCall) -> bool:
    if call.score_mod is not None:
        return True
    if call.mask is None:
        return False
    return not (call.mask.spec == ("causal",) and _causal_flag(call) is not None)


def _plan(call: AttentionCall, dtype: torch.dtype) -> _Plan:
    """The kernel's mask arguments; remembered per Mask (or ready-made ScoreMod) object, shape and positions (a
    causal mask, a padding mask or an ALiBi modifier reused by every layer and step)."""
    mask, mod = call.mask, call.score_mod
    if mod is None and (mask is None or (mask.spec == ("causal",) and _causal_flag(call) is not None)):
        return _Plan(causal=mask is not None and bool(_causal_flag(call)))
    owner = mod if mod is not None else mask
    if owner.spec is None or (mask is not None and mask.spec is None):  # a custom function: built for this call
        return _dense_plan(call, dtype)
    specs = (mask.spec if mask is not None else (), mod.spec if mod is not None else ())
    tensors = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in _spec_tensors(specs))
    key = (call.B, call.H_q, call.N_q, call.N_k, call.q_start, call.k_pos0, call.device, dtype, tensors, mask)
    per_owner = _PLANS.setdefault(owner, {})
    plan = per_owner.get(key)
    if plan is None:
        if len(per_owner) > 8:
            per_owner.clear()
        plan = per_owner[key] = _dense_plan(call, dtype)  # the mask's and modifier's part: a bias is added per call
    return plan


def _spec_tensors(spec) -> list[Tensor]:
    return [t for part in spec for t in ([part] if isinstance(part, Tensor) else
                                         _spec_tensors(part) if isinstance(part, tuple) else [])]


def _dense_plan(call: AttentionCall, dtype: torch.dtype) -> _Plan:
    """The mask (and an additive modifier's term) as one float mask: 0 visible, −inf hidden."""
    b, h, q, k = masks.grid(call.B, call.H_q, call.N_q, call.N_k, call.device, q_pos0=call.q_start,
                            k_pos0=call.k_pos0)
    add, dead = None, None
    if call.mask is not None:
        visible = call.mask.mask_mod(b, h, q, k)  # broadcastable to (B, H_q, N_q, N_k), as small as it can be
        add = torch.zeros(visible.shape, dtype=dtype, device=call.device).masked_fill_(~visible, -math.inf)
        dead = ~visible.any(-1)
        dead = dead if bool(dead.any()) else None
    if call.score_mod is not None:
        term = score_mods.additive_term(call.score_mod, b, h, q, k, dtype)  # (1 or B, H_q, N_q, N_k)
        add = term if add is None else add + term
    return _Plan(add=add, dead=dead)


@functools.cache
def cpu_kernel_groups() -> bool:
    """Whether this torch's CPU flash kernel takes fewer K/V heads than query heads itself (grouped-query attention
    without copies, as ``enable_gqa`` uses it), checked once on a small call against the same call with K and V
    repeated per query head."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(2))
    try:
        got = _FLASH_CPU(q, k, v, 0.0, True, scale=0.5)[0]
    except RuntimeError:
        return False
    want = _FLASH_CPU(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.0, True, scale=0.5)[0]
    return bool(torch.equal(got, want))


def _run_cpu(call: AttentionCall, plan: _Plan, add: Tensor | None) -> tuple[Tensor, Tensor]:
    """The CPU flash kernel, K and V shared by the query heads of a group without copies. Shapes as in the call."""
    q, k, v = call.q, call.k, call.v
    B, H_q, N_q, D = q.shape
    D_v = v.shape[-1]
    if D_v != D:  # the kernel wants one head size: zero columns add nothing to scores or outputs
        if D_v < D:
            v = torch.nn.functional.pad(v, (0, D - D_v))
        else:
            q, k = (torch.nn.functional.pad(t, (0, D_v - D)) for t in (q, k))
    g = H_q // k.shape[1]
    if g == 1 or cpu_kernel_groups():
        out, lse = _FLASH_CPU(q, k, v, 0.0, plan.causal, attn_mask=add, scale=call.scale)[:2]
    elif not plan.causal and (add is None or (add.shape[1] == 1 and add.shape[2] == 1)):
        # rows independent of the head: the g query heads of a group are g·N_q rows of one head (B, H_kv, g·N_q, D)
        folded = q.reshape(B, H_q // g, g * N_q, -1)
        out, lse = _FLASH_CPU(folded, k, v, 0.0, False, attn_mask=add, scale=call.scale)[:2]
        out, lse = out.reshape(B, H_q, N_q, -1), lse.reshape(B, H_q, N_q)
    else:  # per batch element: the kernel's batch axis holds H_kv, its head axis the group, K and V expanded (views)
        outs, lses = [], []
        for bi in range(B):
            qb = q[bi].unflatten(0, (-1, g))  # (H_kv, g, N_q, D)
            kb, vb = (t[bi].unsqueeze(1).expand(t.shape[1], g, *t.shape[2:]) for t in (k, v))
            ab = None
            if add is not None:
                ab = add[bi if add.shape[0] > 1 else 0]  # (H_q or 1, N_q or 1, N_k)
                ab = ab.unsqueeze(0) if ab.shape[0] == 1 else ab.unflatten(0, (-1, g))
            o, l_ = _FLASH_CPU(qb, kb, vb, 0.0, plan.causal, attn_mask=ab, scale=call.scale)[:2]
            outs.append(o.flatten(0, 1))  # (H_q, N_q, ·)
            lses.append(l_.flatten(0, 1))
        out, lse = torch.stack(outs), torch.stack(lses)
    return (out if out.shape[-1] == D_v else out[..., :D_v]), lse


@functools.cache
def cuda_flash_groups(device: str) -> bool:
    """Whether FlashAttention-2 inside this torch takes fewer K/V heads than query heads on ``device`` (its kernel
    supports grouped-query attention; SDPA's ``enable_gqa`` relies on it): checked once per device on a small call
    against the same call with K and V repeated per query head, so a torch whose op does not is served by copies."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 5, 8, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    try:
        got = flash(q, k, v, 0.0, True, False, scale=0.5)[0]
    except RuntimeError:
        return False
    want = flash(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.0, True, False, scale=0.5)[0]
    return bool(torch.equal(got, want))


def _run_cuda(call: AttentionCall, plan: _Plan, add: Tensor | None) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 inside SDPA where it applies, else the memory-efficient kernel (it takes the dense mask)."""
    q, k, v = call.q, call.k, call.v
    g = call.H_q // call.H_kv
    flash = add is None and q.dtype in (torch.float16, torch.bfloat16) and call.D == call.D_v and \
        call.D <= FLASH_CUDA_MAX_HEAD_DIM and call.D % 8 == 0
    if g > 1 and not (flash and cuda_flash_groups(str(q.device))):  # (B, H_q, N_k, ·): one head count
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (a decoding step copies its cache here)
    if flash:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, plan.causal, False, scale=call.scale)
        return r[0], r[1]
    if add is not None and add.dtype != q.dtype:
        add = add.to(q.dtype)
    if add is not None:  # the kernel reads (B, H_q, N_q, N_k) through strides: a view, no copy
        add = add.expand(call.B, call.H_q, call.N_q, call.N_k)
    r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, add, True, 0.0, plan.causal,
                                                               scale=call.scale)
    return r[0], r[1][..., :call.N_q]  # the lse is padded to a multiple of 32 rows


@dataclass(frozen=True)
class SdpaBackend(Backend):
    def call_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.score_mod is not None and not call.score_mod.additive:
            reasons.append(f"SDPA cannot apply score modifier {call.score_mod.name} inside its softmax (only an "
                           "additive one, ALiBi or a relative bias, as a dense mask)")
        if _needs_dense(call):
            n = _mask_elements(call)
            if n > DENSE_MAX_ELEMENTS:
                what = call.mask.name if call.mask is not None else call.score_mod.name
                if call.mask is not None and call.mask.spec == ("causal",):
                    what = (f"bottom-right causal with N_q={call.N_q} != N_k={call.N_k} (torch's flag is "
                            "top-left)")
                reasons.append(f"{what} would go to SDPA as a dense mask of {n:,} elements, over its limit of "
                               f"{DENSE_MAX_ELEMENTS:,} (sdpa.DENSE_MAX_ELEMENTS)")
        grads = [t for t in ((call.bias,) if call.bias is not None else ()) + call.captures if t.requires_grad]
        if grads and torch.is_grad_enabled():
            reasons.append("SDPA gives no gradient for its mask: a bias or modifier tensor requires grad")
        if call.sinks is not None and call.needs_grad:
            reasons.append("sinks join through the log-sum-exp only without gradients (inputs require grad)")
        if call.q_pos0 is not None or call.k_pos0:
            reasons.append("no block calls (q_pos0/k_pos0)")
        return reasons

    def forward(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        call = dense_rows(call)  # the kernels below SDPA's public API misread a strided head dim
        run = self._plain_run(call)
        done = run(call.q, call.k, call.v) if run is not None else None
        if done is not None:  # the shortest path (decoding steps cost about the kernel's 20 µs): nothing to plan
            return done
        mask_dtype = call.dtype if call.device.type == "cpu" and call.dtype in (torch.float32, torch.float64) \
            else torch.float32
        plan = _plan(call, mask_dtype) if _needs_dense(call) else (_Plan() if call.mask is None else
                                                                   _Plan(causal=bool(_causal_flag(call))))
        add, dead = plan.add, plan.dead
        if call.bias is not None:
            bias = call.bias.to(mask_dtype)
            add = bias if add is None else add + bias
            dead = torch.isneginf(add).all(-1)  # a bias may hide whole rows too
            dead = dead if bool(dead.any()) else None
        run = _run_cpu if call.device.type == "cpu" else _run_cuda
        out, lse = run(call, plan, add)
        if dead is not None:  # rows that see no key: zeros and −inf (the kernels give NaN or lse 0)
            dead = dead.reshape((1,) * (3 - dead.dim()) + tuple(dead.shape)).expand(call.B, call.H_q, call.N_q)
            out = torch.where(dead[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
            lse = lse.masked_fill(dead, -math.inf)
        lse = lse if lse.dtype == torch.float32 else lse.float()
        if call.sinks is not None:
            out, lse = score_mods.add_sinks(out, lse, call.sinks)
            out = out.to(call.dtype)
        return out, lse

    def repeat(self, call: AttentionCall):
        """On the CPU, a call without extras whose mask is none or causal: one kernel call (q, k, v with a strided
        head dim are made dense first, see base.dense_rows), kept for later calls (``Backend.repeat``)."""
        return self._plain_run(call)

    def _plain_run(self, call: AttentionCall):
        """``run(q, k, v) -> (out, lse)``, or None from ``run`` for a causal call torch's top-left flag does not
        express (N_q > 1 queries against N_k != N_q keys: a kept signature's N_k varies within its bucket)."""
        if not (call.device.type == "cpu" and call.bias is None and call.score_mod is None and call.sinks is None
                and not call.dropout_p and (call.H_q == call.H_kv or cpu_kernel_groups()) and call.D == call.D_v
                and (call.mask is None or call.mask.spec == ("causal",)) and call.q_pos0 is None and not call.k_pos0):
            return None
        causal, scale = call.mask is not None, call.scale

        def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
            flag = False  # no mask, or one query: it sees every key
            if causal and q.shape[2] > 1:
                if q.shape[2] != k.shape[2]:
                    return None
                flag = True  # aligned: top-left is bottom-right
            if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # (rare: a strided head dim)
                q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
            r = _FLASH_CPU(q, k, v, 0.0, flag, scale=scale)
            lse = r[1]
            return r[0], (lse if lse.dtype is torch.float32 else lse.float())
        return run


BACKEND = SdpaBackend(
    name="sdpa",
    description="torch's scaled_dot_product_attention kernels (FlashAttention-2 / memory-efficient on CUDA, the "
                "fused flash kernel on the CPU) for what they express exactly: no mask, aligned causal, GQA, small "
                "dense masks and additive biases",
    # float64 is the checking dtype: the CPU kernel's blocked softmax is a few ulps off the textbook's rounding there,
    # beyond the 2x rule; tiled and reference serve it
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    supports_sinks=True,
    supports_score_mods=True,  # additive ready-made ones only (call_reasons declines the rest)
)
