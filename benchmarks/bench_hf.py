"""End-to-end prefill of a tiny Llama-style model on the CPU: attn_implementation "selfattn" vs "sdpa" vs "eager".

    python benchmarks/bench_hf.py                 # N = 4096 and 16384, writes benchmarks/results/hf_prefill.json
    python benchmarks/bench_hf.py --n 1024 2048   # a quick run

The prefill is the model's forward over N tokens with a KV cache and only the last position's logits (what
``generate`` does first), batch 1, float32, the same random weights and tokens for every implementation. Timing: one
process holds the three models and runs them in interleaved rounds (selfattn, sdpa, eager, selfattn, ...) after a
warm-up, so a change of machine load hits all of them alike; the table gives the median and the best of --repeats
rounds, and the ratio of medians to sdpa. Peak memory: a fresh subprocess per (implementation, N) runs one prefill
and reports its ru_maxrss. Eager attention materialises B·H·N² float32 scores several times; when that estimate
exceeds --eager-max-gib the case is reported as not run instead of swapping the shared machine.
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


def _model(impl: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import selfattn.integrations.hf  # noqa: F401  registers "selfattn"

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(LlamaConfig(**MODEL), attn_implementation=impl).eval()


def _prefill(model, ids) -> tuple[float, list[float]]:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, out.logits[0, -1, :4].tolist()


def peak_memory(impl: str, n: int) -> dict:
    """One prefill in this (fresh) process: its peak resident memory, and which backend selfattn chose."""
    import resource

    import torch

    model = _model(impl)
    _prefill(model, torch.randint(0, MODEL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1)))
    result = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if impl == "selfattn":
        import selfattn
        from selfattn import backends

        q = torch.zeros(1, MODEL["num_attention_heads"], n, 64)
        kv = torch.zeros(1, MODEL["num_key_value_heads"], n, 64)
        result["backend"] = backends.choose(selfattn.api.make_call(q, kv, kv, causal=True)).name
    return result


def interleaved_times(impls: list[str], n: int, repeats: int) -> dict[str, dict]:
    """Median and best prefill time of each implementation over interleaved rounds, in this process."""
    import torch

    models = {impl: _model(impl) for impl in impls}
    ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    logits = {}
    for impl in impls:
        _, logits[impl] = _prefill(models[impl], ids)  # warm-up
    for _ in range(repeats):
        for impl in impls:
            times[impl].append(_prefill(models[impl], ids)[0])
    return {impl: {"seconds": sorted(t)[len(t) // 2], "best_seconds": min(t), "all_seconds": t,
                   "last_logits": logits[impl]} for impl, t in times.items()}


def _subprocess(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed (exit {done.returncode}): {last[:300]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-max-gib", type=float, default=6.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_prefill.json"))
    p.add_argument("--memory", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    p.add_argument("--time", nargs="+", metavar="N_THEN_IMPLS", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory:
        print(json.dumps(peak_memory(args.memory[0], int(args.memory[1]))))
        return
    if args.time:
        print(json.dumps(interleaved_times(args.time[1:], int(args.time[0]), args.repeats)))
        return

    load = os.getloadavg()
    rows = []
    for n in args.n:
        need = EAGER_SCORE_COPIES * MODEL["num_attention_heads"] * n * n * 4 / 2**30
        runnable = [i for i in args.impls if not (i == "eager" and need > args.eager_max_gib)]
        timed = _subprocess(["--time", str(n), *runnable, "--repeats", str(args.repeats)], args.timeout)
        for impl in args.impls:
            row = {"impl": impl, "N": n}
            if impl not in runnable:
                row["error"] = (f"not run: eager attention needs ~{need:.0f} GiB for its N x N scores "
                                f"(limit --eager-max-gib {args.eager_max_gib:g})")
            elif "error" in timed:
                row["error"] = timed["error"]
            else:
                row.update(timed[impl])
                row.update(_subprocess(["--memory", impl, str(n)], args.timeout))
            rows.append(row)
            print(row, flush=True)

    print(f"\nprefill of a tiny Llama-style model ({MODEL['num_hidden_layers']} layers, d={MODEL['hidden_size']}, "
          f"H_q={MODEL['num_attention_heads']}, H_kv={MODEL['num_key_value_heads']}), batch 1, float32, "
          f"{os.cpu_count()} CPUs, load {load[0]:.1f}")
    print(f"{'N':>6} {'impl':>9} {'median s':>9} {'best s':>8} {'vs sdpa':>8} {'peak RSS':>9}  note")
    for n in args.n:
        sdpa = next((r["seconds"] for r in rows if r["N"] == n and r["impl"] == "sdpa" and "seconds" in r), None)
        for r in (r for r in rows if r["N"] == n):
            if "seconds" in r:
                ratio = f"{r['seconds'] / sdpa:.2f}x" if sdpa else "-"
                note = f"backend {r['backend']}" if "backend" in r else ""
                rss = f"{r['peak_rss_gib']:.2f}G" if "peak_rss_gib" in r else "-"
                print(f"{n:>6} {r['impl']:>9} {r['seconds']:>9.3f} {r['best_seconds']:>8.3f} {ratio:>8} {rss:>9}  "
                      f"{note}{r.get('error', '')}")
            else:
                print(f"{n:>6} {r['impl']:>9} {'-':>9} {'-':>8} {'-':>8} {'-':>9}  {r['error']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from selfattn.backends import choice

    meta = {"model": MODEL, "batch": 1, "dtype": "float32", "machine": choice.machine(), "load_before": load,
            "load_after": os.getloadavg(), "python": platform.python_version(), "repeats": args.repeats}
    import torch
    import transformers

    meta.update(torch=torch.__version__, transformers=transformers.__version__)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
