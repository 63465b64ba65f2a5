// Shared by the pages: the JSON API with the session's CSRF token, DOM building, time in words.
"use strict";
const fw = {
  me: null,
  skew: 0, // server clock minus this browser's clock, seconds
  now() { return Date.now() / 1000 + fw.skew; },
  async api(method, path, body) {
    const headers = { "Accept": "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && fw.me) headers["X-CSRF-Token"] = fw.me.csrf;
    const res = await fetch(path, { method, headers, credentials: "same-origin",
                                    body: body === undefined ? undefined : JSON.stringify(body) });
    if (res.status === 401) { window.location.assign("/login"); throw new Error("signed out"); }
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || res.statusText);
      throw new Error(detail);
    }
    return data;
  },
  h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  },
  ago(t) {
    if (t === null || t === undefined) return "never";
    const s = Math.max(0, fw.now() - t);
    if (s < 5) return "just now";
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  },
  when(t) { return t ? new Date(t * 1000).toLocaleString() : "-"; },
  pct(p) { return p === null || p === undefined ? "-" : `${Math.round(100 * p)}%`; },
  words(s) { return String(s || "").replaceAll("_", " "); },
  async signIn() {
    fw.me = await fw.api("GET", "/api/me");
    document.querySelectorAll("[data-me]").forEach(el => { el.textContent = `${fw.me.name} (${fw.me.role})`; });
    document.querySelectorAll("[data-admin]").forEach(el => el.classList.toggle("hidden", fw.me.role !== "admin"));
    const out = document.getElementById("signout");
    if (out) out.addEventListener("click", async () => {
      await fw.api("POST", "/api/logout").catch(() => null);
      window.location.assign("/login");
    });
    return fw.me;
  },
  // Server-sent events; the browser reconnects by itself, and "hello" tells us to reload state.
  live(path, handlers) {
    const dot = document.getElementById("live");
    const src = new EventSource(path);
    const mark = (on) => { if (dot) { dot.textContent = on ? "live" : "reconnecting"; dot.className = on ? "live on" : "live off"; } };
    src.addEventListener("open", () => mark(true));
    src.addEventListener("error", () => mark(false));
    src.addEventListener("logout", () => { src.close(); window.location.assign("/login"); });
    for (const [name, fn] of Object.entries(handlers)) {
      src.addEventListener(name, (e) => fn(JSON.parse(e.data)));
    }
    return src;
  },
};
