"use strict";
// The page of selfattn explain (see html.py). One head's weights are recomputed from its q, k and mask when it is
// selected, in float64 and in the oracle's order: s_ij = q_i·k_j, × scale (+ bias), −∞ where masked, softmax by row.
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.tokens.length;
const S = {layer: 0, head: 0, token: D.token, key: null};
const $ = (id) => document.getElementById(id);
const show = (t) => t.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
const fmt = (x) => x === -Infinity ? "\u2212\u221e" : x.toFixed(4);
const vec = (v, n = 12) => "[" + Array.from(v.slice(0, n), (x) => x.toFixed(3)).join(", ") +
  (v.length > n ? ", \u2026" : "") + "]";
function colour(w) {  // white -> dark blue, as the weight goes 0 -> 1
  const a = Math.max(0, Math.min(1, w));
  return [Math.round(255 - 225 * a), Math.round(255 - 175 * a), Math.round(255 - 75 * a)];
}
const css = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;

function bytes(s) {
  const bin = atob(s), u = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
  return u;
}
function floats(s, type) { const u = bytes(s); return type === "f64" ? new Float64Array(u.buffer) : new Float32Array(u.buffer); }
const maskBits = D.masks.map(() => null);
function visibleOf(hd) {  // (N*N) Uint8Array of bits, or null when nothing is masked
  if (hd.mask < 0) return null;
  if (maskBits[hd.mask] === null) maskBits[hd.mask] = bytes(D.masks[hd.mask]);
  return maskBits[hd.mask];
}
const isVisible = (bits, p) => bits === null || ((bits[p >> 3] >> (p & 7)) & 1) === 1;

function vectors(hd) {  // decoded once per head
  if (!hd._q) {
    hd._q = floats(hd.q, hd.types[0]); hd._k = floats(hd.k, hd.types[1]); hd._v = floats(hd.v, hd.types[2]);
    hd._bias = hd.bias ? new Float32Array(bytes(hd.bias).buffer) : null;
  }
  return hd;
}
const cache = [];  // the weights of the last few heads: [hd, Float64Array(N*N)]
function weightsOf(hd) {
  const hit = cache.find((c) => c[0] === hd);
  if (hit) return hit[1];
  vectors(hd);
  const q = hd._q, k = hd._k, dk = hd.d_k, bits = visibleOf(hd), w = new Float64Array(N * N);
  for (let i = 0; i < N; i++) {
    let max = -Infinity;
    const qi = i * dk, row = i * N;
    for (let j = 0; j < N; j++) {
      const p = row + j;
      if (!isVisible(bits, p)) { w[p] = -Infinity; continue; }
      let s = 0;
      const kj = j * dk;
      for (let d = 0; d < dk; d++) s += q[qi + d] * k[kj + d];
      s = s * hd.scale + (hd._bias ? hd._bias[p] : 0);
      w[p] = s;
      if (s > max) max = s;
    }
    if (max === -Infinity) { w.fill(0, row, row + N); continue; }  // a fully masked row: weight 0 everywhere
    let sum = 0;
    for (let j = 0; j < N; j++) { const e = Math.exp(w[row + j] - max); w[row + j] = e; sum += e; }
    for (let j = 0; j < N; j++) w[row + j] /= sum;
  }
  cache.unshift([hd, w]);
  cache.length = Math.min(cache.length, 4);
  return w;
}
function head() { return D.layers[S.layer][S.head]; }

// ------------------------------------------------------------------------------------------------- controls
function buildControls() {
  D.layers.forEach((_, l) => $("layer").add(new Option(String(l), String(l))));
  $("layer").addEventListener("change", (e) => { S.layer = +e.target.value; fillHeads(); S.key = null; render(); });
  $("head").addEventListener("change", (e) => { S.head = +e.target.value; S.key = null; render(); });
  $("query").max = String(N - 1);
  $("query").addEventListener("change", (e) => {
    const v = Math.round(+e.target.value); if (v >= 0 && v < N) pick(v);
  });
  fillHeads();
  const strip = $("tokens"), frag = document.createDocumentFragment();
  D.tokens.forEach((t, i) => {
    const s = document.createElement("span");
    s.className = "tok"; s.textContent = show(t); s.dataset.i = i;
    frag.appendChild(s);
  });
  strip.appendChild(frag);
  const onTok = (e) => { const i = e.target.dataset && e.target.dataset.i; if (i !== undefined) pick(+i); };
  strip.addEventListener("mouseover", onTok);
  strip.addEventListener("click", onTok);
}
function fillHeads() {
  const sel = $("head"), n = D.layers[S.layer].length;
  sel.innerHTML = "";
  for (let h = 0; h < n; h++) sel.add(new Option(String(h), String(h)));
  S.head = Math.min(S.head, n - 1);
  sel.value = String(S.head);
}
function pick(i) { if (S.token !== i) { S.token = i; S.key = null; render(); } }

