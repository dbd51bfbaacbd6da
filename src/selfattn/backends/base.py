"""What a backend is: a name, what it can do (as data), why it cannot serve a call, and how it runs one."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfattn.masks import Mask
from selfattn.score_mods import ScoreMod


@dataclass(frozen=True, init=False)
class AttentionCall:
    """One validated attention call. Shapes: q (B, H_q, N_q, D), k (B, H_kv, N_k, D), v (B, H_kv, N_k, D_v).

    ``mask`` is the effective mask (``causal`` already folded in) or None; ``bias`` is an additive float tensor
    broadcastable to (B, H_q, N_q, N_k) or None. Masks see positions: query row i is at ``q_start + i`` and key j at
    ``k_pos0 + j``; by default q_start = N_k − N_q (bottom-right). Composite algorithms (ring attention, split-KV
    decoding) set ``q_pos0``/``k_pos0`` to evaluate one block of a larger problem.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    mask: Mask | None = None
    bias: Tensor | None = None
    causal: bool = False
    q_pos0: int | None = None
    k_pos0: int = 0
    score_mod: ScoreMod | None = None  # applied to the scaled scores, before the bias and the mask
    sinks: Tensor | None = None  # (H_q,) logits of one extra softmax column with value zero
    dropout_p: float = 0.0  # dropout on the weights, positions from score_mods.dropout_keep(dropout_seed, ...)
    dropout_seed: int = 0

    def __init__(self, q, k, v, scale, mask=None, bias=None, causal=False, q_pos0=None, k_pos0=0, score_mod=None,
                 sinks=None, dropout_p=0.0, dropout_seed=0):
        # One dict update instead of a frozen dataclass's thirteen object.__setattr__ calls (1.3 µs of a decoding
        # step's fixed cost); the fields are still read-only afterwards. Keep in step with the fields above.
        self.__dict__.update(q=q, k=k, v=v, scale=scale, mask=mask, bias=bias, causal=causal, q_pos0=q_pos0,
                             k_pos0=k_pos0, score_mod=score_mod, sinks=sinks, dropout_p=dropout_p,
                             dropout_seed=dropout_seed)

    @property
    def q_start(self) -> int:
        """Position of query row 0 (what mask_mod sees as q_idx for that row)."""
        return self.N_k - self.N_q if self.q_pos0 is None else self.q_pos0

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def H_q(self) -> int:
        return self.q.shape[1]

    @property
    def H_kv(self) -> int:
        return self.k.shape[1]

    @property
    def N_q(self) -> int:
        return self.q.shape[2]

    @property
    def N_k(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def D_v(self) -> int:
        return self.v.shape[3]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def needs_grad(self) -> bool:
        if not torch.is_grad_enabled():  # the common inference case first: this runs on every call
            return False
        if self.q.requires_grad or self.k.requires_grad or self.v.requires_grad:
            return True
        extra = ((self.bias,) if self.bias is not None else ()) + ((self.sinks,) if self.sinks is not None else ())
        return any(t.requires_grad for t in extra + self.captures)

    @property
    def captures(self) -> tuple[Tensor, ...]:
        return () if self.score_mod is None else self.score_mod.captures

    def describe(self) -> str:
        return (
            f"B={self.B} H_q={self.H_q} H_kv={self.H_kv} N_q={self.N_q} N_k={self.N_k} D={self.D} D_v={self.D_v} "
            f"{self.dtype} on {self.device.type}, mask={self.mask.name if self.mask else None}, "
            f"bias={'yes' if self.bias is not None else 'no'}, "
            + (f"score_mod={self.score_mod.name}, " if self.score_mod is not None else "")
            + ("sinks, " if self.sinks is not None else "")
            + (f"dropout_p={self.dropout_p}, " if self.dropout_p else "")
            + f"grad={'yes' if self.needs_grad else 'no'}"
        )


def dense_rows(call: AttentionCall) -> AttentionCall:
    """The call with q, k, v whose last dim has stride 1: PyTorch's fused CPU kernel (called below its public API,
    which would copy) reads each row as D consecutive numbers, and gave silently wrong results on a strided head dim
    (q[..., ::2]; found by tests/test_bad_inputs.py for tiled, by the fuzzer for sdpa). Other strides (transposed,
    expanded, overlapping) it takes."""
    if all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (call.q, call.k, call.v)):
        return call
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    return dataclasses.replace(call, q=q, k=k, v=v)


