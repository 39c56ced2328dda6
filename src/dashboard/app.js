// The gpu-manager dashboard. It reads GET /gpu/status and GET /gpu/history once, then
// follows GET /gpu/events (Server-Sent Events): state changes, desired-state changes and
// actions are applied as they arrive. The event stream carries no memory figures, so
// each event (debounced) and a slow timer re-read /gpu/status for the VRAM bar, the GPU
// line and the timeline. Everything is drawn with the DOM and SVG; no library.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const WINDOW_MS = 15 * 60 * 1000;
const REFRESH_MS = 2000;
const ACTIONS_KEPT = 50;
const TOKEN_KEY = "gpu-manager-token";
// Okabe-Ito, in an order that keeps neighbours in a stack far apart.
const SERVICE_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
const OTHER_SERIES = [
  { key: "external_mb", label: "external", cls: "hatch-external", pattern: "p-external" },
  { key: "reclaiming_mb", label: "reclaiming", cls: "hatch-reclaiming", pattern: "p-reclaiming" },
];

const model = {
  status: null,
  clockSkewMs: 0, // the daemon's clock minus this browser's, as of the last status
  samples: [], // timeline samples, oldest first: {at_ms, phase, services, external_mb, reclaiming_mb}
  totalMb: 0,
  request: null, // the change in flight: {label, started, lines}
};

// ---- small DOM helpers -------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "onclick") node.addEventListener("click", value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

const byId = (id) => document.getElementById(id);
const daemonNow = () => Date.now() + model.clockSkewMs;
const mb = (value) => (value === null || value === undefined ? "-" : `${value} MB`);
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

function seconds(ms) {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function serviceColours(status) {
  const colours = {};
  Object.keys(status.services).sort().forEach((name, i) => {
    colours[name] = SERVICE_COLOURS[i % SERVICE_COLOURS.length];
  });
  return colours;
}

// ---- data --------------------------------------------------------------------------

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`GET ${path}: HTTP ${response.status}`);
  return response.json();
}

function sampleOf(status) {
  const services = {};
  for (const [name, s] of Object.entries(status.services)) {
    if (s.observed_vram_mb) services[name] = s.observed_vram_mb;
  }
  return {
    at_ms: status.observed_at_ms,
    phase: status.desired.phase,
    services,
    external_mb: status.vram.external_mb,
    reclaiming_mb: status.vram.reclaiming_mb,
  };
}

function addSample(sample) {
  const last = model.samples[model.samples.length - 1];
  if (!sample.at_ms || (last && sample.at_ms < last.at_ms + 900)) return;
  model.samples.push(sample);
  const oldest = sample.at_ms - WINDOW_MS;
  while (model.samples.length && model.samples[0].at_ms < oldest) model.samples.shift();
}

async function refreshStatus() {
  try {
    model.status = await getJson("/gpu/status");
    // Claims and demands end on the daemon's clock; the browser's may be off (another
    // host). The snapshot was taken snapshot_age_ms before the answer.
    model.clockSkewMs = model.status.observed_at_ms + (model.status.snapshot_age_ms || 0) - Date.now();
    model.totalMb = model.status.vram.total_mb || model.totalMb;
    addSample(sampleOf(model.status));
    render();
  } catch (error) {
    setConnection("reconnecting", String(error.message || error));
  }
}

async function loadHistory() {
  try {
    const history = await getJson("/gpu/history");
    model.totalMb = history.total_mb || model.totalMb;
    model.samples = history.samples;
    if (model.status) addSample(sampleOf(model.status));
    renderTimeline();
  } catch (error) {
    setConnection("reconnecting", String(error.message || error));
  }
}

let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer === null) {
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      refreshStatus();
    }, 150);
  }
}

// ---- the event stream --------------------------------------------------------------

function setConnection(state, detail) {
  const badge = byId("connection");
  badge.dataset.state = state;
  badge.textContent = detail ? `${state}: ${detail}` : state;
}

function connectEvents() {
  const source = new EventSource("/gpu/events");
  source.onopen = () => {
    setConnection("live");
    const badge = byId("connection");
    badge.dataset.connects = String(Number(badge.dataset.connects || 0) + 1);
    // After a daemon restart the page may have missed anything: read it all again.
    refreshStatus();
    loadHistory();
  };
  source.onmessage = (message) => applyEvent(JSON.parse(message.data));
  source.onerror = () => {
    setConnection("reconnecting");
    // The browser retries by itself unless the stream was refused outright.
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connectEvents, REFRESH_MS);
    }
  };
}

