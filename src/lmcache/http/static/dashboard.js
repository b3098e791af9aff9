// The dashboard at GET /: polls /status every second and draws what it reads. No library,
// no build step. Server-provided strings go into the page only as textContent (model
// names are the clients' choice), never as HTML.
"use strict";

const POLL_MS = 1000;
const WINDOW_S = 300; // the charts' time span
const samples = []; // {t, storeTps, retrieveTps, hitPct, usedPct}
let previous = null; // the last /status, for rates
let failures = 0;

const $ = (id) => document.getElementById(id);
const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}
const fmtPct = (x) => (x === null || !isFinite(x) ? "–" : `${(100 * x).toFixed(1)} %`);
const fmtRate = (n) => (n >= 100 ? fmtInt(n) : n.toFixed(1));
function set(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = String(cell);
    tr.appendChild(td);
  }
  return tr;
}
function fill(id, rows, emptyText, columns) {
  const body = $(id);
  body.replaceChildren(...(rows.length ? rows : [emptyRow(emptyText, columns)]));
}
function emptyRow(text, columns) {
  const tr = document.createElement("tr");
  const td = document.createElement("td");
  td.colSpan = columns; td.className = "muted"; td.textContent = text;
  tr.appendChild(td);
  return tr;
}
function dot(ok, text) {
  const span = document.createElement("span");
  const d = document.createElement("span");
  d.className = `dot ${ok ? "ok" : "bad"}`;
  span.append(d, text);
  return span;
}

function rates(s) {
  const out = { storeTps: 0, retrieveTps: 0, storeBps: 0, retrieveBps: 0, hitNow: null };
  if (!previous || previous.instance_id !== s.instance_id) return out;
  const dt = s.uptime_s - previous.uptime_s;
  if (dt <= 0) return out;
  const d = (get) => Math.max(0, get(s) - get(previous)) / dt;
  out.storeTps = d((x) => x.traffic.stored_tokens);
  out.retrieveTps = d((x) => x.traffic.retrieved_tokens);
  out.storeBps = d((x) => x.traffic.stored_bytes);
  out.retrieveBps = d((x) => x.traffic.retrieved_bytes);
  const asked = s.lookups.requested_tokens - previous.lookups.requested_tokens;
  if (asked > 0) out.hitNow = (s.lookups.hit_tokens - previous.lookups.hit_tokens) / asked;
  return out;
}

function render(s) {
  const l1 = s.l1 || {};
  const lk = s.lookups || {};
  const tr = s.traffic || {};
  const ev = s.eviction || {};
  const r = rates(s);
  set("version", `v${s.version} · instance ${s.instance_id} · up ${fmtUptime(s.uptime_s)}`);
  const degraded = (s.l2_adapters || []).some((a) => a.healthy === false);
  const health = $("health");
  health.className = `badge ${!s.healthy ? "bad" : degraded ? "warn" : "ok"}`;
  set("health", !s.ready ? "starting" : !s.healthy ? "unhealthy" : degraded ? "degraded" : "healthy");
  const problems = $("problems");
  problems.hidden = !(s.problems && s.problems.length);
  set("problems", (s.problems || []).join(" · "));

  const cap = l1.capacity_bytes || 0;
  set("l1-used", fmtBytes(l1.used_bytes));
  set("l1-committed", `${fmtBytes(l1.committed_bytes)}${l1.committed_bytes < cap ? " (lazy pool)" : ""}`);
  set("l1-capacity", fmtBytes(cap));
  set("l1-objects", fmtInt(l1.objects || 0));
  set("l1-shm", l1.shm_segment || "–");
  $("bar-used").style.width = `${cap ? (100 * l1.used_bytes) / cap : 0}%`;
  $("bar-committed").style.width = `${cap ? (100 * l1.committed_bytes) / cap : 0}%`;

  const hit = lk.requested_tokens ? lk.hit_tokens / lk.requested_tokens : null;
  set("hit-rate", fmtPct(hit));
  set("hit-rate-now", fmtPct(r.hitNow));
  set("hit-l1", fmtInt(lk.hit_l1_tokens || 0));
  set("hit-l2", fmtInt(lk.hit_l2_tokens || 0));
  set("lookup-requested", fmtInt(lk.requested_tokens || 0));

  set("store-tps", fmtRate(r.storeTps));
  set("retrieve-tps", fmtRate(r.retrieveTps));
  set("store-bps", fmtBytes(r.storeBps));
  set("retrieve-bps", fmtBytes(r.retrieveBps));
  set("stored-tokens", fmtInt(tr.stored_tokens || 0));
  set("retrieved-tokens", fmtInt(tr.retrieved_tokens || 0));
  set("stored-bytes", fmtBytes(tr.stored_bytes || 0));
  set("retrieved-bytes", fmtBytes(tr.retrieved_bytes || 0));
  set("no-space", fmtInt(tr.store_no_space || 0));

  set("ev-policy", ev.policy || l1.eviction_policy || "–");
  set("ev-count", fmtInt(l1.evictions || 0));
  set("ev-watermark", ev.watermark === null || ev.watermark === undefined ? "on demand only"
    : `${fmtPct(ev.watermark)} → ${fmtPct(ev.watermark - ev.ratio)} (${fmtInt(ev.evicted)} evicted)`);
  set("locked", fmtInt(l1.locked || 0));
  set("leases", fmtInt(l1.leases || 0));
  set("writing", fmtInt(l1.writing || 0));
  set("sessions", fmtInt((s.sessions || {}).active || 0));
  set("prepared", fmtInt(s.prepared_transfers || 0));

  const engines = s.engines || [];
  set("engine-count", String(engines.length));
  fill("engines", engines.map((e) => row([
    e.instance_id, e.model_name, `${e.rank} / ${e.world_size}`, e.dtype, e.transfer,
    `${e.num_layers} layers × ${e.planes} × ${e.num_blocks} blocks of ${e.block_size}`,
    fmtBytes(e.chunk_bytes), `${Number(e.idle_s).toFixed(1)} s`,
  ])), "none registered", 8);

  fill("l2", (s.l2_adapters || []).map((a) => row([
    a.name, dot(a.healthy !== false, a.healthy === false ? ` down: ${a.last_error || ""}` : " up"),
    fmtInt(a.objects || 0),
    a.capacity_bytes ? `${fmtBytes(a.bytes)} of ${fmtBytes(a.capacity_bytes)}` : fmtBytes(a.bytes),
    `${fmtInt(a.hits || 0)} / ${fmtInt(a.misses || 0)}`, fmtInt(a.errors || 0),
    fmtInt(a.queue_depth || 0), fmtInt(a.queue_skipped_full || 0),
    `${a.store_gbps ?? "–"} / ${a.read_gbps ?? a.prefetch_gbps ?? "–"}`,
  ])), "no L2 tier (--l2-adapter)", 9);

  $("workers").replaceChildren(...(s.workers || []).map((w) => {
    const li = document.createElement("li");
    li.appendChild(dot(w.alive, ` ${w.name}${w.in_flight !== undefined ? ` (${w.in_flight} in flight)` : ""}`));
    return li;
  }));

  samples.push({
    t: s.uptime_s, storeTps: r.storeTps, retrieveTps: r.retrieveTps,
    hitPct: r.hitNow === null ? null : 100 * r.hitNow, usedPct: cap ? (100 * l1.used_bytes) / cap : 0,
  });
  while (samples.length && samples[0].t < s.uptime_s - WINDOW_S) samples.shift();
  draw($("chart-traffic"), [["storeTps", "--c1"], ["retrieveTps", "--c2"]], null);
  draw($("chart-ratio"), [["hitPct", "--c3"], ["usedPct", "--c4"]], 100);
  previous = s;
}