@dataclass(frozen=True)
class Backend:
    """A way to compute attention. Capabilities are data; ``not_supported_reasons`` turns them into sentences.

    Subclasses implement ``forward(call) -> (out, lse)``: out (B, H_q, N_q, D_v) in the input dtype, lse
    (B, H_q, N_q) float32 (−inf for fully masked rows), differentiable with respect to q, k, v (and bias) when
    ``supports_grad``.

    Backends that set ``supports_blocks`` also implement the two halves separately, for algorithms that split one
    attention into blocks and merge them by log-sum-exp (ring attention, split-KV decoding):
    ``forward_block(call) -> (out, lse)`` without autograd, and ``backward_block(call, out, lse, d_out) ->
    (dq, dk, dv)``, the gradient contribution of this block of keys given the *final* out and lse of the rows
    (P = exp(S − lse), dS = P·(dP − rowsum(dO∘O))). Both return float32 (or float64 for float64 inputs).
    """

    name: str
    description: str
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    head_dims: tuple[int, int] = (1, 1 << 16)  # inclusive range of D and D_v
    supports_masks: bool = True
    supports_bias: bool = True
    supports_grad: bool = True
    supports_gqa: bool = True
    supports_dv_differs: bool = True
    supports_blocks: bool = False
    supports_score_mods: bool = False  # custom and ready-made score_mod functions
    supports_sinks: bool = False
    supports_dropout: bool = False
    auto_devices: frozenset[str] | None = None  # where the chooser may pick it unnamed (None: all it runs on)
    extra: dict = field(default_factory=dict, compare=False)

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (a missing package, no GPU); [] if it can."""
        return []

    def device_types(self) -> frozenset[str]:
        """Device types it runs on now (``devices``, unless a mode such as an interpreter adds one)."""
        return self.devices

    def auto_reasons(self, call: AttentionCall) -> list[str]:
        """Why the chooser must not pick it *unnamed* for this call (on top of ``not_supported_reasons``)."""
        if self.auto_devices is not None and call.device.type not in self.auto_devices:
            return [f"chosen automatically only on {sorted(self.auto_devices)}; name it to run on {call.device.type}"]
        return []

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = list(self.unavailable_reasons())
        if call.device.type not in self.device_types():
            reasons.append(f"runs on {sorted(self.device_types())}, not {call.device.type}")
        if call.dtype not in self.dtypes:
            reasons.append(f"supports {sorted(str(d) for d in self.dtypes)}, not {call.dtype}")
        lo, hi = self.head_dims
        for name, d in (("D", call.D), ("D_v", call.D_v)):
            if not lo <= d <= hi:
                reasons.append(f"head dim {name}={d} outside [{lo}, {hi}]")
        if call.mask is not None and not self.supports_masks:
            reasons.append(f"does not take masks (got {call.mask.name})")
        if call.bias is not None and not self.supports_bias:
            reasons.append("does not take an additive bias")
        if call.score_mod is not None and not self.supports_score_mods:
            reasons.append(f"does not take score modifiers (got {call.score_mod.name})")
        if call.sinks is not None and not self.supports_sinks:
            reasons.append("does not take attention sinks")
        if call.dropout_p and not self.supports_dropout:
            reasons.append(f"has no dropout (got dropout_p={call.dropout_p})")
        if call.needs_grad and not self.supports_grad:
            reasons.append("has no backward (inputs require grad)")
        if call.H_q != call.H_kv and not self.supports_gqa:
            reasons.append(f"no grouped-query attention (H_q={call.H_q}, H_kv={call.H_kv})")
        if call.D != call.D_v and not self.supports_dv_differs:
            reasons.append(f"needs D == D_v (got {call.D} and {call.D_v})")
        reasons.extend(self.call_reasons(call))
        return reasons

    def call_reasons(self, call: AttentionCall) -> list[str]:
        """Backend-specific reasons beyond the declared capabilities."""
        return []

    def forward(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def repeat(self, call: AttentionCall):
        """A function ``(q, k, v) -> (out, lse)`` for later calls with this one's signature (shapes, dtypes, device,
        causal, scale), except N_k, which may be any number of keys in N_k's bucket (``choice.n_bucket``): a
        decoding step's cache grows by one key per step. None where the backend cannot promise that; the function
        itself returns None for a call it does not serve after all, which then goes the whole way. Only plain
        calls (no mask object, bias, sinks or dropout; a ready-made score modifier object passed a second time, and
        without gradients, is part of the signature) ask; for a call that autograd records (q, k or v
        requires grad) the function must be differentiable in q, k, v as ``forward`` is, and it is kept apart from
        the one for calls without. ``selfattn.attention`` keeps the function per signature and calls it directly,
        so a repeated call pays neither the validation nor the planning again; a backend offers it where that is
        most of a call (a decoding step, or a training step's small attention)."""
        return None

    def forward_block(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"backend {self.name!r} does not compute blocks (supports_blocks=False)")

    def backward_block(self, call: AttentionCall, out: Tensor, lse: Tensor, d_out: Tensor):
        raise NotImplementedError(f"backend {self.name!r} does not compute blocks (supports_blocks=False)")


def sum_to_bias(grad: Tensor, bias: Tensor) -> Tensor:
    """A (B, H_q, N_q, N_k) gradient summed over the dimensions ``bias`` broadcasts, in ``bias``'s shape and dtype."""
    shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [i for i, n in enumerate(shape4) if n == 1 and grad.shape[i] != 1]
    return (grad.sum(dims, keepdim=True) if dims else grad).reshape(bias.shape).to(bias.dtype)


def merge_by_lse(outs: list[Tensor], lses: list[Tensor], dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Combine attention over disjoint key blocks into attention over their union (exact).

    Each part is (out_j (B, H, N_q, D_v), lse_j (B, H, N_q)); the result is Σ_j exp(lse_j − lse)·out_j with
    lse = log Σ_j exp(lse_j). Rows masked in every part stay zero with lse −inf. The sum is accumulated in ``dtype``
    (default: the promotion of the parts' and the weights' dtypes).
    """
    lse_all = torch.stack(lses)  # (P, B, H, N_q)
    lse = torch.logsumexp(lse_all, dim=0)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lse_all - safe)  # (P, B, H, N_q); exp(−inf) = 0 for parts that saw nothing
    if dtype is None:
        dtype = functools.reduce(torch.promote_types, [o.dtype for o in outs], w.dtype)
    out = outs[0].to(dtype) * w[0][..., None]
    for o_j, w_j in zip(outs[1:], w[1:], strict=True):
        out.add_(o_j.to(dtype) * w_j[..., None])
    return out, lse
