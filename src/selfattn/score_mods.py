"""Score modifiers are functions: ``score_mod(score, b, h, q_idx, kv_idx) -> score``; plus sinks and dropout.

A score modifier changes each scaled score before the mask and the softmax (FlexAttention's ``score_mod``)::

    S = Q·Kᵀ · scale  →  S' = score_mod(S, b, h, q_idx, kv_idx)  →  S' + bias  →  −∞ where masked  →  softmax

``b``, ``h``, ``q_idx``, ``kv_idx`` are broadcastable integer tensors as for ``mask_mod`` (see ``selfattn.masks``):
``q_idx`` is the query's position in the key sequence (bottom-right aligned), ``h`` the *query* head. The function is
called on whole tiles of scores (tensor operations, no Python loops over elements) and must return a tensor of the
score's shape and dtype. Modifiers compose with ``>>``: ``softcap(50) >> alibi(slopes)`` soft-caps, then adds ALiBi.

Ready-made modifiers carry a plain-data ``spec`` so kernels and the custom op can take them as arguments:

    softcap(cap)                  cap · tanh(s / cap)                        ("softcap", cap)
    alibi(slopes)                 s + slopes[h] · (kv_idx − q_idx)           ("alibi", slopes)   (H_q,) or (B, H_q)
    relative_bias(table)          s + table[h, clamp(kv_idx − q_idx) + M]    ("relative", table, M)   (H_q, 2M + 1)
    relative_bias(table, buckets=...)  T5's log buckets of kv_idx − q_idx    ("t5", table, bidirectional, max_distance)

Tensors a modifier reads (slopes, tables) are its ``captures``: their gradients flow (summed tile by tile in a fixed
order, so deterministically). A custom modifier that reads tensors needing gradients lists them:
``ScoreMod(fn, captures=(table,))``.

**Sinks** (gpt-oss): per-head logits (H_q,) that join every row's softmax as one more column whose value is zero:
P_ij = exp(S_ij − L_i), L_i = log(exp(sink_h) + Σ_j exp(S_ij)). A row whose keys are all masked returns zeros.

**Dropout** on the weights, from a counter-based hash of (seed, b, h, q_idx, kv_idx): the backward regenerates the
same positions, tiles may run in any order, and every backend (and the oracle) drops exactly the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ScoreModFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class ScoreMod:
    """A score modifier with a name, an optional plain-data ``spec`` (ready-made ones) and the tensors it reads
    that may need gradients (``captures``)."""

    score_mod: ScoreModFn
    name: str = "custom"
    spec: tuple | None = None
    captures: tuple[Tensor, ...] = ()
    parts: tuple = ()  # a chain's links, in order, when a custom link leaves it without a spec (``>>``)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.score_mod(score, b, h, q_idx, kv_idx)

    def __rshift__(self, other) -> ScoreMod:
        """``a >> b``: apply a, then b."""
        other = as_score_mod(other)
        spec = None if self.spec is None or other.spec is None else ("then", self.spec, other.spec)
        parts = () if spec is not None else (self.parts or (self,)) + (other.parts or (other,))
        return ScoreMod(lambda s, b, h, q, k: other.score_mod(self.score_mod(s, b, h, q, k), b, h, q, k),
                        f"({self.name} >> {other.name})", spec, self.captures + other.captures, parts)

    @property
    def trains(self) -> bool:
        """Whether autograd records this call's use of the modifier: one of its tensors requires grad, with grad
        mode on (the one check api, choice and the backends make)."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.captures)

    @property
    def additive(self) -> bool:
        """True when the modifier adds a term that does not depend on the score (ALiBi, relative bias)."""
        return self.spec is not None and all(leaf[0] in ("alibi", "relative", "t5") for leaf in leaves(self.spec))

    def __repr__(self) -> str:
        return f"ScoreMod({self.name})"


def leaves(spec: tuple) -> list[tuple]:
    if spec[0] == "then":
        return leaves(spec[1]) + leaves(spec[2])
    return [spec]


def as_score_mod(fn) -> ScoreMod:
    if isinstance(fn, ScoreMod):
        return fn
    if callable(fn):
        return ScoreMod(fn, getattr(fn, "__name__", "custom"))
    raise TypeError(f"score_mod must be a function score_mod(score, b, h, q_idx, kv_idx) -> score or a "
                    f"selfattn.score_mods.ScoreMod, got {type(fn).__name__}")


# ------------------------------------------------------------------------------------------------------ ready-made


