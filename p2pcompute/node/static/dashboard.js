// The node's page: live updates from /api/events (server-sent events), the rest from the JSON API (docs/api.md).
// Everything from the network (peer names, reasons) is put in the page as text, never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const VIEWS = ["node", "swarm", "runs", "credits", "ledger"];
const RECENT_EPOCHS = 20;

const state = {
  csrf: "",
  status: null,
  runId: null,
  points: new Map(), // epoch -> point of the run this node trains
  creditsShownFor: null, // the balance the credits view was last loaded at
  ledgerLoaded: false,
};

const $ = (id) => document.getElementById(id);

// ---- the JSON API ---------------------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") {
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = state.csrf;
    init.body = JSON.stringify(body || {});
  }
  const response = await fetch("/api/" + path, init);
  let payload = {};
  try {
    payload = await response.json();
  } catch (e) {
    payload = { error: "HTTP " + response.status };
  }
  if (!response.ok) throw new Error(payload.error || "HTTP " + response.status);
  return payload.result;
}

// ---- small helpers --------------------------------------------------------------------------------

function text(value, fallback = "-") {
  return value === null || value === undefined || value === "" ? fallback : String(value);
}

function num(value, digits = 4) {
  return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "-";
}

function duration(seconds) {
  if (typeof seconds !== "number" || !isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return (h ? h + " h " : "") + (h || m ? m + " min " : "") + (s % 60) + " s";
}

function bytes(n) {
  if (!n) return "-";
  return n >= 2 ** 30 ? (n / 2 ** 30).toFixed(1) + " GiB" : (n / 2 ** 20).toFixed(0) + " MiB";
}

function credits(micro) {
  return typeof micro === "number" ? (micro / 1e6).toFixed(6) : "-";
}

function fillFields(dl, rows) {
  dl.replaceChildren();
  for (const [key, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    if (value instanceof Node) dd.append(value);
    else dd.textContent = text(value);
    dl.append(dt, dd);
  }
}

function fillTable(table, rows, rowClass) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren();
  rows.forEach((cells, i) => {
    const tr = document.createElement("tr");
    if (rowClass) tr.className = rowClass(i);
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell);
      else td.textContent = text(cell);
      tr.append(td);
    }
    tbody.append(tr);
  });
}

function span(value, cls) {
  const s = document.createElement("span");
  s.textContent = value;
  if (cls) s.className = cls;
  return s;
}

// ---- charts (inline SVG built with DOM calls) ---------------------------------------------------

function svg(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

// series: [{cls, points: [[x, y], ...]}]; the chart's data-points attribute counts every point drawn
function lineChart(el, series, xLabel, yLabel, xFormat = (x) => String(x)) {
  const W = 640, H = 260, L = 56, R = 12, T = 12, B = 34;
  el.replaceChildren();
  const all = series.flatMap((s) => s.points).filter(([x, y]) => isFinite(x) && isFinite(y));
  el.setAttribute("data-points", String(all.length));
  el.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  el.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!all.length) {
    const t = svg("text", { x: W / 2 - 40, y: H / 2 });
    t.textContent = "no data yet";
    el.append(t);
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const label = (x, y, value, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor || "start" });
    t.textContent = value;
    el.append(t);
  };
  label(L - 4, T + 8, y1.toPrecision(3), "end");
  label(L - 4, H - B, y0.toPrecision(3), "end");
  label(L, H - B + 16, xFormat(x0), "start");
  label(W - R, H - B + 16, xFormat(x1), "end");
  label((L + W - R) / 2, H - 4, xLabel, "middle");
  label(4, T + 8, yLabel, "start");
  for (const s of series) {
    const pts = s.points.filter(([x, y]) => isFinite(x) && isFinite(y));
    if (!pts.length) continue;
    el.append(svg("polyline", { class: s.cls, points: pts.map(([x, y]) => sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join(" ") }));
    const [lx, ly] = pts[pts.length - 1];
    el.append(svg("circle", { class: s.cls, cx: sx(lx).toFixed(1), cy: sy(ly).toFixed(1), r: 3 }));
  }
}

// ---- views ----------------------------------------------------------------------------------------

function showView() {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "node";
  for (const v of VIEWS) $("view-" + v).hidden = v !== name;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (name === "credits") loadCredits();
  if (name === "ledger" && !state.ledgerLoaded && state.status) {
    state.ledgerLoaded = true;
    $("ledger-q").value = state.status.peer_id;
    searchLedger();
  }
}

