"""One self-contained HTML page of attention: hover a token to see where it attends, pick a layer and head, read the
step trace. No network: the CSS, the script and the data are inline; the file opens from disk in any browser.

The page reads its state from the URL fragment — ``page.html#layer=1&head=0&token=3`` — so a link shows one view.
``#selftest`` makes it select every layer and head through its own controls and write what it rendered into
``<pre id="selftest">`` (the tests read it from headless Chromium).
"""

from __future__ import annotations

import html as _html
import json
import math
import os
from collections.abc import Sequence

import torch

from selfattn.explain.trace import Trace

DIGITS = 4


def _num(x: float):
    return None if not math.isfinite(x) else round(x, DIGITS)


def _mat(t) -> list:
    return [[_num(v) for v in row] for row in t.tolist()]


def page_data(traces: Sequence[Sequence[Trace]], *, title: str = "") -> dict:
    """The JSON the page embeds, from traces[layer][head] (each a full ``Trace``, all over the same tokens)."""
    if not traces or not all(traces):
        raise ValueError("page_data needs at least one layer with at least one head of traces")
    tokens = traces[0][0].tokens
    layers = []
    for row in traces:
        heads = []
        for t in row:
            if t.tokens != tokens:
                raise ValueError("every trace of one page must be over the same tokens")
            rot = "Q_rot" in t.names
            heads.append({
                "where": t.where, "scale": t.scale, "causal": t.causal,
                "d_k": t["Q"].shape[-1], "d_v": t["V"].shape[-1],
                "q": _mat(t["Q_rot" if rot else "Q"]),
                "scores": _mat(t["scores"]), "scaled": _mat(t["scaled"]),
                "hidden": ["".join("1" if h else "0" for h in row) for row in torch.isinf(t["masked"]).tolist()],
                "weights": _mat(t["weights"]), "y": _mat(t["Y"]), "rotary": rot,
            })
        layers.append(heads)
    return {"title": title, "tokens": list(tokens), "token": traces[0][0].token, "layers": layers}


def render(traces: Sequence[Sequence[Trace]], *, title: str = "selfattn explain") -> str:
    """The page as a string (see ``write``)."""
    data = json.dumps(page_data(traces, title=title), separators=(",", ":"), ensure_ascii=True)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # safe inside <script>
    return (_TEMPLATE.replace("%%TITLE%%", _html.escape(title)).replace("%%CSS%%", _CSS).replace("%%JS%%", _JS)
            .replace("%%DATA%%", data))