def softcap(cap: float) -> ScoreMod:
    """cap · tanh(s / cap): scores squashed into (−cap, cap) (Gemma-2's ``attn_logit_softcapping``, Grok)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"softcap(cap) takes a positive float, got {cap!r}")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap(cap) needs a finite cap > 0, got {cap}; for no capping pass no score_mod")
    cap = float(cap)

    def mod(s, b, h, q, k):
        return torch.tanh(s / cap) * cap

    return ScoreMod(mod, f"softcap({cap:g})", ("softcap", cap))


def alibi_slopes(n_heads: int) -> Tensor:
    """The ALiBi paper's slopes (H,) float32: 2^(−8i/H) for i = 1..H, with the paper's interleaving when H is not a
    power of two."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"alibi_slopes(n_heads) needs a positive int, got {n_heads!r}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(p) + (power_of_two(2 * p)[0::2][: n_heads - p] if p < n_heads else [])
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(slopes: Tensor) -> ScoreMod:
    """s + slope · (kv_idx − q_idx): a linear penalty on the distance to earlier keys (for causal attention,
    −slope·distance). ``slopes`` (H_q,) per head or (B, H_q) per batch element and head; may require grad."""
    slopes = _float_tensor("alibi(slopes)", slopes)
    if slopes.dim() not in (1, 2):
        raise ValueError(f"alibi(slopes) takes slopes of shape (H_q,) or (B, H_q), got {tuple(slopes.shape)}; "
                         "selfattn.score_mods.alibi_slopes(H) gives the paper's")
    per_batch = slopes.dim() == 2

    def mod(s, b, h, q, k):
        sl = (slopes[b[..., 0, 0], h[..., 0, 0]] if per_batch else slopes[h[..., 0, 0]])[..., None, None]
        return s + sl.to(s.dtype) * (k - q).to(s.dtype)

    return ScoreMod(mod, "alibi", ("alibi", slopes), (slopes,))