function renderNode(s) {
  const training = s.training || {};
  const trainer = training.trainer;
  const idle = training.idle;
  $("node-name").textContent = s.name ? "· " + s.name : "";
  fillFields($("node-fields"), [
    ["peer id", s.peer_id],
    ["role", s.role],
    ["status", s.paused ? "paused by the owner" : s.status],
    ["version", s.version],
    ["uptime", duration(s.uptime_s)],
    ["reachability", text(s.reachability, "unknown")],
    ["device", (s.device + " " + (s.device_name || "")).trim()],
    ["memory", bytes(s.memory_bytes)],
    ["idle policy", idle ? (idle.train ? "train: " : "pause: ") + idle.reason : "not watching (no run in training)"],
    ["training", trainer ? trainer.status + (trainer.reason ? " (" + trainer.reason + ")" : "") : text(training.reason, "-")],
    ["schedule", text(s.schedule, "any time")],
    ["current run", text(s.current_run)],
    ["peers known", s.peers_known],
    ["credits", credits(s.credits)],
    ["ledger entries", s.ledger_entries],
    ["multiaddrs", (s.multiaddrs || []).join("\n")],
  ]);
  const canTrain = s.role === "node" && s.training !== null;
  $("pause").disabled = !canTrain || s.paused;
  $("resume").disabled = !canTrain || !s.paused;
  if (!canTrain) $("pause-msg").textContent = "this node does not train";
}

function renderPeers(peers) {
  const now = Date.now();
  peers.sort((a, b) => (b.self - a.self) || a.peer_id.localeCompare(b.peer_id));
  $("peer-count").textContent = "(" + peers.length + " live peers)";
  fillTable($("peers"), peers.map((p) => [
    p.peer_id + (p.self ? " (this node)" : ""), p.name, p.status, p.software,
    (p.device + " " + (p.device_name || "")).trim(), bytes(p.memory_bytes),
    p.run_id ? p.run_id.slice(0, 12) : "-", Math.max(0, (now - p.updated_at_ms) / 1000).toFixed(0) + " s ago",
  ]), (i) => (peers[i].self ? "self" : ""));
}

function mergeRun(run) {
  if (!run) return;
  if (run.run_id !== state.runId) {
    state.runId = run.run_id;
    state.points = new Map();
  }
  for (const p of run.points) state.points.set(p.epoch, p);
}

function renderRun(run, status) {
  $("run-none").hidden = !!run;
  if (!run) return;
  const points = [...state.points.values()].sort((a, b) => a.epoch - b.epoch);
  const last = points[points.length - 1] || {};
  const trainer = (status && status.training && status.training.trainer) || null;
  $("run-name").textContent = run.name;
  fillFields($("run-fields"), [
    ["run id", run.run_id],
    ["progress", "epoch " + text(trainer ? trainer.epoch : last.epoch) + (run.max_epochs ? " of " + run.max_epochs : " (no end)")],
    ["swarm epoch", trainer ? trainer.global_epoch : "-"],
    ["status", trainer ? trainer.status : "not training it now"],
    ["loss (this node)", num(trainer ? trainer.loss : last.loss)],
    ["loss (swarm)", num(last.swarm_loss)],
    ["samples/s", num(trainer ? trainer.samples_per_second : last.samples_per_second, 1) + " here, " + num(last.swarm_samples_per_second, 1) + " in the swarm"],
    ["peers training", text(last.peers)],
    ["this node's share", typeof last.share === "number" ? (100 * last.share).toFixed(0) + " % of the swarm's samples/s" : "-"],
    ["ETA", run.eta_s === null ? (run.max_epochs ? "not known yet" : "the run has no end") : duration(run.eta_s)],
    ["epochs recorded", points.length],
  ]);
  lineChart($("loss-chart"), [
    { cls: "s-self", points: points.filter((p) => p.loss !== null).map((p) => [p.epoch, p.loss]) },
    { cls: "s-swarm", points: points.filter((p) => p.swarm_loss !== null).map((p) => [p.epoch, p.swarm_loss]) },
  ], "epoch", "loss");
  const recent = points.slice(-RECENT_EPOCHS).reverse();
  fillTable($("epochs"), recent.map((p) => [
    p.epoch, p.peers, num(p.loss), num(p.swarm_loss), num(p.samples_per_second, 1), num(p.swarm_samples_per_second, 1),
    p.samples, typeof p.share === "number" ? (100 * p.share).toFixed(0) + " %" : "-",
  ]));
}

