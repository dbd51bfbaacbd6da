"""Triton kernels for exact attention, forward and backward (FlashAttention-2's algorithm, written for selfattn).

Imported only by ``triton_flash`` when a call runs: importing selfattn never imports Triton.

How these kernels differ from the oracle (``selfattn.reference``)
-------------------------------------------------------------------
* Tiles: a program owns BLOCK_M query rows (forward, dQ) or BLOCK_N keys (dK/dV) and streams over the other side;
  the N_q x N_k matrices never exist in memory.
* Online softmax in base 2: scores are multiplied by ``scale / ln 2`` once, so ``exp2`` (one instruction) replaces
  ``exp``; the running maximum and sum are rescaled by ``exp2(m_old − m_new)`` as new key blocks arrive.
* Matrix products take the input dtype (fp16/bf16 tensor cores) and accumulate in float32; the softmax weights are
  rounded to the input dtype before P·V and dS·K, as in FlashAttention. fp32 inputs use IEEE products (no TF32).
* The log-sum-exp of each row is saved (natural log, −inf for a row that sees no key) and the backward recomputes
  P = exp(S − lse) instead of storing it.
* Backward without atomics: one program per key block accumulates dK and dV over every query block *and over the
  query heads that share the key/value head* (grouped-query attention without copying K or V); a second kernel per
  query block computes dQ. Every sum runs in a fixed order, so results are bitwise repeatable.
* Masks are arguments, not code: causal / sliding window (positions, bottom-right by default), a range of real keys
  per batch element (start and length: left and right padding), and per-position document ids. Key (or query) blocks
  that the mask hides entirely are never visited; blocks it shows entirely run without evaluating the mask; only the
  blocks on a boundary evaluate it.
* An additive bias is loaded tile by tile next to the scores (stride 0 where it broadcasts) and added in log2 units;
  since it may hold −inf, every block then guards the running maximum as the masked blocks do. Its gradient is dS,
  which the dQ kernel stores when asked (BIAS_GRAD).
* Score modifiers are arguments too (``score_mods``' ready-made ones, from their spec): soft-capping, ALiBi slopes
  (per head or per batch element and head) and a relative-position bias, read from a (H_q, N_q + N_k − 1) row of
  the table per distance k_pos − q_pos that the host gathers (so clamped and T5-bucketed tables are one path). Each
  additive term is added before or after the soft-cap (constexpr 1 or 2), in log2 units like the scores. The order
  is the oracle's: S·scale → score_mod → + bias → mask → softmax (with the sink) → dropout.
* Sinks join the softmax in the forward's epilogue (one more term of the denominator). Dropout regenerates
  ``score_mods.dropout_keep`` bit for bit from (seed, b, h, q_pos, k_pos) in uint32 arithmetic (which wraps mod 2³²
  as the oracle's int64 ``& 0xFFFFFFFF`` does): the forward multiplies P by keep/(1 − p) before P·V, and the
  backward regenerates the same mask for dV and dP (δ = rowsum(dO∘O) still holds for the dropped output).
* The ALiBi slopes' gradient Σ dS·(k_pos − q_pos) is summed per query row by the dQ kernel into its own slot of a
  (B, H_q, N_q) buffer, which the host adds up in a fixed order: deterministic, no atomics.

Positions: query row i is at ``q_pos0 + i``, key j at ``k_pos0 + j`` (``AttentionCall.q_start`` / ``k_pos0``).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # 1/ln 2: exp(x) = exp2(x·LOG2E), so the scale carries it and exp2 is used
LN2 = tl.constexpr(0.6931471805599453)  # converts the base-2 log-sum-exp back to the natural log the API returns
FAR = tl.constexpr(1 << 30)  # a position beyond any sequence (int32), for empty ranges
MIX = tl.constexpr(0x45D9F3B)  # score_mods._MIX and _GOLDEN: the dropout hash's constants
GOLDEN = tl.constexpr(0x61C88647)

# Triton compiles a kernel again for every integer argument that changes between "1", "divisible by 16" and
# "other". Lengths, positions and head counts change from call to call and gain nothing from it (their loads are
# masked anyway), so they stay plain integers: one compiled kernel serves every length. Strides keep it (a unit or
# 16-aligned stride is what lets loads vectorise).
RUNTIME_INTS = ["H_q", "H_kv", "N_q", "N_k", "N_DOC", "GROUP", "q_pos0", "k_pos0", "window", "TUNE_N_Q", "TUNE_N_K",
                "s_rel_h", "rel_d0", "seed", "drop_thr"]


def _kernel(fn):
    """@triton.jit for the launched kernels, with the runtime integers above not specialised."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in RUNTIME_INTS if n in names])


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter multiplies bf16 as raw uint16; products of bf16 values are exact in fp32, so
    # an fp32 product of the same (already rounded) operands is what the tensor cores compute.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(q_pos, k_pos, q_doc, k_doc, q_ok, k_ok, window,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr):
    """May the query see the key? Arguments broadcast to the tile (queries x keys or keys x queries).
    q_ok: the row exists (and has a document); k_ok: the key exists and is in its batch element's key range."""
    keep = q_ok & k_ok
    if CAUSAL:
        keep = keep & (k_pos <= q_pos)
    if WINDOW:
        keep = keep & (k_pos > q_pos - window)
    if HAS_DOC:
        keep = keep & (q_doc == k_doc)
    return keep


