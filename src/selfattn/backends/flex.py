"""The ``flex`` backend: torch's FlexAttention, compiled with ``torch.compile``, for any mask and score modifier.

FlexAttention compiles a ``score_mod`` and a ``mask_mod`` into one fused kernel that skips the blocks a BlockMask
marks empty. Here the BlockMask comes from selfattn's own block classifier (``Mask.block_states``: EMPTY blocks are
left out, FULL blocks need no mask, PARTIAL ones evaluate the mask_mod), the mask_mod is the call's mask seen at
selfattn's positions (query row i at ``q_start + i``, bottom-right), and the score_mod is the call's modifier —
a ready-made one rebuilt in scalar form from its spec, a custom one as given — with an additive ``bias`` read from
the bias tensor. Grouped-query attention runs without copies (``enable_gqa``).

* CUDA: forward and backward (gradients reach q, k, v and the tensors the modifier and the bias read), lse from
  ``return_lse``.
* CPU: forward only (torch's CPU FlexAttention compiles inference only, and returns no log-sum-exp). The lse comes
  from a *probe*: one extra key, visible to every row, with score 0 and a value that is one in an extra column, so
  that column of the output is w = 1 / (1 + exp(L)); a second extra column, one for every real key and zero for the
  probe, gives 1 − w = exp(L) / (1 + exp(L)) to full relative precision (computing it as 1 − w lost e^−L ulps when
  L < 0: 7 ulps with one key, found by the fuzzer). Then L = log((1 − w) / w) and the other columns are divided by
  1 − w. Exact in float32 while −87 < L < 87 (a row whose weights sum to less than e^−87 reads as fully masked);
  half precision runs in float32 on the CPU so that the probe keeps its precision. float64 is not compiled there.

Declined with the reason: dropout (selfattn's dropout drops the oracle's weights after the softmax, which a
score_mod cannot express), gradients on the CPU, sinks with gradients, block calls. A custom ``score_mod`` or
``mask_mod`` must be written with elementwise tensor operations: FlexAttention calls it on scalars (vmap).

Compiling takes seconds per call signature (tens of seconds for the first on a small CPU). The compiled function
is made once; torch.compile keeps one kernel per signature (shapes, dtypes, the mask and modifier objects), so reuse
one ``Mask`` / ``ScoreMod`` object across calls. FlexAttention is imported when a call runs, never at import.
"""

from __future__ import annotations

import os

import functools
import importlib.util
import math
import time
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from selfattn import masks, score_mods
from selfattn.backends.base import AttentionCall, Backend

BLOCK = 128  # FlexAttention's block size: the BlockMask's granularity
PROBE_SCORE = 0.0  # the probe key's score (CPU lse): L is exact for −87 < L − PROBE_SCORE < 87 in float32
COMPILE_TIMES: dict[tuple, float] = {}  # call signature -> seconds its first call took (compile + run)


@functools.cache
def _flex_available() -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention (torch >= 2.5 has)"
    return None


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# Signatures FlexAttention may be compiled for in one process. torch.compile's own limit (8 per function) is
# silent: past it, FlexAttention ran uncompiled, materialising every N_q x N_k score (the fuzzer's warnings showed
# it). Past this one the call raises BackendError instead.
RECOMPILE_LIMIT = 64


