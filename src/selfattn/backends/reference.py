"""The oracle as a backend: float64, materialises the N_q x N_k matrix, autograd through plain torch operations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfattn import reference, score_mods
from selfattn.backends.base import AttentionCall, Backend
from selfattn.masks import grid


# The chooser takes the oracle unnamed only on the CPU and only while its float64 N_q x N_k matrices (with their
# intermediates) stay under this: a few hundred MB. Larger calls, and every CUDA call, raise BackendError instead.
AUTO_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class ReferenceBackend(Backend):
    def auto_reasons(self, call: AttentionCall) -> list[str]:
        if call.device.type != "cpu":
            return [f"the float64 oracle is never chosen automatically on {call.device.type}; pass "
                    "backend='reference' to insist"]
        need = reference.bytes_needed(call.B * call.H_q * call.N_q * call.N_k)
        if need > AUTO_MAX_BYTES:
            return [f"the float64 oracle would need ~{need / 2**20:,.0f} MiB for its N_q x N_k matrices, over the "
                    f"{AUTO_MAX_BYTES >> 20} MiB it is chosen automatically for; pass backend='reference' to insist"]
        return []

    def call_reasons(self, call: AttentionCall) -> list[str]:
        shortfall = reference.memory_shortfall(call.B * call.H_q * call.N_q * call.N_k)
        return [] if shortfall is None else [f"materialises the N_q x N_k matrix: {shortfall}"]

    def forward(self, call: AttentionCall):
        s = self._steps(call, call.q, call.k, call.v)
        return s.out.to(call.dtype), s.lse.to(torch.float32)

    def forward_block(self, call: AttentionCall):
        with torch.no_grad():  # sinks are added once the blocks are merged (score_mods.add_sinks)
            s = self._steps(call, call.q, call.k, call.v, sinks=False)
        return s.out.to(_acc(call)), s.lse.to(_acc(call))

    def backward_block(self, call: AttentionCall, out, lse, d_out):
        with torch.no_grad():
            s = self._steps(call, call.q, call.k, call.v, sinks=False)
            lse = lse.to(torch.float64)[..., None]  # (B, H_q, N_q, 1)
            p = torch.where(torch.isneginf(s.masked) | torch.isneginf(lse), 0.0, torch.exp(s.masked - lse))
            d_out, out = d_out.to(torch.float64), out.to(torch.float64)
            keep = 1.0
            if call.dropout_p:
                keep = score_mods.dropout_keep(call.dropout_seed, call.dropout_p, *self._grid(call))
                keep = keep / (1 - call.dropout_p)
            dv = (p * keep).transpose(-2, -1) @ d_out  # (B, H_q, N_k, D_v)
            dp = (d_out @ s.v.transpose(-2, -1)) * keep  # (B, H_q, N_q, N_k)
            ds = p * (dp - (d_out * out).sum(-1, keepdim=True))
            if call.score_mod is not None:  # through the modifier: dS_raw = dS · ∂score_mod/∂s
                def grad(ds=ds):
                    x = (s.scores * call.scale).requires_grad_(True)
                    return torch.autograd.grad(score_mods.apply(call.score_mod, x, *self._grid(call)), x, ds)[0]

                ds = score_mods.with_autograd(grad)
            dq = ds @ s.k * call.scale  # (B, H_q, N_q, D)
            dk = ds.transpose(-2, -1) @ s.q * call.scale  # (B, H_q, N_k, D)
            group = call.H_q // call.H_kv
            dk = dk.unflatten(1, (call.H_kv, group)).sum(2)  # (B, H_kv, N_k, D): sum over the query heads sharing it
            dv = dv.unflatten(1, (call.H_kv, group)).sum(2)
        return dq.to(_acc(call)), dk.to(_acc(call)), dv.to(_acc(call))

    @staticmethod
    def _grid(call: AttentionCall):
        return grid(call.B, call.H_q, call.N_q, call.N_k, call.device, q_pos0=call.q_start, k_pos0=call.k_pos0)

    @staticmethod
    def _steps(call: AttentionCall, q, k, v, sinks=True):
        return reference.steps(q, k, v, scale=call.scale, mask=call.mask, bias=call.bias, q_pos0=call.q_start,
                               k_pos0=call.k_pos0, score_mod=call.score_mod, sinks=call.sinks if sinks else None,
                               dropout_p=call.dropout_p, dropout_seed=call.dropout_seed)


def _acc(call: AttentionCall) -> torch.dtype:
    return torch.float64 if call.dtype == torch.float64 else torch.float32


BACKEND = ReferenceBackend(
    name="reference",
    description="the textbook computation in float64 (the oracle); O(N_q·N_k) memory",
    supports_blocks=True,
    supports_score_mods=True,
    supports_sinks=True,
    supports_dropout=True,
)
