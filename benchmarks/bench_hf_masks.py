"""What transformers' padding and sliding-window masks cost once recognised as ready-made masks, on the CPU.

    flock /tmp/selfattn-bench.lock python benchmarks/bench_hf_masks.py          # writes results/hf_masks.json
    python benchmarks/bench_hf_masks.py --n 1024 --repeats 2                   # a quick run

A batch of two left-padded sequences (the second starts ``--pad`` tokens late, as batched generation pads) through
the prefill of two tiny models with attn_implementation="selfattn": a Llama (full causal attention) and a Mistral
(sliding window ``--window``), float32, same random weights and tokens. Each model runs with the bool mask that
transformers builds, handed to selfattn in three ways, in interleaved rounds in one process:

* ``dense``: the bool tensor itself (what any unrecognised pattern costs; before this change, every sliding-window
  mask);
* ``no-spec``: the recognised mask without its ``spec`` (exact block classifier, but no kernel form: before this
  change, every left-padded mask);
* ``ready-made``: what ``selfattn.integrations.hf`` passes now (``causal & key_range``,
  ``sliding_window(w) & key_range``), which the Triton kernels also take.

Printed: median and best seconds, the ratio to ``ready-made``, and whether the Triton backend would take the call
(its ``call_reasons``: no GPU is needed to ask). Logits of the real tokens are compared with "sdpa".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=65536)  # head dim 64, GQA 4:2, RoPE (as bench_hf.py)
MODES = ("dense", "no-spec", "ready-made")


def _models(family: str, window: int):
    import torch
    import transformers

    import selfattn.integrations.hf  # noqa: F401  registers "selfattn"

    if family == "llama":
        cls, config = transformers.LlamaForCausalLM, transformers.LlamaConfig(**MODEL)
    else:
        cls, config = transformers.MistralForCausalLM, transformers.MistralConfig(**MODEL, sliding_window=window)
    torch.manual_seed(0)
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="selfattn").eval()  # each its own config:
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()  # it records the implementation
    sdpa.load_state_dict(ours.state_dict())
    return ours, sdpa


def _as(mode: str):
    """hf.structured_mask as it behaves in ``mode``."""
    from selfattn import masks
    from selfattn.integrations import hf

    real = hf.structured_mask

    def passed(mask):
        if mode == "dense":
            return mask
        got = real(mask)
        return got if mode == "ready-made" else masks.Mask(got.mask_mod, got.name, got.block_fn)

    return passed


def run(n: int, pad: int, window: int, repeats: int) -> list[dict]:
    import torch

    import selfattn
    from selfattn import backends
    from selfattn.integrations import hf

    ids = torch.randint(0, MODEL["vocab_size"], (2, n), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, n, dtype=torch.long)
    am[1, :pad] = 0
    real_structured, real_attention = hf.structured_mask, selfattn.attention
    rows = []
    for family in ("llama", "mistral"):
        ours, sdpa = _models(family, window)
        with torch.no_grad():
            want = sdpa(ids, attention_mask=am).logits[am.bool()]
        times: dict[str, list[float]] = {m: [] for m in MODES}
        info: dict[str, dict] = {}
        for round_ in range(repeats + 1):  # round 0 is the warm-up, and records what each mode passes
            for mode in MODES:
                hf.structured_mask = _as(mode)
                seen = []

                def spy(q, k, v, seen=seen, **kw):
                    seen.append(selfattn.api.make_call(q, k, v, causal=kw.get("causal", False), mask=kw.get("mask")))
                    return real_attention(q, k, v, **kw)

                selfattn.attention = spy
                try:
                    with torch.no_grad():
                        t0 = time.perf_counter()
                        logits = ours(ids, attention_mask=am).logits
                        elapsed = time.perf_counter() - t0
                finally:
                    hf.structured_mask, selfattn.attention = real_structured, real_attention
                if round_ == 0:
                    got = logits[am.bool()]
                    reasons = backends.get("triton").call_reasons(seen[0])
                    info[mode] = {"mask": seen[0].mask.name, "backend": backends.choose(seen[0]).name,
                                  "triton_takes_it": not reasons, "triton_reasons": reasons,
                                  "rel_err_vs_sdpa": ((got - want).abs().max() / want.abs().max()).item()}
                else:
                    times[mode].append(elapsed)
        for mode in MODES:
            t = sorted(times[mode])
            rows.append({"model": family, "mode": mode, "N": n, "pad": pad, "window": window if family == "mistral"
                         else None, "seconds": t[len(t) // 2], "best_seconds": t[0], "all_seconds": times[mode],
                         **info[mode]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens per sequence (batch of 2)")
    p.add_argument("--pad", type=int, default=1024, help="left padding of the second sequence")
    p.add_argument("--window", type=int, default=512, help="Mistral's sliding window")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_masks.json"))
    args = p.parse_args()
    load = os.getloadavg()
    rows = run(args.n, args.pad, args.window, args.repeats)
    load_after = os.getloadavg()
    print(f"prefill, batch 2 x N={args.n} (second sequence left-padded by {args.pad}), float32, {os.cpu_count()} CPUs, "
          f"load {load[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'model':>8} {'mode':>10} {'median s':>9} {'best s':>8} {'vs ready':>8}  {'backend':>8}  triton  mask")
    for r in rows:
        ready = next(x["seconds"] for x in rows if x["model"] == r["model"] and x["mode"] == "ready-made")
        print(f"{r['model']:>8} {r['mode']:>10} {r['seconds']:>9.3f} {r['best_seconds']:>8.3f} "
              f"{r['seconds'] / ready:>7.2f}x  {r['backend']:>8}  {'yes' if r['triton_takes_it'] else 'no ':>6}  "
              f"{r['mask']} (rel. err vs sdpa {r['rel_err_vs_sdpa']:.1e})")
    import torch
    import transformers

    from selfattn.backends import choice

    meta = {"model": MODEL, "batch": 2, "dtype": "float32", "machine": choice.machine(), "load_before": load,
            "load_after": load_after, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "repeats": args.repeats}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
