// The dashboard: polls the head's REST API and draws what it says. One poll at a time: the
// next starts 2 s after the last one ended, later after errors or slow answers (a head
// slow to answer is a busy head; asking it more often would add to its load).
// A table draws at most a few hundred rows (a cluster may have 10,000 replicas); the filter
// box shows the deployments whose names contain its text. The head chooses what is drawn,
// so a poll reads what the page draws, not the whole cluster:
// /api/status?limit=200&replicas=5&contains=TEXT: schedulers, the deployments drawn (those
//   that need a look first), 5 replicas of each (with the others counted by state), what
//   was left out, recent cluster events.
// /api/series?window_s=N&limit=20&contains=TEXT: the charts drawn (those with errors first,
//   then the busiest): columns of time, rate, error rate, latency, null where there was no
//   traffic or no report (drawn as gaps); and each deployment's latest rate and error rate.
// /api/events: deployment lifecycle events, kept in the head's store (quietly none on 404).
"use strict";
// The gap between the end of one poll and the start of the next: 2 s, or the page's
// ?refresh=S (0.5 to 60 s).
const PERIOD_MS = (() => {
  const asked = Number(new URLSearchParams(location.search).get("refresh"));
  return asked > 0 ? 1000 * Math.min(60, Math.max(0.5, asked)) : 2000;
})();
const MAX_GAP_MS = 30000;  // the longest gap, after errors or slow answers
const FETCH_TIMEOUT_MS = 20000;  // a request the head has not answered by then fails
const MAX_DEPLOYMENT_ROWS = 200;
const MAX_REPLICA_ROWS = 200;
const REPLICAS_PER_DEPLOYMENT = 5;  // more of one deployment's replicas: one row counting them
const MAX_CHARTS = 20;  // deployments with charts
const RANGES = [[300, "5 min"], [900, "15 min"], [3600, "1 h"]];
const KIND_COLOURS = {
  created: "#1a7f37", updated: "#1f6feb", restarted: "#8250df",
  failed: "#cf222e", rolled_back: "#bc4c00", scaled: "#0a7d8c", deleted: "#6b7385",
};
const view = {range: 300, start: 0, end: 0, lifecycle: []};
const charts = {};  // deployment -> {box, rate, latency, errors} (uPlot instances)
const sync = uPlot.sync("shoal");
window.shoal = {charts, view};  // for a look from the browser's console (and the tests)

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}
function fmt(n, digits = 1) { return Number(n).toFixed(digits).replace(/\.0+$/, ""); }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function percent(x) { return x === null || x === undefined ? "–" : fmt(x * 100, 1) + "%"; }

// ------------------------------------------------------------------ range
const rangeSelect = document.getElementById("range");
function fillRanges(keepS) {
  const wanted = RANGES.filter(([s]) => s <= keepS);
  if (rangeSelect.options.length === wanted.length) return;
  rangeSelect.replaceChildren(...wanted.map(([s, label]) => el("option", {value: String(s)}, label)));
  rangeSelect.value = String(view.range);
}
rangeSelect.addEventListener("change", () => { view.range = Number(rangeSelect.value); pollNow(); });

// ------------------------------------------------------------------ bounds
const filterBox = document.getElementById("filter");
let filterTimer = null;
filterBox.addEventListener("input", () => {  // drawn now from what was read, then asked again
  draw();
  clearTimeout(filterTimer);
  filterTimer = setTimeout(pollNow, 300);
});
function wanted(name) { return name.includes(filterBox.value.trim()); }

// At most ``max`` of ``list``, in its order: those ``urgent`` says need a look first, then
// the others from the start. {shown, hidden: how many were left out}.
function bounded(list, max, urgent) {
  if (list.length <= max) return {shown: list, hidden: 0};
  const picked = new Set(list.filter(urgent).slice(0, max));
  for (const x of list) {
    if (picked.size >= max) break;
    picked.add(x);
  }
  return {shown: list.filter(x => picked.has(x)), hidden: list.length - picked.size};
}

// A row saying what a table left out.
function moreRow(columns, what, text) {
  return el("tr", {class: "more", "data-more": what}, el("td", {colspan: String(columns), class: "muted"}, text));
}
function countStates(replicas, counted = {}) {
  const n = {...counted};
  for (const r of replicas) n[r.state] = (n[r.state] || 0) + 1;
  return Object.entries(n).map(([state, k]) => `${k} ${state}`).join(", ");
}
function needsLook(d) { return Boolean(d.pending_reason) || d.ready_replicas < d.target_replicas; }

