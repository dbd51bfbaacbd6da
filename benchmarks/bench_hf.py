"""End-to-end prefill of a tiny Llama-style model on the CPU: attn_implementation "selfattn" vs "sdpa" vs "eager".

    python benchmarks/bench_hf.py                 # N = 4096 and 16384, writes benchmarks/results/hf_prefill.json
    python benchmarks/bench_hf.py --n 1024 2048   # a quick run

Each (implementation, N) runs in a fresh subprocess (so peak memory, ru_maxrss, is its own) on the same random
weights and tokens: one warm-up prefill, then the median of --repeats timed prefills. The prefill is the model's
forward over N tokens with a KV cache and only the last position's logits (what ``generate`` does first). Eager
attention materialises B·H·N² float32 scores several times; when that estimate exceeds --eager-max-gib the case is
reported as not run instead of swapping the shared machine. Ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ("selfattn", "sdpa", "eager")
MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=65536)  # head dim 64, GQA 4:2, RoPE
EAGER_SCORE_COPIES = 3  # scores, + mask, softmax: float32 (B, H, N, N) tensors alive at once in eager attention


def run_one(impl: str, n: int, repeats: int) -> dict:
    """Time the prefill in this process (called in a fresh subprocess by main)."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import selfattn.integrations.hf  # noqa: F401  registers "selfattn"

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**MODEL), attn_implementation=impl).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, n))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
    times.sort()
    result = {"impl": impl, "N": n, "seconds": times[len(times) // 2], "all_seconds": times,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "last_logits": out.logits[0, -1, :4].tolist()}
    if impl == "selfattn":
        from selfattn import backends

        q = torch.zeros(1, 4, n, 64)
        call = selfattn.api.make_call(q, q[:, :2], q[:, :2], causal=True)
        result["backend"] = backends.choose(call).name
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-max-gib", type=float, default=6.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_prefill.json"))
    p.add_argument("--one", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.repeats)))
        return

    load = os.getloadavg()
    rows = []
    for n in args.n:
        for impl in args.impls:
            need = EAGER_SCORE_COPIES * MODEL["num_attention_heads"] * n * n * 4 / 2**30
            if impl == "eager" and need > args.eager_max_gib:
                rows.append({"impl": impl, "N": n, "error": f"not run: eager attention needs ~{need:.0f} GiB for its "
                             f"N x N scores (limit --eager-max-gib {args.eager_max_gib:g})"})
                print(rows[-1], flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", impl, str(n), "--repeats", str(args.repeats)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if done.returncode == 0:
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                else:
                    last = (done.stderr.strip().splitlines() or ["?"])[-1]
                    rows.append({"impl": impl, "N": n, "error": f"failed (exit {done.returncode}): {last[:300]}"})
            except subprocess.TimeoutExpired:
                rows.append({"impl": impl, "N": n, "error": f"timed out after {args.timeout:.0f} s"})
            print(rows[-1], flush=True)

    print(f"\nprefill of a tiny Llama-style model ({MODEL['num_hidden_layers']} layers, d={MODEL['hidden_size']}, "
          f"H_q={MODEL['num_attention_heads']}, H_kv={MODEL['num_key_value_heads']}), batch 1, float32, "
          f"{os.cpu_count()} CPUs, load {load[0]:.1f}")
    print(f"{'N':>6} {'impl':>9} {'seconds':>9} {'vs sdpa':>8} {'peak RSS':>9}  note")
    for n in args.n:
        sdpa = next((r["seconds"] for r in rows if r["N"] == n and r["impl"] == "sdpa" and "seconds" in r), None)
        for r in (r for r in rows if r["N"] == n):
            if "seconds" in r:
                ratio = f"{r['seconds'] / sdpa:.2f}x" if sdpa else "-"
                note = f"backend {r['backend']}" if "backend" in r else ""
                print(f"{n:>6} {r['impl']:>9} {r['seconds']:>9.3f} {ratio:>8} {r['peak_rss_gib']:>7.2f}G  {note}")
            else:
                print(f"{n:>6} {r['impl']:>9} {'-':>9} {'-':>8} {'-':>9}  {r['error']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "batch": 1, "dtype": "float32", "cpus": os.cpu_count(), "load_before": load,
            "load_after": os.getloadavg(), "python": platform.python_version(), "repeats": args.repeats}
    import torch
    import transformers

    meta.update(torch=torch.__version__, transformers=transformers.__version__)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
