// Phyllome's web UI: plain DOM, no framework, no build step, nothing from the internet.
// Every view reads /api/v1; one EventSource on /api/v1/events keeps the machines' states,
// the jobs and the event list live (no polling). Data from the server only ever reaches the
// page as text (textContent), never as HTML.
"use strict";

const ROLES = ["viewer", "operator", "admin"];
const MiB = 1024 * 1024;
const state = { me: null, vms: new Map(), events: [], source: null, jobsTimer: null,
                console: null };

// -- helpers ---------------------------------------------------------------------------------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  const json = (r.headers.get("content-type") || "").startsWith("application/json");
  const data = json ? await r.json() : null;
  if (!r.ok) {
    const err = new Error((data && data.message) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

function can(role) {
  return state.me !== null && ROLES.indexOf(state.me.role) >= ROLES.indexOf(role);
}

function toast(text, error) {
  const box = document.getElementById("toast");
  const p = h("p", { class: error ? "error" : "" }, text);
  box.append(p);
  setTimeout(() => p.remove(), error ? 9000 : 4000);
}

function gib(bytes) {
  return `${(bytes / 1024 / MiB).toFixed(1)} GiB`;
}

async function attempt(what, fn) {
  try {
    return await fn();
  } catch (e) {
    toast(`${what}: ${e.message}`, true);
    if (e.status === 401) showLogin();
    return null;
  }
}

// -- login -----------------------------------------------------------------------------------

function showLogin() {
  closeConsole();
  state.me = null;
  if (state.source) state.source.close();
  state.vms.clear(); // what the last token could see is not for the next one
  state.events = [];
  document.getElementById("vm-grid").replaceChildren();
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("token").focus();
}

async function login(event) {
  event.preventDefault();
  const field = document.getElementById("token");
  const me = await attempt("log in", () => api("POST", "/api/v1/login", { token: field.value }));
  field.value = "";
  if (me) await start(me);
}

async function logout() {
  await attempt("log out", () => api("POST", "/api/v1/logout"));
  showLogin();
}

async function start(me) {
  state.me = me;
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  document.getElementById("who-name").textContent = `${me.name} (${me.role}) · ${me.host}`;
  await follow(); // the stream first: what changes after the views load reaches them
  route();
}

// -- live events -----------------------------------------------------------------------------

function follow() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/v1/events?subject=phy.evt.>");
  state.source = source;
  let opened = false;
  let resumable = false; // an event with an id came: EventSource resumes after it
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) toast("the event stream closed; reload the page", true);
  };
  source.onmessage = (msg) => {
    const item = JSON.parse(msg.data);
    resumable = true;
    const ev = item.event || {};
    if (ev.type === "vm.state_changed.v1") vmChanged(ev);
    if (ev.type === "job.progress.v1" || ev.type === "job.finished.v1") jobsChanged();
    state.events.unshift(item);
    state.events.length = Math.min(state.events.length, 200);
    if (!document.getElementById("view-events").hidden) renderEvents();
  };
  return new Promise((resolve) => {
    source.onopen = () => {
      // A reconnect without an event id to resume from may have missed some: read again.
      if (opened && !resumable) route();
      opened = true;
      resolve();
    };
  });
}

function vmChanged(ev) {
  const vm = state.vms.get(ev.uuid);
  if (ev.state === "deleted") {
    state.vms.delete(ev.uuid);
    document.querySelector(`.vm[data-uuid="${CSS.escape(ev.uuid)}"]`)?.remove();
    emptyNote();
  } else if (vm) {
    vm.state = ev.state;
    vm.reason = ev.reason || "";
    card(vm);
  } else {
    loadVms(); // a VM this page has not seen: its summary comes from the list
  }
}

function jobsChanged() {
  if (document.getElementById("view-jobs").hidden || state.jobsTimer) return;
  state.jobsTimer = setTimeout(() => { state.jobsTimer = null; loadJobs(); }, 300);
}

// -- machines --------------------------------------------------------------------------------

async function loadVms() {
  const list = await attempt("list machines", () => api("GET", "/api/v1/vms"));
  if (!list) return;
  const seen = new Set();
  for (const vm of list.vms) {
    seen.add(vm.uuid);
    state.vms.set(vm.uuid, vm);
    card(vm);
  }
  for (const uuid of [...state.vms.keys()]) {
    if (!seen.has(uuid)) {
      state.vms.delete(uuid);
      document.querySelector(`.vm[data-uuid="${CSS.escape(uuid)}"]`)?.remove();
    }
  }
  emptyNote();
}

function emptyNote() {
  document.getElementById("vms-empty").hidden = state.vms.size > 0;
}

