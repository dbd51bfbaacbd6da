"""Runs the Triton kernels' oracle tests (tests/triton_cases.py) on the CPU under Triton's interpreter.

TRITON_INTERPRET=1 has to be in the environment before Triton is first imported, so the cases run in a separate
pytest process with it set. Needs only the ``gpu`` extra (``pip install triton``), no GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import selfattn


def test_kernels_match_the_oracle_under_the_interpreter():
    pytest.importorskip("triton", reason="triton not installed (pip install 'selfattn[gpu]')")
    cases = Path(__file__).with_name("triton_cases.py")
    src = str(Path(selfattn.__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                         env=env, capture_output=True, text=True, timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, f"interpreter cases failed ({summary}):\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, f"every interpreter case must run: {summary}"


def test_gpu_benchmark_script_runs_end_to_end_under_the_interpreter(tmp_path):
    """Only the plumbing (implementations, timing, tables, result files): on the CPU its numbers mean nothing."""
    pytest.importorskip("triton", reason="triton not installed (pip install 'selfattn[gpu]')")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    src = str(Path(selfattn.__file__).resolve().parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md", ".png"], written
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert {r["impl"] for r in rows} == {"selfattn-triton", "sdpa-math"}
    assert all("tflops" in r and "error" not in r for r in rows), [r for r in rows if "error" in r]
    # float32 kernels vs SDPA's math on O(1) values: 1e-5 ~ 84 ulps; the plumbing is tested, not the numerics
    assert all(r["max_diff_vs_first"] < 1e-5 for r in rows if r["mode"] == "fwd"), rows
