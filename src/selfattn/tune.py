"""Measure which backend is fastest for each call kind on this machine, and write the chooser's table.

``tune()`` builds one call per (workload, dtype, N, forward or forward + backward), asks every registered backend
but the oracle whether it can serve it, and times those that can, interleaved round by round; the best of
``rounds`` ranks them (on a shared machine load only ever adds time; the medians are recorded too). The ranking,
fastest first, is stored under the call's kind (``selfattn.backends.choice.call_kind``) in a JSON table keyed by
the device's name and torch's version, which ``backends.choose`` then reads. A kind that only one backend serves is
recorded without timing. ``selfattn tune`` is the command; benchmarks/tune.py the script.

Shapes: B = 1, H_q = 8 (H_kv = 2 for the grouped-query and decoding workloads), D = 64; decoding is one query
against N keys. Backends that compile per signature (flex) are timed after one warm-up call, whose time (the compile)
is recorded apart; on the CPU they are left out unless ``compiled=True`` (each signature takes tens of seconds).

    >>> from selfattn import tune
    >>> table = tune.tune(workloads=["causal"], dtypes=["float32"], sizes=[64], modes=["fwd"], rounds=1, write=False)
    >>> sorted(table["entries"])[0].startswith("cpu|float32|causal")
    True
"""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import time

import torch

import selfattn
from selfattn import backends, masks, score_mods
from selfattn.backends import choice

B, H, H_KV, D = 1, 8, 2, 64
# Prefill N and decoding keys. Each stands for its bucket of choice.N_BUCKETS: 4096 for the bucket of 2049-8192 (the
# middle of it on a log scale, at a quarter of 8192's time); larger calls take the nearest measured bucket's ranking.
CPU_SIZES = (128, 512, 2048, 4096)
CUDA_SIZES = (1024, 4096, 16384)
DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "fwd+bwd")


def custom_score_mod(score, b, h, q_idx, kv_idx):
    """A custom (spec-less) modifier for the "custom" workload: a small linear bias on the distance."""
    return score + 0.01 * (kv_idx - q_idx).to(score.dtype)


_SLOPES = score_mods.alibi_slopes(H)
_MODS = {"softcap": score_mods.softcap(30.0), "alibi": score_mods.alibi(_SLOPES),
         "custom": score_mods.ScoreMod(custom_score_mod, "custom_distance")}  # one object each: flex compiles once