const ACTIONS = [
  // label, verb, states it applies to, body, confirm
  ["Start", "start", ["shutoff", "crashed"]],
  ["Shut down", "stop", ["running"]],
  ["Force off", "destroy", ["running", "paused", "shutting-down", "blocked"]],
  ["Resume", "resume", ["paused"]],
  ["Console", "console", ["running", "paused"]],
  ["Clone", "clone", ["shutoff"]],
  ["Delete", "delete", ["shutoff", "crashed"]],
];

function card(vm) {
  // Built once per VM, then updated in place: focus, and a reader's place, survive changes.
  const id = `vm-${vm.uuid}`;
  let el = document.getElementById(id);
  const operator = can("operator");
  if (!el) {
    const buttons = ACTIONS.map(([label, verb]) => h("button", {
      type: "button", "data-verb": verb, class: verb === "delete" ? "danger" : "",
      "aria-label": `${label} ${vm.name}`,
      title: operator ? null : `your token is a ${state.me.role}: ${label.toLowerCase()} needs operator`,
      onclick: () => act(state.vms.get(vm.uuid) || vm, verb),
    }, label));
    el = h("li", { class: "vm", id, "data-uuid": vm.uuid, "data-name": vm.name },
      h("div", { class: "screen", "aria-hidden": "true" },
        h("img", { class: "thumb", alt: "", hidden: true, onload: thumbLoaded,
                   onerror: thumbFailed }),
        h("span", { class: "glyph" })),
      h("h3", {}, vm.name),
      h("p", { class: "meta" }, h("span", { "data-role": "state" }),
        h("span", { "data-role": "where" })),
      h("p", { class: "meta" }, `${vm.vcpus} vCPU · ${vm.memory_mib} MiB · ${vm.firmware}`,
        vm.secure_boot ? " · Secure Boot" : "", vm.tpm !== "none" ? " · TPM" : "",
        ` · ${vm.accelerator.toUpperCase()}`),
      h("div", { class: "actions" }, buttons));
    document.getElementById("vm-grid").append(el);
  }
  el.setAttribute("data-state", vm.state);
  el.querySelector(".glyph").textContent = vm.state === "running" ? "▶" : "■";
  thumb(el, vm, false);
  const badge = el.querySelector("[data-role=state]");
  badge.className = `state ${vm.state}`;
  badge.textContent = vm.state;
  el.querySelector("[data-role=where]").textContent = `${vm.reason ? ` (${vm.reason})` : ""} · ${vm.host}`;
  for (const [, verb, states] of ACTIONS) {
    el.querySelector(`[data-verb="${verb}"]`).disabled = !operator || !states.includes(vm.state);
  }
}

// Thumbnails: the screen of each running VM in view, every THUMB_MS while the page is
// visible (operators only: a screen is a console's view). A new picture is loaded beside the
// shown one and swapped in when it is complete, so a card never flickers or goes blank.
const THUMB_MS = 5000;
const SHOWS_SCREEN = ["running", "paused", "blocked", "shutting-down"];

function thumb(el, vm, again) {
  const img = el.querySelector("img.thumb");
  if (!can("operator") || !SHOWS_SCREEN.includes(vm.state)) {
    img.hidden = true;
    img.removeAttribute("src");
    el.querySelector(".glyph").hidden = false;
    return;
  }
  if (img.getAttribute("src") && !again) return;
  const url = `/api/v1/vms/${encodeURIComponent(vm.name)}/screenshot?host=` +
    `${encodeURIComponent(vm.host)}&max_width=320&t=${Math.floor(Date.now() / THUMB_MS)}`;
  if (!img.getAttribute("src")) { img.src = url; return; }
  const next = new Image();
  next.onload = () => { // from the browser's cache now (max-age); unless it stopped since
    if (SHOWS_SCREEN.includes((state.vms.get(vm.uuid) || {}).state)) img.src = url;
  };
  next.src = url;
}

function thumbLoaded(event) {
  event.target.hidden = false;
  event.target.closest(".screen").querySelector(".glyph").hidden = true;
}

function thumbFailed(event) {
  event.target.hidden = true;
  event.target.closest(".screen").querySelector(".glyph").hidden = false;
}

function refreshThumbs() {
  if (document.visibilityState !== "visible" || document.getElementById("view-vms").hidden) return;
  for (const el of document.querySelectorAll("#vm-grid .vm")) {
    const vm = state.vms.get(el.getAttribute("data-uuid"));
    const box = el.getBoundingClientRect();
    if (vm && box.bottom > 0 && box.top < window.innerHeight) thumb(el, vm, true);
  }
}