// ------------------------------------------------------------------ tables
function renderSchedulers(list) {
  const body = document.querySelector("#schedulers tbody");
  body.replaceChildren(...list.map(s => el("tr", {"data-scheduler": s.id},
    el("td", {}, s.id),
    el("td", {class: "state " + s.state, title: s.routes_lagging ? "late taking routing tables: its requests may follow an older one" : ""},
       s.routes_lagging ? `${s.state} (tables late)` : s.state),
    el("td", {}, s.address),
    el("td", {}, `${fmt(s.allocated.cpus, 2)} / ${fmt(s.capacity.cpus, 2)}`),
    el("td", {}, `${fmt(s.allocated.memory_mb, 0)} / ${fmt(s.capacity.memory_mb, 0)}`),
    el("td", {}, `${fmt(s.allocated.gpus, 2)} / ${fmt(s.capacity.gpus, 2)}`),
    el("td", {}, `${s.replicas} / ${s.max_replicas || "-"}`),
    el("td", {}, `${fmt(s.last_seen_s)} s ago`))));
}

// ``hidden``: how many more the head left out (it sends those that need a look first).
function renderDeployments(all, latest, more) {
  const body = document.querySelector("#deployments tbody");
  const {shown: list, hidden: here} = bounded(all, MAX_DEPLOYMENT_ROWS, needsLook);
  const hidden = here + more;
  const rows = list.map(d => {
    const s = latest[d.name];
    const w = s ? s.window : null;
    const rate = s ? s.rate : null;
    const state = el("td", {});
    if (d.pending_reason) {
      const failed = d.pending_reason.startsWith("FAILED");
      state.append(el("div", {class: failed ? "pending FAILED" : "pending"}, d.pending_reason));
    }
    return el("tr", {"data-deployment": d.name},
      el("td", {}, d.name), el("td", {}, d.spec.backend || ""),
      el("td", {class: "count", "data-ready": d.ready_replicas, "data-target": d.target_replicas},
        `${d.ready_replicas} / ${d.target_replicas}`),
      el("td", {class: "rate"}, rate === null ? "–" : fmt(rate, 1)),
      el("td", {class: "error-rate", "data-requests": w ? w.requests : 0, "data-errors": w ? w.errors : 0,
                title: w ? `${w.errors} errors in ${w.requests} requests over the last ${fmt(w.seconds, 0)} s; `
                  + `a rate is shown from ${w.min_requests} requests` : "no requests seen"},
        percent(w ? w.error_rate : null)),
      state);
  });
  if (hidden) rows.push(moreRow(6, "deployments", `${hidden} more deployments: filter by name to see them`));
  body.replaceChildren(...rows);
}

// Traffic routes (shoal route): a row per target and shadow, with that deployment's own rates.
function renderRoutes(routes, latest) {
  const rows = [];
  for (const r of routes) {
    const targets = Object.entries(r.targets).map(([t, w]) => [t, w + "%"]);
    if (r.shadow) targets.push([r.shadow, "shadow"]);
    for (const [target, share] of targets) {
      const s = latest[target];
      const w = s ? s.window : null;
      const rate = s ? s.rate : null;
      rows.push(el("tr", {"data-route": r.name, "data-target": target},
        el("td", {}, r.name), el("td", {}, target), el("td", {class: "share"}, share),
        el("td", {class: "rate"}, rate === null ? "–" : fmt(rate, 1)),
        el("td", {class: "error-rate"}, percent(w ? w.error_rate : null))));
    }
  }
  document.querySelector("#routes tbody").replaceChildren(...rows);
  document.getElementById("no-routes").style.display = rows.length ? "none" : "";
}

