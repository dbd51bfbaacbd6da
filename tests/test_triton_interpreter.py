"""Runs the Triton kernels' oracle tests (tests/triton_cases.py) on the CPU under Triton's interpreter.

TRITON_INTERPRET=1 has to be in the environment before Triton is first imported, so the cases run in a separate
pytest process with it set. Needs only the ``gpu`` extra (``pip install triton``), no GPU.
"""

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