def write(traces: Sequence[Sequence[Trace]], path: str | os.PathLike, *, title: str = "selfattn explain") -> str:
    """Write the page for traces[layer][head] to ``path``; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(traces, title=title))
    return os.fspath(path)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>%%TITLE%%</title>
<style>%%CSS%%</style></head>
<body>
<h1>%%TITLE%%</h1>
<p class="help">Hover or click a token: the colours show where it attends — its row of the attention weights
in the chosen layer and head. In the heatmap, <b>rows are queries</b> (the token that looks) and <b>columns are
keys</b> (the token looked at).</p>
<div id="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<span id="where"></span>
</div>
<div id="tokens" aria-label="tokens"></div>
<div id="panes">
<div><h2>attention weights <small>(rows: queries, columns: keys; hatched: masked)</small></h2>
<table id="heatmap"></table></div>
<div><h2>the steps for the selected token</h2><div id="trace"></div></div>
</div>
<h2>all layers × heads <small>(click one to select it)</small></h2>
<div id="overview"></div>
<pre id="selftest" hidden></pre>
<script id="data" type="application/json">%%DATA%%</script>
<script>%%JS%%</script>
</body></html>
"""

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:14px 0 6px}small{color:#666;font-weight:normal}
.help{color:#444;max-width:70em}
#controls{margin:8px 0}#controls label{margin-right:14px}#where{color:#555}
#tokens{display:flex;flex-wrap:wrap;gap:3px;margin:10px 0;font:15px monospace}
.tok{padding:3px 5px;border:1px solid #bbb;border-radius:4px;cursor:pointer;white-space:pre}
.tok.sel{outline:2px solid #d33;outline-offset:1px}
#panes{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
#heatmap{border-collapse:collapse;font:10px monospace}
#heatmap{--cell:18px;--label:10px}
#heatmap td{width:var(--cell);height:var(--cell);padding:0;border:1px solid #fff}
#heatmap td.masked{background-image:repeating-linear-gradient(45deg,#ddd 0 2px,transparent 2px 5px)}
#heatmap th{font-weight:normal;padding:0 2px;white-space:pre;font-size:var(--label);line-height:1}
#heatmap th.col{writing-mode:vertical-rl;transform:rotate(180deg);height:auto}
#heatmap tr.sel th{color:#d33;font-weight:bold}
#heatmap tr.sel td{box-shadow:inset 0 2px #d33,inset 0 -2px #d33}
#trace table{border-collapse:collapse;font:12px monospace}
#trace td,#trace th{border-bottom:1px solid #eee;padding:2px 8px;text-align:right}
#trace td.l,#trace th.l{text-align:left}
.vec{font:12px monospace;color:#333;word-break:break-all;max-width:48em}
#overview{display:flex;flex-direction:column;gap:6px}
.orow{display:flex;gap:6px;align-items:center}.orow span{width:60px;color:#555}
canvas.mini{border:2px solid #ddd;cursor:pointer;image-rendering:pixelated}
canvas.mini.sel{border-color:#d33}
"""

_JS = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.tokens.length;
const S = {layer: 0, head: 0, token: D.token};
const $ = (id) => document.getElementById(id);
const show = (t) => t.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
const fmt = (x) => x === null ? "\u2212\u221e" : x.toFixed(4);
const vec = (v) => "[" + v.map((x) => x.toFixed(3)).join(", ") + "]";
function colour(w) {  // white -> dark blue, as the weight goes 0 -> 1
  const a = Math.max(0, Math.min(1, w));
  const r = Math.round(255 - 225 * a), g = Math.round(255 - 175 * a), b = Math.round(255 - 75 * a);
  return `rgb(${r},${g},${b})`;
}
function head() { return D.layers[S.layer][S.head]; }

function buildControls() {
  D.layers.forEach((_, l) => $("layer").add(new Option(String(l), String(l))));
  $("layer").addEventListener("change", (e) => { S.layer = +e.target.value; fillHeads(); render(); });
  $("head").addEventListener("change", (e) => { S.head = +e.target.value; render(); });
  fillHeads();
  const strip = $("tokens");
  D.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok"; s.textContent = show(t); s.dataset.i = i; s.title = `token ${i}`;
    s.addEventListener("mouseover", () => { S.token = i; render(); });
    s.addEventListener("click", () => { S.token = i; render(); });
    strip.appendChild(s);
  });
}
function fillHeads() {
  const sel = $("head"), n = D.layers[S.layer].length;
  sel.innerHTML = "";
  for (let h = 0; h < n; h++) sel.add(new Option(String(h), String(h)));
  S.head = Math.min(S.head, n - 1);
  sel.value = String(S.head);
}

function renderTokens(w) {
  document.querySelectorAll(".tok").forEach((s) => {
    const j = +s.dataset.i, a = w[S.token][j];
    const hidden = head().hidden[S.token][j] === "1";
    s.style.background = hidden ? "#f4f4f4" : colour(a);
    s.style.color = hidden ? "#aaa" : a > 0.55 ? "#fff" : "#222";
    s.title = `token ${j}: ` + (hidden ? "masked for the selected query" : `weight ${a.toFixed(4)}`);
    s.dataset.w = a.toFixed(4);
    s.classList.toggle("sel", j === S.token);
  });
}
function renderHeatmap(w) {
  const t = $("heatmap");
  t.innerHTML = "";
  const cell = Math.max(3, Math.min(18, Math.floor(640 / N)));  // long texts: smaller cells, smaller labels
  t.style.setProperty("--cell", `${cell}px`);
  t.style.setProperty("--label", `${Math.max(5, Math.min(10, cell - 2))}px`);
  const top = t.insertRow();
  top.appendChild(document.createElement("th"));
  D.tokens.forEach((tok) => {
    const th = document.createElement("th");
    th.className = "col"; th.textContent = show(tok); top.appendChild(th);
  });
  w.forEach((row, i) => {
    const tr = t.insertRow();
    if (i === S.token) tr.className = "sel";
    const th = document.createElement("th"); th.textContent = show(D.tokens[i]); tr.appendChild(th);
    row.forEach((a, j) => {
      const td = tr.insertCell(), hidden = head().hidden[i][j] === "1";
      td.style.backgroundColor = hidden ? "#eee" : colour(a);
      if (hidden) td.className = "masked";
      td.title = `query ${i} ${JSON.stringify(D.tokens[i])} -> key ${j} ${JSON.stringify(D.tokens[j])}: ` +
        (hidden ? "masked (score −∞, weight 0)" : a.toFixed(4));
      td.addEventListener("mouseover", () => { if (S.token !== i) { S.token = i; render(); } });
    });
  });
}
function renderTrace(h) {
  const i = S.token, q = h.rotary ? "q_i (rotated)" : "q_i = x_i\u00b7W_Q";
  let html = `<p>query <b>${i}</b> ${JSON.stringify(D.tokens[i])}; d_k = ${h.d_k}, d_v = ${h.d_v}, ` +
    `scale = ${h.scale.toFixed(4)}${h.causal ? ", causal" : ""}</p>`;
  html += `<p class="vec">${q} = ${vec(h.q[i])}</p>`;
  html += `<table id="steps"><tr><th>j</th><th class="l">key</th><th>q_i\u00b7k_j</th><th>\u00d7 scale</th>` +
    `<th>masked</th><th>softmax a_ij</th></tr>`;
  for (let j = 0; j < N; j++) {
    html += `<tr><td>${j}</td><td class="l">${show(D.tokens[j])}</td><td>${fmt(h.scores[i][j])}</td>` +
      `<td>${fmt(h.scaled[i][j])}</td><td>${fmt(h.hidden[i][j] === "1" ? null : h.scaled[i][j])}</td>` +
      `<td class="w">${fmt(h.weights[i][j])}</td></tr>`;
  }
  const total = h.weights[i].reduce((a, b) => a + b, 0);
  html += `<tr><td></td><td class="l">sum</td><td></td><td></td><td></td><td>${total.toFixed(3)}</td></tr></table>`;
  html += `<p class="vec">y_i = \u03a3_j a_ij v_j = ${vec(h.y[i])}</p>`;
  $("trace").innerHTML = html;
}
function buildOverview() {
  const box = $("overview"), px = Math.max(2, Math.min(6, Math.floor(96 / N)));
  D.layers.forEach((heads, l) => {
    const row = document.createElement("div"); row.className = "orow";
    const lab = document.createElement("span"); lab.textContent = `layer ${l}`; row.appendChild(lab);
    heads.forEach((hd, h) => {
      const c = document.createElement("canvas");
      c.width = c.height = N * px; c.className = "mini"; c.dataset.layer = l; c.dataset.head = h;
      c.title = `layer ${l}, head ${h}`;
      const ctx = c.getContext("2d");
      hd.weights.forEach((r, i) => r.forEach((a, j) => {
        ctx.fillStyle = hd.hidden[i][j] === "1" ? "#eee" : colour(a); ctx.fillRect(j * px, i * px, px, px);
      }));
      c.addEventListener("click", () => {
        S.layer = l; $("layer").value = String(l); fillHeads();
        S.head = h; $("head").value = String(h); render();
      });
      row.appendChild(c);
    });
    box.appendChild(row);
  });
}
function render() {
  const h = head();
  $("where").textContent = h.where;
  renderTokens(h.weights); renderHeatmap(h.weights); renderTrace(h);
  document.querySelectorAll("canvas.mini").forEach(
    (c) => c.classList.toggle("sel", +c.dataset.layer === S.layer && +c.dataset.head === S.head));
  document.body.dataset.state = `${S.layer},${S.head},${S.token}`;
}

function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const get = (k, n) => { const v = parseInt(p.get(k), 10); return Number.isInteger(v) && v >= 0 && v < n ? v : null; };
  const l = get("layer", D.layers.length); if (l !== null) S.layer = l;
  $("layer").value = String(S.layer); fillHeads();
  const h = get("head", D.layers[S.layer].length); if (h !== null) { S.head = h; $("head").value = String(h); }
  const t = get("token", N); if (t !== null) S.token = t;
  return p.has("selftest");
}
function selftest() {  // drive the page through its own controls and report what it shows
  const out = [], fire = (el, type) => el.dispatchEvent(new Event(type, {bubbles: true}));
  const layers = [...$("layer").options].map((o) => +o.value);
  for (const l of layers) {
    $("layer").value = String(l); fire($("layer"), "change");
    for (const h of [...$("head").options].map((o) => +o.value)) {
      $("head").value = String(h); fire($("head"), "change");
      for (const i of [0, N - 1]) {
        fire(document.querySelector(`.tok[data-i="${i}"]`), "mouseover");
        out.push({layer: l, head: h, token: i, state: document.body.dataset.state, where: $("where").textContent,
          strip: [...document.querySelectorAll(".tok")].map((s) => +s.dataset.w),
          trace: [...document.querySelectorAll("#steps td.w")].map((td) => +td.textContent),
          cells: $("heatmap").rows[i + 1].cells.length - 1});
      }
    }
  }
  $("selftest").textContent = JSON.stringify(out);
}

buildControls();
buildOverview();
const testing = fromHash();
render();
if (testing) selftest();
"""