async function act(vm, verb) {
  if (verb === "console") {
    location.hash = `#/console/${encodeURIComponent(vm.name)}/vnc`;
    return;
  }
  let body;
  if (verb === "clone") {
    const name = prompt(`Name of the copy of ${vm.name}`, `${vm.name}-copy`);
    if (!name) return;
    body = { name };
  }
  if (verb === "delete") {
    if (!confirm(`Delete ${vm.name} with the disks made for it?`)) return;
    body = { delete_disks: true };
  }
  const path = `/api/v1/vms/${encodeURIComponent(vm.name)}/${verb}?host=${encodeURIComponent(vm.host)}`;
  const reply = await attempt(`${verb} ${vm.name}`, () => api("POST", path, body));
  // The new state arrives through the event stream; only jobs are announced here.
  if (reply && reply.type === "web.job_started.v1") toast(`${reply.kind} started (job ${reply.job_id.slice(0, 8)})`);
}

// -- new machine -----------------------------------------------------------------------------

async function loadNew() {
  const images = document.getElementById("new-image");
  const hosts = document.getElementById("new-host");
  const [catalogue, hostList] = await Promise.all([
    api("GET", "/api/v1/images").catch((e) => e),
    attempt("list hosts", () => api("GET", "/api/v1/hosts")),
  ]);
  images.replaceChildren(h("option", { value: "" }, "(no image: a VM without a disk)"));
  if (catalogue instanceof Error) {
    images.append(h("option", { disabled: true }, `(the catalogue: ${catalogue.message})`));
  }
  for (const img of (catalogue instanceof Error ? [] : catalogue.images).filter((i) => i.local)) {
    images.append(h("option", { value: img.id }, `${img.name}${img.version ? " " + img.version : ""}`));
  }
  hosts.replaceChildren(h("option", { value: "auto" }, "Best fit (auto)"));
  for (const host of (hostList ? hostList.hosts : []).filter((x) => x.state === "up" && x.agents.includes("vm"))) {
    hosts.append(h("option", { value: host.host }, host.host));
  }
  document.querySelector("#new-form button").disabled = !can("operator");
}

async function imageChosen() {
  const id = document.getElementById("new-image").value;
  if (!id) return;
  const info = await attempt("read the image", () => api("GET", `/api/v1/images/${encodeURIComponent(id)}`));
  if (!info) return;
  const t = info.template;
  document.getElementById("new-memory").value = Math.max(Math.round(t.memory / MiB), 16);
  document.getElementById("new-vcpus").value = t.vcpus;
  document.getElementById("new-firmware").value = t.firmware;
  document.getElementById("new-sb").checked = t.secure_boot;
  document.getElementById("new-tpm").checked = Boolean(t.tpm);
  if (!document.getElementById("new-name").value) {
    document.getElementById("new-name").value = info.entry.id.replace(/[^A-Za-z0-9_-]/g, "-");
  }
}

async function create(event) {
  event.preventDefault();
  const f = event.target.elements;
  const spec = {
    name: f.name.value, memory_mib: Number(f.memory_mib.value), vcpus: Number(f.vcpus.value),
    firmware: f.firmware.value, secure_boot: f.secure_boot.checked,
    tpm: f.tpm.checked ? "emulated-2.0" : "none", display: "vnc",
  };
  const button = event.target.querySelector("button");
  button.disabled = true;
  const info = await attempt(`create ${spec.name}`, () => api("POST", "/api/v1/vms",
    { spec, image: f.image.value, host: f.host.value }));
  button.disabled = false;
  if (info) {
    toast(`${info.name} created on ${info.host}`);
    location.hash = "#/vms";
  }
}

// -- hosts, hardware, jobs, events -----------------------------------------------------------

async function loadHosts() {
  const list = await attempt("list hosts", () => api("GET", "/api/v1/hosts"));
  if (!list) return;
  const body = document.querySelector("#hosts-table tbody");
  body.replaceChildren(...list.hosts.map((x) => {
    const r = x.resources;
    const pools = Object.entries(x.pools).map(([name, p]) => `${name}: ${gib(p.free_bytes)}`);
    return h("tr", {},
      h("th", { scope: "row" }, x.host),
      h("td", {}, h("span", { class: `state ${x.state}` }, x.state), x.reason ? ` (${x.reason})` : ""),
      h("td", {}, x.agents.join(", ") || "-"),
      h("td", {}, r ? String(r.cpus) : "-"),
      h("td", {}, r ? `${gib(r.memory_available_bytes)} of ${gib(r.memory_total_bytes)}` : "-"),
      h("td", {}, pools.join(", ") || "-"),
      h("td", {}, String(x.vms)));
  }));
}