def _run_compiled(*args, **kwargs):
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        try:
            return _compiled()(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            from selfattn.backends import BackendError

            raise BackendError(
                f"flex: FlexAttention has been compiled for {RECOMPILE_LIMIT} call signatures in this process, and "
                "past that torch would run it uncompiled (every score in memory). Reuse shapes and Mask / ScoreMod "
                "objects, call torch._dynamo.reset() to start over, or choose another backend "
                "(backend='native' or 'tiled' on the CPU)") from e


# ------------------------------------------------------------------------------------ selfattn's functions, for Flex


def _flex_mod(mod: score_mods.ScoreMod):
    """A modifier in scalar form (FlexAttention calls it per score): ready-made ones rebuilt from their spec, a
    custom one as given, a chain link by link (a ready-made link's own function indexes (B, H, 1, 1) grids, which
    FlexAttention's scalars are not: found by make fuzz with alibi >> custom)."""
    if mod.spec is None and mod.parts:
        links = [_flex_mod(p) for p in mod.parts]

        def linked(s, b, h, q, k):
            for f in links:
                s = f(s, b, h, q, k)
            return s
        return linked
    if mod.spec is None:
        return mod.score_mod

    def one(leaf):
        kind = leaf[0]
        if kind == "softcap":
            cap = leaf[1]
            return lambda s, b, h, q, k: torch.tanh(s / cap) * cap
        if kind == "alibi":
            slopes = leaf[1]
            if slopes.dim() == 1:
                return lambda s, b, h, q, k: s + slopes[h].to(s.dtype) * (k - q).to(s.dtype)
            return lambda s, b, h, q, k: s + slopes[b, h].to(s.dtype) * (k - q).to(s.dtype)
        if kind == "relative":
            table, M = leaf[1], leaf[2]
            return lambda s, b, h, q, k: s + table[h, (k - q).clamp(-M, M) + M].to(s.dtype)
        table, bidirectional, max_distance = leaf[1], leaf[2], leaf[3]  # ("t5", ...)
        buckets = table.shape[1]
        return lambda s, b, h, q, k: s + table[h, score_mods.t5_bucket(k - q, bidirectional, buckets,
                                                                     max_distance)].to(s.dtype)

    parts = [one(leaf) for leaf in score_mods.leaves(mod.spec)]

    def chained(s, b, h, q, k):
        for p in parts:
            s = p(s, b, h, q, k)
        return s

    return chained


@dataclass(frozen=True)
class _Prepared:
    """The compiled call's arguments that do not depend on q, k, v's values: the BlockMask and the score_mod."""

    block_mask: object
    score_mod: object
    probe: bool  # CPU: one extra key, the probe, at row N_k (see the module docstring)


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Mask or ScoreMod -> {key: _Prepared}
_NO_MASK = masks.Mask(lambda b, h, q, k: k >= 0, "all", spec=("all",))  # key for calls without a mask


def _prepare(call: AttentionCall, probe: bool) -> _Prepared:
    """Remembered per Mask object (the score_mod per ScoreMod object) and shape: rebuilding them would make
    torch.compile see new functions, and compile again."""
    owner = call.mask if call.mask is not None else _NO_MASK
    key = (call.B, call.H_q, call.N_q, call.N_k, call.q_start, call.k_pos0, call.device, probe,
           call.score_mod, None if call.bias is None else (call.bias.data_ptr(), call.bias.shape))
    per = _PREPARED.setdefault(owner, {})
    if key not in per:
        if len(per) > 8:
            per.clear()
        per[key] = _build(call, probe)
    return per[key]


def _build(call: AttentionCall, probe: bool) -> _Prepared:
    from torch.nn.attention.flex_attention import BlockMask

    q0, k0, n_k = call.q_start, call.k_pos0, call.N_k
    mask = call.mask
    if mask is None:
        def mask_mod(b, h, q, k):
            return k >= 0
    elif probe:
        def mask_mod(b, h, q, k):
            return (k == n_k) | mask.mask_mod(b, h, q + q0, k.clamp(max=n_k - 1) + k0)
    else:
        def mask_mod(b, h, q, k):
            return mask.mask_mod(b, h, q + q0, k + k0)

    score_mod = None
    if call.score_mod is not None or call.bias is not None or probe:
        inner = _flex_mod(call.score_mod) if call.score_mod is not None else None
        bias = None if call.bias is None else call.bias.reshape((1,) * (4 - call.bias.dim()) + call.bias.shape).expand(
            call.B, call.H_q, call.N_q, call.N_k)

        def score_mod(s, b, h, q, k):
            kk = k.clamp(max=n_k - 1) if probe else k
            t = s if inner is None else inner(s, b, h, q + q0, kk + k0)
            if bias is not None:
                t = t + bias[b, h, q, kk].to(t.dtype)
            return torch.where(k == n_k, torch.full_like(t, PROBE_SCORE), t) if probe else t

    # the BlockMask from selfattn's block classifier: EMPTY blocks left out, FULL ones unmasked, PARTIAL ones masked
    if mask is None:
        states = torch.full((1, 1, -(-call.N_q // BLOCK), -(-n_k // BLOCK)), masks.FULL, dtype=torch.int8,
                            device=call.device)
    else:
        states = mask.block_states(call.B, call.H_q, call.N_q, n_k, BLOCK, BLOCK, call.device, q_pos0=q0, k_pos0=k0)
    n_keys = n_k + probe
    if probe:  # the probe key's block is visible to every row, through the mask_mod (so not FULL)
        states = torch.nn.functional.pad(states, (0, 1), value=masks.PARTIAL) if n_keys > states.shape[-1] * BLOCK \
            else states.clone()
        states[..., -1] = masks.PARTIAL
    partial, full = states == masks.PARTIAL, states == masks.FULL

    def blocks(sel):
        num = sel.sum(-1, dtype=torch.int32)  # (Bm, Hm, nQ)
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # selected blocks first
        return num.contiguous(), idx.contiguous()

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(call.N_q, n_keys))
    return _Prepared(block_mask, score_mod, probe)


# --------------------------------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class FlexBackend(Backend):
    def unavailable_reasons(self) -> list[str]:
        reason = _flex_available()
        return [reason] if reason else []

    def call_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        cpu = call.device.type == "cpu"
        if cpu and call.needs_grad:
            reasons.append("on the CPU torch compiles FlexAttention for inference only (inputs require grad); on "
                           "CUDA it has a backward")
        if cpu and call.dtype == torch.float64:
            reasons.append("torch's CPU FlexAttention takes float32, bfloat16 and float16, not float64")
        if cpu and os.environ.get("ATEN_CPU_CAPABILITY"):
            # measured: under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU the compiled CPU kernels gave errors of O(1)
            # against the oracle (tests/test_backends.py in make test-portable); declined until that is understood
            reasons.append(f"its compiled CPU kernels gave wrong results under ATEN_CPU_CAPABILITY="
                           f"{os.environ['ATEN_CPU_CAPABILITY']} (measured); unset it to use flex on the CPU")
        if call.sinks is not None and call.needs_grad:
            reasons.append("sinks join through the log-sum-exp, which carries no gradient here")
        if call.q_pos0 is not None or call.k_pos0:
            reasons.append("no block calls (q_pos0/k_pos0)")
        if call.device.type == "cuda" and not (16 <= call.D <= 256 and 16 <= call.D_v <= 256):
            reasons.append(f"FlexAttention's CUDA kernels take head dims 16..256 (got D={call.D}, D_v={call.D_v})")
        return reasons

    def forward(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        probe = call.device.type == "cpu"
        prepared = _prepare(call, probe)
        q, k, v = call.q, call.k, call.v
        if probe:
            work = torch.float32
            q, k, v = (t.to(work) for t in (q, k, v))
            k = torch.nn.functional.pad(k, (0, 0, 0, 1))  # (B, H_kv, N_k + 1, D): the probe key
            v = torch.nn.functional.pad(v, (0, 2, 0, 1))  # (B, H_kv, N_k + 1, D_v + 2)
            v[:, :, -1, -2] = 1.0  # the probe's weight w
            v[:, :, :-1, -1] = 1.0  # the real keys' weight 1 − w
        signature = (call.device.type, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), id(prepared))
        t0 = time.perf_counter() if signature not in COMPILE_TIMES else None
        result = _run_compiled(q, k, v, score_mod=prepared.score_mod, block_mask=prepared.block_mask,
                             scale=call.scale, enable_gqa=call.H_q != call.H_kv, return_lse=not probe)
        if t0 is not None:
            COMPILE_TIMES[signature] = time.perf_counter() - t0
        if not probe:
            out, lse = result
            lse = lse.float()
            dead = torch.isneginf(lse)
            if bool(dead.any()):
                out = torch.where(dead[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
        else:
            w = result[..., -2]  # (B, H_q, N_q): the probe's weight, 1 / (1 + exp(L − PROBE_SCORE))
            rest = result[..., -1]  # the real keys' weight, 1 − w
            dead = rest <= 0  # only the probe was visible
            lse = (PROBE_SCORE + torch.log(rest) - torch.log(w)).masked_fill(dead, -math.inf)
            out = (result[..., :-2] / rest.clamp(min=torch.finfo(w.dtype).tiny)[..., None])
            out = out.masked_fill(dead[..., None], 0.0).to(call.dtype)
        if call.sinks is not None:
            out, lse = score_mods.add_sinks(out, lse, call.sinks)
            out = out.to(call.dtype)
        return out, lse


BACKEND = FlexBackend(
    name="flex",
    description="torch's FlexAttention compiled by torch.compile: any mask_mod and score_mod, block-sparse; "
                "forward and backward on CUDA, forward on the CPU; compiles once per call signature",
    supports_score_mods=True,
    supports_sinks=True,
    extra={"compiles": True},
)
