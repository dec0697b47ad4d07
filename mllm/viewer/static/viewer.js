"use strict";
// `mllm view`'s page: the data is the JSON in #data; a page of cards is drawn at a time, so a
// benchmark of thousands of items opens at once. Text from the results is always set as text,
// never parsed as HTML.
const DATA = JSON.parse(document.getElementById("data").textContent);
const COLORS = ["#2f6fde", "#d9822b", "#8e44ad", "#16a085", "#c0392b", "#5d6d7e", "#b7950b", "#1abc9c"];
const letter = (k) => String.fromCharCode(65 + k);
const state = { group: 0, page: 0, q: "", facets: {}, outcome: [], disagree: false, pageSize: DATA.page_size || 50 };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const group = () => DATA.groups[state.group];

function renderTabs() {
  const tabs = document.getElementById("tabs");
  tabs.replaceChildren();
  if (DATA.groups.length < 2) return;
  DATA.groups.forEach((g, i) =>
    tabs.appendChild(el("button", { class: i === state.group ? "on" : "", onclick: () => selectGroup(i) }, `${g.benchmark} (${g.items})`)));
}

function renderResults(g) {
  const box = document.getElementById("results");
  box.replaceChildren(...g.results.map((r, k) => el("div", { class: "result", style: `border-left-color:${COLORS[k % COLORS.length]}` },
    el("div", { class: "name" }, `${letter(k)} · ${r.label}`),
    r.headline ? el("div", {}, `${r.headline[0]}: `, el("b", {}, r.headline[1])) : null,
    el("div", { class: "meta" }, `${g.benchmark} · rule ${r.rule} · ${r.n} items · ${r.path}`))));
}

function renderPanels(g) {
  const box = document.getElementById("panels");
  box.replaceChildren(...g.panels.map((p) => {
    if (p.type === "matrix") {
      const blocks = p.blocks.map((b) => el("div", { class: "block" },
        el("table", {}, el("tr", {}, el("th", {}, b.label), ...p.cols.map((c) => el("th", {}, c))),
          ...p.rows.map((name, i) => el("tr", {}, el("td", {}, name),
            ...b.cells[i].map((v, j) => el("td", { class: j === i ? "diag" : j < 2 ? "off" : "" }, String(v)))))),
        el("div", { class: "note" }, b.note)));
      return el("div", { class: "panel matrix" }, el("h2", {}, p.title), el("div", { class: "blocks" }, ...blocks));
    }
    return el("div", { class: "panel" }, el("h2", {}, p.title),
      el("table", {}, el("tr", {}, ...p.columns.map((c) => el("th", {}, c))),
        ...p.rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))));
  }));
}

function renderControls(g) {
  const box = document.getElementById("controls");
  const refilter = () => { state.page = 0; apply(); };
  const parts = [el("label", {}, "search",
    el("input", { type: "search", id: "q", placeholder: "id or text", value: state.q,
      oninput: (e) => { state.q = e.target.value.trim().toLowerCase(); refilter(); } }))];
  for (const [name, values] of Object.entries(g.facets)) {
    parts.push(el("label", {}, name, el("select", { id: `facet-${name.replace(/\W+/g, "-")}`,
      onchange: (e) => { state.facets[name] = e.target.value; refilter(); } },
      el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, v)))));
  }
  g.results.forEach((r, k) => parts.push(el("label", { title: r.label }, `${letter(k)}${g.pairs ? " (pair)" : ""}`,
    el("select", { id: `outcome-${k}`, onchange: (e) => { state.outcome[k] = e.target.value; refilter(); } },
      el("option", { value: "" }, "any"), el("option", { value: "right" }, "right"), el("option", { value: "wrong" }, "wrong")))));
  if (g.results.length > 1) {
    parts.push(el("label", {}, el("input", { type: "checkbox", id: "disagree",
      onchange: (e) => { state.disagree = e.target.checked; refilter(); } }), "disagreements only"));
  }
  parts.push(el("label", {}, "per page", el("select", { id: "page-size",
    onchange: (e) => { state.pageSize = Number(e.target.value); refilter(); } },
    ...[25, 50, 100, 200].map((n) => el("option", { value: n, selected: n === state.pageSize }, String(n))))));
  if (g.boxes) {
    parts.push(el("span", { class: "legend" }, el("span", {}, el("span", { class: "swatch", style: "background:#1e9e4a" }), "gold"),
      ...g.results.map((r, k) => el("span", {}, el("span", { class: "swatch", style: `background:${COLORS[k % COLORS.length]}` }), letter(k)))));
  }
  box.replaceChildren(...parts);
}

function matches(c) {
  for (const [name, value] of Object.entries(state.facets)) {
    if (value && c.facets[name] !== value) return false;
  }
  for (let k = 0; k < state.outcome.length; k++) {
    const want = state.outcome[k];
    if (!want) continue;
    if (c.ok[k] === null || c.ok[k] !== (want === "right")) return false;
  }
  if (state.disagree && c.rank === 2) return false;
  if (state.q) {
    const hit = c.items.some((it) => it.id.toLowerCase().includes(state.q) || it.prompt.toLowerCase().includes(state.q));
    if (!hit) return false;
  }
  return true;
}

