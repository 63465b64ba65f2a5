// The caregiver page: open events (take them, resolve them), camera tiles, history.
"use strict";
(() => {
  const { h } = fw;
  // fetches: refreshes started (only the newest one's answer is shown); live: camera updates pushed
  // by the stream (a refresh that started before one of them answers with older tiles).
  const state = { events: [], cameras: [], page: 1, pages: 1, seen: new Set(), sound: null, drafts: {},
                  fetches: 0, live: 0 };
  const OUTCOMES = [["confirmed_fall", "Confirmed fall"], ["false_alarm", "False alarm"], ["not_sure", "Not sure"]];
  const KIND = { fall: "Fall", camera_offline: "Camera offline" };

  // --- alarm: banner, tab title, optional sound -------------------------------------------------
  function alarming() {
    return state.events.filter(e => e.kind === "fall" && !e.acknowledged);
  }
  function beep() {
    if (!state.sound) return;
    const osc = state.sound.createOscillator(), gain = state.sound.createGain();
    osc.frequency.value = 880; gain.gain.value = 0.2;
    osc.connect(gain); gain.connect(state.sound.destination);
    osc.start(); osc.stop(state.sound.currentTime + 0.4);
  }
  function renderAlarm() {
    const list = alarming();
    const banner = document.getElementById("banner");
    banner.classList.toggle("hidden", list.length === 0);
    if (list.length === 0) { document.title = "fallwatch"; return; }
    const top = list[0];
    document.getElementById("banner-text").textContent =
      `FALL: ${top.camera_name || top.camera_id}, ${fw.ago(top.started_at)}` + (list.length > 1 ? ` (+${list.length - 1} more)` : "");
    document.getElementById("banner-go").dataset.event = top.event_id;
    document.title = `(${list.length}) FALL: ${top.camera_name || top.camera_id} · fallwatch`;
  }

  // --- open events --------------------------------------------------------------------------------
  async function act(el, fn) {
    const err = el.querySelector(".error");
    try { err.textContent = ""; await fn(); await refresh(); }
    catch (e) { err.textContent = e.message; }
  }
  function resolveForm(e, card) {
    const draft = state.drafts[e.event_id] || (state.drafts[e.event_id] = { outcome: "", note: "" });
    const radios = OUTCOMES.map(([value, label]) => h("label", {},
      h("input", { type: "radio", name: `outcome-${e.event_id}`, value, checked: draft.outcome === value,
                   onchange: () => { draft.outcome = value; } }), ` ${label}`));
    const note = h("textarea", { placeholder: "Note (optional)", maxlength: "1000", "aria-label": "note",
                                 oninput: (ev) => { draft.note = ev.target.value; } });
    note.value = draft.note;
    const submit = h("button", { type: "button", class: "primary", "data-action": "resolve", onclick: () => act(card, async () => {
      if (!draft.outcome) throw new Error("choose what it was first");
      await fw.api("POST", `/api/events/${e.event_id}/resolve`, { outcome: draft.outcome, note: draft.note });
      delete state.drafts[e.event_id];
    }) }, "Resolve");
    return h("div", { class: "resolve" }, h("fieldset", {}, h("legend", {}, "What was it?"), radios), note, submit);
  }
  function snapshotButton(e, card) {
    if (!fw.me.snapshots || e.kind !== "fall") return null;
    return h("button", { type: "button", onclick: () => act(card, async () => {
      const res = await fetch(`/api/events/${e.event_id}/snapshot`, { credentials: "same-origin", cache: "no-store" });
      if (!res.ok) throw new Error((await res.json().catch(() => ({}))).detail || "no snapshot");
      const img = h("img", { alt: "frame of the event", src: URL.createObjectURL(await res.blob()) });
      card.querySelector(".snap").replaceChildren(img);
    }) }, "Show frame");
  }
  function eventCard(e) {
    const fresh = e.kind === "fall" && !e.acknowledged;
    const card = h("article", { class: `event ${e.kind === "fall" ? "fall" : "offline"} ${fresh ? "new" : ""}`,
                                "data-event": e.event_id });
    const who = e.acknowledged ? `taken by ${e.acknowledged_by} ${fw.ago(e.acknowledged_at)}` : "";
    card.append(
      h("div", { class: "top" }, h("span", { class: "cam" }, e.camera_name || e.camera_id),
        h("span", {}, KIND[e.kind] || e.kind), h("span", { class: "muted", "data-ago": e.started_at }, fw.ago(e.started_at)),
        e.confidence !== null ? h("span", {}, `confidence ${fw.pct(e.confidence)}`) : null),
      e.kind === "fall" ? h("div", { class: "muted" }, e.decided_words) : (e.description ? h("div", { class: "muted" }, e.description) : null),
      h("div", { class: "state", "data-state": "" }, e.state, who ? ` · ${who}` : ""),
      h("div", { class: "actions" },
        !e.acknowledged ? h("button", { type: "button", class: "go", "data-action": "ack",
          onclick: () => act(card, () => fw.api("POST", `/api/events/${e.event_id}/ack`)) }, "I'm going") : null,
        snapshotButton(e, card)),
      e.kind === "fall" ? resolveForm(e, card) : null,
      h("div", { class: "snap" }), h("p", { class: "error", role: "alert" }));
    return card;
  }
  function renderEvents() {
    const box = document.getElementById("events");
    document.getElementById("open-count").textContent = state.events.length ? `(${state.events.length})` : "";
    box.replaceChildren(...(state.events.length ? state.events.map(eventCard) : [h("p", { class: "muted" }, "Nothing open. All quiet.")]));
    renderAlarm();
  }

  // --- cameras --------------------------------------------------------------------------------------
  function tileClass(c) { return c.online ? "online" : c.stale ? "stale" : c.state === "offline" ? "offline" : "unknown"; }
  function tileBadge(c) { return c.online ? "Online" : c.stale ? "No frames" : c.state === "offline" ? "Offline" : "Not seen yet"; }
  function renderCameras() {
    const box = document.getElementById("cameras");
    box.replaceChildren(...state.cameras.map(c => h("div", { class: `tile ${tileClass(c)}`, "data-camera": c.id },
      h("div", { class: "name" }, c.name), h("div", { class: "badge" }, tileBadge(c)),
      h("div", { class: "muted" }, "last frame ", h("span", { "data-ago": c.last_frame_at ?? "" }, fw.ago(c.last_frame_at))),
      c.reason && !c.online ? h("div", { class: "muted" }, c.reason) : null,
      c.open_event ? h("div", { class: "error" }, c.open_event.kind === "fall" ? "fall event open" : "offline event open") : null)));
    const select = document.getElementById("f-camera"), keep = select.value;
    select.replaceChildren(h("option", { value: "" }, "all"), ...state.cameras.map(c => h("option", { value: c.id }, c.name)));
    select.value = keep;
  }

  // --- history ----------------------------------------------------------------------------------------
  function day(id, end) {
    const v = document.getElementById(id).value;
    if (!v) return null;
    const d = new Date(`${v}T00:00:00`);
    if (end) d.setDate(d.getDate() + 1);
    return d.getTime() / 1000 - (end ? 0.001 : 0);
  }
  function historyRow(e) {
    const row = h("tr", { "data-event": e.event_id, class: "row" },
      h("td", {}, fw.when(e.started_at)), h("td", {}, e.camera_name || e.camera_id), h("td", {}, KIND[e.kind] || e.kind),
      h("td", { class: "hide-narrow" }, e.kind === "fall" ? e.decided_words : "-"),
      h("td", {}, e.outcome ? fw.words(e.outcome) : (e.open ? "open" : "-")),
      h("td", { class: "hide-narrow" }, e.resolved_by || e.acknowledged_by || "-"));
    row.addEventListener("click", () => toggleDetail(row, e));
    return row;
  }
  function toggleDetail(row, e) {
    if (row.nextSibling && row.nextSibling.classList && row.nextSibling.classList.contains("detail")) { row.nextSibling.remove(); return; }
    const lines = [`started ${fw.when(e.started_at)}`];
    if (e.acknowledged) lines.push(`acknowledged by ${e.acknowledged_by} at ${fw.when(e.acknowledged_at)} (${e.ack_source || "?"})`);
    if (e.outcome) lines.push(`resolved as ${fw.words(e.outcome)} by ${e.resolved_by} at ${fw.when(e.resolved_at)}`);
    if (e.outcome_note) lines.push(`note: ${e.outcome_note}`);
    lines.push(`frames: ${e.frame_ids.length}, event ${e.event_id}`);
    row.after(h("tr", { class: "detail" }, h("td", { colspan: "6" }, lines.map(l => h("div", {}, l)))));
  }
  async function loadHistory() {
    const q = new URLSearchParams({ page: String(state.page) });
    const cam = document.getElementById("f-camera").value, out = document.getElementById("f-outcome").value;
    const since = day("f-since", false), until = day("f-until", true);
    if (cam) q.set("camera", cam);
    if (out) q.set("outcome", out);
    if (since !== null) q.set("since", String(since));
    if (until !== null) q.set("until", String(until));
    const data = await fw.api("GET", `/api/events?${q}`);
    state.pages = data.pages;
    document.querySelector("#history tbody").replaceChildren(...(data.events.length ? data.events.map(historyRow)
      : [h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No events."))]));
    document.getElementById("page").textContent = `page ${data.page} of ${data.pages} (${data.total} events)`;
    document.getElementById("prev").disabled = state.page <= 1;
    document.getElementById("next").disabled = state.page >= state.pages;
  }

  // --- wiring ----------------------------------------------------------------------------------------------
  async function refresh() {
    const mine = ++state.fetches, live = state.live;
    const [events, cameras] = await Promise.all([fw.api("GET", "/api/events/open"), fw.api("GET", "/api/cameras")]);
    if (mine !== state.fetches) return;  // a newer refresh is on its way
    const newFall = events.some(e => e.kind === "fall" && !e.acknowledged && !state.seen.has(e.event_id));
    events.forEach(e => state.seen.add(e.event_id));
    state.events = events;
    if (live === state.live) state.cameras = cameras;  // else the stream has already sent newer tiles
    renderEvents(); renderCameras();
    if (newFall) beep();
  }
  function tick() {
    document.querySelectorAll("[data-ago]").forEach(el => {
      const t = el.dataset.ago; el.textContent = fw.ago(t === "" ? null : Number(t));
    });
    renderAlarm();
  }
  function wire() {
    document.getElementById("filters").addEventListener("submit", (e) => { e.preventDefault(); state.page = 1; loadHistory(); });
    document.getElementById("prev").addEventListener("click", () => { state.page -= 1; loadHistory(); });
    document.getElementById("next").addEventListener("click", () => { state.page += 1; loadHistory(); });
    document.getElementById("banner-go").addEventListener("click", async (e) => {
      await fw.api("POST", `/api/events/${e.target.dataset.event}/ack`); await refresh();
    });
    document.getElementById("sound").addEventListener("change", (e) => {
      state.sound = e.target.checked ? new AudioContext() : null;
      if (state.sound) beep();
    });
  }
  async function main() {
    await fw.signIn();
    wire();
    await refresh();
    await loadHistory();
    setInterval(tick, 1000); // clock only: "how long ago" texts; data come from the live stream
    fw.live("/api/stream", {
      hello: (d) => { fw.skew = d.at - Date.now() / 1000; refresh(); loadHistory(); },
      event: () => { refresh(); if (state.page === 1) loadHistory(); },
      cameras: (rows) => { state.live++; state.cameras = rows; renderCameras(); },
    });
  }
  main().catch(e => { document.getElementById("events").replaceChildren(h("p", { class: "error" }, e.message)); });
})();
