// The demo page at "/": a person's view of Squall through squall.js.
import Squall from "./squall.mjs";

const MAX_LOG_ENTRIES = 500;
// What the page subscribes to when the URL presets nothing (?topic=...): every topic,
// so that an event published anywhere, as the README's curl does, shows at once.
const DEFAULT_TOPICS = [">"];
const $ = (selector) => document.querySelector(selector);

const ui = {
  state: $("#state"),
  transport: $("#transport"),
  stateDetail: $("#state-detail"),
  url: $("#url"),
  token: $("#token"),
  connect: $("#connect"),
  disconnect: $("#disconnect"),
  subscriptions: $("#subscriptions"),
  subscribeTopic: $("#subscribe-topic"),
  publishTopic: $("#publish-topic"),
  publishData: $("#publish-data"),
  publishResult: $("#publish-result"),
  counters: $("#counters tbody"),
  countersEmpty: $("#counters-empty"),
  log: $("#log"),
  logEmpty: $("#log-empty"),
  logTotal: $("#log-total"),
  pause: $("#pause"),
};

const params = new URLSearchParams(location.search);
let client = null;
let connectedWith = null;           // {url, token} of the current client
let opens = 0;                      // how many times a connection opened
const subscriptions = new Map();  // topic or pattern -> {subscription, count, element}
const counters = new Map();       // topic -> {count, row}
let total = 0;
let paused = false;

// -- connection ---------------------------------------------------------------------

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/ws`;
}

function connect() {
  if (client) client.close();
  const token = ui.token.value.trim() || null;
  connectedWith = {url: ui.url.value.trim(), token};
  client = new Squall(connectedWith.url, {token, transport: params.get("transport") || "auto"});
  client.on("state", showState);
  client.on("transport", ({transport}) => {
    ui.transport.hidden = false;
    ui.transport.textContent = transport === "sse" ? "over SSE" : "over WebSocket";
    ui.transport.dataset.transport = transport;
  });
  client.on("recovery_failed", ({topic}) => {
    notice(`${topic}: the events missed while disconnected could not be recovered; ` +
           "an app would reload its state now.", "warn");
  });
  // a refused subscription is told by its own onError (attach), once
  client.on("error", (error) => {
    if (!error.topic) notice(`${error.code || "error"}: ${error.message}`, "error");
  });
  for (const topic of subscriptions.keys()) attach(topic);
  showButtons();
}

const ACTIVE = new Set(["connecting", "open", "reconnecting"]);

// Connect while disconnected; while connected, Reconnect only once the URL or the
// token was changed (with them); Disconnect while connected.
function showButtons() {
  const active = client !== null && ACTIVE.has(client.state);
  const changed = connectedWith !== null && (ui.url.value.trim() !== connectedWith.url ||
                                             (ui.token.value.trim() || null) !== connectedWith.token);
  ui.connect.textContent = active && changed ? "Reconnect" : "Connect";
  ui.connect.disabled = active && !changed;
  ui.disconnect.disabled = !active;
}

function showState({state, code, reason, delay}) {
  ui.state.textContent = state;
  ui.state.dataset.state = state;
  showButtons();
  const closedWith = code ? ` (closed ${code}${reason ? `: ${reason}` : ""})` : "";
  const details = {
    connecting: `Connecting to ${client.url}…`,
    open: `Connected to ${client.url}.`,
    reconnecting: `Reconnecting in ${(delay / 1000).toFixed(1)} s${closedWith}.`,
    closed: `Disconnected${closedWith}.`,
  };
  ui.stateDetail.textContent = details[state] || "";
  if (state === "open" && opens++ > 0) notice("connected again", "ok");
  if (state === "reconnecting") notice(`connection lost${closedWith}; reconnecting`, "warn");
}

// -- subscriptions ------------------------------------------------------------------

function subscribe(topic) {
  if (subscriptions.has(topic)) return;
  const element = chip(topic);
  subscriptions.set(topic, {subscription: null, count: 0, element});
  attach(topic);
}

function attach(topic) {
  const entry = subscriptions.get(topic);
  entry.element.classList.add("pending");
  entry.subscription = client.subscribe(topic, (event) => onEvent(topic, event), {
    onSubscribed: () => entry.element.classList.remove("pending"),
    onError: (error) => {
      notice(`${topic}: ${error.message}`, "error");
      forget(topic);
    },
  });
}

function forget(topic) {
  const entry = subscriptions.get(topic);
  if (!entry) return;
  subscriptions.delete(topic);
  entry.subscription.unsubscribe();
  entry.element.remove();
}

function chip(topic) {
  const item = document.createElement("li");
  item.className = "chip";
  item.dataset.topic = topic;
  item.style.setProperty("--hue", hue(topic));
  item.innerHTML = '<code></code><span class="count">0</span>' +
    '<button type="button" class="remove" aria-label="Unsubscribe">×</button>';
  item.querySelector("code").textContent = topic;
  item.querySelector("button").setAttribute("aria-label", `Unsubscribe from ${topic}`);
  item.querySelector("button").addEventListener("click", () => forget(topic));
  ui.subscriptions.append(item);
  return item;
}

// -- events -------------------------------------------------------------------------

function onEvent(subscribed, event) {
  const entry = subscriptions.get(subscribed);
  entry.count += 1;
  entry.element.querySelector(".count").textContent = entry.count;
  if (count(event) && !paused) logEvent(event);
}

// One event can match several subscriptions: count and log it once.
const seen = new Set();

function count(event) {
  const key = `${event.topic}\n${event.id}`;
  if (seen.has(key)) return false;
  seen.add(key);
  if (seen.size > 5000) seen.delete(seen.values().next().value);
  total += 1;
  ui.logTotal.textContent = total;
  let counter = counters.get(event.topic);
  if (!counter) {
    const row = document.createElement("tr");
    row.dataset.topic = event.topic;
    row.innerHTML = '<td><span class="topic"></span></td><td class="n"></td><td class="when"></td>';
    row.querySelector(".topic").textContent = event.topic;
    row.querySelector(".topic").style.setProperty("--hue", hue(event.topic));
    counter = {count: 0, row};
    counters.set(event.topic, counter);
    insertSorted(row, event.topic);
    ui.countersEmpty.hidden = true;
  }
  counter.count += 1;
  counter.row.querySelector(".n").textContent = counter.count;
  counter.row.querySelector(".when").textContent = clock(event.ts);
  return true;
}

function insertSorted(row, topic) {
  const after = [...ui.counters.children].find((other) => other.dataset.topic > topic);
  ui.counters.insertBefore(row, after || null);
}

function logEvent(event) {
  const item = document.createElement("li");
  item.className = "event";
  item.dataset.topic = event.topic;
  item.dataset.id = event.id;
  item.style.setProperty("--hue", hue(event.topic));
  item.innerHTML = '<div class="meta"><span class="topic"></span><span class="id"></span>' +
    '<time></time></div><pre class="data"></pre>';
  item.querySelector(".topic").textContent = event.topic;
  item.querySelector(".id").textContent = event.id;
  item.querySelector("time").textContent = clock(event.ts);
  item.querySelector("time").dateTime = new Date(event.ts).toISOString();
  item.querySelector(".data").textContent = formatData(event.data);
  prepend(item);
}

function notice(text, kind) {
  const item = document.createElement("li");
  item.className = `notice ${kind}`;
  item.innerHTML = "<span></span><time></time>";
  item.querySelector("span").textContent = text;
  item.querySelector("time").textContent = clock(Date.now());
  prepend(item);
}

function prepend(item) {
  ui.log.prepend(item);
  if (item.classList.contains("event")) ui.logEmpty.hidden = true;
  while (ui.log.children.length > MAX_LOG_ENTRIES) ui.log.lastElementChild.remove();
}

// -- publishing ---------------------------------------------------------------------

async function publish() {
  const topic = ui.publishTopic.value.trim();
  let data;
  try {
    data = JSON.parse(ui.publishData.value);
  } catch (error) {
    result(`Data is not valid JSON: ${error.message}`, "error");
    return;
  }
  result("Publishing…", "pending");
  try {
    const reply = await client.publish(topic, data);
    result(`Published ${reply.id}`, "ok");
  } catch (error) {
    result(`${error.code || "error"}: ${error.message}`, "error");
  }
}

function result(text, kind) {
  ui.publishResult.textContent = text;
  ui.publishResult.dataset.kind = kind;
}

// -- helpers ------------------------------------------------------------------------

// A stable color per topic (FNV-1a of its name), from hues that read well as text.
const HUES = [195, 265, 330, 25, 160, 290, 5, 225, 140, 350, 245, 180];

function hue(text) {
  let hash = 2166136261;
  for (const char of text) hash = Math.imul(hash ^ char.codePointAt(0), 16777619) >>> 0;
  return HUES[hash % HUES.length];
}

function formatData(data) {
  // JSON.stringify escapes newlines inside strings, so every newline here is layout
  const compact = JSON.stringify(data, null, 1).replace(/\n\s*/g, " ");
  return compact.length <= 72 ? compact : JSON.stringify(data, null, 2);
}

function clock(ms) {
  const time = new Date(ms);
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(time.getHours())}:${pad(time.getMinutes())}:${pad(time.getSeconds())}` +
    `.${pad(time.getMilliseconds(), 3)}`;
}