def workload(name: str, N: int, device: str) -> tuple[int, int, int, dict]:
    """(H_kv, N_q, N_k, keyword arguments of ``attention``) for a named workload at size N."""
    if name == "plain":
        return H, N, N, {}
    if name == "causal":
        return H, N, N, {"causal": True}
    if name == "window":
        return H, N, N, {"mask": masks.sliding_window(max(1, N // 8))}
    if name == "documents":
        ids = torch.arange(N, device=device) // max(1, N // 4)  # four documents
        return H, N, N, {"mask": masks.document(ids) & masks.causal()}
    if name == "gqa":
        return H_KV, N, N, {"causal": True}
    if name == "decode":
        return H, 1, N, {"causal": True}
    if name == "decode-gqa":
        return H_KV, 1, N, {"causal": True}
    if name in ("softcap", "alibi", "custom"):
        return H, N, N, {"causal": True, "score_mod": _MODS[name]}
    if name == "dropout":
        return H, N, N, {"causal": True, "dropout_p": 0.1, "dropout_seed": 0}
    raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")


WORKLOADS = ("plain", "causal", "window", "documents", "gqa", "decode", "decode-gqa", "softcap", "alibi", "dropout",
             "custom")


def _time(fn, rounds: int, budget_s: float = 0.05) -> list[float]:
    """Seconds per call, one number per round; each round repeats the call to last about ``budget_s``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    number = max(1, min(500, int(budget_s / max(first, 1e-6))))
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number)
    return out


def _runner(name: str, q, k, v, kw: dict, grad: bool):
    if not grad:
        def run():
            with torch.no_grad():
                selfattn.attention(q, k, v, backend=name, **kw)
        return run
    d_out = torch.randn(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)

    def run():
        out = selfattn.attention(q, k, v, backend=name, **kw)
        torch.autograd.grad(out, (q, k, v), d_out)
    return run


def tune(*, device: str = "cpu", workloads=WORKLOADS, dtypes=DTYPES, sizes=None, modes=MODES, rounds: int = 5,
         compiled: bool | None = None, out: str | None = None, write: bool = True, merge: bool = False,
         log=None) -> dict:
    """Time every backend that can serve each case; return the table (and write it: ``out``, default the user's
    table folder, ``choice.user_dir()``). ``compiled``: also time backends that compile per signature (default:
    on CUDA only). ``merge``: keep the kinds the table file already holds and this run does not measure (a run for
    one size or workload adds to a table instead of replacing it); the file must be this device's and torch's."""
    sizes = sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)
    compiled = device == "cuda" if compiled is None else compiled
    log = log or (lambda s: None)
    entries, compile_s, path = {}, {}, None
    kept = _kept(device, out) if merge and write else None
    g = torch.Generator().manual_seed(0)
    for name in workloads:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for N in sizes:
                H_kv, N_q, N_k, kw = workload(name, N, device)
                for mode in modes:
                    grad = mode == "fwd+bwd"
                    if grad and N_q == 1:
                        continue  # decoding steps run without gradients
                    q = torch.randn(B, H, N_q, D, generator=g).to(device, dtype).requires_grad_(grad)
                    k, v = (torch.randn(B, H_kv, N_k, D, generator=g).to(device, dtype).requires_grad_(grad)
                            for _ in range(2))
                    call = selfattn.api.make_call(q, k, v, **kw)
                    able = [b for n, b in backends.REGISTRY.items() if n != "reference" and not
                            b.not_supported_reasons(call) and (compiled or not b.extra.get("compiles"))]
                    key = choice.kind_key(choice.call_kind(call))
                    if len(able) <= 1:
                        entries[key] = {"order": [b.name for b in able], "ms": {}}
                        continue
                    runs = {}
                    for b in able:
                        run = _runner(b.name, q, k, v, kw, grad)
                        t0 = time.perf_counter()
                        run()  # warm-up: the compile of a compiling backend, caches of the others
                        if b.extra.get("compiles"):
                            compile_s[f"{key}|{b.name}"] = round(time.perf_counter() - t0, 2)
                        runs[b.name] = run
                    times = {n: [] for n in runs}
                    order = list(runs.items())
                    for r in range(rounds):  # interleaved: each round times every backend once, every other
                        # round backwards (what ran just before moves a small call's time by up to 10 %)
                        for n, run in (order if r % 2 == 0 else order[::-1]):
                            times[n] += _time(run, 1)
                    ms = {n: round(min(t) * 1e3, 4) for n, t in times.items()}
                    median = {n: round(statistics.median(t) * 1e3, 4) for n, t in times.items()}
                    entries[key] = {"order": sorted(ms, key=ms.get), "ms": ms, "median_ms": median}
                    log(f"{key}: " + ", ".join(f"{n} {ms[n]:.3f} ms" for n in entries[key]["order"]))
        if write:  # after every workload: a run cut short (a time limit) keeps what it measured
            path = _write(device, rounds, compile_s, entries, out, kept)
    table = _table(device, rounds, compile_s, entries, kept)
    if write:
        table["path"] = path
        choice.reset()  # the next choice reads it
    return table


def _path(device: str, out: str | None) -> str:
    """The table file a run writes: ``out``, else this device's and torch's file in the user's table folder."""
    here = {"device": choice.device_name(device), "torch": choice.torch_version()}
    return out or str(choice.user_dir() / table_filename(here))


def _kept(device: str, out: str | None) -> dict | None:
    """The table file a merging run adds to (None when there is none yet), after checking it is this machine's."""
    path = _path(device, out)
    if not os.path.exists(path):
        return None
    old = choice.load_table(path).data
    here = (choice.device_name(device), choice.torch_version())
    if (old.get("device"), old.get("torch")) != here:
        raise ValueError(f"cannot merge into {path}: it was measured on {old.get('device')!r} with torch "
                         f"{old.get('torch')}, this is {here[0]!r} with torch {here[1]}; write a new table "
                         "(leave out --merge, or give another --out)")
    return old


def _table(device, rounds, compile_s, entries, kept: dict | None = None) -> dict:
    if kept is not None:  # the kinds measured now replace the file's, the others stay; each run is listed
        entries = {**kept["entries"], **entries}
        compile_s = {**kept.get("compile_seconds", {}), **compile_s}
        earlier = kept.get("merged", []) + [{k: kept.get(k) for k in ("measured", "load_average", "rounds")}]
    return {
        "format": choice.TABLE_FORMAT, "device": choice.device_name(device), "torch": choice.torch_version(),
        "torch_full": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": B, "H_q": H, "H_kv (gqa, decode-gqa)": H_KV, "D": D}, "rounds": rounds,
        "backends": backends.names(), "compile_seconds": compile_s, "entries": entries,
        **({"merged": earlier} if kept is not None else {}),
    }


def _write(device, rounds, compile_s, entries, out, kept=None) -> str:
    table = _table(device, rounds, compile_s, entries, kept)
    path = _path(device, out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    return path


def table_filename(table: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", table["device"].lower()).strip("-")
    return f"{slug}-torch{table['torch']}.json"
