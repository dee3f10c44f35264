// herald support console: plain DOM over the HTTP API (/api/v1). Everything
// that comes from mail is inserted as text (textContent), never as HTML.
// The token lives in sessionStorage and goes only in the Authorization
// header.

const API = "/api/v1";
const view = document.getElementById("view");

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "on") {
      for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
    } else if (v !== undefined && v !== null) {
      e.setAttribute(k, v);
    }
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function token() {
  return sessionStorage.getItem("herald-token");
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + (token() || "") };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(API + path, init);
  const data = await r.json().catch(() => ({ ok: false, error: "HTTP " + r.status }));
  if (r.status === 401) throw new Unauthorized(data.error || "wrong token");
  if (!r.ok) throw new Error(data.error || "HTTP " + r.status);
  return data;
}

function ago(ms) {
  if (!ms) return "-";
  let s = Math.round((Date.now() - ms) / 1000);
  const suffix = s >= 0 ? " ago" : "";
  const prefix = s < 0 ? "in " : "";
  s = Math.abs(s);
  const d = s >= 86400 ? Math.floor(s / 86400) + "d " : "";
  const h = s >= 3600 ? Math.floor((s % 86400) / 3600) + "h " : "";
  const m = s >= 60 ? Math.floor((s % 3600) / 60) + "m " : "";
  return prefix + (d + h + m || s + "s ").trim() + suffix;
}

function table(headers, rows, id) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) =>
      el("td", i === r.length - 1 ? { class: "detail" } : {}, c))))));
}

// What this token may see and do: a tenant's token sees its tenant's mail
// only (the API enforces it; the page shows the tenant's name and leaves
// out what the token may not do).
let scope = null;

async function loadScope() {
  if (scope) return scope;
  const st = await api("GET", "/status");
  scope = { tenant: st.tenant || null, readOnly: !!st.read_only };
  const badge = document.getElementById("scope");
  badge.textContent = (scope.tenant ? "tenant " + scope.tenant : "") +
    (scope.readOnly ? (scope.tenant ? " (read-only)" : "read-only") : "");
  badge.hidden = !badge.textContent;
  document.getElementById("nav-dmarc").hidden = !!scope.tenant;
  return scope;
}

// A button, or nothing for a read-only token.
function action(attrs, label) {
  return scope && scope.readOnly ? null : el("button", attrs, label);
}

function show(...children) {
  view.replaceChildren(...children);
}

function failure(e) {
  if (e instanceof Unauthorized) {
    login(e.message);
    return;
  }
  show(el("p", { class: "error", id: "error" }, e.message));
}

// ---------------------------------------------------------------- login

function login(message) {
  const dialog = document.getElementById("login");
  const err = document.getElementById("login-error");
  err.hidden = !message || !token();
  err.textContent = message && token() ? "That token was refused: " + message : "";
  sessionStorage.removeItem("herald-token");
  scope = null;
  document.getElementById("scope").hidden = true;
  document.getElementById("logout").hidden = true;
  view.replaceChildren();
  if (!dialog.open) dialog.showModal();
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const t = document.getElementById("token").value.trim();
  sessionStorage.setItem("herald-token", t);
  scope = null;
  try {
    await api("GET", "/status");
    document.getElementById("login").close();
    document.getElementById("logout").hidden = false;
    route();
  } catch (e) {
    const err = document.getElementById("login-error");
    sessionStorage.removeItem("herald-token");
    err.hidden = false;
    err.textContent = e instanceof Unauthorized ? "That token was refused." : e.message;
  }
});

document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem("herald-token");
  login();
});

// --------------------------------------------------------------- search

document.getElementById("search").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = document.getElementById("q").value.trim();
  if (!q) return;
  if (q.includes("@")) location.hash = "#/trace/" + encodeURIComponent(q);
  else if (/^[0-9A-HJKMNP-TV-Z]{12}$/.test(q)) location.hash = "#/message/" + q;
  else location.hash = "#/tag/" + encodeURIComponent(q);
});

function eventRows(events) {
  return events.map((e) => [
    e.time,
    ago(e.time_ms),
    e.id ? el("a", { href: "#/message/" + e.id }, e.id) : "-",
    e.event,
    e.class || "-",
    e.rcpt,
    e.subject || "-",
    e.detail,
  ]);
}

const EVENT_HEADERS = ["Time", "Age", "Queue id", "Event", "Class", "Recipient", "Subject", "Detail"];

