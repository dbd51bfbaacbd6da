"""Targets of the tiny GPT (issue 4), measured on this machine. Run timed parts under the shared lock:

    flock /tmp/selfattn-bench.lock python benchmarks/bench_gpt.py train     # default `selfattn train`, loss, tokens/s
    flock /tmp/selfattn-bench.lock python benchmarks/bench_gpt.py decode    # per-token time vs context, cache vs none
    flock /tmp/selfattn-bench.lock python benchmarks/bench_gpt.py stream    # 100,000 tokens, sliding window, memory

Every part prints the machine load (``uptime``) next to its numbers; ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch

from selfattn import decode
from selfattn.model import GPT, GPTConfig, data
from selfattn.model.generate import stream_tokens
from selfattn.model.train import TrainConfig, train


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bigram_loss() -> float:
    """Held-out loss of a byte-bigram model (add-one counts from the training split): the floor to beat."""
    s = data.load_splits(None)
    counts = torch.ones(256, 256)
    counts.index_put_((s.train[:-1], s.train[1:]), torch.ones(len(s.train) - 1), accumulate=True)
    logp = (counts / counts.sum(1, keepdim=True)).log()
    return -logp[s.val[:-1], s.val[1:]].mean().item()


def bench_train(args) -> None:
    print(f"before: {load()}; torch threads {args.threads or torch.get_num_threads()}")
    print(f"byte-bigram baseline, held-out: {bigram_loss():.3f} nats/byte")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "run")
        r = train(TrainConfig(out_dir=out, progress=False, threads=args.threads), log=print)
        print(f"after: {load()}")
        h = r["history"]
        print("held-out loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in zip(h["val_step"], h["val_loss"],
                                                                                      strict=True)))
        print(f"default `selfattn train`: {r['params'] / 1e6:.2f}M parameters, {r['step']} steps in "
              f"{r['seconds']:.0f} s, {r['tokens_per_s']:,.0f} tokens/s, final held-out loss "
              f"{r['val_loss']:.3f} nats/byte (target <= 1.9 in <= 300 s); loss curve: {r.get('plot')}")


def _timed_steps(model, caches, n: int) -> float:
    token = torch.zeros(1, 1, dtype=torch.long)
    times = []
    with torch.inference_mode():
        for _ in range(n):
            t = time.perf_counter()
            model(token, caches=caches)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_decode(args) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # the default size; timing does not depend on training
    print(f"{load()}; torch threads {torch.get_num_threads()}; model {GPTConfig()}")
    print(f"{'context':>8} {'cached ms/token':>16} {'recompute ms/token':>19} {'speed-up':>9}")
    per_token = {}
    for n in args.contexts:
        prompt = torch.randint(256, (1, n))
        caches = decode.new_caches(model, 1, max_len=n + args.steps + 1)
        with torch.inference_mode():
            for start in range(0, n, 1024):  # fill the cache as generation does, in pieces
                model(prompt[:, start:start + 1024], caches=caches)
        cached = _timed_steps(model, caches, args.steps)
        per_token[n] = cached
        recompute = None
        if n <= args.max_recompute:
            with torch.inference_mode():
                times = []
                for _ in range(2 if n < 2048 else 1):
                    t = time.perf_counter()
                    model(prompt)  # what generating one token costs without a cache
                    times.append(time.perf_counter() - t)
            recompute = min(times)
        rec = f"{recompute * 1e3:19.1f} {recompute / cached:8.1f}x" if recompute else f"{'-':>19} {'-':>9}"
        print(f"{n:8d} {cached * 1e3:16.2f} {rec}", flush=True)
    lo, hi = min(per_token), max(per_token)
    print(f"cached per-token time {lo} -> {hi}: x{per_token[hi] / per_token[lo]:.2f} for x{hi / lo:.0f} context "
          f"(linear would be at most x{hi / lo:.0f}); {load()}")


def bench_stream(args) -> None:
    torch.manual_seed(0)
    config = GPTConfig(context=64, n_layer=1, n_head=2, d_model=32)
    model = GPT(config).eval()
    print(f"{load()}; torch threads {torch.get_num_threads()}; tiny model {config}; window={args.window}, sinks=4")
    start_rss, t0, marks = rss_mib(), time.perf_counter(), {}
    prompt = torch.tensor([[10]])
    for i, _ in enumerate(stream_tokens(model, prompt, args.tokens, temperature=1.0, seed=0, cache="window",
                                        window=args.window, sinks=4), 1):
        if i % (args.tokens // 10) == 0:
            marks[i] = rss_mib()
            print(f"{i:>8} tokens  {time.perf_counter() - t0:7.1f} s  RSS {marks[i]:.1f} MiB", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first, last = marks[min(marks)], marks[max(marks)]
    print(f"streamed {args.tokens:,} tokens in {time.perf_counter() - t0:.0f} s with a {args.window}+4-token window; "
          f"RSS {start_rss:.1f} MiB at start, {first:.1f} MiB at {min(marks):,} tokens, {last:.1f} MiB at "
          f"{max(marks):,} (growth {last - first:+.1f} MiB); peak RSS {peak:.1f} MiB; {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["train", "decode", "stream"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; decode/stream: 1)")
    p.add_argument("--out", default=None, help="train: keep the checkpoint here")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--max-recompute", type=int, default=4096, help="decode: longest context to recompute")
    p.add_argument("--steps", type=int, default=20, help="decode: timed tokens per context")
    p.add_argument("--tokens", type=int, default=100_000, help="stream: tokens to generate")
    p.add_argument("--window", type=int, default=60, help="stream: recent tokens kept")
    args = p.parse_args()
    if args.part != "train":
        torch.set_num_threads(args.threads or 1)
    {"train": bench_train, "decode": bench_decode, "stream": bench_stream}[args.part](args)


if __name__ == "__main__":
    main()
