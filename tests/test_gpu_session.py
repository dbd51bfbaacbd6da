"""benchmarks/gpu_session.sh --dry-run: every step of the GPU session but the CUDA ones, so the script cannot rot
while no GPU is lent (about 20 s: the GPU tests are collected, a one-size tune and the choice benchmark's plumbing
run on the CPU)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_gpu_session_script_runs_dry(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = r.stdout.split("== summary ==")[-1]
    for phase in ("tests (dry run", "tune: exit 0", "bench: exit 0"):
        assert phase in summary, summary
    assert "exit 0" in summary.split("tests (dry run")[1].splitlines()[0], summary
    table = json.loads((tmp_path / "tune-dry-run.json").read_text())
    assert table["entries"] and table["device"], table
    rows = json.loads((tmp_path / "gpu-choice-dry-run.json").read_text())["rows"]
    assert rows and not any(r["errors"] for r in rows), rows
