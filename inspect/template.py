"""index.html of `sae inspect`: the list of latents, from window.SAE_INSPECT (latents.js), and a
latent's card, from its cards/NNNN.js (a <script> added when the card opens, which calls SAE_CARDS).
Plain DOM calls, no library: the page must work offline from file://. Every string from the data is
set as textContent, never parsed as HTML."""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>sae inspect</title>
<style>
  :root { --ink: #1d2430; --muted: #687385; --line: #e3e7ee; --hit: #ff7000; --pane: #f7f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); }
  header { padding: 10px 18px; border-bottom: 1px solid var(--line); }
  h1 { font-size: 18px; margin: 0 0 2px; }
  h2 { font-size: 17px; margin: 0 0 4px; }
  h3 { font-size: 13px; margin: 14px 0 6px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
  #meta, .stats, #count { color: var(--muted); }
  main { display: flex; height: calc(100vh - 62px); }
  #list { width: 520px; min-width: 520px; border-right: 1px solid var(--line); display: flex; flex-direction: column; }
  .controls { padding: 10px; display: flex; gap: 8px; align-items: center; flex-wrap: wrap; background: var(--pane); }
  #search { flex: 1; min-width: 180px; padding: 6px 8px; font-size: 14px; }
  #scroll { overflow: auto; flex: 1; }
  table { border-collapse: collapse; width: 100%; }
  #scroll table { table-layout: fixed; }
  th, td { padding: 4px 8px; text-align: right; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { position: sticky; top: 0; background: #fff; cursor: pointer; user-select: none; }
  th.sorted::after { content: attr(data-arrow); }
  td.tokens, th.tokens { text-align: left; overflow: hidden; text-overflow: ellipsis; font-family: ui-monospace, monospace; }
  tr.latent-row { cursor: pointer; }
  tr.latent-row:hover, tr.selected { background: #fff3e6; }
  .flag { font-size: 11px; padding: 0 5px; border-radius: 8px; margin-left: 3px; }
  .flag.dead { background: #e8e8e8; color: #555; }
  .flag.dense { background: #ffe1e1; color: #a40000; }
  #more { margin: 8px; }
  #card { flex: 1; overflow: auto; padding: 14px 22px; }
  #card .empty { color: var(--muted); margin-top: 40px; }
  .example { display: flex; gap: 10px; padding: 3px 0; border-bottom: 1px dotted var(--line); align-items: baseline; }
  .act { width: 58px; min-width: 58px; text-align: right; color: var(--muted); font-variant-numeric: tabular-nums; }
  .q { width: 44px; min-width: 44px; color: var(--muted); font-size: 12px; }
  .ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }
  .tok { border-radius: 2px; }
  .tok.hit { outline: 1.5px solid var(--hit); }
  .columns { display: flex; gap: 28px; flex-wrap: wrap; }
  .columns table { width: auto; }
  .columns td { font-family: ui-monospace, monospace; }
  .columns td.token { text-align: left; white-space: pre; }
  .narrow { width: 300px; }
  button.neighbour { margin: 0 6px 6px 0; cursor: pointer; }
  svg rect { fill: var(--hit); }
  svg text { fill: var(--muted); font-size: 11px; }
</style>
</head>
<body>
<header><h1 id="title">sae inspect</h1><div id="meta"></div></header>
<main>
  <section id="list">
    <div class="controls">
      <input id="search" type="search" placeholder="latent id, or a token it fires on or promotes" autocomplete="off">
      <select id="filter"><option value="all">all</option><option value="live">live</option>
        <option value="dead">dead</option><option value="dense">dense</option></select>
      <span id="count"></span>
    </div>
    <div id="scroll">
      <table><colgroup><col style="width: 112px"><col style="width: 80px"><col style="width: 78px">
        <col style="width: 90px"><col></colgroup><thead><tr>
        <th data-key="id">latent</th><th data-key="density">density</th><th data-key="max_activation">max act.</th>
        <th data-key="mean_activation">mean act.</th><th class="tokens">fires on</th>
      </tr></thead><tbody id="rows"></tbody></table>
      <button id="more" hidden>show more</button>
    </div>
  </section>
  <section id="card"><p class="empty">Choose a latent.</p></section>
</main>
<script src="latents.js" charset="utf-8"></script>
<script>
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const data = window.SAE_INSPECT;
  if (!data) { $("card").textContent = "latents.js is missing beside this page: run `sae inspect` again."; return; }
  const latents = data.latents, SHOWN = 200;
  const state = { key: "density", dir: -1, limit: SHOWN, query: "", filter: "all", selected: null };

  function el(tag, props, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children || []) if (c) node.append(c);
    return node;
  }
  function fmt(x) {
    if (x === null || x === undefined) return "–";
    const a = Math.abs(x);
    if (a === 0) return "0";
    if (a >= 1000) return x.toFixed(0);
    if (a < 0.001) return x.toExponential(1);
    return String(Number(x.toPrecision(3)));
  }
  const pct = (x) => (x === 0 ? "0" : fmt(100 * x) + "%");
  const shown = (token) => token.replace(/\n/g, "↵");  // newlines as a visible mark
  const listed = (token) => (token.trim() ? token.trim() : shown(token).replace(/ /g, "␣"));  // a blank token stays visible
  const flags = (l) => [l.dead && el("span", { class: "flag dead", text: "dead" }),
                        l.dense && el("span", { class: "flag dense", text: "dense" })];

  // Searchable tokens of a latent: those its top examples fire on, and those it promotes.
  for (const l of latents) l._search = l.fires.concat(l.promoted).join("\u0000").toLowerCase();

  // Full records arrive by shard: cards/NNNN.js calls SAE_CARDS(shard, records).
  const shards = {}, waiting = {};
  window.SAE_CARDS = (shard, records) => { shards[shard] = records; (waiting[shard] || []).forEach((f) => f()); };
  function withRecord(id, then) {
    const shard = Math.floor(id / data.shard_size), record = () => shards[shard][id - shard * data.shard_size];
    if (shards[shard]) return then(record());
    if (!waiting[shard]) {
      waiting[shard] = [];
      const name = `cards/${String(shard).padStart(4, "0")}.js`;
      const script = el("script", { src: name, charset: "utf-8" });
      script.addEventListener("error", () => { $("card").textContent = `${name} is missing beside this page: run \`sae inspect\` again.`; });
      document.head.append(script);
    }
    waiting[shard].push(() => then(record()));
  }

  function matches(l) {
    if (state.filter === "live" && l.dead) return false;
    if (state.filter === "dead" && !l.dead) return false;
    if (state.filter === "dense" && !l.dense) return false;
    const q = state.query;
    if (!q.trim()) return true;
    if (/^\s*\d+\s*$/.test(q)) return l.id === Number(q);
    return l._search.includes(q.toLowerCase());
  }

  function renderList() {
    const found = latents.filter(matches);
    found.sort((a, b) => state.dir * (a[state.key] - b[state.key]) || a.id - b.id);
    $("count").textContent = `${found.length.toLocaleString()} of ${latents.length.toLocaleString()}`;
    $("rows").replaceChildren(...found.slice(0, state.limit).map((l) => el("tr", {
      class: "latent-row" + (l.id === state.selected ? " selected" : ""), "data-id": l.id, onclick: () => showCard(l.id),
    }, [el("td", { text: l.id }, flags(l)), el("td", { text: pct(l.density) }), el("td", { text: fmt(l.max_activation) }),
        el("td", { text: fmt(l.mean_activation) }), el("td", { class: "tokens", text: l.fires.slice(0, 5).map(listed).join(" · ") })])));
    $("more").hidden = found.length <= state.limit;
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.classList.toggle("sorted", th.dataset.key === state.key);
      th.dataset.arrow = state.dir < 0 ? " ▼" : " ▲";
    }
  }

  function example(e, max, withQuantile) {
    const ctx = el("span", { class: "ctx" }, e.tokens.map((t, i) => {
      const a = e.activations[i];
      const span = el("span", { class: i === e.at ? "tok hit" : "tok", title: `${JSON.stringify(t)}  ${fmt(a)}`, text: shown(t) });
      if (a > 0) span.style.backgroundColor = `rgba(255, 112, 0, ${Math.min(1, a / (max || 1)).toFixed(3)})`;
      return span;
    }));
    return el("div", { class: "example" }, [el("span", { class: "act", text: fmt(e.activation) }),
      withQuantile && el("span", { class: "q", text: "q " + e.quantile.toFixed(2) }), ctx]);
  }

  function histogram(h) {
    const NS = "http://www.w3.org/2000/svg", W = 300, H = 90, n = h.counts.length, top = Math.max(1, ...h.counts);
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
    h.counts.forEach((c, i) => {
      const r = document.createElementNS(NS, "rect"), bh = (H * c) / top;
      for (const [k, v] of Object.entries({ x: (i * W) / n + 0.5, y: H - bh, width: W / n - 1, height: bh })) r.setAttribute(k, v);
      const tip = document.createElementNS(NS, "title");
      tip.textContent = `${fmt(h.edges[i])} – ${fmt(h.edges[i + 1])}: ${c}`;
      r.append(tip); svg.append(r);
    });
    for (const [x, anchor, label] of [[0, "start", "0"], [W, "end", fmt(h.edges[n])]]) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x); t.setAttribute("y", H + 13); t.setAttribute("text-anchor", anchor); t.textContent = label;
      svg.append(t);
    }
    return svg;
  }

  const tokenTable = (rows) => rows.length ? el("table", {}, rows.map((p) =>
    el("tr", {}, [el("td", { class: "token", text: JSON.stringify(p.token).slice(1, -1) }), el("td", { text: fmt(p.logit) })])))
    : el("p", { class: "stats", text: "no LM loaded (--no-lm)" });
  const section = (title, ...body) => el("div", { class: "section" }, [el("h3", { text: title }), ...body]);

  function showCard(id) {
    state.selected = id;
    for (const tr of document.querySelectorAll("tr.latent-row")) tr.classList.toggle("selected", Number(tr.dataset.id) === id);
    history.replaceState(null, "", "#" + id);
    withRecord(id, (l) => { if (state.selected === id) renderCard(l); });
  }

  function renderCard(l) {
    const rows = data.source.rows;
    $("card").replaceChildren(...[
      el("h2", { text: `Latent ${l.id} ` }, flags(l)),
      el("p", { class: "stats", text: `density ${pct(l.density)} (${l.count.toLocaleString()} of ${rows.toLocaleString()} rows)` +
        ` · max ${fmt(l.max_activation)} · mean when active ${fmt(l.mean_activation)}` }),
      section("Top activations", ...(l.top.length ? l.top.map((e) => example(e, l.max_activation, false))
        : [el("p", { class: "stats", text: "never active on the rows read" })])),
      l.quantiles.length && section("Across its activations (quantiles of a uniform sample)", ...l.quantiles.map((e) => example(e, l.max_activation, true))),
      el("div", { class: "columns" }, [
        el("div", { class: "narrow" }, [
          l.histogram && section("Activation histogram (sample)", histogram(l.histogram)),
          section("Nearest latents (decoder cosine)", el("div", {}, l.neighbours.map((n) =>
            el("button", { class: "neighbour", text: `${n.id}  ${fmt(n.cosine)}`, onclick: () => showCard(n.id) })))),
        ]),
        section("Promoted tokens", tokenTable(l.promoted)),
        section("Suppressed tokens", tokenTable(l.suppressed)),
      ]),
    ].filter(Boolean));
    $("card").scrollTop = 0;
  }

  const run = data.run, src = data.source;
  const dead = latents.filter((l) => l.dead).length, dense = latents.filter((l) => l.dense).length;
  document.title = `sae inspect · ${run.name}`;
  $("title").textContent = run.name;
  $("meta").textContent = `${run.arch}, k ${run.k}, ${run.dict_size.toLocaleString()} latents · ${data.cache.model} layer ${data.cache.layer}` +
    ` · ${src.rows.toLocaleString()} rows (${src.kind === "heldout" ? "held-out chunks" : "the cache's first rows"}; ${src.rows_gated.toLocaleString()} gated)` +
    ` · ${dead.toLocaleString()} dead, ${dense.toLocaleString()} dense`;
  $("search").addEventListener("input", (ev) => { state.query = ev.target.value; state.limit = SHOWN; renderList(); });
  $("search").addEventListener("keydown", (ev) => {
    const id = Number(ev.target.value);
    if (ev.key === "Enter" && /^\s*\d+\s*$/.test(ev.target.value) && id < latents.length) showCard(id);
  });
  $("filter").addEventListener("change", (ev) => { state.filter = ev.target.value; state.limit = SHOWN; renderList(); });
  $("more").addEventListener("click", () => { state.limit += 5 * SHOWN; renderList(); });
  for (const th of document.querySelectorAll("th[data-key]")) th.addEventListener("click", () => {
    state.dir = state.key === th.dataset.key ? -state.dir : (th.dataset.key === "id" ? 1 : -1);
    state.key = th.dataset.key;
    renderList();
  });
  renderList();
  const hash = /^#(\d+)$/.exec(location.hash);
  if (hash && Number(hash[1]) < latents.length) showCard(Number(hash[1]));
})();
</script>
</body>
</html>
"""
