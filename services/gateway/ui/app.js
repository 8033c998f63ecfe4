// The dashboard: sign in with a token, then runners, queue, hosts and a live event feed, all
// refreshed from the event stream (a status read follows the events that change it).
import { Api } from "./api.js";

const $ = (selector) => document.querySelector(selector);
const TOKEN_KEY = "runner.token";
const FEED_MAX = 200;
const state = { api: null, admin: false, user: null, workers: [], strategies: {}, endStream: null,
                refreshTimer: null, refreshing: null };

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function say(text, error = false) {
  const message = $("#message");
  message.textContent = text;
  message.classList.toggle("error", error);
}

// ------------------------------------------------------------------ signing in

async function signIn(token) {
  const api = new Api(token);
  let me;
  try {
    me = await api.me();
  } catch (error) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#token").setCustomValidity(error.message);
    $("#token").reportValidity();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.api = api;
  state.admin = me.admin;
  $("#sign-in-panel").hidden = true;
  $("#dashboard").hidden = false;
  $("#sign-out").hidden = false;
  $("#hosts-panel").hidden = !state.admin;
  $("#user-field").hidden = !state.admin;
  $("#who").textContent = state.admin ? "admin" : me.userId;
  state.endStream = api.events({ onEvent, onState: onStreamState });
  setInterval(tickUptimes, 1000);
  await refresh();
  try {
    await loadStrategies();
  } catch (error) {
    say(`strategies: ${error.message}`, true);
  }
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.endStream?.();
  location.reload();
}

// ------------------------------------------------------------------ live updates

function onStreamState(live) {
  const badge = $("#live");
  badge.textContent = live ? "live" : "offline";
  badge.className = `badge ${live ? "on" : "off"}`;
  if (live) refreshSoon();  // whatever happened while it was down
}

function onEvent(event) {
  const { envelope } = event;
  const payload = envelope.payload || {};
  const detail = Object.entries(payload)
    .filter(([key, value]) => key !== "worker_id" && key !== "job_id" && value !== null
            && typeof value !== "object")
    .map(([key, value]) => `${key}=${value}`).join(" ");
  const time = new Date(envelope.occurred_at).toLocaleTimeString();
  const item = el("li", { "data-position": String(event.position), "data-type": event.type },
                  `${time} `, el("span", { class: "type" }, event.type),
                  ` ${payload.worker_id || envelope.user_id || ""} ${detail}`);
  const feed = $("#feed");
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
  refreshSoon();
}

function refreshSoon() {  // one status read for a burst of events
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(refresh, 150);
}

async function refresh() {
  if (state.refreshing) { await state.refreshing; }
  state.refreshing = (async () => {
    try {
      const status = await state.api.status();
      state.workers = status.workers;
      renderRunners(status);
      if (state.admin) renderHosts((await state.api.hosts()).hosts);
    } catch (error) {
      say(`status: ${error.message}`, true);
    }
  })();
  await state.refreshing;
  state.refreshing = null;
}

// ------------------------------------------------------------------ runners

const money = (value) => value.toLocaleString(undefined, { minimumFractionDigits: 2,
                                                              maximumFractionDigits: 2 });

function uptime(worker) {
  if (worker.status !== "running" || !worker.startedAt) return "–";
  let seconds = Math.max(0, Math.floor((Date.now() - worker.startedAt) / 1000));
  const parts = [];
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size) { parts.push(`${Math.floor(seconds / size)}${unit}`); seconds %= size; }
  }
  parts.push(`${seconds}s`);
  return parts.slice(0, 2).join(" ");
}

function tickUptimes() {
  for (const entry of state.workers) {
    const cell = document.querySelector(
      `.card[data-worker-id="${CSS.escape(entry.worker.workerId)}"] .uptime`);
    if (cell) cell.textContent = uptime(entry.worker);
  }
}

function renderRunners(status) {
  const q = status.queueStats;
  $("#queue-stats").textContent = `queued ${q.queuedJobs} · running ${q.runningWorkers} · ` +
    `total ${q.totalWorkers} · failed ${q.failedJobs}`;
  const cards = status.workers.slice().reverse().map(runnerCard);
  $("#runners").replaceChildren(...(cards.length ? cards
    : [el("p", { class: "hint" }, "No runners yet: start one below.")]));
}

function runnerCard({ worker, positions, stats }) {
  const unrealized = positions.reduce((sum, p) => sum + p.unrealizedPnL, 0);
  const pnl = (value, cls) => el("span", { class: `pnl ${cls} ${value > 0 ? "up" : value < 0
    ? "down" : ""}` }, money(value));
  const rows = [
    ["user", worker.userId], ["strategy", `${worker.strategyId} on ${worker.brokerId}`],
    ["host", worker.hostId || "–"], ["pid", worker.pid ? String(worker.pid) : "–"],
    ["uptime", el("span", { class: "uptime" }, uptime(worker))],
    ["restarts", el("span", { class: "restarts" }, String(worker.restartCount))],
    ["positions", el("span", { class: "positions" }, positions.map((p) =>
      `${p.side} ${p.amount} ${p.instrumentName} @ ${money(p.entryPrice)}`).join(", ") || "none")],
    ["unrealized", pnl(unrealized, "unrealized")],
    ["P&L", el("span", {}, pnl(stats.totalPnL, "realized"),
               ` (${stats.totalTrades} trade${stats.totalTrades === 1 ? "" : "s"}, ${stats.winRate}% won)`)],
  ];
  if (worker.reason) rows.push(["reason", worker.reason]);
  const list = el("dl");
  for (const [label, value] of rows) list.append(el("dt", {}, label), el("dd", {}, value));
  const card = el("article", { class: "card", "data-worker-id": worker.workerId,
                               "data-status": worker.status },
    el("h3", {}, el("span", { class: "worker-id" }, worker.workerId),
       el("span", { class: `status ${worker.status}` }, worker.status)),
    list);
  if (!["stopped", "failed"].includes(worker.status)) {
    card.append(el("div", { class: "actions" },
      el("button", { class: "secondary stop", type: "button", onclick: () => stop(worker, false) },
         "Stop"),
      el("button", { class: "danger stop-flatten", type: "button",
                     onclick: () => stop(worker, true) }, "Stop and flatten")));
  }
  return card;
}

