"""Autotuning configurations for the Triton kernels on NVIDIA GPUs (H100 first, sane on others).

Only imported when a kernel is launched on a GPU (under the interpreter the kernels run with fixed small blocks).
Configurations whose tiles cannot fit the GPU's shared memory are pruned before compiling; Triton's autotuner also
drops any that fail to compile or run out of resources. Tuning is keyed on the head dims, the mask flags and the
power-of-two buckets of N_q and N_k (``TUNE_N_Q``/``TUNE_N_K``), so a training run with varying lengths does not
retune at every step.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton

from selfattn.backends import triton_kernels as tk

_KEY = ["TUNE_N_Q", "TUNE_N_K", "HEAD_D", "HEAD_DV", "CAUSAL", "WINDOW", "HAS_LEN", "HAS_DOC", "PRECISION"]


def _configs(blocks_m, blocks_n, warps, stages) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in itertools.product(blocks_m, blocks_n, warps, stages)]


@functools.lru_cache(maxsize=1)
def _shared_memory_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _element_bytes(nargs) -> int:
    return 4 if nargs["PRECISION"] == "ieee" else 2


def _prune(kernel_name: str):
    def prune(configs, nargs, **kwargs):
        d, dv = nargs["BLOCK_D"], nargs["BLOCK_DV"]
        e = _element_bytes(nargs)
        kept = []
        for c in configs:
            m, n, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            if kernel_name == "attn_fwd":  # Q tile resident, K and V tiles pipelined over `stages`
                need = e * (m * d + s * n * (d + dv))
            elif kernel_name == "attn_bwd_dkdv":  # K, V resident; Q, dO pipelined
                need = e * (n * (d + dv) + s * m * (d + dv))
            else:  # dQ: Q, dO resident; K, V pipelined
                need = e * (m * (d + dv) + s * n * (d + dv))
            if need <= _shared_memory_bytes() and (max(d, dv) < 256 or m * n <= 64 * 64):
                kept.append(c)
        return kept or configs[:1]

    return prune


# Forward: 128-row query tiles with 64/128-key tiles and 8 warps are the H100 sweet spot at D = 64/128 (as in
# FlashAttention-2 and the Triton tutorial); smaller tiles serve D = 256 and older GPUs.
_FWD = _configs((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
# dK/dV: a key tile stays in registers while query tiles stream past; dQ: the mirror image.
_DKDV = _configs((32, 64), (64, 128), (4, 8), (2, 3))
_DQ = _configs((64, 128), (32, 64), (4, 8), (2, 3))


@functools.cache
def tuned(name: str):
    configs = {"attn_fwd": _FWD, "attn_bwd_dkdv": _DKDV, "attn_bwd_dq": _DQ}[name]
    return triton.autotune(configs=configs, key=_KEY,
                           prune_configs_by={"early_config_prune": _prune(name)})(getattr(tk, name))