function figure(g, it) {
  if (!it.thumb) return el("figure", {}, el("div", { class: "none" }, "no image"));
  // width and height hold the image's place before it loads, so nothing below it moves
  const [tw, th] = it.thumb_size || [null, null];
  const fig = el("figure", {}, el("img", { src: it.thumb, loading: "lazy", alt: it.id, width: tw, height: th }));
  if (g.boxes && it.size && it.gold_box) {
    const [w, h] = it.size;
    const s = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" });
    const rect = (b, color, dash) => {
      const r = svg("rect", { x: Math.min(b[0], b[2]), y: Math.min(b[1], b[3]), width: Math.abs(b[2] - b[0]), height: Math.abs(b[3] - b[1]),
        fill: "none", stroke: color, "stroke-width": 2.5, "vector-effect": "non-scaling-stroke" });
      if (dash) r.setAttribute("stroke-dasharray", "5 3");
      s.appendChild(r);
    };
    rect(it.gold_box, "#1e9e4a", false);
    it.r.forEach((a, k) => { if (a && a.box) rect(a.box, COLORS[k % COLORS.length], true); });
    fig.appendChild(s);
  }
  return fig;
}

function item(g, it) {
  const answers = it.r.map((a, k) => {
    const who = el("span", { class: "who", style: `background:${COLORS[k % COLORS.length]}`, title: g.results[k].label }, letter(k));
    if (!a) return [who, el("span", { class: "mark" }, "·"), el("span", { class: "ext" }, "not in this result")];
    const ext = `→ ${a.extracted}${a.iou !== undefined ? ` · IoU ${a.iou}` : ""}${a.missing ? " · no answer" : ""}`;
    return [who, el("span", { class: `mark ${a.ok ? "ok" : "bad"}` }, a.ok ? "✓" : "✗"),
      el("span", {}, el("span", { class: "resp" }, a.response || "(empty)"), " ", el("span", { class: "ext" }, ext))];
  });
  return el("div", { class: "item", "data-id": it.id }, figure(g, it),
    el("div", { class: "text" }, el("div", { class: "id" }, it.id), el("div", { class: "prompt" }, it.prompt),
      el("div", { class: "gold" }, "gold: ", el("b", {}, it.gold)), el("div", { class: "answer" }, ...answers.flat())));
}

function card(g, c) {
  const head = [];
  if (c.pair !== null && c.pair !== undefined) head.push(el("span", { class: "title" }, `pair ${c.pair}`));
  for (const [k, v] of Object.entries(c.facets)) head.push(el("span", { class: "chip" }, `${k}: ${v}`));
  c.ok.forEach((ok, k) => head.push(el("span", { class: `chip ${ok === null ? "" : ok ? "ok" : "bad"}`, title: g.results[k].label },
    `${letter(k)} ${ok === null ? "—" : ok ? "right" : "wrong"}`)));
  const cls = ["card", c.pair !== null && c.pair !== undefined ? "pair" : "", c.rank < 2 ? "disagree" : ""].join(" ");
  return el("article", { class: cls }, el("div", { class: "card-head" }, ...head),
    el("div", { class: "card-body" }, ...c.items.map((it) => item(g, it))));
}

function apply() {
  const g = group();
  const hits = g.cards.filter(matches);
  const pages = Math.max(1, Math.ceil(hits.length / state.pageSize));
  state.page = Math.min(state.page, pages - 1);
  const start = state.page * state.pageSize;
  const shown = hits.slice(start, start + state.pageSize);
  document.getElementById("cards").replaceChildren(...shown.map((c) => card(g, c)));
  const count = document.getElementById("count");
  count.dataset.shown = shown.length;
  count.dataset.matching = hits.length;
  count.dataset.total = g.cards.length;
  const what = g.pairs ? "pairs" : "items";
  const dis = g.results.length > 1 ? ` · ${g.cards.filter((c) => c.rank < 2).length} disagreements, shown first` : "";
  count.textContent = hits.length
    ? `${start + 1}–${start + shown.length} of ${hits.length} ${what}` + (hits.length < g.cards.length ? ` (filtered from ${g.cards.length})` : "") + dis
    : `no ${what} match (of ${g.cards.length})`;
  const pager = document.getElementById("pager");
  const go = (p) => () => { state.page = p; apply(); window.scrollTo(0, document.getElementById("controls").offsetTop); };
  pager.replaceChildren(
    el("button", { id: "first", disabled: state.page === 0, onclick: go(0) }, "«"),
    el("button", { id: "prev", disabled: state.page === 0, onclick: go(state.page - 1) }, "‹ prev"),
    el("span", { id: "page" }, `page ${state.page + 1} of ${pages}`),
    el("button", { id: "next", disabled: state.page >= pages - 1, onclick: go(state.page + 1) }, "next ›"),
    el("button", { id: "last", disabled: state.page >= pages - 1, onclick: go(pages - 1) }, "»"));
}

function selectGroup(i) {
  state.group = i;
  state.page = 0;
  state.q = "";
  state.facets = {};
  state.outcome = [];
  state.disagree = false;
  const g = group();
  renderTabs();
  renderResults(g);
  renderPanels(g);
  renderControls(g);
  apply();
}

document.getElementById("title").textContent = DATA.title;
document.getElementById("generated").textContent = `mllm view · ${DATA.generated}`;
selectGroup(0);
document.body.dataset.ready = "true";