def relative_bias(table: Tensor, *, buckets: int | None = None, bidirectional: bool = True,
                  max_distance: int = 128) -> ScoreMod:
    """s + table[h, r(kv_idx − q_idx)], a learned bias per head and relative position.

    Without ``buckets``: ``table`` is (H_q, 2M + 1) and r(d) = clamp(d, −M, M) + M. With ``buckets`` (T5): ``table``
    is (H_q, buckets) and r is T5's bucket of the distance (half exact, half logarithmic up to ``max_distance``;
    ``bidirectional=False`` for decoders)."""
    table = _float_tensor("relative_bias(table)", table)
    if table.dim() != 2:
        raise ValueError(f"relative_bias(table) takes a (H_q, positions) table, got shape {tuple(table.shape)}")
    if buckets is None:
        if table.shape[1] % 2 != 1:
            raise ValueError(f"relative_bias(table) without buckets needs an odd width 2M+1 (relative positions "
                             f"−M..M), got {table.shape[1]}; or pass buckets=")
        M = table.shape[1] // 2

        def mod(s, b, h, q, k):
            r = (k - q).clamp(-M, M) + M
            return s + table[h, r].to(s.dtype)

        return ScoreMod(mod, f"relative_bias(M={M})", ("relative", table, M), (table,))
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < (4 if bidirectional else 2):
        raise ValueError(f"relative_bias(buckets={buckets!r}) needs an int number of buckets >= "
                         f"{4 if bidirectional else 2} ({'bidirectional: ' if bidirectional else ''}half exact, half "
                         "logarithmic), e.g. 32 as T5")
    if table.shape[1] != buckets:
        raise ValueError(f"relative_bias(table, buckets={buckets}) needs a table of shape (H_q, {buckets}), got "
                         f"{tuple(table.shape)}")
    exact = (buckets // 2 if bidirectional else buckets) // 2
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance <= exact:
        raise ValueError(f"relative_bias(buckets={buckets}, max_distance={max_distance!r}): max_distance must be an "
                         f"int above the {exact} exact buckets (distances below {exact} get a bucket each, the rest "
                         f"log-spaced up to max_distance); T5 uses 128")

    def mod_t5(s, b, h, q, k):
        return s + table[h, t5_bucket(k - q, bidirectional, buckets, max_distance)].to(s.dtype)

    return ScoreMod(mod_t5, f"t5_bias({buckets})", ("t5", table, bidirectional, max_distance), (table,))


def t5_bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of ``relative = kv_idx − q_idx`` (transformers' ``_relative_position_bucket``)."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.clamp(relative, max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return bucket + torch.where(relative < max_exact, relative, large)


def from_spec(spec: tuple) -> ScoreMod:
    kind = spec[0]
    if kind == "then":
        return from_spec(spec[1]) >> from_spec(spec[2])
    if kind == "softcap":
        return softcap(spec[1])
    if kind == "alibi":
        return alibi(spec[1])
    if kind == "relative":
        return relative_bias(spec[1])
    if kind == "t5":
        return relative_bias(spec[1], buckets=spec[1].shape[1], bidirectional=spec[2], max_distance=spec[3])
    raise ValueError(f"unknown score_mod spec {spec!r}")


def _float_tensor(where: str, t) -> Tensor:
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{where} takes a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t


# ------------------------------------------------------------------------------------------ applying, with checks


def apply(mod: ScoreMod, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """``mod`` on a block of scores (B', H', R, K), checked: the result must be a tensor of the score's shape and
    dtype (a broadcastable one is expanded)."""
    try:
        out = mod.score_mod(score, b, h, q_idx, kv_idx)
    except Exception as e:
        raise ValueError(f"score_mod {mod.name!r} raised {type(e).__name__}: {e} (called on scores of shape "
                         f"{tuple(score.shape)} with broadcastable b, h, q_idx, kv_idx index tensors; write it with "
                         "tensor operations)") from e
    if not isinstance(out, Tensor):
        raise TypeError(f"score_mod {mod.name!r} returned {type(out).__name__}, not a tensor; return a tensor "
                        "shaped like the score")
    if out.dtype != score.dtype:
        raise TypeError(f"score_mod {mod.name!r} returned {out.dtype} for {score.dtype} scores; cast the tensors it "
                        "reads with .to(score.dtype)")
    if out.shape != score.shape:
        try:
            out = out.expand(score.shape)
        except RuntimeError:
            raise ValueError(f"score_mod {mod.name!r} returned shape {tuple(out.shape)} for scores of shape "
                             f"{tuple(score.shape)}; return one value per score") from None
    return out


def with_autograd(fn):
    """``fn()`` with autograd recording: inside a custom op's implementation (torch.compile's backward) the autograd
    dispatch keys are excluded on this thread, so the per-tile autograd of a modifier runs on a helper thread."""
    with torch.enable_grad():
        if torch.ones(1, requires_grad=True).mul(2).requires_grad:
            return fn()
    from concurrent.futures import ThreadPoolExecutor

    def run():
        with torch.enable_grad():
            return fn()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def additive_term(mod: ScoreMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, dtype: torch.dtype) -> Tensor:
    """score_mod(0, ...) of an additive modifier (``mod.additive``): the term it adds, in the broadcast shape of
    the index tensors (no score-sized zeros are made)."""
    if mod.spec is not None and mod.spec[0] == "alibi" and mod.spec[1].dim() == 1:  # one multiply, in ``dtype``
        distance = (kv_idx - q_idx).to(dtype)  # (1, 1, R, K)
        return distance * mod.spec[1].detach().to(dtype)[h[..., 0, 0]][..., None, None]  # (1, H, R, K)
    return mod.score_mod(torch.zeros((), dtype=dtype, device=b.device), b, h, q_idx, kv_idx).to(dtype)


# ---------------------------------------------------------------------------------------------------------- sinks


def check_sinks(sinks, H_q: int, q: Tensor) -> Tensor | None:
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating-point tensor of per-head logits (H_q,) = ({H_q},), got "
                        f"{getattr(sinks, 'dtype', type(sinks).__name__)}")
    if tuple(sinks.shape) != (H_q,):
        raise ValueError(f"sinks must have shape (H_q,) = ({H_q},), one logit per query head, got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks are on {sinks.device} but q is on {q.device}; move them with .to(q.device)")
    return sinks


def add_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention without sinks (out (B, H_q, N_q, D_v), lse (B, H_q, N_q)) -> with them: the sink joins the
    softmax's denominator, so L' = logaddexp(L, sink_h) and out' = out · exp(L − L'). Rows that saw no key keep
    out = 0 and get L' = sink_h (with a sink of −inf too: L − sink is NaN there, and their factor is 0)."""
    s = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    keep = torch.sigmoid(lse - s).masked_fill_(torch.isneginf(lse), 0.0)  # exp(L − L') = 1 / (1 + exp(sink − L))
    return out * keep[..., None].to(out.dtype), torch.logaddexp(lse, s)


def sinks_grad(out: Tensor, lse: Tensor, d_out: Tensor, sinks: Tensor) -> Tensor:
    """d sink_h = −Σ_{b,i} P_sink(b,h,i) · δ_i with P_sink = exp(sink_h − L'), δ = rowsum(dO∘O') (the sink's value is
    zero, so dP_sink = 0 and dS_sink = P_sink·(0 − δ)). Inputs are the final out', L'."""
    delta = (d_out.to(torch.float64) * out.to(torch.float64)).sum(-1)  # (B, H_q, N_q)
    p_sink = torch.exp(sinks.to(torch.float64).view(1, -1, 1) - lse.to(torch.float64))
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)


