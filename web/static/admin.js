// The admin page: offload rate, cloud queue, timeouts, budget, switcher, workers, Redis, precision.
"use strict";
(() => {
  const { h } = fw;
  const dash = (v) => (v === null || v === undefined ? "-" : v);
  function kv(id, pairs) {
    document.getElementById(id).replaceChildren(...pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, dash(v))]));
  }
  function rows(id, list, cells, empty) {
    const body = document.querySelector(`#${id} tbody`);
    const n = document.querySelectorAll(`#${id} th`).length;
    body.replaceChildren(...(list.length ? list.map(r => h("tr", {}, cells(r).map(c => h("td", {}, c))))
      : [h("tr", {}, h("td", { colspan: String(n), class: "muted" }, empty))]));
  }
  function render(s) {
    const sc = s.scoring, q = s.queue;
    kv("offload", [["offload rate", fw.pct(sc.offload_rate)], ["final verdicts", sc.finals], ["offloaded", sc.offloaded],
      ...Object.entries(s.timeouts).map(([k, v]) => [fw.words(k), v]),
      ...Object.entries(sc.by_decider).filter(([k]) => !(k in s.timeouts)).map(([k, v]) => [`by ${fw.words(k)}`, v])]);
    kv("queue", [["queue", q.name], ["waiting", q.depth], ["oldest waiting", s.queue_age_s === null ? "-" : `${s.queue_age_s.toFixed(1)} s`],
      ["running", q.started], ["failed", q.failed], ["cloud workers", q.workers]]);
    kv("budget", s.budget ? Object.entries(s.budget).map(([k, v]) => [fw.words(k), typeof v === "object" ? JSON.stringify(v) : v])
      : [["budget", "no cloud budget configured"]]);
    kv("switcher", [["checkpoint", s.switcher.checkpoint || "none (nothing offloaded)"], ["version in use", s.switcher.version || "not reported"],
      ["drift", s.switcher.drift || "not reported"]]);
    kv("redis", [["version", s.redis.version], ["memory used", `${(s.redis.used_memory_bytes / 1048576).toFixed(1)} MiB`],
      ["clients", s.redis.connected_clients], ["key prefix", s.key_prefix]]);
    rows("workers", s.workers, w => [w.role, w.name, fw.ago(w.last_beat_at),
      w.metrics ? h("a", { href: `http://${w.metrics}/metrics`, rel: "noopener" }, w.metrics) : "-"], "No live workers.");
    const prec = Object.entries(s.precision).flatMap(([cam, periods]) => periods.map(p => ({ cam, ...p }))).reverse();
    rows("precision", prec, p => [p.cam, new Date(p.period_start * 1000).toLocaleDateString(), p.confirmed, p.false_alarm,
      p.not_sure, fw.pct(p.precision)], "No outcomes recorded yet.");
    rows("streams", s.streams.flatMap(st => st.groups.length ? st.groups.map(g => ({ st, g })) : [{ st, g: null }]),
      ({ st, g }) => [st.name, st.length, g ? g.name : "-", g ? g.pending : "-", g && g.lag !== null ? g.lag : "-"], "No streams.");
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }
  async function main() {
    await fw.signIn();
    render(await fw.api("GET", "/api/status"));
    fw.live("/api/stream?status=1", {
      hello: (d) => { fw.skew = d.at - Date.now() / 1000; },
      status: render,
    });
  }
  main().catch(e => { document.getElementById("updated").replaceChildren(h("span", { class: "error" }, e.message)); });
})();