// The README's curl, for the publish form's topic and data.
function curlHint() {
  const topic = ui.publishTopic.value.trim() || "orders.eu";
  const data = ui.publishData.value.trim().replace(/\s*\n\s*/g, " ") || "null";
  $("#curl-hint").textContent = `curl -s -X POST ${location.origin}/v1/topics/${topic}/events \\\n` +
    `     -H 'Content-Type: application/json' -d '${data.replaceAll("'", "'\\''")}'`;
}

// -- wiring -------------------------------------------------------------------------

$("#connect-form").addEventListener("submit", (event) => {
  event.preventDefault();
  connect();
});
ui.disconnect.addEventListener("click", () => client.close());
ui.url.addEventListener("input", showButtons);
ui.token.addEventListener("input", showButtons);
$("#subscribe-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const topic = ui.subscribeTopic.value.trim();
  if (topic) subscribe(topic);
});
$("#publish-form").addEventListener("submit", (event) => {
  event.preventDefault();
  publish();
});
ui.publishData.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    publish();
  }
});
ui.publishTopic.addEventListener("input", curlHint);
ui.publishData.addEventListener("input", curlHint);
ui.pause.addEventListener("click", () => {
  paused = !paused;
  ui.pause.setAttribute("aria-pressed", String(paused));
  ui.pause.textContent = paused ? "Resume" : "Pause";
});
$("#clear").addEventListener("click", () => {
  ui.log.replaceChildren();
  ui.logEmpty.hidden = false;
});

// ?url=...&topic=a&topic=b&transport=sse preset the connection and the subscriptions
ui.url.value = params.get("url") || defaultUrl();
curlHint();
connect();
const presets = params.getAll("topic");
for (const topic of presets.length ? presets : DEFAULT_TOPICS) subscribe(topic);
