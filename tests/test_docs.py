"""The documentation cannot rot: every Python code block of README.md and docs/*.md runs, the docstring examples of
the API reference run as doctests, and the MkDocs site builds in strict mode with no warning.

A code block that cannot run here is marked, on the line just above its opening fence, with an HTML comment that
gives the reason (a reader of the rendered page does not see it; a reader of the Markdown does):

    <!-- not run: needs a CUDA GPU -->

The blocks of one page run in order in one namespace, so a later block may use what an earlier one defined, in a
temporary working directory (a block may write files).
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->\s*$")

# Modules whose docstring examples are fragments around a model of the reader's (no doctest), with the reason
DOCTEST_FRAGMENTS = {
    "selfattn.explain": "shows capture(model) around a model the reader built",
    "selfattn.explain.trace": "shows capture(model) around a model the reader built",
    "selfattn.explain.lessons": "prints two long lesson tables (tests/test_explain.py checks them)",
}


def code_blocks(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, reason it is not run or None) for each fenced block of a Markdown file."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        above = lines[start - 1] if start > 0 else ""
        reason = NOT_RUN.match(above)
        blocks.append((start + 1, lang, "\n".join(lines[start + 1:j]), reason.group(1) if reason else None))
        i = j + 1
    return blocks


def test_the_parser_sees_every_block():
    """Each page's fences pair up (an odd count would hide the rest of the page from the runner)."""
    for page in PAGES:
        fences = [n for n, line in enumerate(page.read_text().splitlines(), 1) if line.startswith("```")]
        assert len(fences) % 2 == 0, f"{page.name}: unpaired code fence among lines {fences}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = [b for b in code_blocks(page) if b[1] in ("python", "py")]
    for line, _, _, reason in blocks:
        assert reason is None or reason.strip(), f"{page.name}:{line}: 'not run:' needs a reason"
    runnable = [(line, code) for line, _, code, reason in blocks if reason is None]
    if not runnable:
        pytest.skip(f"{page.name}: no runnable Python block ({len(blocks)} marked not run)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [page.name])
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in runnable:
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the Python block at {page.relative_to(ROOT)}:{line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def _documented_modules() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return re.findall(r"^::: (selfattn[\w.]*)", text, flags=re.M)


@pytest.mark.parametrize("module", _documented_modules())
def test_docstring_examples_of_the_api_reference_run(module):
    if module in DOCTEST_FRAGMENTS:
        pytest.skip(f"{module}: not run: {DOCTEST_FRAGMENTS[module]}")
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(mod, module) if t.examples]
    for t in tests:
        t.globs.setdefault("torch", importlib.import_module("torch"))
        runner.run(t, out=lambda s: None)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{module}: {result.failed} of {result.attempted} docstring examples failed " \
                               f"(python -m doctest -v on the module shows which)"


def test_the_site_builds_strictly_with_no_warning(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs build needs the docs extra: pip install 'selfattn[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs build needs the docs extra: pip install 'selfattn[docs]'")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert out.returncode == 0 and not warnings, f"mkdocs build --strict exited {out.returncode}:\n{log}"
    for page in PAGES[1:]:
        if page.name != "index.md":
            assert (tmp_path / "site" / page.stem / "index.html").is_file(), f"{page.name} was not built"


def test_readme_links_point_at_files_that_exist():
    """README.md is not part of the site build, so its relative links (docs pages, result files) are checked here;
    every row of the speed table links the result file that holds its numbers, or says why there is none."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in relative if t and not (ROOT / t).exists()]
    assert relative and not missing, f"README.md links to missing files: {missing}"
    speed = text.split("## Speed", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in speed.splitlines() if line.startswith("| ") and not line.startswith("| workload")]
    for row in rows:
        assert "](benchmarks/results/" in row or "not measured" in row, f"a speed figure without its result: {row}"
