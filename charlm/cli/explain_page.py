"""One self-contained HTML page that explains a text: every character coloured by how surprised the model was,
its probability and the model's top predictions on hover or keyboard focus, and a picker that recolours the
text by a hidden unit's activation. Returns a string; the command layer writes it.

Self-contained: no network, no external script, style sheet or font. The scores travel inside the page as
base64 typed arrays (about 30 bytes a character), and the script draws one page of PAGE characters at a
time, so a text of a million characters opens as fast as a short one.
"""

from __future__ import annotations

import base64
import html
import json
import math

import numpy as np

# Surprisal bins in bits and their colours (shared with the terminal view): doubling bins, because a trained
# model spends most characters under 1 bit and the eye should go to the few that cost a lot.
SURPRISAL_BINS = (1.0, 2.0, 4.0, 8.0)
SURPRISAL_COLOURS = ("#c8ecd0", "#eef3a6", "#ffe08a", "#ffb070", "#ff7070")
SURPRISAL_LABELS = ("<1", "1-2", "2-4", "4-8", "\u22658")
PAGE = 20_000  # characters drawn at once: a few screens of text, instant to draw and to recolour


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def page_data(text: str, scores, vocab_chars: str, summary: dict, checkpoint: str, units: list,
              features: list) -> dict:
    """The JSON the page's script reads: typed arrays as little-endian base64, plus small plain fields."""
    wide = len(vocab_chars) > 65535
    id_type = np.dtype("<u4") if wide else np.dtype("<u2")
    packed_units = []
    for u in units:
        v = np.asarray(u["values"], dtype=np.float64)
        scale = max(float(np.abs(v).max(initial=0.0)), 1.0)  # tanh outputs keep [-1, 1]; cell states their range
        q = np.clip(np.round(v / scale * 127), -127, 127).astype(np.int8)
        packed_units.append({"unit": int(u["unit"]), "name": u["name"], "scale": scale, "q": _b64(q),
                             "corr": {f: round(r, 3) for f, r in u["corr"].items()}})
    return {
        "vocab": vocab_chars, "n": len(scores.ids), "wide": wide, "page": PAGE,
        "ids": _b64(scores.ids.astype(id_type)),
        "lp": _b64(scores.logprob.astype("<f4")),
        "rank": _b64(scores.rank.astype(id_type)),
        "k": int(scores.top_ids.shape[1]),
        "top": _b64(scores.top_ids.astype(id_type)),
        "topp": _b64(np.round(scores.top_p.astype(np.float64) * 65535).astype("<u2")),
        "bins": list(SURPRISAL_BINS), "colours": list(SURPRISAL_COLOURS), "labels": list(SURPRISAL_LABELS),
        "summary": {k: v for k, v in summary.items() if k != "surprising_spans"},
        "spans": summary.get("surprising_spans", []), "checkpoint": checkpoint, "units": packed_units,
        "features": [[f, d] for f, d in features],
    }


def build_page(text: str, scores, vocab_chars: str, summary: dict, checkpoint: str, units: list = (),
               features: list = ()) -> str:
    """The whole page as one string. units: [{"unit", "name", "corr": {feature: r}, "values": (n,)}]."""
    data = json.dumps(page_data(text, scores, vocab_chars, summary, checkpoint, list(units), list(features)),
                      ensure_ascii=True).replace("</", "<\\/")  # never closes its own <script> element
    bits = summary.get("bits_per_char", float("nan"))
    title = f"charlm explain: {len(scores.ids):,} characters, {bits:.3f} bits/char" if math.isfinite(bits) else \
        "charlm explain"
    return (_TEMPLATE.replace("@TITLE@", html.escape(title))
            .replace("@DATA@", data))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>@TITLE@</title>
