// raygate dashboard: fetches /dashboard/data (session cookie) and draws it; refreshes itself.
// Every value from the server goes into the page through textContent, never as HTML.
"use strict";

const REFRESH_MS = 15000;
const plots = {};

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 2 : digits });
}

function usd(value) {
  return value === null || value === undefined ? "–" : "$" + fmt(value, value < 1 ? 6 : 2);
}

function pct(value) {
  return value === null || value === undefined ? "–" : fmt(100 * value, 1) + " %";
}

function renderNumbers(o) {
  const box = document.getElementById("numbers");
  const cards = [
    ["Requests", fmt(o.requests, 0)], ["Per minute", fmt(o.requests_per_minute, 1)],
    ["Error rate", pct(o.error_rate)], ["p50 latency", fmt(o.latency_ms.p50, 0) + " ms"],
    ["p95 latency", fmt(o.latency_ms.p95, 0) + " ms"], ["p99 latency", fmt(o.latency_ms.p99, 0) + " ms"],
    ["Cache hit rate", pct(o.cache.hit_rate)], ["Cost", usd(o.cost_usd)], ["Saved by cache", usd(o.cache.saved_usd)],
    ["Tokens in / out", fmt(o.prompt_tokens, 0) + " / " + fmt(o.completion_tokens, 0)],
  ];
  box.replaceChildren(...cards.map(([label, value]) => {
    const card = el("div", null, "card");
    card.append(el("span", label, "label"), el("strong", value));
    return card;
  }));
}

function chart(id, series, columns, yValue, yRange) {
  const node = document.getElementById(id);
  const width = Math.max(node.clientWidth, 280);
  if (!plots[id]) {
    plots[id] = new uPlot({
      width: width, height: 200,
      scales: { x: { time: true }, y: yRange ? { range: yRange } : {} },
      series: [{}].concat(series.map(([label, stroke]) => ({
        label: label, stroke: stroke, width: 2, spanGaps: false, points: { show: true, size: 5 }, value: (u, v) => yValue(v),
      }))),
      axes: [{}, { size: 70, values: (u, splits) => splits.map(yValue) }],
    }, columns, node);
  } else {
    plots[id].setData(columns);
    if (plots[id].width !== width) plots[id].setSize({ width: width, height: 200 });
  }
}

function renderCharts(s) {
  const p = s.points;
  const xs = p.map((b) => b.t);
  const count = (v) => fmt(v, 0);
  const ms = (v) => (v === null || v === undefined ? "–" : fmt(v, 0) + " ms");
  chart("chart-requests", [["requests", "#2563eb"], ["errors", "#dc2626"]],
    [xs, p.map((b) => b.requests), p.map((b) => b.errors)], count);
  chart("chart-cost", [["cost", "#059669"]], [xs, p.map((b) => b.cost_usd)],
    (v) => (v === null || v === undefined ? "–" : "$" + Number(v).toPrecision(2)));
  chart("chart-latency", [["p50", "#2563eb"], ["p95", "#d97706"], ["p99", "#dc2626"]],
    [xs, p.map((b) => b.p50), p.map((b) => b.p95), p.map((b) => b.p99)], ms);
  chart("chart-cache", [["hit rate", "#7c3aed"]], [xs, p.map((b) => b.cache_hit_rate)], pct, [0, 1]);
}

function table(id, headers, rows) {
  const node = document.getElementById(id);
  const head = el("tr");
  head.append(...headers.map((h) => el("th", h)));
  const body = rows.length ? rows.map((r) => {
    const tr = el("tr");
    tr.append(...r.map((c) => el("td", c)));
    return tr;
  }) : [(() => { const tr = el("tr"); const td = el("td", "none", "empty"); td.colSpan = headers.length; tr.append(td); return tr; })()];
  node.replaceChildren(head, ...body);
}

function bar(label, fraction, text, cls) {
  const row = el("div", null, "bar-row");
  const track = el("div", null, "bar-track");
  const fill = el("div", null, "bar-fill " + (cls || ""));
  fill.style.width = Math.min(Math.max(fraction, 0), 1) * 100 + "%";
  track.append(fill);
  row.append(el("span", label, "bar-label"), track, el("span", text, "bar-value"));
  return row;
}

function renderSides(o) {
  const top = Math.max(...o.cost_by_model.map((m) => m.cost_usd), 1e-12);
  document.getElementById("cost-by-model").replaceChildren(...(o.cost_by_model.length
    ? o.cost_by_model.map((m) => bar(m.model || "(none)", m.cost_usd / top, usd(m.cost_usd) + " · " + m.requests + " req"))
    : [el("p", "no traffic", "empty")]));
  document.getElementById("budgets").replaceChildren(...(o.budgets.length
    ? o.budgets.map((b) => bar(b.id + " (" + b.period + ")", b.spent_fraction, pct(b.spent_fraction),
      b.spent_fraction >= 1 ? "over" : b.spent_fraction >= 0.8 ? "warn" : ""))
    : [el("p", "no budgets", "empty")]));
  table("experiments", ["name", "status", "model", "metric", "winner"],
    o.experiments.map((e) => [e.name, e.status, e.match_model, e.metric, e.winner || "–"]));
  table("alerts", ["when", "kind", "state", "message"], o.alerts.map((a) => [
    new Date(a.created_at * 1000).toLocaleString(), a.kind, a.state || a.delivery, a.message]));
  table("health", ["component", "status"], Object.entries(o.health).map(([k, v]) => [k, v]));
  table("errors", ["status", "code", "requests"], o.errors_by_type.map((e) => [e.status, e.code || "–", e.requests]));
}

async function refresh() {
  const windowS = document.getElementById("window").value;
  const errorBox = document.getElementById("error");
  try {
    const answer = await fetch("/dashboard/data?window_s=" + encodeURIComponent(windowS),
      { credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401 || answer.status === 403) { window.location.assign("/dashboard"); return; }
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error ? body.error.message : "HTTP " + answer.status);
    renderNumbers(body.overview);
    renderCharts(body.series);
    renderSides(body.overview);
    errorBox.textContent = "";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    document.body.dataset.loaded = "1";
  } catch (err) {
    errorBox.textContent = "Could not load the data: " + err.message;
  }
}

document.getElementById("window").addEventListener("change", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
