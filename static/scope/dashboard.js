// The operators' dashboard: a snapshot, then every change pushed over /ws/dashboard/.
// Terminate goes through DELETE /api/v1/webrtc/offer/{id}, the same close path as any client's.
"use strict";

(() => {
  const RECONNECT_DELAY_MS = 2000;
  const RECENTLY_CLOSED = 20;
  const CLOSE_UNAUTHORIZED = 4003;

  const $ = (id) => document.getElementById(id);
  const tables = {
    live: $("live-sessions").tBodies[0],
    closed: $("closed-sessions").tBodies[0],
    workers: $("workers").tBodies[0],
  };
  const empties = { live: $("live-empty"), closed: $("closed-empty"), workers: $("workers-empty") };
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

  const open = new Map(); // session id → record
  let closed = []; // newest first
  const workers = new Map(); // worker id → record
  let clockSkewMs = 0; // server clock − this clock

  // --- formatting ------------------------------------------------------------------

  const serverNow = () => Date.now() + clockSkewMs;
  const shortId = (id) => id.slice(0, 8);

  function duration(ms) {
    if (ms === null || Number.isNaN(ms)) return "–";
    const seconds = Math.max(0, Math.round(ms / 1000));
    if (seconds < 60) return `${seconds} s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return `${minutes} min ${seconds % 60} s`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  const since = (iso) => (iso ? serverNow() - Date.parse(iso) : null);
  const until = (iso) => (iso ? Date.parse(iso) - serverNow() : null);

  function cell(row, index, text, className) {
    while (row.cells.length <= index) row.insertCell();
    const td = row.cells[index];
    if (className !== undefined) td.className = className;
    if (td.textContent !== String(text)) td.textContent = text;
    return td;
  }

  function stateCell(row, index, state) {
    const td = cell(row, index, "");
    let badge = td.firstElementChild;
    if (!badge) { badge = document.createElement("span"); badge.className = "state"; td.append(badge); }
    badge.dataset.state = state;
    badge.textContent = state;
  }

  function rowFor(tbody, key, value, position) {
    let row = tbody.querySelector(`tr[${key}="${CSS.escape(String(value))}"]`);
    if (!row) {
      row = document.createElement("tr");
      row.setAttribute(key, value);
      row.classList.add("changed");
      row.addEventListener("animationend", () => row.classList.remove("changed"));
    }
    const at = tbody.rows[position];
    if (at !== row) tbody.insertBefore(row, at || null);
    return row;
  }

  function prune(tbody, key, keep) {
    for (const row of [...tbody.rows]) if (!keep.has(row.getAttribute(key))) row.remove();
  }

  // --- rendering -------------------------------------------------------------------

  function renderLive() {
    const sessions = [...open.values()].sort((a, b) => a.created_at.localeCompare(b.created_at));
    sessions.forEach((s, position) => {
      const row = rowFor(tables.live, "data-session-id", s.id, position);
      row.dataset.state = s.state;
      cell(row, 0, shortId(s.id), "id").title = s.id;
      cell(row, 1, s.owner ?? "anonymous");
      cell(row, 2, s.pipeline || "–");
      cell(row, 3, s.worker === null ? "–" : `#${s.worker}`);
      stateCell(row, 4, s.state);
      cell(row, 5, duration(since(s.created_at)));
      cell(row, 6, s.deadline_at ? duration(until(s.deadline_at)) : "–");
      cell(row, 7, s.frames_in.toLocaleString(), "num");
      cell(row, 8, s.frames_out.toLocaleString(), "num");
      cell(row, 9, s.viewers.toLocaleString(), "num");
      actionCell(row, 10, s);
    });
    prune(tables.live, "data-session-id", new Set(sessions.map((s) => s.id)));
    empties.live.hidden = sessions.length > 0;
  }

  function actionCell(row, index, session) {
    const td = cell(row, index, "");
    if (td.querySelector("button")) {
      td.querySelector("button").disabled = session.state === "closing" || td.dataset.busy === "1";
      return;
    }
    const button = document.createElement("button");
    button.type = "button";
    button.className = "button danger small terminate";
    button.textContent = "Terminate";
    const outcome = document.createElement("span");
    outcome.className = "outcome";
    button.addEventListener("click", () => terminate(session.id, td, button, outcome));
    td.append(button, outcome);
  }

  async function terminate(sessionId, td, button, outcome) {
    td.dataset.busy = "1";
    button.disabled = true;
    outcome.textContent = "Terminating…";
    let text;
    try {
      const response = await fetch(`/api/v1/webrtc/offer/${encodeURIComponent(sessionId)}`, {
        method: "DELETE",
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken },
      });
      if (response.status === 204) text = "terminated";
      else if (response.status === 202) text = "closing…";
      else {
        const body = await response.json().catch(() => ({}));
        text = `failed: ${body.code || response.status}`;
        button.disabled = false;
      }
    } catch (error) {
      text = `failed: ${error.message}`;
      button.disabled = false;
    }
    delete td.dataset.busy;
    outcome.textContent = text;
    notice(`Session ${shortId(sessionId)}: ${text}`);
  }

  function renderClosed() {
    closed.forEach((s, position) => {
      const row = rowFor(tables.closed, "data-session-id", s.id, position);
      cell(row, 0, shortId(s.id), "id").title = s.id;
      cell(row, 1, s.owner ?? "anonymous");
      cell(row, 2, s.pipeline || "–");
      cell(row, 3, s.close_reason, "reason");
      const began = s.live_at || s.created_at;
      cell(row, 4, duration(Date.parse(s.closed_at) - Date.parse(began)));
      cell(row, 5, `${duration(since(s.closed_at))} ago`);
      cell(row, 6, s.frames_in.toLocaleString(), "num");
      cell(row, 7, s.frames_out.toLocaleString(), "num");
    });
    prune(tables.closed, "data-session-id", new Set(closed.map((s) => s.id)));
    empties.closed.hidden = closed.length > 0;
  }

  function renderWorkers() {
    const list = [...workers.values()].sort((a, b) => a.id - b.id);
    list.forEach((w, position) => {
      const row = rowFor(tables.workers, "data-worker-id", w.id, position);
      cell(row, 0, `#${w.id}`, "id");
      cell(row, 1, `${w.host} · pid ${w.pid}`);
      cell(row, 2, w.device);
      const slots = cell(row, 3, "");
      slots.replaceChildren();
      const meter = document.createElement("span");
      meter.className = "meter";
      const fill = document.createElement("span");
      fill.style.width = `${w.capacity ? Math.min(100, (100 * w.slots_used) / w.capacity) : 0}%`;
      meter.append(fill);
      slots.append(meter, `${w.slots_used} / ${w.capacity}`);
      cell(row, 4, w.peer_count, "num");
      stateCell(row, 5, w.state);
      cell(row, 6, `${duration(since(w.heartbeat_at))} ago`);
    });
    prune(tables.workers, "data-worker-id", new Set(list.map((w) => String(w.id))));
    empties.workers.hidden = list.length > 0;
  }

  function renderAll() {
    renderLive();
    renderClosed();
    renderWorkers();
  }

  function notice(text) {
    const box = $("notice");
    box.textContent = text;
    box.hidden = !text;
  }

  // --- state from the server --------------------------------------------------------

  function applySession(session) {
    if (session.state === "closed") {
      open.delete(session.id);
      closed = [session, ...closed.filter((s) => s.id !== session.id)].slice(0, RECENTLY_CLOSED);
    } else {
      open.set(session.id, session);
    }
  }

  function onMessage(event) {
    const message = JSON.parse(event.data);
    if (message.now) clockSkewMs = Date.parse(message.now) - Date.now();
    switch (message.type) {
      case "snapshot":
        open.clear();
        workers.clear();
        message.sessions.forEach((s) => open.set(s.id, s));
        closed = message.closed;
        message.workers.forEach((w) => workers.set(w.id, w));
        break;
      case "session":
        applySession(message.session);
        break;
      case "worker":
        workers.set(message.worker.id, message.worker);
        message.sessions.forEach(applySession);
        break;
      case "error":
        notice(message.error);
        return;
      default:
        return;
    }
    renderAll();
  }

  function connect() {
    const indicator = $("connection");
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/dashboard/`);
    ws.addEventListener("open", () => { indicator.dataset.state = "live"; indicator.textContent = "Live"; });
    ws.addEventListener("message", onMessage);
    ws.addEventListener("close", (event) => {
      indicator.dataset.state = "lost";
      if (event.code === CLOSE_UNAUTHORIZED) { indicator.textContent = "Not allowed"; return; }
      indicator.textContent = "Reconnecting…";
      setTimeout(connect, RECONNECT_DELAY_MS);
    });
  }

  setInterval(renderAll, 1000); // ages and time left tick between pushes
  connect();
})();