// Up to REPLICAS_PER_DEPLOYMENT rows of each deployment (those not READY, or with a message,
// first), then one row counting the rest by state; the deployments whose rows fit in
// MAX_REPLICA_ROWS (those that need a look first), then one row counting those left out
// (with ``more``: the deployments the head left out). The head lists a few replicas of each
// deployment and counts the others by state (``more_replicas``).
function total(d) { return d.replicas.length + Object.values(d.more_replicas || {}).reduce((a, b) => a + b, 0); }
function renderReplicas(list, more) {
  const body = document.querySelector("#replicas tbody");
  const groups = list.filter(d => total(d) > 0);
  const cost = d => Math.min(total(d), REPLICAS_PER_DEPLOYMENT + 1);
  const chosen = new Set();
  let used = 0;
  for (const d of [...groups.filter(needsLook), ...groups.filter(d => !needsLook(d))]) {
    if (used + cost(d) > MAX_REPLICA_ROWS) break;
    chosen.add(d);
    used += cost(d);
  }
  const rows = [];
  for (const d of groups.filter(d => chosen.has(d))) {
    const {shown} = bounded(d.replicas, REPLICAS_PER_DEPLOYMENT, r => r.state !== "READY" || Boolean(r.message));
    const hidden = total(d) - shown.length;
    for (const r of shown) {
      rows.push(el("tr", {"data-replica": r.id, "data-deployment": d.name},
        el("td", {}, d.name), el("td", {}, r.id), el("td", {class: "state " + r.state}, r.state),
        el("td", {}, r.scheduler), el("td", {class: "pid"}, r.pid ? String(r.pid) : "–"),
        el("td", {class: "in-flight"}, String(r.in_flight)), el("td", {class: "queued"}, String(r.queued)),
        el("td", {class: "message"}, r.message || "")));
    }
    if (hidden) {
      const rest = countStates(d.replicas.filter(r => !shown.includes(r)), d.more_replicas);
      rows.push(moreRow(8, "replicas-of:" + d.name, `${d.name}: ${hidden} more replicas (${rest})`));
    }
  }
  const left = groups.filter(d => !chosen.has(d));
  const leftCount = left.length + more.deployments_with_replicas;
  if (leftCount) {
    const count = left.reduce((n, d) => n + total(d), 0) + more.replicas;
    rows.push(moreRow(8, "replicas", `${count} more replicas of ${leftCount} more deployments: filter by name to see them`));
  }
  body.replaceChildren(...rows);
  document.getElementById("no-replicas").hidden = rows.length > 0;
}

function renderEvents(list) {
  const ul = document.getElementById("events");
  ul.replaceChildren(...list.slice().reverse().slice(0, 40).map(e =>
    el("li", {"data-kind": e.kind}, el("time", {}, clock(e.at)), e.message)));
}

function renderLifecycle(list) {
  const ul = document.getElementById("lifecycle");
  ul.replaceChildren(...list.slice().reverse().slice(0, 100).map(e => el("li",
    {"data-kind": e.kind, "data-deployment": e.deployment},
    el("time", {}, clock(e.time)),
    el("span", {class: "kind", style: `color:${KIND_COLOURS[e.kind] || "inherit"}`}, e.kind.replace("_", " ")),
    el("b", {}, e.deployment),
    e.revision === null || e.revision === undefined ? "" : el("span", {class: "muted"}, ` rev ${e.revision}`),
    " ", e.message || "")));
  document.getElementById("no-lifecycle").hidden = list.length > 0;
}

// ------------------------------------------------------------------ charts
// Vertical lines at the deployment's lifecycle events, on every chart of it.
function markers(name) {
  return u => {
    const ctx = u.ctx;
    const {top, height} = u.bbox;
    for (const e of view.lifecycle) {
      if (e.deployment !== name || e.time < view.start || e.time > view.end) continue;
      const x = Math.round(u.valToPos(e.time, "x", true));
      ctx.save();
      ctx.strokeStyle = KIND_COLOURS[e.kind] || "#6b7385";
      ctx.lineWidth = 2 * devicePixelRatio;
      ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
      ctx.restore();
    }
  };
}

// A value with no neighbours draws no line: a dot, so that it is seen.
function lone(u, si) {
  const d = u.data[si];
  const out = [];
  for (let i = 0; i < d.length; i++) {
    if (d[i] !== null && (i === 0 || d[i - 1] === null) && (i === d.length - 1 || d[i + 1] === null)) out.push(i);
  }
  return out;
}

function chart(plots, name, title, series, width) {
  const holder = el("div", {class: "plot"}, el("h4", {}, title));
  plots.append(holder);
  return new uPlot({
    width, height: 140, series: [{}, ...series.map(s => ({spanGaps: false, points: {show: true, filter: lone}, ...s}))],
    scales: {x: {time: true, auto: false}},
    axes: [{}, {size: 50}], legend: {live: false},
    cursor: {sync: {key: sync.key}}, hooks: {draw: [markers(name)]},
  }, [[], ...series.map(() => [])], holder);
}