async function loadHardware() {
  const select = document.getElementById("hw-host");
  if (!select.options.length) {
    const list = await attempt("list hosts", () => api("GET", "/api/v1/hosts"));
    for (const x of (list ? list.hosts : []).filter((x) => x.agents.includes("hardware"))) {
      select.append(h("option", { value: x.host, selected: x.host === state.me.host }, x.host));
    }
  }
  const body = document.querySelector("#hw-table tbody");
  if (!select.value) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 7 }, "No hardware agent answers.")));
    return;
  }
  const list = await attempt("list devices", () => api("GET", `/api/v1/hw/devices?host=${encodeURIComponent(select.value)}`));
  if (!list) return;
  const admin = can("admin");
  body.replaceChildren(...list.devices.map((d) => {
    const p = d.passthrough;
    const bound = d.driver === "vfio-pci";
    const verb = bound ? "release" : "bind";
    return h("tr", {},
      h("th", { scope: "row" }, d.address),
      h("td", {}, `${d.vendor} ${d.name}`.trim() || `${d.vendor_id}:${d.device_id}`),
      h("td", {}, d.kind),
      h("td", {}, d.driver || "-"),
      h("td", {}, p ? p.verdict : "-"),
      h("td", {}, h("ul", {}, (p ? p.reasons : []).concat(d.problems).map((x) => h("li", {}, x)))),
      h("td", {}, h("button", {
        type: "button", disabled: !admin,
        title: admin ? null : "binding devices needs an admin token",
        onclick: async () => {
          const reply = await attempt(`${verb} ${d.address}`, () => api("POST",
            `/api/v1/hw/devices/${encodeURIComponent(d.address)}/${verb}?host=${encodeURIComponent(select.value)}`));
          if (reply) toast(`${reply.kind} started`);
        },
      }, bound ? "Release" : "Bind to VFIO")));
  }));
}

async function loadJobs() {
  const list = await attempt("list jobs", () => api("GET", "/api/v1/jobs"));
  if (!list) return;
  const body = document.querySelector("#jobs-table tbody");
  if (!list.jobs.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 6 }, "No jobs since the agents started.")));
    return;
  }
  body.replaceChildren(...list.jobs.map(({ host, service, job }) => h("tr", {},
    h("th", { scope: "row" }, job.kind),
    h("td", {}, `${service} on ${host}`),
    h("td", {}, h("span", { class: `state ${job.state === "succeeded" ? "up" : job.state === "running" ? "paused" : "down"}` }, job.state)),
    h("td", {}, job.total ? h("progress", { value: job.done, max: job.total,
      "aria-label": `${job.kind}: ${Math.round(100 * job.done / job.total)}%` }) : "-"),
    h("td", {}, job.message || ""),
    h("td", {}, job.state === "running" ? h("button", {
      type: "button", disabled: !can("operator"),
      onclick: () => attempt("cancel", () => api("POST", `/api/v1/jobs/${host}/${service}/${job.job_id}/cancel`)),
    }, "Cancel") : ""))));
}