// ---------------------------------------------------------------- views

async function traceView(addr) {
  const t = await api("GET", "/trace?rcpt=" + encodeURIComponent(addr));
  const last = t.events[0];
  const tone = !last ? "" : ["delivered", "opened"].includes(last.event) ? "good"
    : ["bounced", "suppressed", "expired", "rejected", "cancelled"].includes(last.event) ? "bad" : "";
  const parts = [
    el("h1", {}, "Recipient ", el("span", { id: "addr" }, t.addr)),
    el("div", { class: "diagnosis " + tone, id: "diagnosis" }, t.diagnosis),
  ];
  if (t.suppression) {
    const s = t.suppression;
    parts.push(el("p", { id: "suppression" },
      "Suppressed since " + ago(s.added_ms) + " (" + s.reason + (s.reply ? ": " + s.reply : "") + ")" +
        (s.tenant ? ", for tenant " + s.tenant + "'s mail only " : ", for everyone "),
      action({ id: "lift", on: { click: () => removeSuppression(s.addr, s.tenant, () => traceView(addr)) } },
        "Remove from the suppression list")));
  } else {
    parts.push(el("p", { id: "suppression" }, "Not suppressed."));
  }
  parts.push(table(EVENT_HEADERS, eventRows(t.events), "events"));
  show(...parts);
}

async function tagView(tag) {
  const r = await api("GET", "/events?limit=1000&tag=" + encodeURIComponent(tag));
  show(el("h1", {}, "Tag ", tag), table(EVENT_HEADERS, eventRows(r.events.slice().reverse()), "events"));
}

async function messageView(id) {
  const m = await api("GET", "/messages/" + encodeURIComponent(id));
  const q = m.queued;
  const parts = [el("h1", {}, "Message ", el("span", { id: "message-id" }, m.id))];
  const msg = el("p", { id: "action-result" });
  if (q) {
    parts.push(el("p", {},
      "From <" + q.original_sender + "> (sent as <" + q.mail_from + ">), route " + q.upstream +
      ", tag " + (q.tag || "-") + ", " + q.size + " bytes, received " + ago(q.received_at)));
    parts.push(table(["Recipient", "Status", "Class", "Tries", "Next", "Last reply"],
      q.rcpts.map((r) => [r.addr, r.status, r.class || "-", r.attempts,
        ["queued", "deferred"].includes(r.status) ? ago(r.next_attempt) : "-", r.last_reply || "-"]), "rcpts"));
    if (!scope.readOnly) parts.push(el("p", {},
      el("button", { id: "retry", on: { click: async () => {
        try {
          const r = await api("POST", "/messages/" + encodeURIComponent(id) + "/retry");
          msg.textContent = r.retried + " recipient(s) due now";
        } catch (e) { msg.textContent = e.message; }
      } } }, "Retry now"), " ",
      el("button", { id: "cancel", on: { click: async () => {
        if (!confirm("Cancel what is still queued of message " + id + "?")) return;
        try {
          const r = await api("DELETE", "/messages/" + encodeURIComponent(id));
          msg.textContent = "cancelled " + r.cancelled.length + " recipient(s)";
          await messageView(id);
        } catch (e) { msg.textContent = e.message; }
      } } }, "Cancel")));
    parts.push(msg);
  } else {
    parts.push(el("p", { id: "state" }, "No longer queued: every recipient is final (body deleted)."));
  }
  if (m.headers) parts.push(el("h2", {}, "Headers as sent"), el("pre", { id: "headers" }, m.headers));
  parts.push(el("h2", {}, "Events"), table(EVENT_HEADERS, eventRows(m.events.slice().reverse()), "events"));
  show(...parts);
}

async function removeSuppression(addr, tenant, then) {
  if (!confirm("Remove " + addr + " from the suppression list?")) return;
  await api("DELETE", "/suppressions/" + encodeURIComponent(addr) +
    (tenant ? "?tenant=" + encodeURIComponent(tenant) : ""));
  await then();
}

function csv(rows) {
  const cell = (v) => {
    let s = v === null || v === undefined ? "" : String(v);
    // A cell a spreadsheet would run as a formula stays text (OWASP).
    if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  };
  return rows.map((r) => r.map(cell).join(",")).join("\n") + "\n";
}

