"""The oracle as a backend: float64, materialises the N_q x N_k matrix, autograd through plain torch operations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfattn import reference
from selfattn.backends.base import AttentionCall, Backend


@dataclass(frozen=True)
class ReferenceBackend(Backend):
    def call_reasons(self, call: AttentionCall) -> list[str]:
        n = call.B * call.H_q * call.N_q * call.N_k
        need, have = reference.bytes_needed(n), reference.available_memory_bytes()
        if need > have // 2:
            return [f"its N_q x N_k float64 matrices need ~{need / 2**30:.1f} GiB, more than half the "
                    f"{have / 2**30:.1f} GiB available"]
        return []

    def forward(self, call: AttentionCall):
        out, lse = reference.attention(
            call.q, call.k, call.v, scale=call.scale, mask=call.mask, bias=call.bias, return_lse=True
        )
        return out.to(call.dtype), lse.to(torch.float32)


BACKEND = ReferenceBackend(
    name="reference",
    description="the textbook computation in float64 (the oracle); O(N_q·N_k) memory",
)
