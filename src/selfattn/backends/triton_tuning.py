"""Autotuning configurations for the Triton kernels on NVIDIA GPUs (H100 first, sane on others).

Only imported when a kernel is launched on a GPU (under the interpreter the kernels run with fixed small blocks).
Configurations whose tiles cannot fit the GPU's shared memory are pruned before compiling; Triton's autotuner also
drops any that fail to compile or run out of resources. Tuning is keyed on the head dims, the mask flags and the
power-of-two buckets of N_q and N_k up to 4096 (``TUNE_N_Q``/``TUNE_N_K``), so a training run with varying lengths
does not retune at every step; the choices are cached on disk with Triton's kernel cache.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from selfattn.backends import triton_kernels as tk

_KEY = ["TUNE_N_Q", "TUNE_N_K", "HEAD_D", "HEAD_DV", "CAUSAL", "WINDOW", "HAS_LEN", "HAS_DOC", "PRECISION", "HAS_BIAS",
        "BIAS_GRAD", "TMA_OK", "SOFTCAP", "ALIBI", "REL", "HAS_SINK", "DROPOUT", "SLOPE_GRAD"]  # those it has


@functools.cache
def _shared_memory_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _element_bytes(nargs) -> int:
    return 4 if nargs["PRECISION"] == "ieee" else 2


def _prune(kernel_name: str):
    def prune(configs, nargs, **kwargs):
        nargs = {**nargs, **kwargs}  # the autotuner passes positional and keyword arguments apart
        d, dv = nargs["BLOCK_D"], nargs["BLOCK_DV"]
        e = _element_bytes(nargs)
        kept = []
        for c in configs:
            if c.kwargs.get("TMA") and not nargs.get("TMA_OK"):  # descriptors need Hopper and an aligned layout
                continue
            m, n, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            if kernel_name == "attn_fwd":  # Q tile resident, K and V tiles pipelined over `stages`
                need = e * (m * d + s * n * (d + dv))
            elif kernel_name == "attn_bwd_dkdv":  # K, V resident; Q, dO pipelined
                need = e * (n * (d + dv) + s * m * (d + dv))
            else:  # dQ: Q, dO resident; K, V pipelined
                need = e * (m * (d + dv) + s * n * (d + dv))
            # D = 256 and fp32 (IEEE products run on the FMA units, not the tensor cores) need small tiles: large
            # ones spill registers and take minutes to compile
            small = m * n <= (2048 if e == 4 else 4096)
            if need <= _shared_memory_bytes() and (small or (max(d, dv) < 256 and e == 2)):
                kept.append(c)
        plain = [c for c in configs if not c.kwargs.get("TMA")]
        return kept or [min(plain, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]

    return prune


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward: 128-row query tiles with 64/128-key tiles and 8 warps are the
# H100's sweet spot at D = 64/128 (FlashAttention-2, the Triton tutorial); the smaller tiles serve D = 256 and older
# GPUs. dK/dV keeps a key tile (and its two float32 accumulators) resident while query tiles stream past, so its key
# tiles are the larger; dQ is the mirror image. A short list: each configuration compiles once per shape bucket.
_TILES = {
    "attn_fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 2)],
    # Hopper: K/V tiles through tensor descriptors (TMA); tried only where the layout and the GPU allow (``tma_ok``)
    "attn_fwd tma": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3)],
    "attn_bwd_dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (16, 32, 4, 2)],
    "attn_bwd_dq": [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)],
}


def autotuning() -> bool:
    """SELFATTN_TRITON_AUTOTUNE=0 runs every call with the default tiles (``default_config``) instead of tuning."""
    return os.environ.get("SELFATTN_TRITON_AUTOTUNE", "1") not in ("0", "")


def default_config(name: str, block_d: int) -> dict:
    """Tiles that fit any NVIDIA GPU from Ampere on at this head dim (the first that the pruner keeps)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _TILES[name]]
    nargs = {"BLOCK_D": block_d, "BLOCK_DV": block_d, "PRECISION": "tf32"}
    c = _prune(name)(configs, nargs)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def _configs(name: str) -> list:
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _TILES[name]]
    configs += [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TMA": True}, num_warps=w, num_stages=s)
                for m, n, w, s in _TILES.get(name + " tma", [])]
    return configs


@functools.cache
def tuned(name: str):
    configs = _configs(name)
    key = [k for k in _KEY if k in getattr(tk, name).arg_names]  # TMA_OK: a TMA choice must not serve other layouts
    # cache_results: the choice is kept in Triton's on-disk cache, so a new process does not tune again
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _prune(name)},
                           cache_results=True)(getattr(tk, name))


_POINTERS = {"Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ"}


def compile_for(name: str, *, arch: int = 90, dtype: str = "bf16", head_dim: int = 128, flags: dict | None = None,
                config: tuple[int, int, int, int] | None = None):
    """Compile kernel ``name`` ahead of time for an NVIDIA GPU of compute capability ``arch`` (90 = H100) without
    one: checks that the kernels build for the real target (the interpreter does not), and gives the PTX and cubin.
    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages), default the first tile of the list."""
    from triton.backends.compiler import GPUTarget

    fn = getattr(tk, name)
    block_m, block_n, warps, stages = config or _TILES.get(name, [(64, 64, 4, 1)])[0]
    consts = dict(HEAD_D=head_dim, HEAD_DV=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  BLOCK_DV=max(16, triton.next_power_of_2(head_dim)), PRECISION="ieee" if dtype == "fp32" else "tf32",
                  UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n, HAS_DLSE=True)
    consts |= dict(CAUSAL=False, WINDOW=False, HAS_LEN=False, HAS_DOC=False, DOC_RUNS=False, TMA_OK=False,
                   TMA=False, HAS_BIAS=False, BIAS_GRAD=False, SOFTCAP=False, ALIBI=0, REL=0, HAS_SINK=False,
                   DROPOUT=False, SLOPE_GRAD=False) | (flags or {})
    consts = {n: c for n, c in consts.items() if n in fn.arg_names}
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in _POINTERS:
            signature[arg] = "*" + dtype
        elif arg in ("LSE", "DELTA", "DLSE", "BIAS", "DBIAS", "SLOPES", "RELD", "SINKS", "DSLOPE"):
            signature[arg] = "*fp32"
        elif arg in ("KLEN", "KSTART", "RUN_LO", "RUN_HI"):
            signature[arg] = "*i32"
        elif arg == "DOC":
            signature[arg] = "*i64"
        elif arg in ("qk_scale", "sm_scale", "cap2", "drop_scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