# -------------------------------------------------------------------------------------------------------- dropout

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^31: a 32-bit value times it stays below 2^63 in int64
_GOLDEN = 0x61C88647  # 2^32 / golden ratio (mod 2^31): spreads consecutive counters
_SIGN = -(2**31)  # the int32 with only the sign bit set


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) in int64 arithmetic that never overflows."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def dropout_keep(seed: int, p: float, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """True where the weight of (b, h, q_idx, kv_idx) is kept, for dropout probability ``p``: a hash of the five
    integers compared with p·2³², so every backend, tile order and the backward agree bit for bit.

    The hash is mixed per row from (seed, b, h, q_idx) and per key from (seed, kv_idx), each over the broadcast
    shapes only (O(rows + keys) work); per score there is one xor and one multiply-xorshift round."""
    return dropout_kept(dropout_rows(seed, b, h, q_idx), dropout_cols(seed, kv_idx), p) != 0


# In int32, with the bits of the unsigned 32-bit arithmetic: a product keeps its low 32 bits, and ">> 16 & 0xFFFF"
# is the logical shift. The first xorshift of the per-score round, x ^ (x >>> 16) with x = row ^ col, equals
# (row ^ row >>> 16) ^ (col ^ col >>> 16): it is done on the halves.


def dropout_rows(seed: int, b: Tensor, h: Tensor, q_idx: Tensor) -> Tensor:
    """The per-row half of the dropout hash (int32, broadcast shape of b, h, q_idx), its first xorshift done."""
    s = _mix(seed & _MASK32)
    row = _mix((_mix((_mix(s ^ b) + h * _GOLDEN) & _MASK32) + (q_idx & _MASK32) * _GOLDEN) & _MASK32)
    return _as_int32(row ^ (row >> 16))


def dropout_cols(seed: int, kv_idx: Tensor) -> Tensor:
    """The per-key half of the dropout hash (int32, kv_idx's shape), its first xorshift done."""
    col = _mix((_mix(seed & _MASK32) + (kv_idx & _MASK32) * _GOLDEN) & _MASK32)
    return _as_int32(col ^ (col >> 16))


def dropout_kept(rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """The keep mask as int32 bits (broadcast shape of the halves): −1 (every bit set) where kept, 0 where dropped;
    ANDed with a float32 tensor's bits it zeroes the dropped weights in place."""
    x = (rows ^ cols).mul_(_MIX)  # the round's multiply
    u = torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF).bitwise_xor_(x)  # the round's last xorshift
    return _at_least(u, int(round(p * 2**32)))


def _at_least(u: Tensor, T: int) -> Tensor:
    """u >= T for u int32 read as unsigned and 0 <= T <= 2³², as int32 −1 / 0; ``u`` is overwritten. Integer
    operations only: torch's comparisons and bool products are several times slower than its integer arithmetic.
    With the sign bit flipped, s = u − 2³¹ and T' = T − 2³¹ compare as signed values; s is clamped so that s − T'
    cannot overflow (the clamped values stay on their side of T'), and ~(s − T') >> 31 spreads the sign: −1 when
    s − T' >= 0."""
    if T >= 2**32:  # nothing reaches it
        return torch.zeros_like(u)
    t = T - 2**31
    s = u.bitwise_xor_(_SIGN)
    s = s.clamp_(max=2**31 - 1 + t) if t < 0 else s.clamp_(min=t - 2**31)
    return s.sub_(t).bitwise_not_().bitwise_right_shift_(31)


def _as_int32(x: Tensor) -> Tensor:
    """A value in [0, 2³²) as the int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def check_dropout(p, seed) -> tuple[float, int]:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}; 0 turns dropout off")
    if p == 0:
        return 0.0, 0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from torch's global generator: torch.manual_seed works
    elif isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**31 - 1, (), generator=seed).item())
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed must be an int or a torch.Generator, got {seed!r}")
    return float(p), int(seed)