<style>
  [hidden] { display: none !important; }
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 60rem; padding: 0 1rem;
         color: #1b1b1b; background: #fdfdfb; }
  h1 { font-size: 1.2rem; margin: 0 0 .3rem; }
  .meta { color: #555; font-size: .9rem; margin-bottom: .8rem; }
  .bar { display: flex; flex-wrap: wrap; gap: .8rem; align-items: center; margin: .6rem 0; font-size: .9rem; }
  .legend span { display: inline-block; padding: 0 .4rem; margin-right: .2rem; border-radius: 2px;
                 font-family: ui-monospace, Menlo, Consolas, monospace; }
  #text { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 15px;
          line-height: 1.6; white-space: pre-wrap; word-break: break-all; border: 1px solid #ddd;
          padding: .8rem; background: #fff; }
  #text span.c { border-radius: 2px; cursor: default; }
  #text span.c:focus, #text span.c.on { outline: 2px solid #1f4fd1; outline-offset: 0; }
  #tip { position: fixed; z-index: 10; background: #222; color: #f4f4f4; padding: .5rem .6rem; border-radius: 4px;
         font-size: 13px; font-family: ui-monospace, Menlo, Consolas, monospace; pointer-events: none;
         min-width: 14rem; box-shadow: 0 2px 8px rgba(0,0,0,.3); }
  #tip[hidden] { display: none; }
  #tip .row { display: flex; gap: .5rem; align-items: center; }
  #tip .g { width: 2.2rem; text-align: center; background: #444; border-radius: 2px; }
  #tip .b { height: .55rem; background: #8fb3ff; border-radius: 1px; }
  #tip .hit .g { background: #2f7d3f; }
  button, select { font: inherit; }
  .spans li { cursor: pointer; font-family: ui-monospace, Menlo, Consolas, monospace; }
  details { margin-top: 1rem; font-size: .9rem; color: #333; }
</style>
</head>
<body>
<h1>How surprised the model is by each character</h1>
<div class="meta" id="meta"></div>
<div class="bar">
  <label>Colour by <select id="mode"><option value="-1">surprisal</option></select></label>
  <span class="legend" id="legend"></span>
</div>
<div class="bar" id="pager" hidden>
  <button id="prev" type="button">&#9664; previous</button>
  <span id="pageinfo"></span>
  <button id="next" type="button">next &#9654;</button>
</div>
<div id="text" aria-label="the text, one focusable element per character; arrow keys move"></div>
<div id="tip" role="tooltip" hidden></div>
<details id="spansbox"><summary>Most surprising spans</summary><ol class="spans" id="spans"></ol></details>
<details><summary>How to read this page</summary>
<p>Each character is coloured by its surprisal, -log<sub>2</sub> p, where p is the probability the model gave it
after reading everything before it (the first character after reading one line break). Hover over a character,
or focus it and move with the arrow keys, to see its probability, its rank among the model's guesses and the
model's top predictions. With a unit chosen above, the colours show that hidden unit's value after reading each
character instead: blue negative, red positive. Units are ranked by the absolute Pearson correlation between
their value and a feature of the text:</p><ul id="features"></ul></details>
<script type="application/json" id="data">@DATA@</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  function bytes(s) {
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }
  const IdArray = D.wide ? Uint32Array : Uint16Array;
  const V = Array.from(D.vocab);  // one entry per code point, the model's characters (Korean, emoji alike)
  const ids = new IdArray(bytes(D.ids)), lp = new Float32Array(bytes(D.lp));
  const rank = new IdArray(bytes(D.rank));
  const top = new IdArray(bytes(D.top)), topp = new Uint16Array(bytes(D.topp));
  const units = D.units.map(u => Object.assign({}, u, {v: new Int8Array(bytes(u.q))}));
  const K = D.k, N = D.n, PAGE = D.page, LN2 = Math.log(2);
  const text = document.getElementById("text"), tip = document.getElementById("tip");
  const mode = document.getElementById("mode"), legend = document.getElementById("legend");
  let page = 0, unit = -1, current = null;

  function glyph(ch) { return ch === "\n" ? "\u21b5" : ch === "\t" ? "\u2192" : ch === "\r" ? "\u240d" :
                       (/[\u0000-\u001f\u007f]/.test(ch) ? "\u00b7" : ch); }
  function bits(i) { return -lp[i] / LN2; }
  function surprisalColour(i) {
    const b = bits(i); let k = 0;
    while (k < D.bins.length && b >= D.bins[k]) k++;
    return D.colours[k];
  }
  function unitColour(x) {  // x in [-1, 1]: blue for negative, red for positive, white near zero
    const fade = Math.round(255 * (1 - Math.min(1, Math.abs(x))));
    return x < 0 ? `rgb(${fade},${fade},255)` : `rgb(255,${fade},${fade})`;
  }
  function colour(i) { return unit < 0 ? surprisalColour(i) : unitColour(units[unit].v[i] / 127); }

  function draw() {
    const a = page * PAGE, b = Math.min(N, a + PAGE), frag = document.createDocumentFragment();
    for (let i = a; i < b; i++) {
      const s = document.createElement("span"), ch = V[ids[i]];
      s.className = "c"; s.dataset.i = i; s.tabIndex = i === a ? 0 : -1;
      s.textContent = glyph(ch); s.style.backgroundColor = colour(i);
      frag.appendChild(s);
      if (ch === "\n") frag.appendChild(document.createTextNode("\n"));
    }
    text.replaceChildren(frag);
    const pages = Math.ceil(N / PAGE);
    document.getElementById("pager").hidden = pages <= 1;
    document.getElementById("pageinfo").textContent =
      `page ${page + 1} of ${pages} (characters ${a.toLocaleString()}\u2013${(b - 1).toLocaleString()})`;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
    hide();
  }
  function recolour() {
    for (const s of text.querySelectorAll("span.c")) s.style.backgroundColor = colour(+s.dataset.i);
    drawLegend();
  }
  function drawLegend() {
    legend.replaceChildren();
    const add = (label, bg) => { const s = document.createElement("span"); s.textContent = label;
                                 s.style.backgroundColor = bg; legend.appendChild(s); };
    if (unit < 0) {
      legend.append("surprisal (bits): ");
      D.labels.forEach((l, k) => add(l, D.colours[k]));
    } else {
      const u = units[unit], m = u.scale;
      legend.append(`${u.name}: `);
      [-1, -0.5, 0, 0.5, 1].forEach(x => add((x * m).toFixed(m > 1 ? 1 : 2), unitColour(x)));
    }
  }
  function show(s) {
    const i = +s.dataset.i;
    if (current) current.classList.remove("on");
    current = s; s.classList.add("on");
    const p = Math.exp(lp[i]), ch = V[ids[i]];
    tip.replaceChildren();
    const head = document.createElement("div");
    head.textContent = `#${i.toLocaleString()} ${JSON.stringify(ch)}  p=${p.toPrecision(3)}  ` +
                       `${bits(i).toFixed(2)} bits  rank ${rank[i] + 1}`;
    tip.appendChild(head);
    if (unit >= 0) {
      const u = units[unit], row = document.createElement("div");
      row.textContent = `${u.name}: ${(u.v[i] / 127 * u.scale).toFixed(3)}`;
      tip.appendChild(row);
    }
    const sub = document.createElement("div"); sub.textContent = "the model expected:"; tip.appendChild(sub);
    for (let k = 0; k < K; k++) {
      const t = top[i * K + k], q = topp[i * K + k] / 65535;
      const row = document.createElement("div"); row.className = "row top" + (t === ids[i] ? " hit" : "");
      const g = document.createElement("span"); g.className = "g"; g.textContent = glyph(V[t]);
      const bar = document.createElement("span"); bar.className = "b"; bar.style.width = `${Math.max(1, q * 8)}rem`;
      const num = document.createElement("span"); num.textContent = q.toFixed(3);
      row.append(g, bar, num); tip.appendChild(row);
    }
    tip.hidden = false;
    const r = s.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = `${Math.max(4, Math.min(window.innerWidth - w - 4, r.left))}px`;
    tip.style.top = `${r.bottom + h + 8 < window.innerHeight ? r.bottom + 6 : Math.max(4, r.top - h - 6)}px`;
  }
  function hide() { tip.hidden = true; if (current) current.classList.remove("on"); current = null; }
  function focusChar(i) {
    page = Math.floor(i / PAGE); draw();
    const s = text.querySelector(`span.c[data-i="${i}"]`);
    if (s) { s.tabIndex = 0; s.focus(); s.scrollIntoView({block: "center"}); }
  }

  text.addEventListener("mouseover", e => { if (e.target.matches("span.c")) show(e.target); });
  text.addEventListener("mouseleave", () => { if (!text.contains(document.activeElement)) hide(); });
  text.addEventListener("focusin", e => { if (e.target.matches("span.c")) show(e.target); });
  text.addEventListener("focusout", e => { if (!text.contains(e.relatedTarget)) hide(); });
  text.addEventListener("keydown", e => {
    if (!e.target.matches("span.c")) return;
    const i = +e.target.dataset.i, step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
    if (e.key === "Escape") { hide(); return; }
    if (!step || i + step < 0 || i + step >= N) return;
    e.preventDefault();
    let next = text.querySelector(`span.c[data-i="${i + step}"]`);
    if (!next) { focusChar(i + step); return; }
    e.target.tabIndex = -1; next.tabIndex = 0; next.focus();
  });
  document.getElementById("prev").addEventListener("click", () => { page--; draw(); });
  document.getElementById("next").addEventListener("click", () => { page++; draw(); });
  mode.addEventListener("change", () => { unit = +mode.value; recolour(); if (current) show(current); });

  units.forEach((u, k) => {
    const o = document.createElement("option"); o.value = k;
    const best = Object.entries(u.corr).sort((x, y) => Math.abs(y[1]) - Math.abs(x[1]))[0];
    o.textContent = best ? `${u.name} (${best[0]} r=${best[1] >= 0 ? "+" : ""}${best[1].toFixed(2)})` : u.name;
    mode.appendChild(o);
  });
  const S = D.summary;
  document.getElementById("meta").textContent =
    `${N.toLocaleString()} characters \u00b7 ${S.bits_per_char.toFixed(3)} bits/char \u00b7 ` +
    `${S.nats_per_char.toFixed(4)} nats/char \u00b7 perplexity ${S.perplexity.toFixed(2)} \u00b7 ${D.checkpoint}`;
  const spans = document.getElementById("spans");
  document.getElementById("spansbox").hidden = D.spans.length === 0;
  for (const sp of D.spans) {
    const li = document.createElement("li");
    li.textContent = `${(sp.nats_per_char / LN2).toFixed(2)} bits/char at ${sp.start.toLocaleString()}: ` +
                     JSON.stringify(sp.text);
    li.tabIndex = 0;
    li.addEventListener("click", () => focusChar(sp.start));
    li.addEventListener("keydown", e => { if (e.key === "Enter") focusChar(sp.start); });
    spans.appendChild(li);
  }
  const fl = document.getElementById("features");
  for (const [f, d] of D.features) {
    const li = document.createElement("li"); li.textContent = `${f}: ${d}`; fl.appendChild(li);
  }
  draw(); drawLegend();
  window.charlmExplain = {pages: () => Math.ceil(N / PAGE), focusChar: focusChar};
})();
</script>
</body>
</html>
"""