// Three charts side by side in each deployment's row.
function plotWidth() {
  const root = document.getElementById("charts");
  return Math.max(260, Math.floor((root.clientWidth - 2 * 12) / 3));
}
window.addEventListener("resize", () => {
  const width = plotWidth();
  for (const c of Object.values(charts)) {
    for (const k of ["rate", "latency", "errors"]) c[k].setSize({width, height: 140});
  }
});

// How many unbroken runs of values a column has: what the chart draws as separate lines.
function segments(column) {
  let n = 0, inRun = false;
  for (const v of column) {
    if (v !== null && !inRun) n++;
    inRun = v !== null;
  }
  return n;
}

// The head sends at most MAX_CHARTS (those with errors first), ``left`` counting the others.
function renderSeries(all, left) {
  const root = document.getElementById("charts");
  const traffic = Object.keys(all).filter(n => all[n].at.length > 0 && wanted(n)).sort();
  document.getElementById("no-traffic").hidden = traffic.length > 0 || left > 0;
  const {shown: names, hidden: here} = bounded(traffic, MAX_CHARTS, n => all[n].window.errors > 0);
  const hidden = here + left;
  const more = document.getElementById("more-charts");
  more.hidden = !hidden;
  more.textContent = `${hidden} more deployments with traffic: filter by name to see their charts`;
  const keep = new Set(names);
  for (const name of Object.keys(charts)) {
    if (keep.has(name)) continue;
    for (const k of ["rate", "latency", "errors"]) charts[name][k].destroy();
    charts[name].box.remove();
    delete charts[name];
  }
  for (const name of names) {
    const s = all[name];
    let c = charts[name];
    if (!c) {
      const plots = el("div", {class: "plots"});
      const box = el("div", {class: "chart", "data-deployment": name}, el("h3", {}, name), plots);
      root.append(box);
      const width = plotWidth();
      c = charts[name] = {
        box,
        rate: chart(plots, name, "requests / s", [{label: "req/s", stroke: "#1f6feb"}], width),
        latency: chart(plots, name, "latency ms (none without requests)",
          [{label: "p50", stroke: "#1a7f37"}, {label: "p99", stroke: "#9a6700"}], width),
        errors: chart(plots, name, `error rate % (over ${fmt(s.window.seconds, 0)} s, from ${s.window.min_requests} requests)`,
          [{label: "errors %", stroke: "#cf222e"}], width),
      };
    }
    const pct = s.error_rate.map(v => v === null ? null : v * 100);
    for (const [u, data] of [[c.rate, [s.at, s.rate]], [c.latency, [s.at, s.p50_ms, s.p99_ms]], [c.errors, [s.at, pct]]]) {
      u.setData(data, false);
      u.setScale("x", {min: view.start, max: view.end});
    }
    const shown = view.lifecycle.filter(e => e.deployment === name && e.time >= view.start && e.time <= view.end);
    c.box.dataset.points = String(s.at.filter((_, i) => s.requests[i] !== null).length);
    c.box.dataset.segments = String(segments(s.p50_ms));
    c.box.dataset.xMin = String(c.rate.scales.x.min);
    c.box.dataset.xMax = String(c.rate.scales.x.max);
    c.box.dataset.markers = String(shown.length);
  }
}

// ------------------------------------------------------------------ polling
// With tokens on, the API wants "Authorization: Bearer <token>": asked for once, kept in localStorage.
const TOKEN_KEY = "shoal.token";
class NeedToken extends Error {}
class Missing extends Error {}
class HeadError extends Error {  // any other answer than 200: over a rate limit, busy, failed
  constructor(message, retryAfterMs) { super(message); this.retryAfterMs = retryAfterMs; }
}
async function api(path) {
  const token = localStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, {
    headers: token ? {Authorization: "Bearer " + token} : {},
    signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
  });
  if (r.status === 401 || r.status === 403) {
    throw new NeedToken((await r.json().catch(() => ({}))).error || r.statusText);
  }
  if (r.status === 404) throw new Missing(path);
  if (!r.ok) {
    const why = (await r.json().catch(() => ({}))).error || r.statusText;
    throw new HeadError(`${path}: ${r.status} ${why}`, 1000 * (Number(r.headers.get("Retry-After")) || 0));
  }
  return r.json();
}
document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  localStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
  document.getElementById("login").style.display = "none";
  poller.gap = PERIOD_MS;
  pollNow();
});