async function suppressionsView() {
  const r = await api("GET", "/suppressions");
  const filter = el("input", { id: "filter", type: "search", placeholder: "filter" });
  const body = el("div");
  const render = () => {
    const f = filter.value.trim().toLowerCase();
    const entries = r.entries.filter((e) => !f || e.addr.includes(f));
    body.replaceChildren(table(["Address", "Since", "Lifts", "Source", "For", "Reason"],
      entries.map((e) => [
        e.addr, ago(e.added_ms), e.expires_ms ? ago(e.expires_ms) : "never",
        e.automatic ? (e.reason === "complaint" ? "complaint" : "bounce") : "manual",
        e.tenant ? "tenant " + e.tenant : "everyone",
        el("span", {}, e.reason + (e.reply ? ": " + e.reply : "") + " ",
          action({ class: "remove", "data-addr": e.addr,
            on: { click: () => removeSuppression(e.addr, e.tenant, suppressionsView).catch(failure) } }, "Remove")),
      ]), "suppressions"));
  };
  filter.addEventListener("input", render);
  const addr = el("input", { id: "add-addr", placeholder: "address" });
  const reason = el("input", { id: "add-reason", placeholder: "reason" });
  const result = el("span", { id: "add-result" });
  const add = el("form", { id: "add", on: { submit: async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/suppressions", { addr: addr.value.trim(), reason: reason.value.trim() || null });
      await suppressionsView();
    } catch (e) { result.textContent = e.message; }
  } } }, addr, " ", reason, " ", el("button", { type: "submit" }, "Add"), " ", result);
  const exp = el("button", { id: "export", on: { click: () => {
    const rows = [["address", "reason", "reply", "source_id", "added", "expires"]].concat(
      r.entries.map((e) => [e.addr, e.reason, e.reply, e.source_id,
        new Date(e.added_ms).toISOString(), e.expires_ms ? new Date(e.expires_ms).toISOString() : ""]));
    const a = el("a", { href: URL.createObjectURL(new Blob([csv(rows)], { type: "text/csv" })),
      download: "suppressions.csv" });
    a.click();
  } } }, "Export CSV");
  render();
  show(el("h1", {}, "Suppressions (" + r.entries.length + ")"), el("p", {}, filter, " ", exp),
    scope.readOnly ? null : add, body);
}

async function queueView() {
  const [st, q] = await Promise.all([api("GET", "/status"), api("GET", "/queue")]);
  const perRoute = {};
  for (const m of q.messages) perRoute[m.upstream] = (perRoute[m.upstream] || 0) + 1;
  // Pausing all delivery is the platform staff's.
  const pause = scope.tenant ? null : action({ id: "pause", on: { click: async () => {
    await api("POST", st.paused ? "/resume" : "/pause");
    await queueView();
  } } }, st.paused ? "Resume delivery" : "Pause delivery");
  const rows = [];
  for (const m of q.messages) {
    for (const r of m.rcpts) {
      if (!["queued", "deferred"].includes(r.status)) continue;
      rows.push([el("a", { href: "#/message/" + m.id }, m.id), ago(m.received_at), r.status,
        r.addr, r.attempts, ago(r.next_attempt), m.tag || "-", r.last_reply || "-"]);
    }
  }
  show(
    el("h1", {}, "Queue"),
    el("p", { id: "paused" }, "Outbound delivery is " + (st.paused ? "PAUSED" : "active") + ". ", pause),
    table(["Route", "Queued messages", "Healthy", "Held", "Last error"],
      st.routes.map((r) => {
        const held = (st.paused_routes || []).includes(r.name);
        const button = action({ class: "route-pause", "data-route": r.name, on: { click: async () => {
          await api("POST", (held ? "/resume" : "/pause") + "?route=" + encodeURIComponent(r.name));
          await queueView();
        } } }, held ? "Resume route" : "Pause route");
        return [r.name, perRoute[r.name] || 0,
          r.healthy === false ? "no" : r.healthy === true ? "yes" : "not used yet",
          el("span", {}, held ? "PAUSED " : "", button), r.last_error || "-"];
      }), "routes"),
    table(["Queue id", "Received", "Status", "Recipient", "Tries", "Next", "Tag", "Last reply"], rows, "queue"),
  );
}

const SERIES = [["delivered", "#2a9d8f"], ["deferred", "#e9c46a"], ["bounced", "#e63946"], ["opened", "#457b9d"]];
const HOUR = 3600000;