function applyEvent(event) {
  const status = model.status;
  switch (event.type) {
    case "state_changed":
      if (status && status.services[event.service]) {
        status.services[event.service].state = event.to;
        status.services[event.service].reason = event.reason;
      }
      progress(`${event.service}: ${event.from} -> ${event.to}`);
      break;
    case "action_started":
      progress(`${event.op} ${event.service}: ${event.reason}`);
      break;
    case "action_finished": {
      const a = event.action;
      if (status) {
        status.recent_actions.push(a);
        status.recent_actions = status.recent_actions.slice(-ACTIONS_KEPT);
      }
      const outcome = a.outcome.Ok !== undefined ? a.outcome.Ok : `FAILED: ${a.outcome.Err}`;
      progress(`${a.op} ${a.service} done in ${seconds(a.duration_ms)}: ${outcome}`);
      break;
    }
    case "desired_accepted":
      if (status) Object.assign(status.desired, {
        phase: event.phase, pinned: event.pinned, held: event.held, generation: event.generation,
      });
      progress(`desired state accepted (generation ${event.generation}): phase ${event.phase ?? "none"}`);
      break;
    case "config_reloaded":
      progress(`config reloaded (generation ${event.report.generation})`);
      break;
    case "config_refused":
      progress(`config reload refused: ${event.error}`);
      break;
    case "demand_started":
      progress(`${event.service}: demanded (a request came through its proxy)`);
      break;
    case "demand_ended":
      progress(`${event.service}: demand ended (no request for its idle_ms)`);
      break;
    case "desired_refused":
      progress(`desired-state file refused: ${event.error}`);
      break;
    case "lagged":
      progress(`(missed ${event.missed} events)`);
      break;
    default:
      break;
  }
  render();
  refreshSoon();
}

// ---- changes (POSTs) ---------------------------------------------------------------

function progress(line) {
  if (!model.request) return;
  const elapsed = ((performance.now() - model.request.started) / 1000).toFixed(2);
  model.request.lines.push(`[${elapsed.padStart(6)}s] ${line}`);
  renderProgress();
}