function renderEvents() {
  const list = document.getElementById("event-list");
  list.replaceChildren(...state.events.map((item) => {
    const ev = item.event || {};
    const rest = Object.entries(ev).filter(([k]) => !["type", "host", "event_id", "time"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return h("li", {},
      h("time", { datetime: new Date(item.time * 1000).toISOString() },
        new Date(item.time * 1000).toLocaleTimeString()),
      h("span", { class: "subject" }, item.subject),
      h("span", {}, h("strong", {}, ev.type || "?"), " ", rest));
  }));
  if (!state.events.length) list.append(h("li", {}, "Events appear here as they happen."));
}

// -- consoles --------------------------------------------------------------------------------
// The screen is noVNC (Debian's novnc, served by the gateway under /novnc), the serial port a
// small terminal of our own: both are WebSockets to the gateway, which relays them over NATS
// to the VM's host.

function closeConsole() {
  if (state.console) state.console.close();
  state.console = null;
}

function consoleUrl(name, kind, host) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = host ? `?host=${encodeURIComponent(host)}` : "";
  return `${scheme}//${location.host}/api/v1/vms/${encodeURIComponent(name)}/console/${kind}${query}`;
}

function loadConsole(name, kind) {
  closeConsole();
  kind = kind === "serial" ? "serial" : "vnc";
  const vm = [...state.vms.values()].find((v) => v.name === name);
  const status = document.getElementById("console-status");
  const say = (text) => { status.textContent = text; };
  document.getElementById("console-title").textContent = `Console of ${name}`;
  for (const [k, id] of [["vnc", "console-vnc-link"], ["serial", "console-serial-link"]]) {
    const a = document.getElementById(id);
    a.href = `#/console/${encodeURIComponent(name)}/${k}`;
    if (k === kind) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const screen = document.getElementById("console-screen");
  const serial = document.getElementById("console-serial");
  screen.hidden = kind !== "vnc";
  serial.hidden = kind !== "serial";
  const url = consoleUrl(name, kind, vm && vm.host);
  say(`connecting to the ${kind === "vnc" ? "screen" : "serial port"} of ${name}…`);
  if (kind === "vnc") openScreen(url, screen, say);
  else openSerial(url, serial, say);
}

async function openScreen(url, box, say) {
  let RFB;
  try {
    ({ default: RFB } = await import("/novnc/core/rfb.js"));
  } catch (e) {
    say("noVNC is not installed on the gateway's host (Debian package novnc)");
    return;
  }
  box.replaceChildren();
  const rfb = new RFB(box, url, { wsProtocols: ["binary"] });
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => say("connected: the guest's screen"));
  rfb.addEventListener("disconnect", (e) => say(e.detail.clean ? "the console closed" :
    "the console closed: is the VM running, and is your token an operator's?"));
  rfb.addEventListener("credentialsrequired", () => {
    const password = prompt("The VM's console password");
    if (password !== null) rfb.sendCredentials({ password });
  });
  state.console = { close: () => rfb.disconnect() };
}

// Keys a terminal sends for what a keyboard event names.
const KEYS = { Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b", ArrowUp: "\x1b[A",
               ArrowDown: "\x1b[B", ArrowRight: "\x1b[C", ArrowLeft: "\x1b[D", Delete: "\x1b[3~",
               Home: "\x1b[H", End: "\x1b[F" };

function openSerial(url, out, say) {
  out.replaceChildren();
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  let text = "";
  const show = (chunk) => {
    // Control sequences (colours, cursor moves) are dropped; backspace and CR are honoured.
    for (const ch of chunk.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]/g, "")) {
      if (ch === "\b") text = text.slice(0, -1);
      else if (ch === "\r") continue;
      else if (ch >= " " || ch === "\n" || ch === "\t") text += ch;
    }
    if (text.length > 200000) text = text.slice(-100000);
    out.textContent = text;
    out.scrollTop = out.scrollHeight;
  };
  ws.onopen = () => { say("connected: the serial port (click it and type)"); out.focus(); };
  ws.onmessage = (m) => show(decoder.decode(m.data, { stream: true }));
  ws.onclose = (e) => say(`the console closed (${e.code})${e.reason ? ": " + e.reason : ""}`);
  const send = (s) => { if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(s)); };
  out.onkeydown = (e) => {
    let s = KEYS[e.key];
    if (!s && e.ctrlKey && e.key.length === 1) s = String.fromCharCode(e.key.toUpperCase().charCodeAt(0) - 64);
    if (!s && e.key.length === 1 && !e.metaKey && !e.altKey) s = e.key;
    if (s) { send(s); e.preventDefault(); }
  };
  out.onpaste = (e) => { send(e.clipboardData.getData("text")); e.preventDefault(); };
  state.console = { close: () => ws.close() };
}

// -- routing ---------------------------------------------------------------------------------

const VIEWS = { vms: loadVms, new: loadNew, hosts: loadHosts, hardware: loadHardware,
                jobs: loadJobs, events: renderEvents, console: loadConsole };

function route() {
  if (!state.me) return;
  const [, name = "vms", arg = "", kind = ""] =
    location.hash.match(/^#\/(\w+)(?:\/([^/]+))?(?:\/(\w+))?/) || [];
  const view = VIEWS[name] && (name !== "console" || arg) ? name : "vms";
  if (view !== "console") closeConsole();
  for (const [key] of Object.entries(VIEWS)) {
    document.getElementById(`view-${key}`).hidden = key !== view;
  }
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${view}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  VIEWS[view](decodeURIComponent(arg), kind);
}

async function boot() {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  document.getElementById("new-form").addEventListener("submit", create);
  document.getElementById("new-image").addEventListener("change", imageChosen);
  document.getElementById("hw-host").addEventListener("change", loadHardware);
  window.addEventListener("hashchange", route);
  setInterval(refreshThumbs, THUMB_MS);
  document.addEventListener("visibilitychange", refreshThumbs);
  try {
    await start(await api("GET", "/api/v1/whoami"));
  } catch (e) {
    if (e.status !== 401) toast(`the gateway: ${e.message}`, true);
    showLogin();
  }
}

document.addEventListener("DOMContentLoaded", boot);