@triton.jit
def _tanh(x):
    """tanh in float32 from exp2 (Triton's interpreter has no libdevice): (1 − e)/(1 + e) with e = exp(−2|x|), which
    loses no digits for |x| ≥ 1/4, and the Taylor series to x⁹ below (its next term is < 1e-8 relative there)."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * (-2.0 * LOG2E))
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(ax < 0.25, near, tl.where(x < 0, -far, far))


@triton.jit
def _modify(s, q_pos, k_pos, ok, slope, rel_base, rel_d0, cap2,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr):
    """The ready-made score modifier on scores in log2 units (arguments broadcast to the tile, either orientation).
    ALIBI / REL: 0 absent, 1 added before the soft-cap, 2 after it. slope and the gathered table carry LOG2E, cap2 =
    cap·LOG2E, so cap2·tanh(s/cap2) is cap·tanh(S/cap) in log2 units. Returns (s, t): t = tanh of the soft-cap, whose
    derivative 1 − t² the backward needs (t = s without one)."""
    if ALIBI == 1:
        s += slope * (k_pos - q_pos).to(tl.float32)
    if REL == 1:
        s += tl.load(rel_base + (k_pos - q_pos - rel_d0), mask=ok, other=0.0) * LOG2E
    t = s
    if SOFTCAP:
        t = _tanh(s / cap2)
        s = cap2 * t
    if ALIBI == 2:
        s += slope * (k_pos - q_pos).to(tl.float32)
    if REL == 2:
        s += tl.load(rel_base + (k_pos - q_pos - rel_d0), mask=ok, other=0.0) * LOG2E
    return s, t


@triton.jit
def _head_mods(SLOPES, RELD, b, h, s_sl_b, s_rel_h, ALIBI: tl.constexpr):
    """Head h's ALiBi slope in log2 units (0.0 without ALiBi) and the start of its row of the gathered relative-bias
    table (read only with REL)."""
    slope = 0.0
    if ALIBI > 0:
        slope = tl.load(SLOPES + b * s_sl_b + h) * LOG2E
    return slope, RELD + h * s_rel_h


@triton.jit
def _mix(x):
    """score_mods._mix on uint32 (products wrap mod 2³², as the int64 version's & 0xFFFFFFFF makes them)."""
    x = ((x >> 16) ^ x) * MIX
    x = ((x >> 16) ^ x) * MIX
    return (x >> 16) ^ x


@triton.jit
def _drop_rows(seed, b, h, q_pos):
    """The per-row half of score_mods.dropout_keep's hash; ``seed`` is _mix(seed) (host), as int32 bits."""
    s = seed.to(tl.uint32, bitcast=True)
    r = _mix(_mix(s ^ b.to(tl.uint32)) + h.to(tl.uint32) * GOLDEN)
    return _mix(r + q_pos.to(tl.uint32) * GOLDEN)  # negative positions wrap as the oracle's & 0xFFFFFFFF does


@triton.jit
def _drop_cols(seed, k_pos):
    return _mix(seed.to(tl.uint32, bitcast=True) + k_pos.to(tl.uint32) * GOLDEN)


@triton.jit
def _kept(rows, cols, thr, drop_scale):
    """keep/(1 − p) of a tile from its row and column hashes (broadcast): 0 where dropped. thr = round(p·2³²) as
    int32 bits (the host declines p that rounds to 2³²)."""
    x = rows ^ cols
    x = ((x >> 16) ^ x) * MIX
    return tl.where(((x >> 16) ^ x) >= thr.to(tl.uint32, bitcast=True), drop_scale, 0.0)


@triton.jit
def _span(lo, hi, full_lo_raw, full_hi_raw, BLOCK: tl.constexpr):
    """Align [lo, hi) to blocks and carve out the block-aligned middle [full_lo, full_hi) that needs no mask."""
    lo = tl.maximum(lo, 0)
    lo = (lo // BLOCK) * BLOCK
    hi = tl.maximum(hi, lo)
    full_lo = lo + tl.cdiv(tl.maximum(full_lo_raw - lo, 0), BLOCK) * BLOCK
    full_lo = tl.minimum(full_lo, hi)
    full_hi = full_lo + (tl.maximum(tl.minimum(full_hi_raw, hi) - full_lo, 0) // BLOCK) * BLOCK
    return lo, hi, full_lo, full_hi


@triton.jit
def _key_span(b, q_first, q_last, q_pos, q_in, N_k, kstart, klen, k_pos0, window, RUN_LO, RUN_HI, s_doc_b, s_doc_n,
              N_DOC, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
              DOC_RUNS: tl.constexpr):
    """Key indices a block of queries (positions q_first..q_last) may see, and the middle part it sees entirely."""
    lo = kstart  # keys before the start (left padding) are never visited
    hi = tl.minimum(N_k, klen)
    full_lo_raw = kstart
    full_hi_raw = hi
    if CAUSAL:  # k_pos <= q_pos
        hi = tl.minimum(hi, q_last - k_pos0 + 1)
        full_hi_raw = tl.minimum(full_hi_raw, q_first - k_pos0 + 1)
    if WINDOW:  # k_pos > q_pos - window
        lo = tl.maximum(lo, q_first - window + 1 - k_pos0)
        full_lo_raw = tl.maximum(full_lo_raw, q_last - window + 1 - k_pos0)
    if DOC_RUNS:  # each document is one contiguous run of positions: keys outside the rows' runs are hidden
        ok = q_in & (q_pos >= 0) & (q_pos < N_DOC)
        run_lo = tl.load(RUN_LO + b * s_doc_b + q_pos * s_doc_n, mask=ok, other=FAR)
        run_hi = tl.load(RUN_HI + b * s_doc_b + q_pos * s_doc_n, mask=ok, other=-FAR)
        lo = tl.maximum(lo, tl.min(run_lo, 0) - k_pos0)
        hi = tl.minimum(hi, tl.max(run_hi, 0) - k_pos0)
    if HAS_DOC:
        full_lo_raw = hi
    return _span(lo, hi, full_lo_raw, full_hi_raw, BLOCK_N)


@triton.jit
def _query_rows(b, start_m, offs_m, q_in, q_pos0, N_q, N_k, KLEN, KSTART, DOC, RUN_LO, RUN_HI, s_doc_b, s_doc_n, N_DOC,
                k_pos0, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_LEN: tl.constexpr, HAS_DOC: tl.constexpr, DOC_RUNS: tl.constexpr):
    """What one block of query rows needs to walk its keys (the forward and the dQ kernel share it): the rows'
    positions, documents and validity, the key range [kstart, klen) of batch element b, and the key span to visit."""
    q_pos = q_pos0 + offs_m
    q_first = q_pos0 + start_m
    q_last = q_pos0 + tl.minimum(start_m + BLOCK_M, N_q) - 1
    klen = N_k
    kstart = 0
    if HAS_LEN:
        klen = tl.load(KLEN + b)
        kstart = tl.load(KSTART + b)
    q_doc = offs_m
    q_ok = q_in
    doc_base = DOC
    if HAS_DOC:
        doc_base = DOC + b * s_doc_b
        q_ok = q_in & (q_pos >= 0) & (q_pos < N_DOC)  # a query outside the ids belongs to no document
        q_doc = tl.load(doc_base + q_pos * s_doc_n, mask=q_ok, other=0)
    lo, hi, full_lo, full_hi = _key_span(b, q_first, q_last, q_pos, q_in, N_k, kstart, klen, k_pos0, window, RUN_LO,
                                         RUN_HI, s_doc_b, s_doc_n, N_DOC, BLOCK_N, CAUSAL, WINDOW, HAS_DOC,
                                         DOC_RUNS)
    return q_pos, q_doc, q_ok, doc_base, kstart, klen, lo, hi, full_lo, full_hi


@triton.jit
def _bias(bias_rows, cols, sbn, rows_ok, cols_ok):
    """The additive bias of a tile in log2 units (as the scores), float32; bias_rows points at each row's start.
    Broadcast dimensions have stride 0, so a (1, H, N_q, N_k) or (B, 1, N_q, N_k) bias is read in place."""
    b = tl.load(bias_rows + cols * sbn, mask=rows_ok & cols_ok, other=0.0)
    return b.to(tl.float32) * LOG2E


@triton.jit
def _program(n_rows, BLOCK: tl.constexpr, HEAVY_LAST: tl.constexpr):
    """(tile, batch·head) of this program in a 1-D grid (no 65535 limit on B·H). Tiles of one head run next to each
    other (they share K/V in L2); with HEAVY_LAST (causal: the last query tiles see the most keys) they run heaviest
    first, so the short ones fill the tail of the grid."""
    n_tiles = tl.cdiv(n_rows, BLOCK)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    if HEAVY_LAST:
        tile = n_tiles - 1 - tile
    return tile, pid // n_tiles


@triton.jit
def _row_scores(q, k, offs_n, q_pos, q_doc, q_ok, q_in, doc_base, s_doc_n, N_k, kstart, klen, k_pos0, window,
                qk_scale, bias_rows, sbn, slope, rel_base, rel_d0, cap2, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr):
    """score_mod(S·scale) (+ bias) of a block of query rows against keys offs_n, in log2 units, (BLOCK_M, BLOCK_N);
    −inf where the mask hides the key (evaluated in boundary blocks only); and the soft-cap's tanh (see _modify).
    The forward and the dQ kernel share it."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    s, t = _modify(s, q_pos[:, None], (k_pos0 + offs_n)[None, :], q_in[:, None] & (offs_n < N_k)[None, :], slope,
                   rel_base, rel_d0, cap2, SOFTCAP, ALIBI, REL)
    if HAS_BIAS:
        s += _bias(bias_rows, offs_n[None, :], sbn, q_in[:, None], (offs_n < N_k)[None, :])
    if MASKED:
        in_k = offs_n < N_k
        k_doc = offs_n
        if HAS_DOC:
            k_doc = tl.load(doc_base + (k_pos0 + offs_n) * s_doc_n, mask=in_k, other=0)
        k_ok = in_k & (offs_n >= kstart) & (offs_n < klen)
        keep = _visible(q_pos[:, None], (k_pos0 + offs_n)[None, :], q_doc[:, None], k_doc[None, :],
                        q_ok[:, None], k_ok[None, :], window, CAUSAL, WINDOW, HAS_DOC)
        s = tl.where(keep, s, float("-inf"))
    return s, t


# --------------------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd, svn, svd, s_doc_n,
               start, end, N_k, kstart, klen, k_pos0, window, qk_scale, bias_rows, q_in, sbn,
               slope, rel_base, rel_d0, cap2, drop_rows, seed, drop_thr, drop_scale,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
               HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr,
               DROPOUT: tl.constexpr):
    # TMA: k_base / v_base are tensor descriptors of this head's (N_k, D) keys and values; Hopper's copy engine
    # fetches whole tiles into shared memory (rows past N_k read as zeros) while the warps compute.
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_base.load([start_n, 0])
            v = v_base.load([start_n, 0])
        else:
            k = _tile(k_base, offs_n, skn, skd, N_k, HEAD_D, BLOCK_D, MASKED)  # unmasked blocks lie inside [0, N_k)
            v = _tile(v_base, offs_n, svn, svd, N_k, HEAD_DV, BLOCK_DV, MASKED)
        s, t = _row_scores(q, k, offs_n, q_pos, q_doc, q_ok, q_in, doc_base, s_doc_n, N_k, kstart, klen, k_pos0,
                           window, qk_scale, bias_rows, sbn, slope, rel_base, rel_d0, cap2, MASKED, CAUSAL, WINDOW,
                           HAS_DOC, PRECISION, UPCAST, HAS_BIAS, SOFTCAP, ALIBI, REL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:  # a row that has seen nothing yet (or only −inf biases) keeps m = −inf; subtract 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # instead so exp2 gives 0, not NaN
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # the denominator sums the weights before dropout
        if DROPOUT:
            p = p * _kept(drop_rows[:, None], _drop_cols(seed, k_pos0 + offs_n)[None, :], drop_thr, drop_scale)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@_kernel
def attn_fwd(Q, K, V, OUT, LSE, KLEN, KSTART, DOC, RUN_LO, RUN_HI, BIAS, SLOPES, RELD, SINKS,
             sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod, s_doc_b, s_doc_n,
             sbb, sbh, sbm, sbn, s_sl_b, s_rel_h,
             H_q, N_q, N_k, N_DOC, GROUP, q_pos0, k_pos0, window, qk_scale, rel_d0, cap2, seed, drop_thr, drop_scale,
             TUNE_N_Q, TUNE_N_K,
             HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_LEN: tl.constexpr, HAS_DOC: tl.constexpr,
             DOC_RUNS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, HAS_SINK: tl.constexpr,
             DROPOUT: tl.constexpr, TMA_OK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             TMA: tl.constexpr = False):
    """Grid (cdiv(N_q, BLOCK_M)·B·H_q,). OUT (B, H_q, N_q, D_v) in its dtype; LSE (B, H_q, N_q) float32.
    SLOPES (B or 1, H_q) float32 (batch stride s_sl_b, 0 per head); RELD (H_q, N_q + N_k − 1) float32, the relative
    bias at distance k_pos − q_pos = rel_d0 + column; SINKS (H_q,) float32 logits.

    TMA (a tuning choice, allowed when the host found TMA_OK: unit last strides, 16-byte aligned rows, D = BLOCK_D):
    K and V tiles arrive through tensor descriptors (Hopper's copy engine). The arithmetic is the same either way."""
    tl.static_assert(TMA_OK or not TMA, "TMA needs TMA_OK (checked on the host)")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "tl.dot needs inner dimensions of at least 16")
    pid_m, pid_bh = _program(N_q, BLOCK_M, CAUSAL)
    b = (pid_bh // H_q).to(tl.int64)
    h = (pid_bh % H_q).to(tl.int64)
    hk = h // GROUP  # grouped-query attention: the key/value head read in place, never copied
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_in = offs_m < N_q
    q = _tile(Q + b * sqb + h * sqh, offs_m, sqn, sqd, N_q, HEAD_D, BLOCK_D, True)
    q_pos, q_doc, q_ok, doc_base, kstart, klen, lo, hi, full_lo, full_hi = _query_rows(
        b, start_m, offs_m, q_in, q_pos0, N_q, N_k, KLEN, KSTART, DOC, RUN_LO, RUN_HI, s_doc_b, s_doc_n, N_DOC, k_pos0,
        window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_LEN, HAS_DOC, DOC_RUNS)

    if TMA:
        k_base = tl.make_tensor_descriptor(K + b * skb + hk * skh, shape=[N_k, HEAD_D], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(V + b * svb + hk * svh, shape=[N_k, HEAD_DV], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
    else:
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
    bias_rows = BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm  # (BLOCK_M, 1); read only with HAS_BIAS
    slope, rel_base = _head_mods(SLOPES, RELD, b, h, s_sl_b, s_rel_h, ALIBI)
    drop_rows = q_pos
    if DROPOUT:
        drop_rows = _drop_rows(seed, b, h, q_pos)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for part in tl.static_range(3):  # boundary blocks, fully visible blocks, boundary blocks
        if part == 1:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd,
                                       svn, svd, s_doc_n, full_lo, full_hi, N_k, kstart, klen, k_pos0, window, qk_scale,
                                       bias_rows, q_in, sbn, slope, rel_base, rel_d0, cap2, drop_rows, seed,
                                       drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                                       CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, TMA, HAS_BIAS, SOFTCAP, ALIBI, REL,
                                       DROPOUT)
        else:
            start = lo if part == 0 else full_hi
            end = full_lo if part == 0 else hi
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd,
                                       svn, svd, s_doc_n, start, end, N_k, kstart, klen, k_pos0, window, qk_scale,
                                       bias_rows, q_in, sbn, slope, rel_base, rel_d0, cap2, drop_rows, seed,
                                       drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                                       CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, TMA, HAS_BIAS, SOFTCAP, ALIBI, REL,
                                       DROPOUT)

    if HAS_SINK:  # one more term of the denominator, exp(sink); a row that sees no key gets lse = sink, out = 0
        sink = tl.load(SINKS + h) * LOG2E
        m_all = tl.maximum(m_i, sink)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        alpha = tl.math.exp2(m_i - m_all)
        l_i = l_i * alpha + tl.math.exp2(sink - m_all)
        acc = acc * alpha[:, None]
        m_i = m_all
    seen = l_i > 0.0  # False for rows that see no key (and no sink): their output is 0 and their lse −inf
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=q_in[:, None] & (offs_dv[None, :] < HEAD_DV))
    tl.store(LSE + pid_bh.to(tl.int64) * N_q + offs_m, lse, mask=q_in)


# -------------------------------------------------------------------------------------------------------- backward


@_kernel
def attn_bwd_delta(OUT, DO, DLSE, DELTA, sob, soh, son, sod, sdob, sdoh, sdon, sdod, H_q, N_q,
                   HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = Σ_d dO·O per row (− d_lse when the lse output has a gradient). Grid (cdiv(N_q, BLOCK_M)·B·H_q,)."""
    pid_m, pid_bh = _program(N_q, BLOCK_M, False)
    b = (pid_bh // H_q).to(tl.int64)
    h = (pid_bh % H_q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _tile(OUT + b * sob + h * soh, offs_m, son, sod, N_q, HEAD_DV, BLOCK_DV, True)
    do = _tile(DO + b * sdob + h * sdoh, offs_m, sdon, sdod, N_q, HEAD_DV, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = pid_bh.to(tl.int64) * N_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=offs_m < N_q, other=0.0)
    tl.store(DELTA + rows, delta, mask=offs_m < N_q)


@triton.jit
def _row_stats(LSE, DELTA, row0, offs_m, N_q):
    """lse in log2 units, +inf for rows that saw nothing (so exp2(s − lse) = 0 there, never inf·0), and delta."""
    in_q = offs_m < N_q
    lse = tl.load(LSE + row0 + offs_m, mask=in_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + row0 + offs_m, mask=in_q, other=0.0)
    return lse, delta


@triton.jit
def _tile(base, rows, stride_r, stride_c, n_rows, N_COLS: tl.constexpr, BLOCK_C: tl.constexpr,
          CHECK_ROWS: tl.constexpr):
    """A (rows x BLOCK_C) tile, zero outside; no bounds test that is known to pass (so the loads vectorise)."""
    cols = tl.arange(0, BLOCK_C)
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_ROWS:
        if N_COLS == BLOCK_C:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            return tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < N_COLS)[None, :], other=0.0)
    else:
        if N_COLS == BLOCK_C:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=(cols < N_COLS)[None, :], other=0.0)


@triton.jit
def _dkdv_inner(dk, dv, k, v, offs_n, k_ok, k_doc, q_base, do_base, doc_base, LSE, DELTA, row0,
                sqn, sqd, sdon, sdod, s_doc_n, start, end, N_q, N_DOC, q_pos0, k_pos0, window, qk_scale,
                bias_cols, in_k, sbm, b, h, slope, rel_base, rel_d0, cap2, drop_cols, seed, drop_thr, drop_scale,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, DROPOUT: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < N_q
        q_pos = q_pos0 + offs_m
        q = _tile(q_base, offs_m, sqn, sqd, N_q, HEAD_D, BLOCK_D, MASKED)
        do = _tile(do_base, offs_m, sdon, sdod, N_q, HEAD_DV, BLOCK_DV, MASKED)
        lse, delta = _row_stats(LSE, DELTA, row0, offs_m, N_q)
        s_t = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M): keys are the rows here
        s_t, t_t = _modify(s_t, q_pos[None, :], (k_pos0 + offs_n)[:, None], in_k[:, None] & in_q[None, :], slope,
                           rel_base, rel_d0, cap2, SOFTCAP, ALIBI, REL)
        if HAS_BIAS:
            s_t += _bias(bias_cols, offs_m[None, :], sbm, in_k[:, None], in_q[None, :])
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            q_ok = in_q
            q_doc = offs_m
            if HAS_DOC:
                q_ok = in_q & (q_pos >= 0) & (q_pos < N_DOC)
                q_doc = tl.load(doc_base + q_pos * s_doc_n, mask=q_ok, other=0)
            keep = _visible(q_pos[None, :], (k_pos0 + offs_n)[:, None], q_doc[None, :], k_doc[:, None],
                            q_ok[None, :], k_ok[:, None], window, CAUSAL, WINDOW, HAS_DOC)
            p_t = tl.where(keep, p_t, 0.0)
        dp_t = _dot(v, tl.trans(do), PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:  # the forward's P·keep/(1 − p) fed P·V: dV sees the dropped weights, dP the same factor
            z_t = _kept(drop_cols[:, None], _drop_rows(seed, b, h, q_pos)[None, :], drop_thr, drop_scale)
            dv += _dot((p_t * z_t).to(do.dtype), do, PRECISION, UPCAST)
            dp_t = dp_t * z_t
        else:
            dv += _dot(p_t.to(do.dtype), do, PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # through cap·tanh(x/cap): times 1 − tanh²
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST)
    return dk, dv


@_kernel
def attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KLEN, KSTART, DOC, RUN_LO, RUN_HI, BIAS, SLOPES, RELD,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                  sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, s_doc_b, s_doc_n, sbb, sbh, sbm, sbn, s_sl_b, s_rel_h,
                  H_q, H_kv, N_q, N_k, N_DOC, GROUP, q_pos0, k_pos0, window, qk_scale, sm_scale, rel_d0, cap2, seed,
                  drop_thr, drop_scale, TUNE_N_Q, TUNE_N_K,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_LEN: tl.constexpr, HAS_DOC: tl.constexpr,
                  DOC_RUNS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, DROPOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(N_k, BLOCK_N)·B·H_kv,). dK, dV of one key block, summed over all query heads of its group."""
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "tl.dot needs inner dimensions of at least 16")
    pid_n, pid_bh = _program(N_k, BLOCK_N, False)  # causal: the first key tiles are the heavy ones already
    b = (pid_bh // H_kv).to(tl.int64)
    hk = (pid_bh % H_kv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_k = offs_n < N_k
    k = _tile(K + b * skb + hk * skh, offs_n, skn, skd, N_k, HEAD_D, BLOCK_D, True)
    v = _tile(V + b * svb + hk * svh, offs_n, svn, svd, N_k, HEAD_DV, BLOCK_DV, True)
    k_first = k_pos0 + start_n
    k_last = k_pos0 + tl.minimum(start_n + BLOCK_N, N_k) - 1
    k_pos = k_pos0 + offs_n

    # Query rows that may see some key of this block, and the block-aligned middle that sees all of it.
    lo = 0
    hi = N_q
    full_lo_raw = 0
    full_hi_raw = N_q
    k_ok = in_k
    if HAS_LEN:
        klen = tl.load(KLEN + b)
        kstart = tl.load(KSTART + b)
        k_ok = in_k & (offs_n >= kstart) & (offs_n < klen)
        if (start_n >= klen) | (start_n + BLOCK_N <= kstart):  # no real key in this block: no query sees it
            hi = 0
        if (start_n < kstart) | (start_n + BLOCK_N > klen):  # padding keys in this block: every query needs the mask
            full_lo_raw = N_q
    if CAUSAL:  # q_pos >= k_pos
        lo = tl.maximum(lo, k_first - q_pos0)
        full_lo_raw = tl.maximum(full_lo_raw, k_last - q_pos0)
    if WINDOW:  # q_pos < k_pos + window
        hi = tl.minimum(hi, k_last + window - q_pos0)
        full_hi_raw = tl.minimum(full_hi_raw, k_first + window - q_pos0)
    doc_base = DOC
    k_doc = offs_n
    if HAS_DOC:
        doc_base = DOC + b * s_doc_b
        k_doc = tl.load(doc_base + k_pos * s_doc_n, mask=in_k, other=0)
        full_lo_raw = N_q
    if DOC_RUNS:  # only the queries in the keys' runs (contiguous documents) can see them
        run_lo = tl.load(RUN_LO + b * s_doc_b + k_pos * s_doc_n, mask=in_k, other=FAR)
        run_hi = tl.load(RUN_HI + b * s_doc_b + k_pos * s_doc_n, mask=in_k, other=-FAR)
        lo = tl.maximum(lo, tl.min(run_lo, 0) - q_pos0)
        hi = tl.minimum(hi, tl.max(run_hi, 0) - q_pos0)
    lo, hi, full_lo, full_hi = _span(lo, hi, full_lo_raw, full_hi_raw, BLOCK_M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    drop_cols = k_pos
    if DROPOUT:
        drop_cols = _drop_cols(seed, k_pos)
    for g in range(GROUP):  # the query heads sharing this key/value head, in a fixed order (no atomics)
        h = hk * GROUP + g
        row0 = (b * H_q + h) * N_q
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        bias_cols = BIAS + b * sbb + h * sbh + offs_n[:, None] * sbn  # (BLOCK_N, 1); read only with HAS_BIAS
        slope, rel_base = _head_mods(SLOPES, RELD, b, h, s_sl_b, s_rel_h, ALIBI)
        for part in tl.static_range(3):
            if part == 1:
                dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, k_ok, k_doc, q_base, do_base, doc_base, LSE, DELTA,
                                     row0, sqn, sqd, sdon, sdod, s_doc_n, full_lo, full_hi, N_q, N_DOC, q_pos0,
                                     k_pos0, window, qk_scale, bias_cols, in_k, sbm, b, h, slope, rel_base,
                                     rel_d0, cap2, drop_cols, seed, drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_M,
                                     BLOCK_D, BLOCK_DV, False, CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, HAS_BIAS,
                                     SOFTCAP, ALIBI, REL, DROPOUT)
            else:
                start = lo if part == 0 else full_hi
                end = full_lo if part == 0 else hi
                dk, dv = _dkdv_inner(dk, dv, k, v, offs_n, k_ok, k_doc, q_base, do_base, doc_base, LSE, DELTA,
                                     row0, sqn, sqd, sdon, sdod, s_doc_n, start, end, N_q, N_DOC, q_pos0,
                                     k_pos0, window, qk_scale, bias_cols, in_k, sbm, b, h, slope, rel_base,
                                     rel_d0, cap2, drop_cols, seed, drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_M,
                                     BLOCK_D, BLOCK_DV, True, CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, HAS_BIAS,
                                     SOFTCAP, ALIBI, REL, DROPOUT)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=in_k[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=in_k[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _dq_inner(dq, q, do, lse, delta, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd, svn, svd, s_doc_n,
              start, end, N_k, kstart, klen, k_pos0, window, qk_scale, bias_rows, q_in, sbn, dbias_rows,
              slope, rel_base, rel_d0, cap2, dslope, drop_rows, seed, drop_thr, drop_scale,
              HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
              BIAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr,
              DROPOUT: tl.constexpr, SLOPE_GRAD: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(k_base, offs_n, skn, skd, N_k, HEAD_D, BLOCK_D, MASKED)  # unmasked blocks lie inside [0, N_k)
        v = _tile(v_base, offs_n, svn, svd, N_k, HEAD_DV, BLOCK_DV, MASKED)
        s, t = _row_scores(q, k, offs_n, q_pos, q_doc, q_ok, q_in, doc_base, s_doc_n, N_k, kstart, klen, k_pos0,
                           window, qk_scale, bias_rows, sbn, slope, rel_base, rel_d0, cap2, MASKED, CAUSAL, WINDOW,
                           HAS_DOC, PRECISION, UPCAST, HAS_BIAS, SOFTCAP, ALIBI, REL)
        p = tl.math.exp2(s - lse[:, None])  # hidden keys: exp2(−inf) = 0; rows that see nothing have lse = +inf
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:  # dP of the dropped weights: the same keep/(1 − p) as the forward
            dp = dp * _kept(drop_rows[:, None], _drop_cols(seed, k_pos0 + offs_n)[None, :], drop_thr, drop_scale)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:  # d(loss)/d(bias) is dS itself; blocks never visited keep the zeros they start with
            tl.store(dbias_rows + offs_n[None, :], ds, mask=q_in[:, None] & (offs_n < N_k)[None, :])
        ds_in = ds
        if SOFTCAP:  # dS of the scores before cap·tanh(x/cap): times 1 − tanh²
            ds_in = ds * (1.0 - t * t)
        if SLOPE_GRAD:  # d/d slope = Σ dS·(k_pos − q_pos), with dS where ALiBi's term is added
            ds_alibi = ds_in if ALIBI == 1 else ds
            dslope += tl.sum(ds_alibi * ((k_pos0 + offs_n)[None, :] - q_pos[:, None]).to(tl.float32), 1)
        dq += _dot(ds_in.to(k.dtype), k, PRECISION, UPCAST)
    return dq, dslope


@_kernel
def attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KLEN, KSTART, DOC, RUN_LO, RUN_HI, BIAS, DBIAS, SLOPES, RELD, DSLOPE,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdon, sdod,
                sdqb, sdqh, sdqn, sdqd, s_doc_b, s_doc_n, sbb, sbh, sbm, sbn, s_sl_b, s_rel_h,
                H_q, N_q, N_k, N_DOC, GROUP, q_pos0, k_pos0, window, qk_scale, sm_scale, rel_d0, cap2, seed, drop_thr,
                drop_scale, TUNE_N_Q, TUNE_N_K,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_LEN: tl.constexpr, HAS_DOC: tl.constexpr,
                DOC_RUNS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
                BIAS_GRAD: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr,
                DROPOUT: tl.constexpr, SLOPE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(N_q, BLOCK_M)·B·H_q,). dQ of one query block: the same key ranges as the forward. With BIAS_GRAD
    it also writes dS into DBIAS (B, H_q, N_q, N_k) float32, contiguous (summed over broadcast dims by the host).
    With SLOPE_GRAD each row's Σ_j dS·(k_pos − q_pos) goes to its own slot of DSLOPE (B, H_q, N_q) float32."""
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "tl.dot needs inner dimensions of at least 16")
    pid_m, pid_bh = _program(N_q, BLOCK_M, CAUSAL)
    b = (pid_bh // H_q).to(tl.int64)
    h = (pid_bh % H_q).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_in = offs_m < N_q
    q = _tile(Q + b * sqb + h * sqh, offs_m, sqn, sqd, N_q, HEAD_D, BLOCK_D, True)
    do = _tile(DO + b * sdob + h * sdoh, offs_m, sdon, sdod, N_q, HEAD_DV, BLOCK_DV, True)
    lse, delta = _row_stats(LSE, DELTA, pid_bh.to(tl.int64) * N_q, offs_m, N_q)
    q_pos, q_doc, q_ok, doc_base, kstart, klen, lo, hi, full_lo, full_hi = _query_rows(
        b, start_m, offs_m, q_in, q_pos0, N_q, N_k, KLEN, KSTART, DOC, RUN_LO, RUN_HI, s_doc_b, s_doc_n, N_DOC, k_pos0,
        window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_LEN, HAS_DOC, DOC_RUNS)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_rows = BIAS + b * sbb + h * sbh + offs_m[:, None] * sbm  # (BLOCK_M, 1); read only with HAS_BIAS
    dbias_rows = DBIAS + (pid_bh.to(tl.int64) * N_q + offs_m[:, None]) * N_k  # written only with BIAS_GRAD
    slope, rel_base = _head_mods(SLOPES, RELD, b, h, s_sl_b, s_rel_h, ALIBI)
    drop_rows = q_pos
    if DROPOUT:
        drop_rows = _drop_rows(seed, b, h, q_pos)
    dslope = tl.zeros((BLOCK_M,), tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for part in tl.static_range(3):
        if part == 1:
            dq, dslope = _dq_inner(dq, q, do, lse, delta, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd,
                                   svn, svd, s_doc_n, full_lo, full_hi, N_k, kstart, klen, k_pos0, window, qk_scale,
                                   bias_rows, q_in, sbn, dbias_rows, slope, rel_base, rel_d0, cap2, dslope, drop_rows,
                                   seed, drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                                   CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, HAS_BIAS, BIAS_GRAD, SOFTCAP, ALIBI,
                                   REL, DROPOUT, SLOPE_GRAD)
        else:
            start = lo if part == 0 else full_hi
            end = full_lo if part == 0 else hi
            dq, dslope = _dq_inner(dq, q, do, lse, delta, q_pos, q_doc, q_ok, k_base, v_base, doc_base, skn, skd,
                                   svn, svd, s_doc_n, start, end, N_k, kstart, klen, k_pos0, window, qk_scale,
                                   bias_rows, q_in, sbn, dbias_rows, slope, rel_base, rel_d0, cap2, dslope, drop_rows,
                                   seed, drop_thr, drop_scale, HEAD_D, HEAD_DV, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                                   CAUSAL, WINDOW, HAS_DOC, PRECISION, UPCAST, HAS_BIAS, BIAS_GRAD, SOFTCAP, ALIBI,
                                   REL, DROPOUT, SLOPE_GRAD)
    if SLOPE_GRAD:
        tl.store(DSLOPE + pid_bh.to(tl.int64) * N_q + offs_m, dslope, mask=q_in)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=q_in[:, None] & (offs_d[None, :] < HEAD_D))