async function change(label, path) {
  byId("refusal").hidden = true;
  model.request = { label, started: performance.now(), lines: [], done: null };
  renderProgress();
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers });
  } catch (error) {
    showRefusal(`${label}: the daemon cannot be reached (${error.message || error})`, null);
    return;
  }
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status} without a JSON body` }));
  if (response.ok) {
    const count = (body.actions || []).length;
    model.request.done = response.status === 202
      ? `${label}: accepted (generation ${body.generation})`
      : `${label}: converged in ${seconds(body.duration_ms)} (generation ${body.generation}), ${count} action(s)`;
    renderProgress();
    refreshSoon();
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    const form = byId("token-form");
    form.hidden = false;
    form.dataset.retryLabel = label;
    form.dataset.retryPath = path;
    byId("token-input").focus();
  }
  const kind = body.kind ? ` ${body.kind}` : "";
  showRefusal(`${label} refused (HTTP ${response.status}${kind}): ${body.error}`, body);
}

function showRefusal(message, body) {
  const box = byId("refusal");
  box.replaceChildren(el("div", { class: "message", text: message }));
  if (body) box.append(el("pre", { text: JSON.stringify(body, null, 2) }));
  box.hidden = false;
  if (model.request) model.request.done = null;
  renderProgress();
}

function setupTokenForm() {
  const form = byId("token-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = byId("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    byId("token-input").value = "";
    form.hidden = true;
    if (form.dataset.retryPath) change(form.dataset.retryLabel, form.dataset.retryPath);
  });
}

// ---- rendering ---------------------------------------------------------------------

function render() {
  const status = model.status;
  if (!status) return;
  renderGpu(status);
  renderDesired(status);
  renderConfig(status.config);
  renderLease(status.lock);
  renderServices(status);
  renderActions(status.recent_actions);
  renderTimeline();
}

function renderGpu(status) {
  const gpu = status.gpu;
  const parts = [`${gpu.name || "unknown GPU"} (${gpu.source})`];
  if (gpu.temperature_c !== null) parts.push(`${gpu.temperature_c} °C`);
  if (gpu.utilization_pct !== null) parts.push(`${gpu.utilization_pct}% busy`);
  if (gpu.error) parts.push(`error: ${gpu.error}`);
  byId("gpu-line").textContent = parts.join(" · ");

  const v = status.vram;
  const colours = serviceColours(status);
  const total = v.total_mb || 1;
  const segments = [];
  for (const name of Object.keys(status.services).sort()) {
    const s = status.services[name];
    // A parked service holds its residual: observed, else (GPU not observed) as configured.
    const parked = s.state === "parked";
    const held = s.observed_vram_mb ?? (parked ? s.residual_mb : 0) ?? 0;
    if (held > 0) {
      segments.push(parked
        ? { label: `${name} (parked)`, mb: held, colour: colours[name], cls: "parked-segment" }
        : { label: name, mb: held, colour: colours[name] });
    }
  }
  segments.push({ label: "external", mb: v.external_mb, cls: "hatch-external" });
  segments.push({ label: "reclaiming", mb: v.reclaiming_mb, cls: "hatch-reclaiming" });
  const reserve = Math.min(v.reserve_mb, v.free_mb);
  segments.push({ label: "reserve", mb: reserve, cls: "hatch-reserve" });
  segments.push({ label: "free", mb: v.free_mb - reserve, cls: "free" });

  const bar = byId("vram-bar");
  bar.replaceChildren();
  const legend = byId("vram-legend");
  legend.replaceChildren();
  for (const s of segments) {
    const piece = el("div", { class: s.cls, title: `${s.label}: ${s.mb} MB`, "data-segment": s.label });
    piece.style.width = `${(100 * s.mb) / total}%`;
    // The colour only: a class's stripes (a parked residual) stay on top of it.
    if (s.colour) piece.style.backgroundColor = s.colour;
    bar.append(piece);
    const swatch = el("span", { class: `swatch ${s.cls || ""}` });
    if (s.colour) swatch.style.backgroundColor = s.colour;
    legend.append(el("li", { "data-segment": s.label }, swatch, `${s.label} ${s.mb} MB`));
  }
  bar.setAttribute("aria-label", segments.map((s) => `${s.label} ${s.mb} MB`).join(", ") + ` of ${v.total_mb} MB`);
}

function knownPhases(status) {
  const phases = new Set();
  for (const s of Object.values(status.services)) for (const p of s.phases) phases.add(p);
  return [...phases].sort((a, b) => a - b);
}

// The config in force: when it was loaded, and a refused reload's error.
function renderConfig(config) {
  const line = byId("config-line");
  if (!config) return;
  const parts = [`config ${config.path}`, `generation ${config.generation}`, `loaded at ${clock(config.loaded_at_ms)}`];
  if (config.error) parts.push(`last reload refused: ${config.error}`);
  line.textContent = parts.join(" · ");
  line.classList.toggle("refused", Boolean(config.error));
}

function renderDesired(status) {
  const d = status.desired;
  const converged = d.converged_generation >= d.generation ? "converged" : `converging (at ${d.converged_generation})`;
  const line = [`phase ${d.phase ?? "none"}`, `pinned [${d.pinned.join(", ")}]`, `held [${d.held.join(", ")}]`,
    `generation ${d.generation}, ${converged}`];
  if (d.error) line.push(`desired-state file refused: ${d.error}`);
  byId("desired-line").textContent = line.join(" · ");
  // Buttons are built once and then only updated: one replaced under the pointer would
  // lose the click.
  const controls = byId("phase-controls");
  const phases = knownPhases(status);
  if (controls.dataset.phases !== phases.join(",")) {
    controls.dataset.phases = phases.join(",");
    controls.replaceChildren(...phases.map((phase) => el("button", {
      type: "button",
      "data-phase": phase,
      text: `Prepare phase ${phase}`,
      onclick: () => change(`phase ${phase}`, `/gpu/prepare-phase/${phase}`),
    })));
  }
  for (const button of controls.children) {
    button.setAttribute("aria-pressed", String(d.phase === Number(button.dataset.phase)));
  }
}

function renderProgress() {
  const box = byId("progress");
  const request = model.request;
  if (!request) {
    box.replaceChildren();
    return;
  }
  box.replaceChildren(el("div", { text: `${request.label}:` }), ...request.lines.map((line) => el("div", { text: line })));
  if (request.done) box.append(el("div", { class: "done", text: request.done }));
}

function renderLease(lock) {
  const facts = [
    ["holder", lock.holder ? `${lock.holder}${lock.ours ? " (this daemon)" : ""}` : "free"],
    ["role", lock.role || "-"],
    ["reachable", lock.reachable === null ? "not asked yet" : lock.reachable ? "yes" : `no${lock.error ? `: ${lock.error}` : ""}`],
    ["backend", lock.key ? `${lock.backend} (key ${lock.key})` : lock.backend],
  ];
  if (lock.summary) facts.push(["summary", lock.summary]);
  if (lock.last_refusal) facts.push(["last refusal", `HTTP ${lock.last_refusal.http_status} at ${clock(lock.last_refusal.at_ms)}: ${lock.last_refusal.error}`]);
  byId("lease").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { "data-fact": name, text: value })]));
}

const SERVICE_CELLS = ["name", "state", "declared", "observed", "learned", "park", "residual", "priority", "phases",
  "wanted", "proxy", "reason", "restarts", "where", "error"];

// One row per service, built once with its buttons, then updated cell by cell.
function serviceRow(name) {
  const cells = SERVICE_CELLS.map((cell) => el("td", { "data-cell": cell }));
  cells[0].textContent = name;
  for (const cell of ["declared", "observed", "learned", "residual", "priority", "restarts"]) cells[SERVICE_CELLS.indexOf(cell)].className = "num";
  cells[SERVICE_CELLS.indexOf("reason")].className = "reason";
  cells[SERVICE_CELLS.indexOf("error")].className = "error";
  cells[SERVICE_CELLS.indexOf("state")].append(el("span", { class: "state" }));
  const controls = el("div", { class: "controls" },
    el("button", { type: "button", "data-action": "start", "data-service": name, text: "Start",
      onclick: () => change(`start ${name}`, `/gpu/service/${name}/start`) }),
    el("button", { type: "button", "data-action": "stop", "data-service": name, text: "Stop",
      onclick: () => change(`stop ${name}`, `/gpu/service/${name}/stop`) }));
  return el("tr", { "data-service": name }, ...cells, el("td", {}, controls));
}

function renderServices(status) {
  const d = status.desired;
  const names = Object.keys(status.services).sort();
  const body = byId("services").tBodies[0];
  if (body.dataset.names !== names.join(",")) {
    body.dataset.names = names.join(",");
    body.replaceChildren(...names.map(serviceRow));
  }
  for (const row of body.rows) {
    const name = row.dataset.service;
    const s = status.services[name];
    const claims = s.claims || [];
    const demanded = Boolean(s.proxy && s.proxy.demanded);
    const wanted = claims.length ? "claimed" : d.pinned.includes(name) ? "pinned" : d.held.includes(name) ? "held"
      : demanded ? "demanded" : s.wanted ? "yes" : "no";
    const text = {
      declared: mb(s.declared_vram_mb),
      observed: mb(s.observed_vram_mb),
      learned: mb(s.learned_peak_mb),
      park: s.park ? (s.park_error ? `${s.park} (cannot park: stopped instead)` : s.park) : "-",
      residual: mb(s.residual_mb),
      priority: String(s.priority),
      phases: s.phases.join(", ") || "-",
      wanted,
      reason: s.reason || "",
      restarts: String(s.restarts),
      where: s.container ? s.container : s.pids.join(", ") || "-",
      error: s.last_error || "",
    };
    for (const [cell, value] of Object.entries(text)) row.querySelector(`[data-cell="${cell}"]`).textContent = value;
    row.querySelector('[data-cell="learned"]').title = s.footprint_warning || "";
    const parkTimes = [s.parked_at_ms && `parked at ${clock(s.parked_at_ms)}`, s.resumed_at_ms && `resumed at ${clock(s.resumed_at_ms)}`];
    row.querySelector('[data-cell="park"]').title = s.park_error || parkTimes.filter(Boolean).join(", ");
    renderClaims(row.querySelector('[data-cell="wanted"]'), claims);
    renderProxy(row.querySelector('[data-cell="proxy"]'), s.proxy);
    const badge = row.querySelector(".state");
    badge.className = `state state-${s.state}`;
    badge.textContent = s.state;
  }
}

// A claim's holder and the time it has left, counted down between refreshes from its
// `until` (docs/ARCHITECTURE.md, "Claims").
function renderClaims(cell, claims) {
  cell.append(...claims.map((c) => countdownOf("claim", c.holder, Date.parse(c.until))));
  tickCountdowns(cell);
}

// A proxied service's listen address, its requests in flight and waiting, and its
// demand: counted down like a claim while it would end by itself (docs/ARCHITECTURE.md,
// "The demand proxy"). The status gives no end while requests are under way.
function renderProxy(cell, proxy) {
  if (!proxy) {
    cell.textContent = "-";
    return;
  }
  cell.title = `forwards to ${proxy.upstream}` +
    (proxy.last_request_ms ? `; last request at ${clock(proxy.last_request_ms)}` : "");
  const traffic = [`${proxy.in_flight} in flight`, `${proxy.waiting} waiting`];
  if (proxy.upgraded) traffic.push(`${proxy.upgraded} upgraded`);
  let demand;
  if (!proxy.demanded) demand = el("div", { class: "demand", text: "not demanded" });
  else if (proxy.demanded_until_ms === null) {
    const inUse = proxy.in_flight + proxy.waiting + proxy.upgraded > 0;
    demand = el("div", { class: "demand", text: inUse ? "demanded while in use" : "demanded, no end (idle_ms: null)" });
  } else demand = countdownOf("demand", "demanded", proxy.demanded_until_ms);
  cell.replaceChildren(
    el("div", { class: "proxy-listen", text: proxy.listen }),
    el("div", { class: "proxy-traffic", "data-in-flight": proxy.in_flight, "data-waiting": proxy.waiting,
      text: traffic.join(" · ") }),
    demand);
  tickCountdowns(cell);
}

// An element that `tickCountdowns` keeps saying `LABEL: m:ss left` until `untilMs`, a
// time on the daemon's clock.
function countdownOf(cls, label, untilMs) {
  return el("div", { class: `${cls} countdown`, "data-label": label, "data-until-ms": untilMs });
}

function tickCountdowns(root) {
  const now = daemonNow();
  for (const node of root.querySelectorAll(".countdown")) {
    const left = Math.max(0, Number(node.dataset.untilMs) - now);
    node.textContent = `${node.dataset.label}: ${countdown(left)} left`;
  }
}

function countdown(ms) {
  const total = Math.ceil(ms / 1000);
  const [h, m, s] = [Math.floor(total / 3600), Math.floor(total / 60) % 60, total % 60];
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(s)}` : `${m}:${two(s)}`;
}

