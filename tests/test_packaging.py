"""The wheel, installed into a fresh virtual environment outside the repository, works without the source tree.

The environment holds only selfattn's core dependencies (torch, numpy and what they require), linked from the
environment running the tests so nothing is downloaded: the optional extras (matplotlib, transformers, tqdm, Triton)
are absent, which also checks that the package imports them lazily. Offline: pip runs with --no-index.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import selfattn

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("build", reason="building the wheel needs the build package: pip install 'selfattn[dev]'")
Requirement = pytest.importorskip("packaging.requirements").Requirement


def _closure(names: list[str]) -> list[metadata.Distribution]:
    """The installed distributions these requirement names need, recursively (markers evaluated, extras ignored)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        req = Requirement(todo.pop())
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # pip's resolver reports it below if the wheel really needs it
        seen[key] = dist
        todo += dist.requires or []
    return list(seen.values())


def _core_requirements(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist lines that belong to no extra."""
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(name).decode()
    reqs = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


def _link_core_dependencies(core: list[str], target: Path) -> list[str]:
    """Symlink the files of these requirements' distributions (and their dependencies') into target; return the
    distribution names."""
    target.mkdir()
    dists = _closure(core)
    for dist in dists:
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = Path(dist.locate_file(top))
            if top != ".." and src.exists() and not (target / top).exists():
                (target / top).symlink_to(src)
    return sorted(d.metadata["Name"] for d in dists)


def _run(cmd, cwd, env, timeout=300):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_wheel_installs_into_a_clean_environment_and_runs_outside_the_repository(tmp_path):
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env["PIP_NO_INDEX"] = "1"  # offline: everything the wheel needs is already here
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # the wheel carries the native kernel; one instruction set (this CPU's) keeps the build to one compile
    cap = torch.backends.cpu.get_cpu_capability().lower()
    env["SELFATTN_NATIVE_ISAS"] = cap if cap in ("avx2", "avx512") else "default"
    dist = tmp_path / "dist"
    # sdist first, then the wheel built from the sdist: a file missing from the sdist breaks the wheel too
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("selfattn-*.whl")
    (sdist,) = dist.glob("selfattn-*.tar.gz")
    assert wheel.name.startswith(f"selfattn-{selfattn.__version__}-"), wheel.name

    shipped = set(zipfile.ZipFile(wheel).namelist())
    tracked = _run(["git", "ls-files", "src/selfattn"], cwd=ROOT, env=env).split()
    missing = [p for p in tracked if p.removeprefix("src/") not in shipped]
    assert not missing, f"files of the package missing from {wheel.name}: {missing}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env)  # an empty environment
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    core = _core_requirements(wheel)
    assert any(r.startswith("torch") for r in core), f"the wheel does not require torch: {core}"
    linked = _link_core_dependencies(core, tmp_path / "core-deps")
    (site / "core-deps.pth").write_text(str(tmp_path / "core-deps") + "\n")
    assert "torch" in linked and "numpy" in linked, linked
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", wheel], cwd=tmp_path, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([py, "-c", "import selfattn, importlib.util as u; print(selfattn.__file__); "
                  "print([m for m in ('matplotlib', 'transformers', 'tqdm', 'triton') if u.find_spec(m)])"],
                 work, env).splitlines()
    assert Path(where[0]).is_relative_to(site), f"selfattn imported from {where[0]}, not from the wheel in {site}"
    assert where[1] == "[]", f"the clean environment should hold no optional extra, found {where[1]}"

    selfattn_cmd = venv / "bin" / "selfattn"
    assert _run([selfattn_cmd, "--version"], work, env).strip() == f"selfattn {selfattn.__version__}"
    assert any(n.startswith(f"selfattn/_native_{env['SELFATTN_NATIVE_ISAS']}.") for n in shipped), sorted(shipped)
    info = _run([selfattn_cmd, "info"], work, env)
    assert "backends (priority order)" in info and "tiled" in info, info
    native_line = next(line for line in info.splitlines() if line.strip().startswith("native"))
    assert "built for" in native_line, f"the installed wheel's native kernel does not load: {native_line}"
    shape = _run([py, "-c", "import torch, selfattn; q = torch.randn(1, 4, 100, 32); "
                  "print(tuple(selfattn.attention(q, q, q, causal=True).shape))"], work, env).strip()
    assert shape == "(1, 4, 100, 32)", shape
    explained = _run([selfattn_cmd, "explain", "--no-png", "--out", "explain_out"], work, env)
    page = work / "explain_out" / "explain.html"
    assert page.is_file() and page.stat().st_size > 10_000, (explained, sorted(os.listdir(work / "explain_out")))
    assert "softmax" in explained.lower(), explained
    print(f"wheel {wheel.name}, sdist {sdist.name}: built, installed and run in {time.perf_counter() - t0:.1f} s")