async function overview() {
  const st = await api("GET", "/status");
  // Events of the last 24 h, by the hour, from the events API.
  const start = Math.floor(Date.now() / HOUR) * HOUR - 23 * HOUR;
  const counts = Object.fromEntries(SERIES.map(([k]) => [k, new Array(24).fill(0)]));
  let cursor = null;
  for (let page = 0; page < 50; page++) {
    const r = await api("GET", "/events?limit=1000&since=" + new Date(start).toISOString() +
      (cursor ? "&cursor=" + cursor : ""));
    for (const e of r.events) {
      const i = Math.floor((e.time_ms - start) / HOUR);
      if (counts[e.event] && i >= 0 && i < 24) counts[e.event][i]++;
    }
    cursor = r.next_cursor;
    if (!cursor) break;
  }
  const W = 960, H = 240, P = 40;
  // A scale a person can read: the top of the axis is a round number.
  const highest = Math.max(1, ...SERIES.flatMap(([k]) => counts[k]));
  const step = Math.pow(10, Math.floor(Math.log10(highest)));
  const max = [1, 2, 5, 10].map((m) => m * step).find((v) => v >= highest);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("id", "chart");
  const x = (i) => P + (i * (W - 2 * P)) / 23;
  const y = (v) => H - P - (v * (H - 2 * P)) / max;
  const axis = document.createElementNS(svg.namespaceURI, "path");
  axis.setAttribute("d", `M${P} ${P} V${H - P} H${W - P}`);
  axis.setAttribute("stroke", "#999");
  axis.setAttribute("fill", "none");
  svg.append(axis);
  const label = (cls, tx, ty, anchor, text, value) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", tx);
    t.setAttribute("y", ty);
    t.setAttribute("text-anchor", anchor);
    t.setAttribute("class", cls);
    t.setAttribute("font-size", "11");
    t.setAttribute("fill", "#555");
    if (value !== undefined) t.setAttribute("data-value", value);
    t.textContent = text;
    svg.append(t);
  };
  // Events per hour: 0, half and the top, with grid lines.
  for (const v of [0, max / 2, max]) {
    label("y-tick", P - 6, y(v) + 4, "end", String(v), v);
    if (v > 0) {
      const grid = document.createElementNS(svg.namespaceURI, "path");
      grid.setAttribute("d", `M${P} ${y(v)} H${W - P}`);
      grid.setAttribute("stroke", "#eee");
      svg.append(grid);
    }
  }
  // Hours (UTC) every 6 hours along the bottom.
  for (let i = 0; i < 24; i += 6) {
    label("x-tick", x(i), H - P + 16, "middle",
      new Date(start + i * HOUR).toISOString().slice(11, 16) + " UTC");
  }
  label("x-tick", x(23), H - P + 16, "middle", "now");
  for (const [k, color] of SERIES) {
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    line.setAttribute("points", counts[k].map((v, i) => `${x(i)},${y(v)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", "2");
    svg.append(line);
    counts[k].forEach((v, i) => {
      const c = document.createElementNS(svg.namespaceURI, "circle");
      c.setAttribute("cx", x(i));
      c.setAttribute("cy", y(v));
      c.setAttribute("r", "3");
      c.setAttribute("fill", color);
      c.setAttribute("class", "point " + k);
      c.setAttribute("data-count", v);
      const title = document.createElementNS(svg.namespaceURI, "title");
      title.textContent = `${k}: ${v} at ${new Date(start + i * HOUR).toISOString().slice(11, 16)} UTC`;
      c.append(title);
      svg.append(c);
    });
  }
  const last = st.last_24h || {};
  const rec = st.recipients || {};
  show(
    el("h1", {}, "Overview"),
    el("div", { class: "figures", id: "figures" },
      el("div", { class: "figure" }, el("b", {}, st.messages), "queued messages"),
      el("div", { class: "figure" }, el("b", {}, rec.deferred || 0), "deferred recipients"),
      ...["delivered", "bounced", "opened", "rejected"].map((k) =>
        el("div", { class: "figure" }, el("b", { id: "last-" + k }, last[k] || 0), k + " (24 h)")),
      el("div", { class: "figure" }, el("b", {}, st.paused ? "PAUSED" : "active"), "delivery"),
      el("div", { class: "figure" }, el("b", {}, st.storage && st.storage.ok === false ? "FAILED" : "ok"), "storage")),
    el("h2", {}, "Events per hour, last 24 h"),
    svg,
    el("p", { class: "legend" }, SERIES.map(([k, c]) => {
      const sw = el("span", { class: "swatch" });
      sw.style.background = c; // CSSOM, allowed by the CSP (no inline style)
      return el("span", {}, sw, k);
    })),
  );
}

// ---------------------------------------------------------------- DMARC

/// Pass rate per day: one bar per day, its height the share that passed.
function passChart(days) {
  const W = 960, H = 200, P = 40;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart pass-chart");
  const ns = svg.namespaceURI;
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  add("path", { d: `M${P} ${P / 2} V${H - P} H${W - P}`, stroke: "#999", fill: "none" });
  for (const v of [0, 50, 100]) {
    const y = H - P - (v * (H - 1.5 * P)) / 100;
    add("text", { x: P - 6, y: y + 4, "text-anchor": "end", "font-size": "11", fill: "#555", class: "y-tick" }, v + "%");
  }
  const n = Math.max(1, days.length);
  const bw = Math.min(60, (W - 2 * P) / n - 4);
  days.forEach((d, i) => {
    const x = P + 4 + (i * (W - 2 * P)) / n;
    const h = (d.pass_pct * (H - 1.5 * P)) / 100;
    const bar = add("rect", { x, y: H - P - h, width: bw, height: h, fill: d.pass_pct >= 95 ? "#2a7" : "#c33",
      class: "day", "data-day": d.day, "data-rate": d.pass_pct, "data-messages": d.messages });
    const title = document.createElementNS(ns, "title");
    title.textContent = `${d.day}: ${d.pass_pct}% of ${d.messages} passed`;
    bar.append(title);
    if (n <= 12 || i % Math.ceil(n / 12) === 0) {
      add("text", { x: x + bw / 2, y: H - P + 16, "text-anchor": "middle", "font-size": "11", fill: "#555", class: "x-tick" }, d.day.slice(5));
    }
  });
  return svg;
}

async function dmarcView(period) {
  const since = /^[0-9]+[a-z]+$/.test(period || "") ? period : "30d";
  const r = await api("GET", "/dmarc?since=" + since);
  const periods = el("p", {}, "Reports of the last ", ["7d", "30d", "90d"].map((p) =>
    el("a", { href: "#/dmarc/" + p, class: p === since ? "current" : "" }, p + " ")));
  const parts = r.domains.map((d) => el("section", { class: "dmarc-domain", "data-domain": d.domain },
    el("h2", {}, d.domain),
    el("p", { class: "diagnosis" }, d.diagnosis),
    passChart(d.daily || []),
    table(["Source", "IP", "Messages", "Passed", "DKIM aligned", "SPF aligned", "Quarantined", "Rejected"],
      [...d.herald_sources.map((s) => ["herald", s.ip, s.messages, s.passed, s.dkim_aligned, s.spf_aligned, s.quarantined, s.rejected]),
       ...d.other_sources.map((s) => ["OTHER", s.ip, s.messages, s.passed, s.dkim_aligned, s.spf_aligned, s.quarantined, s.rejected])],
      "sources-" + d.domain),
    table(["Receiver", "Messages", "Passed"], d.reporters.map((x) => [x.reporter, x.messages, x.passed]))));
  const tls = r.tls.length ? [el("h2", {}, "TLS to the recipients' servers"),
    table(["Domain", "Succeeded", "Failed", "Failures"], r.tls.map((t) =>
      [t.domain, t.successful, t.failed, JSON.stringify(t.failures)]), "tls")] : [];
  show(el("h1", {}, "DMARC: what receivers saw"), periods,
    ...(r.domains.length ? parts : [el("p", { id: "no-reports" },
      "No DMARC aggregate reports in this period: publish rua=mailto: the intake's dmarc_address (herald check-dns says how).")]),
    ...tls);
}

// --------------------------------------------------------------- router

async function route() {
  if (!token()) return login();
  document.getElementById("logout").hidden = false;
  const [, what, arg] = location.hash.split("/");
  const a = arg ? decodeURIComponent(arg) : "";
  try {
    await loadScope();
    if (what === "trace" && a) await traceView(a);
    else if (what === "message" && a) await messageView(a);
    else if (what === "tag" && a) await tagView(a);
    else if (what === "suppressions") await suppressionsView();
    else if (what === "queue") await queueView();
    else if (what === "dmarc") await dmarcView(a);
    else await overview();
    document.body.setAttribute("data-view", what || "overview");
  } catch (e) {
    failure(e);
  }
}

window.addEventListener("hashchange", route);
route();