function renderActions(actions) {
  const rows = actions.slice(-ACTIONS_KEPT).reverse().map((a) => {
    const ok = a.outcome.Ok !== undefined;
    return el("tr", {},
      el("td", { text: clock(a.finished_at_ms) }),
      el("td", { class: `op-${a.op}`, "data-op": a.op, text: a.op }),
      el("td", { text: a.service }),
      el("td", { class: "num", text: seconds(a.duration_ms) }),
      el("td", { class: ok ? "outcome-ok" : "outcome-err", text: ok ? a.outcome.Ok : a.outcome.Err,
        title: a.busy ? `its drain probe answered ${JSON.stringify(a.busy)}` : undefined }),
      el("td", { class: "reason", text: a.reason }));
  });
  byId("actions").tBodies[0].replaceChildren(...rows);
}

// The timeline: one stacked area per service (then external and reclaiming) over the
// last 15 minutes, y from 0 to the GPU's total, phase changes as dashed vertical lines.
function renderTimeline() {
  const box = byId("timeline-box");
  const width = Math.max(box.clientWidth, 280);
  const height = box.clientWidth < 640 ? 192 : 256;
  const pad = { left: 56, right: 10, top: 16, bottom: 22 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const samples = model.samples;
  const now = samples.length ? Math.max(samples[samples.length - 1].at_ms, Date.now()) : Date.now();
  const start = now - WINDOW_MS;
  const total = model.totalMb || 1;
  const x = (t) => pad.left + (plotW * (t - start)) / WINDOW_MS;
  const y = (value) => pad.top + plotH - (plotH * Math.min(value, total)) / total;

  const chart = svg("svg", {
    id: "timeline", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "VRAM per service over the last 15 minutes", "data-points": String(samples.length),
  });
  chart.append(svg("defs", {},
    svg("pattern", { id: "p-external", width: 8, height: 8, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
      svg("rect", { width: 8, height: 8, fill: "#b5b5b5" }), svg("rect", { width: 4, height: 8, fill: "#8a8a8a" })),
    svg("pattern", { id: "p-reclaiming", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(-45)" },
      svg("rect", { width: 6, height: 6, fill: "#d9d9d9" }), svg("rect", { width: 3, height: 6, fill: "#5d5d5d" }))));

  for (const fraction of [0, 0.25, 0.5, 0.75, 1]) {
    const value = Math.round(total * fraction);
    chart.append(svg("line", { class: "grid", x1: pad.left, x2: pad.left + plotW, y1: y(value), y2: y(value) }));
    chart.append(svg("text", { x: pad.left - 4, y: y(value) + 4, "text-anchor": "end", text: `${value} MB` }));
  }
  for (const minutes of [15, 10, 5, 0]) {
    const t = now - minutes * 60000;
    chart.append(svg("text", { x: x(t), y: height - 6, "text-anchor": minutes === 0 ? "end" : "middle",
      text: minutes === 0 ? "now" : `-${minutes} min` }));
  }

  const colours = model.status ? serviceColours(model.status) : {};
  const names = new Set();
  for (const s of samples) for (const name of Object.keys(s.services)) names.add(name);
  const series = [...names].sort().map((name) => ({ value: (s) => s.services[name] || 0, fill: colours[name] || "#777", label: name }))
    .concat(OTHER_SERIES.map((o) => ({ value: (s) => s[o.key] || 0, fill: `url(#${o.pattern})`, cls: o.cls, label: o.label })));

  if (samples.length === 0) {
    chart.append(svg("text", { class: "empty", x: pad.left + plotW / 2, y: pad.top + plotH / 2, "text-anchor": "middle", text: "no samples yet" }));
  } else {
    // Each sample holds until the next one (a step chart: memory changes in jumps).
    const times = samples.map((s) => Math.max(s.at_ms, start));
    const ends = times.slice(1).concat([now]);
    const base = samples.map(() => 0);
    for (const line of series) {
      const top = samples.map((s, i) => base[i] + line.value(s));
      if (top.some((v, i) => v !== base[i])) {
        const upper = samples.flatMap((_, i) => [`${x(times[i])},${y(top[i])}`, `${x(ends[i])},${y(top[i])}`]);
        const lower = samples.flatMap((_, i) => [`${x(times[i])},${y(base[i])}`, `${x(ends[i])},${y(base[i])}`]).reverse();
        chart.append(svg("polygon", { points: upper.concat(lower).join(" "), fill: line.fill, "data-series": line.label },
          svg("title", { text: line.label })));
      }
      top.forEach((v, i) => { base[i] = v; });
    }
    let previous;
    let lastLabelAt = -Infinity;
    samples.forEach((s, i) => {
      if (i > 0 && s.phase !== previous) {
        const at = x(times[i]);
        chart.append(svg("line", { class: "phase-mark", x1: at, x2: at, y1: pad.top, y2: pad.top + plotH }));
        // Labels of changes closer together than a label's width would overprint: the
        // first one speaks for them (each still has its line, and a title).
        const label = `phase ${s.phase ?? "none"}`;
        if (at - lastLabelAt > 56) {
          chart.append(svg("text", { class: "phase-label", x: at + 3, y: pad.top - 4, text: label }));
          lastLabelAt = at;
        }
        chart.lastChild.append(svg("title", { text: `${label} at ${clock(s.at_ms)}` }));
      }
      previous = s.phase;
    });
  }
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left, y1: pad.top, y2: pad.top + plotH }));
  chart.append(svg("line", { class: "axis", x1: pad.left, x2: pad.left + plotW, y1: pad.top + plotH, y2: pad.top + plotH }));
  const legend = el("ul", { class: "legend" }, ...series.map((line) => {
    const swatch = el("span", { class: "swatch" });
    if (line.cls) swatch.classList.add(line.cls);
    else swatch.style.background = line.fill;
    return el("li", {}, swatch, line.label);
  }));
  box.replaceChildren(chart, legend);
}

// ---- start -------------------------------------------------------------------------

function start() {
  setupTokenForm();
  window.addEventListener("resize", renderTimeline);
  refreshStatus().then(loadHistory);
  connectEvents();
  setInterval(refreshStatus, REFRESH_MS);
  setInterval(() => tickCountdowns(byId("services")), 1000);
}

start();