// Lifecycle events, oldest first; none (quietly) where the head has no such endpoint.
async function lifecycle() {
  try {
    const doc = await api("/api/events?limit=200");
    return Array.isArray(doc.events) ? doc.events.filter(e => typeof e.time === "number") : [];
  } catch (err) {
    if (err instanceof Missing) return [];
    throw err;
  }
}

// Traffic routes; none (quietly) where the head has no such endpoint.
async function routes() {
  try {
    const doc = await api("/api/routes");
    return Array.isArray(doc.routes) ? doc.routes : [];
  } catch (err) {
    if (err instanceof Missing) return [];
    throw err;
  }
}

// What the last poll read, drawn again when the filter changes.
let last = null;
function draw() {
  if (last === null) return;
  const {status, series, events, traffic} = last;
  fillRanges(series.keep_s);
  view.end = series.now;
  view.start = series.now - series.window_s;
  view.lifecycle = events;
  const deployments = status.deployments.filter(d => wanted(d.name));
  // A head from before the bounded reads sends everything and no counts of what it left out.
  const more = status.more || {deployments: 0, deployments_with_replicas: 0, replicas: 0};
  const latest = series.latest || Object.fromEntries(Object.entries(series.deployments).map(
    ([n, s]) => [n, {window: s.window, rate: s.rate.length ? s.rate[s.rate.length - 1] : null}]));
  renderSchedulers(status.schedulers);
  renderDeployments(deployments, latest, more.deployments);
  renderRoutes(traffic, latest);
  renderReplicas(deployments, more);
  renderEvents(status.events);
  renderLifecycle(events);
  renderSeries(series.deployments, series.more || 0);
}

// One poll: fetch, then draw. True when the head answered; false, after saying why, when it
// did not (or not well); a Retry-After it sent is kept in ``retryAfterMs``.
let retryAfterMs = 0;
async function refresh() {
  try {
    const contains = encodeURIComponent(filterBox.value.trim());
    const [status, series, events, traffic] = await Promise.all([
      api(`/api/status?limit=${MAX_DEPLOYMENT_ROWS}&replicas=${REPLICAS_PER_DEPLOYMENT}&contains=${contains}`),
      api(`/api/series?window_s=${view.range}&limit=${MAX_CHARTS}&contains=${contains}`),
      lifecycle(), routes()]);
    last = {status, series, events, traffic};
    draw();
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    return true;
  } catch (err) {
    if (err instanceof HeadError) retryAfterMs = err.retryAfterMs;
    if (err instanceof NeedToken) {
      document.getElementById("login").style.display = "flex";
      document.getElementById("updated").textContent = err.message;
      return false;
    }
    document.getElementById("updated").textContent =
      err instanceof HeadError ? "the head answered " + err.message : "head unreachable: " + err;
    return false;
  }
}

// Polls one after another, never two at once: the next is due ``gap`` ms after one ends,
// PERIOD_MS after a quick answer; after a slow one twice as long as it took (a head taking
// 3 s to answer is asked every 9 s); after a failure twice the gap before (and no sooner
// than a Retry-After says); at most MAX_GAP_MS.
const poller = {gap: PERIOD_MS, timer: null, busy: false, again: false};
async function poll() {
  poller.timer = null;
  poller.busy = true;
  retryAfterMs = 0;
  const started = performance.now();
  const ok = await refresh();
  const took = performance.now() - started;
  poller.busy = false;
  const wait = ok ? Math.max(PERIOD_MS, 2 * took) : Math.max(2 * poller.gap, retryAfterMs);
  poller.gap = Math.min(MAX_GAP_MS, wait);
  if (!ok) document.getElementById("updated").textContent += ` (next try in ${fmt(poller.gap / 1000, 0)} s)`;
  if (poller.again) {  // asked for while this one ran: the range changed, a token was given
    poller.again = false;
    poll();
    return;
  }
  poller.timer = setTimeout(poll, poller.gap);
}
// A poll now (the range changed, a token was given), or right after the one that runs.
function pollNow() {
  if (poller.busy) {
    poller.again = true;
    return;
  }
  clearTimeout(poller.timer);
  poll();
}
poll();