// ------------------------------------------------------------------------------------------------ the views
function renderTokens(w, bits) {
  const i = S.token;
  document.querySelectorAll(".tok").forEach((s) => {
    const j = +s.dataset.i, a = w[i * N + j], hidden = !isVisible(bits, i * N + j);
    s.style.background = hidden ? "#f4f4f4" : css(colour(a));
    s.style.color = hidden ? "#aaa" : a > 0.55 ? "#fff" : "#222";
    s.title = `token ${j}: ` + (hidden ? "masked for the selected query" : `weight ${a.toFixed(4)}`);
    s.dataset.w = a.toFixed(4);
    s.classList.toggle("sel", j === i);
  });
}
const MAX_ROWS = 64;  // a longer text's key table shows its largest weights (laying out 1,024 rows takes 200 ms)
const ROW = Math.max(2, Math.min(16, Math.floor(2400 / N)));  // head view row height: long texts get thin rows
function renderHeadView(w) {
  const c = $("headview"), ctx = c.getContext("2d"), colW = 130, gap = 180;
  c.width = colW * 2 + gap; c.height = N * ROW + 8;
  ctx.clearRect(0, 0, c.width, c.height);
  ctx.font = `${Math.min(12, ROW - 2)}px monospace`; ctx.textBaseline = "middle";
  const y = (i) => 4 + i * ROW + ROW / 2, i = S.token;
  if (N <= 128) {  // every query's lines, faint; the selected one's on top
    for (let a = 0; a < N; a++) for (let b = 0; b < N; b++) {
      const v = w[a * N + b]; if (v < 0.02 || a === i) continue;
      ctx.strokeStyle = `rgba(70,110,200,${(0.25 * v).toFixed(3)})`;
      ctx.beginPath(); ctx.moveTo(colW, y(a)); ctx.lineTo(colW + gap, y(b)); ctx.stroke();
    }
  }
  ctx.lineWidth = Math.max(1, Math.min(3, ROW / 4));
  for (let j = 0; j < N; j++) {
    const v = w[i * N + j]; if (v < 0.002) continue;
    ctx.strokeStyle = `rgba(30,80,180,${Math.min(1, v * 1.2).toFixed(3)})`;
    ctx.beginPath(); ctx.moveTo(colW, y(i)); ctx.lineTo(colW + gap, y(j)); ctx.stroke();
  }
  ctx.lineWidth = 1;
  if (ROW >= 9) {
    for (let j = 0; j < N; j++) {
      ctx.fillStyle = j === i ? "#d33" : "#222";
      ctx.textAlign = "right"; ctx.fillText(show(D.tokens[j]).slice(0, 14), colW - 4, y(j));
      ctx.textAlign = "left"; ctx.fillText(show(D.tokens[j]).slice(0, 14), colW + gap + 4, y(j));
    }
  } else {  // too many rows for every label: the selected query's
    ctx.fillStyle = "#d33"; ctx.font = "11px monospace";
    ctx.textAlign = "right"; ctx.fillText(`${i} ${show(D.tokens[i]).slice(0, 12)}`, colW - 4, y(i));
  }
  c.dataset.lines = String(w.subarray(i * N, i * N + N).filter((v) => v >= 0.002).length);
}
function renderHeatmap(w, bits) {
  const c = $("heatmap"), k = Math.max(1, Math.floor(640 / N)), ctx = c.getContext("2d");
  c.width = c.height = N * k;
  c.style.width = c.style.height = `${Math.min(640, Math.max(N * k, 320))}px`;
  const img = ctx.createImageData(N, N), px = img.data;
  for (let p = 0; p < N * N; p++) {
    const hidden = !isVisible(bits, p), col = hidden ? ((p % N + Math.floor(p / N)) % 4 < 2 ? [221, 221, 221] : [245, 245, 245]) : colour(w[p]);
    px[4 * p] = col[0]; px[4 * p + 1] = col[1]; px[4 * p + 2] = col[2]; px[4 * p + 3] = 255;
  }
  if (k === 1) ctx.putImageData(img, 0, 0);
  else {
    const tmp = document.createElement("canvas"); tmp.width = tmp.height = N;
    tmp.getContext("2d").putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false; ctx.drawImage(tmp, 0, 0, N * k, N * k);
  }
  ctx.strokeStyle = "#d33"; ctx.lineWidth = Math.max(1, k / 3);
  ctx.strokeRect(0.5, S.token * k + 0.5, N * k - 1, Math.max(1, k - 1));
}
function renderSteps(w, bits) {
  const hd = vectors(head()), i = S.token, dk = hd.d_k, dv = hd.d_v;
  const q = hd._q.subarray(i * dk, i * dk + dk), row = w.subarray(i * N, i * N + N);
  let best = 0; for (let j = 1; j < N; j++) if (row[j] > row[best]) best = j;
  const j = S.key === null ? best : S.key, kj = hd._k.subarray(j * dk, j * dk + dk);
  let raw = 0; const prods = [];
  for (let d = 0; d < dk; d++) { const p = q[d] * kj[d]; prods.push(p); raw += p; }
  const scaled = raw * hd.scale + (hd._bias ? hd._bias[i * N + j] : 0), vis = isVisible(bits, i * N + j);
  let max = -Infinity; const dots = new Float64Array(N), masked = new Float64Array(N);
  for (let m = 0; m < N; m++) {
    let s = 0; for (let d = 0; d < dk; d++) s += q[d] * hd._k[m * dk + d];
    dots[m] = s;
    masked[m] = isVisible(bits, i * N + m) ? s * hd.scale + (hd._bias ? hd._bias[i * N + m] : 0) : -Infinity;
    if (masked[m] > max) max = masked[m];
  }
  const big = Math.max(...prods.map(Math.abs), 1e-12);
  let html = `<p>query <b>${i}</b> ${JSON.stringify(D.tokens[i])}, key <b>${j}</b> ${JSON.stringify(D.tokens[j])}` +
    `${S.key === null ? " (its largest weight)" : ""}; d_k = ${dk}, d_v = ${dv}, scale = ${hd.scale.toFixed(4)}` +
    `${hd.causal ? ", causal" : ""}${hd.rotary ? "; q and k rotated by position" : ""}</p>`;
  html += `<p class="vec">q_${i} = ${vec(q, dk)}</p><p class="vec">k_${j} = ${vec(kj, dk)}</p>`;
  html += `<div class="eq">q_${i} \u2299 k_${j}, element by element (d = 0 \u2026 ${dk - 1}):</div><div class="prod" id="prods">` +
    prods.map((p, d) => `<div style="background:${p >= 0 ? `rgba(40,90,200,${(0.6 * p / big).toFixed(3)})` :
      `rgba(200,50,50,${(-0.6 * p / big).toFixed(3)})`}" title="q[${d}]\u00b7k[${d}] = ${q[d].toFixed(4)} \u00d7 ` +
      `${kj[d].toFixed(4)}"><span>${d}</span>${p.toFixed(3)}</div>`).join("") + "</div>";
  html += `<div class="eq">\u03a3 products = raw score s_${i},${j} = q_${i}\u00b7k_${j} = <b id="raw">${raw.toFixed(4)}</b></div>`;
  html += `<div class="eq">\u00d7 scale ${hd.scale.toFixed(4)}${hd._bias ? " + bias" : ""} = <b id="scaled">` +
    `${scaled.toFixed(4)}</b></div>`;
  html += `<div class="eq">masked: ${vis ? "visible, unchanged" : "hidden \u2192 \u2212\u221e"} = <b>${fmt(vis ? scaled : -Infinity)}</b></div>`;
  const denom = max === -Infinity ? 0 : Array.from(masked).reduce((a, s) => a + Math.exp(s - max), 0);
  html += `<div class="eq">softmax: exp(${fmt(masked[j])} \u2212 max ${fmt(max)}) / \u03a3_m exp(s_${i}m \u2212 max) = ` +
    `${vis && denom ? Math.exp(masked[j] - max).toExponential(3) : 0} / ${denom.toExponential(3)} = ` +
    `<b id="weight">${row[j].toFixed(4)}</b></div>`;
  const y = new Float64Array(dv), order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, 5);
  for (let m = 0; m < N; m++) if (row[m] > 0) for (let d = 0; d < dv; d++) y[d] += row[m] * hd._v[m * dv + d];
  html += `<div class="eq">y_${i} = \u03a3_j a_${i}j v_j, the largest terms:</div>` + order.filter((m) => row[m] > 0)
    .map((m) => `<p class="vec">${row[m].toFixed(4)} \u00d7 v_${m} ${JSON.stringify(D.tokens[m])} = ` +
      `${vec(hd._v.subarray(m * dv, m * dv + dv))}</p>`).join("");
  html += `<p class="vec">y_${i} = <span id="y">${vec(y, dv)}</span></p>`;
  const all = S.allKeys || N <= MAX_ROWS;
  html += all ? "" : `<p>the ${MAX_ROWS} keys with the largest weights of ${N}, in order ` +
    `<button id="allkeys">show all ${N} keys</button></p>`;
  html += `<div id="keys"><table id="steps"><thead><tr><th>j</th><th class="l">key</th><th>q_i\u00b7k_j</th>` +
    `<th>\u00d7 scale</th><th>masked</th><th>softmax a_ij</th></tr></thead><tbody>`;
  const rows = [];
  const shown = all ? null : new Set(Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, MAX_ROWS));
  if (shown) shown.add(j);
  for (let m = 0; m < N; m++) {
    if (shown && !shown.has(m)) continue;
    const dot = dots[m];
    rows.push(`<tr data-j="${m}"${m === j ? ' class="pick"' : ""}><td>${m}</td><td class="l">` +
      `${show(D.tokens[m]).replace(/&/g, "&amp;").replace(/</g, "&lt;")}</td><td>${dot.toFixed(4)}</td>` +
      `<td>${(dot * hd.scale).toFixed(4)}</td><td>${fmt(masked[m])}</td><td class="w">${row[m].toFixed(4)}</td></tr>`);
  }
  html += rows.join("") + `<tr><td></td><td class="l">sum</td><td></td><td></td><td></td>` +
    `<td>${row.reduce((a, b) => a + b, 0).toFixed(3)}</td></tr></tbody></table></div>`;  // the sum over all N
  $("stepview").innerHTML = html;
  $("stepview").dataset.key = String(j);
}
function buildOverview() {
  const box = $("overview");
  D.layers.forEach((heads, l) => {
    const row = document.createElement("div"); row.className = "orow";
    const lab = document.createElement("span"); lab.textContent = `layer ${l}`; row.appendChild(lab);
    heads.forEach((hd, h) => {
      const c = document.createElement("canvas"), n = hd.side, t = bytes(hd.thumb);
      c.width = c.height = n; c.className = "mini"; c.dataset.layer = l; c.dataset.head = h;
      c.title = `layer ${l}, head ${h}`;
      const ctx = c.getContext("2d"), img = ctx.createImageData(n, n);
      for (let p = 0; p < n * n; p++) {
        const col = colour(t[p] / 255);
        img.data[4 * p] = col[0]; img.data[4 * p + 1] = col[1]; img.data[4 * p + 2] = col[2]; img.data[4 * p + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      row.appendChild(c);
    });
    box.appendChild(row);
  });
  box.addEventListener("click", (e) => {
    const c = e.target; if (!c.dataset || c.dataset.layer === undefined) return;
    S.layer = +c.dataset.layer; $("layer").value = c.dataset.layer; fillHeads();
    S.head = +c.dataset.head; $("head").value = c.dataset.head; S.key = null; render();
  });
}
const parts = {};  // the last render's milliseconds per view (the self-test reports them)
function timed(name, f) { const t0 = performance.now(); const r = f(); parts[name] = performance.now() - t0; return r; }
function render() {
  const hd = head(), w = timed("weights", () => weightsOf(hd)), bits = visibleOf(hd);
  $("where").textContent = hd.where;
  $("query").value = String(S.token);
  timed("tokens", () => renderTokens(w, bits)); timed("headview", () => renderHeadView(w));
  timed("heatmap", () => renderHeatmap(w, bits)); timed("steps", () => renderSteps(w, bits));
  document.querySelectorAll("canvas.mini").forEach(
    (c) => c.classList.toggle("sel", +c.dataset.layer === S.layer && +c.dataset.head === S.head));
  document.body.dataset.state = `${S.layer},${S.head},${S.token}`;
}
function bindViews() {
  let pending = null;
  $("heatmap").addEventListener("mousemove", (e) => {  // the row under the pointer, at most once a frame
    const r = e.target.getBoundingClientRect(), i = Math.floor((e.clientY - r.top) / r.height * N);
    if (pending === null) pending = requestAnimationFrame(() => { pending = null; if (i >= 0 && i < N) pick(i); });
  });
  $("headview").addEventListener("click", (e) => {
    const r = e.target.getBoundingClientRect(), i = Math.floor((e.clientY - r.top - 4) / ROW);
    if (i >= 0 && i < N) pick(i);
  });
  $("stepview").addEventListener("click", (e) => {
    if (e.target.id === "allkeys") { S.allKeys = true; render(); return; }
    const tr = e.target.closest("tr[data-j]"); if (tr) { S.key = +tr.dataset.j; render(); }
  });
}

function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  const get = (k, n) => { const v = parseInt(p.get(k), 10); return Number.isInteger(v) && v >= 0 && v < n ? v : null; };
  S.layer = Math.min(D.layer, D.layers.length - 1);
  const l = get("layer", D.layers.length); if (l !== null) S.layer = l;
  $("layer").value = String(S.layer);
  S.head = D.head; fillHeads();
  const h = get("head", D.layers[S.layer].length); if (h !== null) { S.head = h; $("head").value = String(h); }
  const t = get("token", N); if (t !== null) S.token = t;
  const k = get("key", N); if (k !== null) S.key = k;
  return p.has("selftest");
}
function selftest(ready) {  // drive the page through its own controls and report what it shows, with timings
  const report = {}, out = [], fire = (el, type) => el.dispatchEvent(new Event(type, {bubbles: true})), switches = [];
  for (const l of [...$("layer").options].map((o) => +o.value)) {
    $("layer").value = String(l); fire($("layer"), "change");
    for (const h of [...$("head").options].map((o) => +o.value)) {
      const t0 = performance.now();
      $("head").value = String(h); fire($("head"), "change");
      void document.body.offsetHeight;  // include the layout in the time
      switches.push(performance.now() - t0);
      if (!out.length) report.parts = Object.assign({}, parts);
      for (const i of [0, N - 1]) {
        fire(document.querySelector(`.tok[data-i="${i}"]`), "mouseover");
        const thumb = document.querySelector(`canvas.mini[data-layer="${l}"][data-head="${h}"]`);
        out.push({layer: l, head: h, token: i, state: document.body.dataset.state, where: $("where").textContent,
          strip: [...document.querySelectorAll(".tok")].map((s) => +s.dataset.w),
          trace: [...document.querySelectorAll("#steps tr[data-j]")].map(
            (tr) => [+tr.dataset.j, +tr.querySelector("td.w").textContent]),
          y: $("y").textContent, raw: +$("raw").textContent, key: +$("stepview").dataset.key,
          prods: [...document.querySelectorAll("#prods div")].map((d) => +d.lastChild.textContent),
          lines: +$("headview").dataset.lines, heat: $("heatmap").width,
          thumbSelected: thumb.classList.contains("sel")});
      }
    }
  }
  const t0 = performance.now();
  document.querySelector("canvas.mini").dispatchEvent(new MouseEvent("click", {bubbles: true}));
  void document.body.offsetHeight;
  const clickMs = performance.now() - t0;
  $("selftest").textContent = JSON.stringify({...report, heads: out, ready_ms: ready, switch_ms: switches, click_ms: clickMs,
    after_click: document.body.dataset.state, resources: performance.getEntriesByType("resource").length,
    thumbs: document.querySelectorAll("canvas.mini").length});
}

buildControls();
buildOverview();
bindViews();
const testing = fromHash();
render();
void document.body.offsetHeight;
const ready = performance.now();  // from navigation start to the first view laid out (parse, decode, compute, draw)
document.body.dataset.ready = ready.toFixed(1);
if (testing) selftest(ready);