function fmtUptime(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min` : `${Math.floor(s)} s`;
}

// A line chart of `series` ([key, css colour variable]) over the last WINDOW_S seconds.
function draw(canvas, series, fixedMax) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const style = getComputedStyle(document.documentElement);
  const left = 48, bottom = h - 18, top = 8, right = w - 8;
  const now = samples.length ? samples[samples.length - 1].t : 0;
  let max = fixedMax || 0;
  if (!fixedMax) for (const p of samples) for (const [k] of series) max = Math.max(max, p[k] || 0);
  max = max > 0 ? niceCeil(max) : 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = style.getPropertyValue("--muted");
  ctx.strokeStyle = style.getPropertyValue("--line");
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const y = bottom - ((bottom - top) * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(right, y); ctx.stroke();
    ctx.fillText(fmtRate((max * i) / 4), 2, y + 4);
  }
  for (let m = 0; m <= WINDOW_S / 60; m += 1) {
    const x = right - ((right - left) * m * 60) / WINDOW_S;
    ctx.fillText(m ? `-${m} min` : "now", Math.min(x - 12, right - 24), h - 4);
  }
  const xOf = (t) => right - ((right - left) * (now - t)) / WINDOW_S;
  const yOf = (v) => bottom - ((bottom - top) * Math.min(v, max)) / max;
  ctx.lineWidth = 2;
  for (const [key, colour] of series) {
    ctx.strokeStyle = style.getPropertyValue(colour);
    ctx.beginPath();
    let pen = false;
    for (const p of samples) {
      const v = p[key];
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(xOf(p.t), yOf(v)); else ctx.moveTo(xOf(p.t), yOf(v));
      pen = true;
    }
    ctx.stroke();
    ctx.fillStyle = ctx.strokeStyle; // a point without neighbours is a dot, not nothing
    for (const p of samples) if (p[key] !== null && p[key] !== undefined) ctx.fillRect(xOf(p.t) - 1.5, yOf(p[key]) - 1.5, 3, 3);
  }
}
function niceCeil(x) {
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 5, 10]) if (x <= m * p) return m * p;
  return 10 * p;
}

async function poll() {
  try {
    const res = await fetch("/status", { cache: "no-store" });
    if (!res.ok) throw new Error(`/status answered ${res.status}`);
    render(await res.json());
    failures = 0;
    $("conn").hidden = true;
    set("updated", `updated ${new Date().toLocaleTimeString("en-GB")}`);
  } catch (err) {
    failures += 1;
    $("conn").hidden = false;
    set("conn", `cannot reach the server (${err.message}); retrying every second`);
    if (failures > 2) { $("health").className = "badge bad"; set("health", "unreachable"); }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function clearL1() {
  if (!window.confirm("Remove every object from L1, locked ones included?")) return;
  const button = $("clear-l1");
  const out = $("action-result");
  const headers = {};
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  button.disabled = true;
  try {
    const res = await fetch("/clear-cache", { method: "POST", headers, cache: "no-store" });
    let body = {};
    try { body = await res.json(); } catch (_) { body = {}; }
    out.hidden = false;
    if (res.ok) {
      out.className = "result ok";
      out.textContent = `Cleared: ${fmtInt(body.removed || 0)} objects removed from L1.`;
    } else {
      out.className = "result bad";
      const why = body.reason || res.statusText;
      out.textContent = res.status === 401 || res.status === 403
        ? `Refused (${res.status}): ${why}`
        : `Failed (${res.status}): ${why}`;
    }
  } catch (err) {
    out.hidden = false; out.className = "result bad";
    out.textContent = `Failed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("window-min").textContent = String(WINDOW_S / 60);
  $("clear-l1").addEventListener("click", clearL1);
  poll();
});