async function stop(worker, flatten) {
  const buttons = document.querySelectorAll(
    `.card[data-worker-id="${CSS.escape(worker.workerId)}"] button`);
  buttons.forEach((button) => { button.disabled = true; });
  say(`stopping ${worker.workerId}${flatten ? " and flattening its positions" : ""}…`);
  try {
    const answer = await state.api.stop(worker.workerId, flatten);
    say(answer.message);
  } catch (error) {
    say(`stop: ${error.message}`, true);
    buttons.forEach((button) => { button.disabled = false; });
  }
  refreshSoon();
}

// ------------------------------------------------------------------ hosts

function renderHosts(hosts) {
  const rows = hosts.map((h) => el("tr", { "data-host-id": h.hostId },
    el("td", {}, h.hostId), el("td", {}, h.hostname || "–"), el("td", {}, String(h.capacity)),
    el("td", {}, h.lastSeen ? new Date(h.lastSeen).toLocaleTimeString() : "–"),
    el("td", {}, h.lost ? "lost" : "online")));
  $("#hosts tbody").replaceChildren(...rows);
}

// ------------------------------------------------------------------ starting

async function loadStrategies() {
  const answer = await state.api.strategies();
  state.strategies = answer.strategies;
  const select = $("#strategy");
  select.replaceChildren(...Object.keys(answer.strategies).map(
    (name) => el("option", { value: name, selected: name === "hold" }, name)));
  renderFields($("#risk"), "risk", answer.riskManagement, "Risk management");
  showParameters();
}

function showParameters() {
  const strategy = state.strategies[$("#strategy").value];
  $("#strategy-description").textContent = strategy?.description || "";
  renderFields($("#parameters"), "param", strategy?.parameters || {}, "Parameters");
}

function fieldType(schema) {  // the first non-null alternative of an optional field
  const options = schema.anyOf ? schema.anyOf.filter((s) => s.type !== "null") : [schema];
  return options[0] || {};
}

function renderFields(fieldset, prefix, schema, legend) {
  const inputs = Object.entries(schema.properties || {}).map(([name, property]) => {
    const type = fieldType(property);
    let input;
    if (type.enum) {
      input = el("select", { name: `${prefix}-${name}` },
                 ...type.enum.map((v) => el("option", { value: v, selected: v === property.default }, v)));
    } else if (type.type === "boolean") {
      input = el("input", { type: "checkbox", name: `${prefix}-${name}`,
                            checked: Boolean(property.default) });
    } else {
      const numeric = type.type === "number" || type.type === "integer";
      input = el("input", { name: `${prefix}-${name}`, type: numeric ? "number" : "text",
                            step: type.type === "integer" ? "1" : "any",
                            placeholder: property.default ?? "" });
      if (numeric) {
        if (type.minimum !== undefined) input.min = type.minimum;
        if (type.maximum !== undefined) input.max = type.maximum;
      }
    }
    input.dataset.kind = type.type || "string";
    input.dataset.field = name;
    return el("label", {}, name, input);
  });
  fieldset.replaceChildren(el("legend", {}, legend), ...inputs);
}

function fieldValues(fieldset) {  // only what was filled in: the rest keeps its default
  const values = {};
  for (const input of fieldset.querySelectorAll("[data-field]")) {
    if (input.type === "checkbox") { values[input.dataset.field] = input.checked; continue; }
    if (input.value === "") continue;
    const kind = input.dataset.kind;
    values[input.dataset.field] = kind === "number" || kind === "integer" ? Number(input.value)
      : input.value;
  }
  return values;
}

async function start(event) {
  event.preventDefault();
  const strategy = $("#strategy").value;
  const instruments = $("#instruments").value.split(",").map((s) => s.trim()).filter(Boolean);
  const body = {
    strategyId: `${strategy}-${(instruments[0] || "x").toLowerCase()}`,
    brokerId: $("#broker").value.trim(),
    credentials: { apiKey: $("#api-key").value, apiSecret: $("#api-secret").value },
    config: { name: strategy, type: strategy, instruments,
              parameters: fieldValues($("#parameters")), riskManagement: fieldValues($("#risk")) },
    flattenOnStop: $("#flatten-on-stop").checked,
  };
  if (state.admin) body.userId = $("#start-user").value.trim();
  const button = $("#start-button");
  button.disabled = true;
  try {
    const answer = await state.api.start(body);
    say(`${answer.message}: ${answer.workerId}`);
  } catch (error) {
    say(`start: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
  refreshSoon();
}

// ------------------------------------------------------------------ wiring

$("#sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  $("#token").setCustomValidity("");
  signIn($("#token").value.trim());
});
$("#token").addEventListener("input", () => $("#token").setCustomValidity(""));
$("#sign-out").addEventListener("click", signOut);
$("#strategy").addEventListener("change", showParameters);
$("#start-form").addEventListener("submit", start);
window.dashboardLoadedAt = Date.now();  // the browser test checks that nothing reloaded the page
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved);