async function loadCredits() {
  if (!state.status) return;
  state.creditsShownFor = state.status.credits;
  let c;
  try {
    c = await api("GET", "credits");
  } catch (e) {
    fillFields($("credit-fields"), [["error", e.message]]);
    return;
  }
  fillFields($("credit-fields"), [
    ["peer id", c.peer_id],
    ["balance", c.credits + " credits"],
    ["samples paid", c.samples],
    ["payouts received", c.receipts],
    ["clawed back by audits", (c.clawed_back_micro_credits / 1e6) + " credits"],
    ["open claims", c.pending_claims === null ? "none (not training)" :
      c.pending_claims.map((p) => "epoch " + p.epoch + ": " + p.witnesses + " witnesses").join(", ") || "none"],
  ]);
  lineChart($("balance-chart"), [{ cls: "s-balance", points: c.series.map(([t, micro]) => [t, micro / 1e6]) }],
    "time", "credits", (t) => new Date(t).toLocaleTimeString());
  fillTable($("receipts"), c.recent_receipts.map((r) => [
    r.time, r.run_id.slice(0, 12), r.epoch, r.samples, r.credits, r.counted ? "yes" : "no",
  ]));
}

async function searchLedger() {
  const by = $("ledger-by").value, q = $("ledger-q").value.trim();
  $("entry-detail").hidden = true;
  if (!q) return;
  $("ledger-msg").textContent = "searching…";
  let result;
  try {
    result = await api("GET", "ledger/entries?" + new URLSearchParams({ [by]: q, limit: "200" }));
  } catch (e) {
    $("ledger-msg").textContent = e.message;
    fillTable($("entries"), []);
    return;
  }
  const rows = result.entries;
  $("ledger-msg").textContent = rows.length + " entries";
  fillTable($("entries"), rows.map((r) => {
    const link = span(r.id.slice(0, 16), "id");
    link.addEventListener("click", () => showEntry(r.id));
    return [r.seq, link, r.kind, r.author.slice(0, 16) + "…", r.time, r.run_id ? r.run_id.slice(0, 12) : "-",
      r.epoch === undefined ? "-" : r.epoch,
      r.credits === undefined ? "-" : r.credits + (r.counted === false ? " (not counted)" : ""),
      span(r.verify, r.verify === "ok" ? "ok" : "bad")];
  }));
  if (by === "id" && rows.length === 1) showDetail(rows[0].entry);
}

async function showEntry(id) {
  try {
    const result = await api("GET", "ledger/entries?" + new URLSearchParams({ id }));
    showDetail(result.entries[0].entry);
  } catch (e) {
    $("ledger-msg").textContent = e.message;
  }
}

function showDetail(entry) {
  $("entry-detail").textContent = JSON.stringify(entry, null, 2);
  $("entry-detail").hidden = false;
}

// ---- live updates ---------------------------------------------------------------------------------

function onSnapshot(event) {
  const data = JSON.parse(event.data);
  if (data.error) {
    $("conn").textContent = "update failed: " + data.error;
    return;
  }
  state.status = data.status;
  $("conn").textContent = "live";
  $("conn").className = "conn live";
  renderNode(data.status);
  renderPeers(data.peers);
  mergeRun(data.run);
  renderRun(data.run, data.status);
  if (!$("view-credits").hidden && data.status.credits !== state.creditsShownFor) loadCredits();
  if (!$("view-ledger").hidden && !state.ledgerLoaded) showView();
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", onSnapshot);
  events.addEventListener("error", () => {
    $("conn").textContent = "reconnecting…";
    $("conn").className = "conn";
  });
}

async function setPaused(paused) {
  $("pause-msg").textContent = paused ? "pausing…" : "resuming…";
  $("pause").disabled = $("resume").disabled = true;
  try {
    await api("POST", paused ? "pause" : "resume");
    $("pause-msg").textContent = paused ? "paused: training stops after the current step" : "resumed";
  } catch (e) {
    $("pause-msg").textContent = e.message;
  }
}

async function verifyLedger() {
  $("verify-result").textContent = "verifying…";
  try {
    const r = await api("POST", "ledger/verify");
    $("verify-result").replaceChildren(span(r.ok ? "ok: " + r.entries + " entries verified"
      : r.problem_count + " problem(s) in " + r.entries + " entries", r.ok ? "ok" : "bad"));
  } catch (e) {
    $("verify-result").textContent = e.message;
  }
}

async function start() {
  window.addEventListener("hashchange", showView);
  $("pause").addEventListener("click", () => setPaused(true));
  $("resume").addEventListener("click", () => setPaused(false));
  $("verify").addEventListener("click", verifyLedger);
  $("ledger-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchLedger();
  });
  showView();
  try {
    state.csrf = (await api("GET", "session")).csrf;
    const run = await api("GET", "history");
    mergeRun(run);
  } catch (e) {
    $("conn").textContent = e.message;
  }
  connect();
}

document.addEventListener("DOMContentLoaded", start);
