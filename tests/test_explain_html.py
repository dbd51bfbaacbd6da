"""The explain HTML page, loaded from disk in a real headless Chromium: it renders, every head is selectable through
the page's own controls, and what it shows equals the traced weights. CI installs Debian's chromium (.ci/run)."""

import html
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
from torch import nn

from selfattn import explain
from selfattn.nn import MultiHeadAttention

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
if BROWSER is None:
    if os.environ.get("SELFATTN_REQUIRE_CHROMIUM"):
        raise RuntimeError("SELFATTN_REQUIRE_CHROMIUM is set but no chromium was found; apt-get install chromium")
    pytest.skip("no headless chromium here (apt-get install chromium); CI installs it", allow_module_level=True)

TEXT = "a cat, sat"


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.layers = nn.ModuleList([MultiHeadAttention(16, 2, causal=True, rotary=True),
                                     MultiHeadAttention(16, 2, causal=True)])

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    torch.manual_seed(0)
    e = explain.explain_model(Model(), torch.tensor([list(TEXT.encode())]), list(TEXT))
    path = e.write_html(tmp_path_factory.mktemp("html") / "explain.html")
    return e, path


def chromium(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               *extra, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


def test_page_is_self_contained(page):
    _, path = page
    text = open(path, encoding="utf-8").read()
    for needle in ("http://", "https://", "<link", "src=", "href=", "@import", "url("):
        assert needle not in text, f"the page must not load anything ({needle!r} found)"


def test_every_head_is_selectable_and_shows_its_weights(page):
    e, path = page
    dom = chromium(f"file://{path}#selftest", "--dump-dom")
    found = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the page's script did not run (no self-test report in the DOM)"
    report = json.loads(html.unescape(found.group(1)))
    N = len(TEXT)
    expected = {(layer, h, i) for layer in range(2) for h in range(2) for i in (0, N - 1)}
    assert {(r["layer"], r["head"], r["token"]) for r in report} == expected
    for r in report:
        trace = e.traces[r["layer"]][r["head"]]
        want = trace["weights"][r["token"]]
        where = f"layer {r['layer']} head {r['head']} token {r['token']}"
        assert r["state"] == f"{r['layer']},{r['head']},{r['token']}", where
        assert r["where"] == trace.where and r["cells"] == N, where
        for shown in ("strip", "trace"):
            got = torch.tensor(r[shown], dtype=torch.float64)
            assert torch.allclose(got, want, atol=1.01e-4, rtol=0), f"{where}: {shown} shows {got} not {want}"


def test_url_fragment_selects_a_view(page):
    e, path = page
    dom = chromium(f"file://{path}#layer=1&head=1&token=4", "--dump-dom")
    dom = dom[:dom.index('<script id="data"')]  # the rendered elements, not the script's templates
    assert 'data-state="1,1,4"' in dom
    rows = re.findall(r'<td class="w">([^<]*)</td>', dom)
    want = e.traces[1][1]["weights"][4].tolist()
    assert [float(x) for x in rows] == [round(w, 4) for w in want]
    assert '<tr class="sel">' in dom and dom.count('class="mini') == 4
    steps = dom[dom.index('<table id="steps">'):]
    assert steps.count("\u2212\u221e") == len(TEXT) - 5, "keys after query 4 must show a masked score of −∞"


def test_screenshot_shows_a_rendered_page(page, tmp_path):
    from PIL import Image

    _, path = page
    shot = tmp_path / "shot.png"
    chromium(f"file://{path}#layer=0&head=1&token=6", f"--screenshot={shot}", "--window-size=1000,900")
    with Image.open(shot) as im:
        assert im.size == (1000, 900)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50, f"only {len(colours or [])} colours: a blank page?"
        blue = sum(n for n, (r, g, b) in colours if b > r + 40)  # the weight colours go white -> blue
        assert blue > 500, f"only {blue} blue pixels: the heatmap did not render"
