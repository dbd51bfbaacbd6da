"""A SmolLM-shaped Llama in Hugging Face transformers: attn_implementation "selfattn" against "sdpa", end to end.

    python benchmarks/bench_hf_llama.py              # prefill 4,096 tokens; greedy decoding of 64 after 2,048
    python benchmarks/bench_hf_llama.py --quick      # 512 / 256 tokens, 8 new ones
    python benchmarks/bench_hf_llama.py --dtype bfloat16   # the same model in bf16 (writes hf_llama_bf16.json)

The model is built from a config with the shape of a small open model (30 layers, d_model 576, 9 query heads sharing
3 key/value heads, head dim 64, RoPE; random weights, a small vocabulary), float32 (or --dtype), batch 1. One process
holds both models (the same weights) and runs them in interleaved rounds; the ratio is the median over rounds of
selfattn's time / sdpa's (< 1: selfattn is faster). Decoding time per token = (generate(prompt, new) −
prefill(prompt)) / new, both measured in the same round. The greedy tokens of the two implementations are compared.
Writes benchmarks/results/hf_llama.json with the CPU model and ``torch.backends.cpu.get_cpu_capability()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_gqa_decode import machine  # noqa: E402

CONFIG = dict(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)


def build(impl: str, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    import selfattn.integrations.hf  # noqa: F401  registers "selfattn"

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(**CONFIG), attn_implementation=impl).to(dtype).eval()


def prefill(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def generate(model, ids, new: int):
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=None, help="default: results/hf_llama.json (hf_llama_bf16.json in bfloat16)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out = args.out or str(HERE / "results" / ("hf_llama.json" if dtype is torch.float32 else "hf_llama_bf16.json"))
    n_prefill, n_prompt, n_new = (512, 256, 8) if args.quick else (4096, 2048, 64)
    models = {impl: build(impl, dtype) for impl in ("selfattn", "sdpa")}
    g = torch.Generator().manual_seed(1)
    ids_prefill = torch.randint(0, CONFIG["vocab_size"], (1, n_prefill), generator=g)
    ids_prompt = torch.randint(0, CONFIG["vocab_size"], (1, n_prompt), generator=g)
    times = {impl: {"prefill": [], "decode_per_token": []} for impl in models}
    tokens = {}
    with torch.no_grad():
        for m in models.values():  # warm-up
            prefill(m, ids_prefill[:, :64])
            generate(m, ids_prompt[:, :64], 2)
        for r in range(args.rounds):
            for impl, m in models.items():
                times[impl]["prefill"].append(prefill(m, ids_prefill))
                t_prompt = prefill(m, ids_prompt)
                t_gen, toks = generate(m, ids_prompt, n_new)
                times[impl]["decode_per_token"].append((t_gen - t_prompt) / n_new)
                tokens.setdefault(impl, toks)
                print(f"round {r} {impl}: prefill {times[impl]['prefill'][-1]:.3f} s, decoding "
                      f"{times[impl]['decode_per_token'][-1] * 1e3:.1f} ms/token", flush=True)
    result = {"machine": machine(), "config": CONFIG, "dtype": args.dtype, "n_prefill": n_prefill, "n_prompt": n_prompt,
              "n_new": n_new,
              "times": times, "tokens_identical": tokens["selfattn"] == tokens["sdpa"]}
    for what in ("prefill", "decode_per_token"):
        a, b = times["selfattn"][what], times["sdpa"][what]
        result[f"{what}_ratio"] = statistics.median(x / y for x, y in zip(a, b, strict=True))
        print(f"{what}: selfattn {min(a):.4f} s, sdpa {min(b):.4f} s, selfattn/sdpa {result[f'{what}_ratio']:.2f}x "
              "(median over rounds)")
    result["machine"]["load_end"] = os.getloadavg()[0]
    print(f"greedy tokens identical: {result['tokens_identical']}")
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
