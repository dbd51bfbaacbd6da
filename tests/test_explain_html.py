"""The explain HTML page, loaded from disk in a real headless Chromium: it renders, every view works and every head
is selectable through the page's own controls, what it shows equals the traced weights, it makes no network request
(a trap proxy records any), and a 1,024-token text stays responsive. CI installs Debian's chromium (.ci/run)."""

import html
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading

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


BROWSER_OWN = re.compile(rb"^[A-Z]+ (https?://)?[^ /]*\b(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)\b")


class NetworkTrap:
    """A proxy that answers nothing and records every connection: Chromium is pointed at it for all requests, so any
    request the page makes (http, https, websockets; loopback included) shows up here. Chromium's own calls home
    (time, component updates, accounts: Google hosts) are set apart in ``browser``."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.requests: list[bytes] = []
        self.browser: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    head = conn.recv(200)
                except OSError:
                    head = b"?"
                (self.browser if BROWSER_OWN.match(head) else self.requests).append(head)

    def close(self):
        self._stop.set()
        self._thread.join()
        self.server.close()


def chromium(url: str, *extra: str, trap: NetworkTrap | None = None) -> str:
    proxy = [] if trap is None else [f"--proxy-server=http://127.0.0.1:{trap.port}", "--proxy-bypass-list=<-loopback>"]
    with tempfile.TemporaryDirectory() as profile:
        cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               *proxy, *extra, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


def selftest(path) -> dict:
    """The page's own report after it has driven every layer and head (see html.py), no network allowed."""
    trap = NetworkTrap()
    try:
        dom = chromium(f"file://{path}#selftest", "--dump-dom", trap=trap)
    finally:
        trap.close()
    found = re.search(r'<pre id="selftest"[^>]*>(.*?)</pre>', dom, re.S)
    assert found and found.group(1), "the page's script did not run (no self-test report in the DOM)"
    report = json.loads(html.unescape(found.group(1)))
    assert trap.requests == [], f"the page made network requests: {trap.requests}"
    assert report["resources"] == 0, f"the page loaded {report['resources']} resources"
    return report


def test_the_network_trap_sees_a_request(tmp_path):
    """The control: a page that does load something is caught, so an empty trap means no request."""
    probe = tmp_path / "probe.html"
    probe.write_text('<!DOCTYPE html><img src="http://selfattn-probe.invalid/x.png"><p>probe</p>')
    trap = NetworkTrap()
    try:
        chromium(f"file://{probe}", "--dump-dom", trap=trap)
    finally:
        trap.close()
    assert any(b"selfattn-probe.invalid" in r for r in trap.requests), trap.requests


def test_page_is_self_contained(page):
    _, path = page
    text = open(path, encoding="utf-8").read()
    for needle in ("http://", "https://", "<link", "src=", "href=", "@import", "url("):
        assert needle not in text, f"the page must not load anything ({needle!r} found)"


def check_report(e, report, N):
    heads = report["heads"]
    L, H = len(e.traces), len(e.traces[0])
    expected = {(layer, h, i) for layer in range(L) for h in range(H) for i in (0, N - 1)}
    assert {(r["layer"], r["head"], r["token"]) for r in heads} == expected
    assert report["thumbs"] == L * H and report["after_click"] == f"0,0,{N - 1}"
    for r in heads:
        trace = e.traces[r["layer"]][r["head"]]
        i, where = r["token"], f"layer {r['layer']} head {r['head']} token {r['token']}"
        want = trace["weights"][i]
        assert r["state"] == f"{r['layer']},{r['head']},{i}", where
        assert r["where"] == trace.where and r["thumbSelected"], where
        got = torch.tensor(r["strip"], dtype=torch.float64)
        # the page shows weights with 4 decimals and y with 3: the bounds are the display's rounding
        assert torch.allclose(got, want, atol=1.01e-4, rtol=0), f"{where}: the tokens show {got} not {want}"
        keys = [j for j, _ in r["trace"]]
        top = want.argsort(descending=True)[:64]  # a long text's table: the 64 largest weights (ties may swap)
        assert len(keys) == min(N, 64) and (N <= 64 or want[keys].min() >= want[top].min() - 1e-12), where
        got = torch.tensor([w for _, w in r["trace"]], dtype=torch.float64)
        assert torch.allclose(got, want[keys], atol=1.01e-4, rtol=0), f"{where}: the step table shows {got}"
        j = r["key"]
        assert j == int(want.argmax()), f"{where}: the step view opens key {j}, not the largest weight"
        assert abs(sum(r["prods"]) - r["raw"]) <= 2e-3 * max(1, len(r["prods"])), where
        assert abs(r["raw"] - trace["scores"][i, j].item()) <= 1e-4 + 1e-6 * abs(r["raw"]), where
        y = torch.tensor([float(x) for x in r["y"].strip("[]").split(",")], dtype=torch.float64)
        assert torch.allclose(y, trace["Y"][i], atol=1.01e-3, rtol=0), f"{where}: y_i {y} not {trace['Y'][i]}"
        assert r["lines"] == int((want >= 0.002).sum()), where


def test_every_head_is_selectable_and_shows_its_weights(page):
    e, path = page
    check_report(e, selftest(path), len(TEXT))


def test_url_fragment_selects_a_view(page):
    e, path = page
    dom = chromium(f"file://{path}#layer=1&head=1&token=4&key=2", "--dump-dom")
    dom = dom[:dom.index('<script id="data"')]  # the rendered elements, not the script's templates
    assert 'data-state="1,1,4"' in dom
    rows = re.findall(r'<td class="w">([^<]*)</td>', dom)
    want = e.traces[1][1]["weights"][4].tolist()
    assert [float(x) for x in rows] == [round(w, 4) for w in want]
    assert '<tr data-j="2" class="pick">' in dom and dom.count('class="mini') == 4
    steps = dom[dom.index('<table id="steps">'):]
    assert steps.count("\u2212\u221e") == len(TEXT) - 5, "keys after query 4 must show a masked score of −∞"
    raw = float(re.search(r'<b id="raw">([^<]*)</b>', dom).group(1))
    assert raw == pytest.approx(e.traces[1][1]["scores"][4, 2].item(), abs=1e-4)


def test_a_hugging_face_gqa_model_page(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("selfattn.integrations.hf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaModel._from_config(config, attn_implementation="selfattn").eval()
    e = explain.explain_hf(model, tok, "the cat sat on the mat")
    path = e.write_html(tmp_path / "llama.html")
    check_report(e, selftest(path), 6)
    assert 'class="selfattn-explain"' in e._repr_html_()


def test_a_long_text_stays_responsive(tmp_path):
    """1,024 tokens, 2 layers × 2 heads: every view works; the timings are printed (tests assert no time)."""
    torch.manual_seed(0)
    n = 1024
    ids = torch.randint(97, 123, (1, n))
    e = explain.explain_model(Model(), ids, [chr(c) for c in ids[0].tolist()])
    path = e.write_html(tmp_path / "long.html")
    size = os.path.getsize(path)
    report = selftest(path)
    check_report(e, report, n)
    sw = sorted(report["switch_ms"])
    print(f"\n1,024 tokens: page {size / 2**20:.1f} MiB; first view laid out {report['ready_ms']:.0f} ms after "
          f"navigation; head switch median {sw[len(sw) // 2]:.0f} ms, max {sw[-1]:.0f} ms; thumbnail click "
          f"{report['click_ms']:.0f} ms; one switch by view (ms): {report['parts']}")
    assert size < 4 * 2**20, f"the page is {size / 2**20:.1f} MiB for 1,024 tokens and 4 heads"


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
