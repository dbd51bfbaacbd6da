"""Would compiling a custom Python ``score_mod`` with torch.compile (inductor's C++ backend) speed up its CPU tiles?

    python benchmarks/bench_compiled_mod.py [--rounds 7] [--N 4096]

The native kernel declines custom Python modifiers (it knows modifiers only as data), so the ``tiled`` backend runs
them on tiles of scores with torch operations, with autograd through them. This measures, in one process with
interleaved rounds:

  tile      the modifier on one tile of the tiled forward (B = 1, H = 8 heads x 128 rows x 512 keys of float32
            scores, with the tile's b, h, q_idx, kv_idx grids), eager against ``torch.compile(dynamic=False)``;
  share     the whole tiled causal forward at N (H = 8, D = 64) with the modifier, against the same call without it
            (plain causal on ``tiled``), and how much of it the modifier's own calls are (tiles x one tile's time):
            what compiling them would save;
  compile   the first compiled call's time (the compile).

for two custom modifiers: the issue's ``30 * tanh(s / 30)`` written by hand, and a distance bias
``s + 0.01 * (kv_idx - q_idx)``. Writes benchmarks/results/compiled_mod.json with the CPU model and
``torch.backends.cpu.get_cpu_capability()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_native import machine, medians  # noqa: E402

MODS = {
    "tanh_cap_30": lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0),
    "distance_bias": lambda s, b, h, q, k: s + 0.01 * (k - q).to(s.dtype),
}


def _median_times(fs: dict, rounds: int, number: int) -> dict:
    """bench_native.medians of each callable repeated ``number`` times, per call."""
    t = medians({n: (lambda f=f: [f() for _ in range(number)]) for n, f in fs.items()}, rounds)
    return {n: s / number for n, s in t.items()}


def main(argv=None) -> None:
    import selfattn
    from selfattn import masks, score_mods

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--out", default=str(HERE / "results" / "compiled_mod.json"))
    args = p.parse_args(argv)
    result = {"machine": machine(), "rounds": args.rounds, "N": args.N, "mods": {}}
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 8, 128, 512, generator=g) * 4
    b, h, qi, ki = masks.grid(1, 8, 128, 512, q_pos0=1024, k_pos0=512)
    q, keys, values = (torch.randn(1, 8, args.N, 64, generator=g) for _ in range(3))
    for name, fn in MODS.items():
        compiled = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        compiled(s, b, h, qi, ki)
        compile_s = time.perf_counter() - t0
        same = torch.testing.assert_close(compiled(s, b, h, qi, ki), fn(s, b, h, qi, ki)) is None
        tile = _median_times({"eager": lambda fn=fn: fn(s, b, h, qi, ki),
                              "compiled": lambda c=compiled: c(s, b, h, qi, ki)}, args.rounds, 20)
        mod = score_mods.ScoreMod(fn, name)
        with torch.no_grad():
            call = _median_times({
                "plain": lambda: selfattn.attention(q, keys, values, causal=True, backend="tiled"),
                "with_mod": lambda mod=mod: selfattn.attention(q, keys, values, causal=True, score_mod=mod,
                                                               backend="tiled"),
            }, max(3, args.rounds // 2), 1)
        n_tiles = 8 * (args.N // 128) * (args.N // 512) // 2  # head-tiles of 128 x 512 a causal forward computes
        row = {"compile_s": round(compile_s, 2), "results_equal": same,
               "tile_eager_us": tile["eager"] * 1e6 / 8, "tile_compiled_us": tile["compiled"] * 1e6 / 8,
               "tile_speedup": tile["eager"] / tile["compiled"],
               "forward_plain_s": call["plain"], "forward_with_mod_s": call["with_mod"],
               "extra_over_plain": call["with_mod"] / call["plain"],
               # the modifier's own calls in that forward (tiles x one tile's time), and what compiling them would
               # save of the whole call: the rest of the extra time is the torch-op tile path itself
               "mod_calls_s": n_tiles * tile["eager"] / 8,
               "compiled_would_save": n_tiles * (tile["eager"] - tile["compiled"]) / 8 / call["with_mod"]}
        result["mods"][name] = row
        print(name, {key: (round(x, 4) if isinstance(x, float) else x) for key, x in row.items()}, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
