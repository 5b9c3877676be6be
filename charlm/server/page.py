"""The page `charlm serve` answers at GET /: type a prime, watch the model's text stream in.

One self-contained HTML string (no network, no external assets: it must work on an offline machine). It
POSTs to /v1/sample with "stream": true and reads the server-sent events from the response body with
fetch's stream reader (EventSource can only GET). A link can fill the form and start generating:
/?prime=ROMEO:&seed=1&length=200&go (the browser test uses this).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>charlm</title>
<link rel="icon" href="data:,">
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem;
         color: #222; background: #fcfcfa; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  #model { color: #666; margin: 0 0 1rem; font-size: .9rem; }
  textarea, input { font: 14px ui-monospace, monospace; }
  textarea { width: 100%; box-sizing: border-box; height: 4.5rem; }
  .row { display: flex; flex-wrap: wrap; gap: .8rem; align-items: center; margin: .6rem 0; }
  .row label { font-size: .9rem; }
  .row input { width: 5.5rem; }
  button { font-size: .95rem; padding: .3rem 1rem; }
  #out { white-space: pre-wrap; font: 14px/1.4 ui-monospace, monospace; background: #fff; border: 1px solid #ddd;
         padding: .8rem; min-height: 8rem; }
  #out .prime { font-weight: bold; }
  #status { color: #666; font-size: .85rem; min-height: 1.2em; }
  #status.error { color: #b00; }
  #out ol { margin: 0; padding-left: 2.2rem; }
  #out .copy { color: #888; }
  #out .lp { color: #999; font-size: .8rem; margin-left: .8rem; }
</style>
</head>
<body>
<h1>charlm</h1>
<p id="model">loading the model's description...</p>
<label for="prime" id="prime-label">Prime (the text the model continues)</label>
<textarea id="prime" spellcheck="false"></textarea>
<div class="row">
  <label><span id="length-label">length</span> <input id="length" type="number" value="500" min="1"></label>
  <label>temperature <input id="temperature" type="number" value="0.8" step="0.1" min="0.05"></label>
  <label>top-k <input id="top_k" type="number" value="0" min="0"></label>
  <label>seed <input id="seed" type="number" placeholder="random"></label>
  <label id="tag-label" hidden>tag <select id="tag"><option value="">(none)</option></select></label>
  <button id="go">Generate</button>
  <button id="halt" disabled>Stop</button>
</div>
<div id="status"></div>
<div id="out"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
// A link can fill the form and start: /?prime=ROMEO:&seed=1&length=200&go (it starts once the model's
// description has said whether it generates text or items)
const query = new URLSearchParams(location.search);
let controller = null;
let itemMode = false;  // a model of a list of things: the page asks /v1/items for new items

fetch("/v1/model").then((r) => r.json()).then((m) => {
  const c = m.model_config;
  $("model").textContent = `${m.checkpoint}: ${c.layers} x ${c.hidden} ${c.cell}, ` +
    `${m.parameters.toLocaleString()} parameters, ${m.vocab_size} characters`;
  if (m.corpus && m.corpus.items) {
    itemMode = true;
    $("model").textContent += ": a model of a list; it gives new items";
    $("prime-label").textContent = "Start of each item (optional)";
    $("prime").style.height = "2.2rem";
    $("length-label").textContent = "items";
    if (!query.has("length")) $("length").value = "10";
  }
  const tags = (m.corpus && m.corpus.tags && m.corpus.tags.names) || [];
  if (tags.length) {  // a tagged model: write in one of its voices
    for (const name of tags) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("tag").appendChild(option);
    }
    $("tag-label").hidden = false;
    if (query.has("tag")) $("tag").value = query.get("tag");
  }
  if (query.has("go")) generate();
}).catch(() => { $("model").textContent = ""; if (query.has("go")) generate(); });

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function body() {
  const b = { prime: $("prime").value, length: Number($("length").value),
              temperature: Number($("temperature").value), top_k: Number($("top_k").value), stream: true };
  if ($("seed").value !== "") b.seed = Number($("seed").value);
  if ($("tag").value !== "") b.tag = $("tag").value;
  return b;
}

async function drawItems() {
  const out = $("out");
  out.textContent = "";
  $("go").disabled = true;
  status("drawing items...");
  const b = { prime: $("prime").value, count: Number($("length").value),
              temperature: Number($("temperature").value), top_k: Number($("top_k").value) };
  if ($("seed").value !== "") b.seed = Number($("seed").value);
  if ($("tag").value !== "") b.tag = $("tag").value;
  try {
    const response = await fetch("/v1/items", { method: "POST", body: JSON.stringify(b),
      headers: { "Content-Type": "application/json" } });
    const d = await response.json();
    if (!response.ok) { status(d.error, true); return; }
    const list = document.createElement("ol");
    for (const item of d.items) {
      const li = document.createElement("li");
      li.textContent = item.text;
      if (!item.new) { li.className = "copy"; li.title = "already in the training list"; }
      const lp = document.createElement("span");
      lp.className = "lp"; lp.textContent = `${item.logprob.toFixed(2)} nats`;
      li.appendChild(lp);
      list.appendChild(li);
    }
    out.appendChild(list);
    status(`${d.items.length} new items from ${d.drawn} drawn; ${d.copies_skipped} copies of the list skipped`);
  } catch (err) {
    status(String(err), true);
  } finally {
    $("go").disabled = false;
  }
}

async function generate() {
  if (itemMode) return drawItems();
  if (controller) controller.abort();
  controller = new AbortController();
  const out = $("out");
  out.textContent = "";
  $("go").disabled = true; $("halt").disabled = false;
  status("generating...");
  const started = performance.now();
  let chars = 0;
  try {
    const response = await fetch("/v1/sample", { method: "POST", body: JSON.stringify(body()),
      headers: { "Content-Type": "application/json" }, signal: controller.signal });
    if (!response.ok) {
      const e = await response.json();
      status(`${e.error}`, true);
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        const d = JSON.parse(data);
        if (event === "start") {
          const p = document.createElement("span");
          p.className = "prime"; p.textContent = d.prime;
          out.appendChild(p);
          $("seed").placeholder = `random (last: ${d.seed})`;
        } else if (event === "message") {
          out.appendChild(document.createTextNode(d.text));
          chars += d.text.length;
        } else if (event === "done") {
          const s = (performance.now() - started) / 1000;
          status(`${chars} characters in ${s.toFixed(2)} s (seed ${d.seed}, ${d.finish_reason})`);
        } else if (event === "error") {
          status(d.error, true);
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") status(String(err), true);
    else status(`stopped after ${chars} characters`);
  } finally {
    $("go").disabled = false; $("halt").disabled = true;
    controller = null;
  }
}

$("go").addEventListener("click", generate);
$("halt").addEventListener("click", () => controller && controller.abort());
$("prime").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
for (const name of ["prime", "length", "temperature", "top_k", "seed"]) {
  if (query.has(name)) $(name).value = query.get(name);
}
</script>
</body>
</html>
"""
