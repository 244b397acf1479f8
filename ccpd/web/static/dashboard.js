/* ccpd dashboard: reads ccpd's own JSON endpoints every 5 s and draws them.
 *
 * No library and no build step. Everything is built with DOM calls and text nodes (model
 * names come from clients: never parsed as HTML); the charts are SVG drawn here. The page's
 * Content-Security-Policy allows no inline script or style: colours and sizes are classes of
 * dashboard.css or SVG attributes.
 *
 * Sources (same origin):
 *   /v1/usage          per model and per lane: windows, states, provider readings, policy
 *   /readyz            lanes up / usable (a 503 body is read too: it says which lane is down)
 *   /v1/usage/samples  the requests of the last 24 h: token and TTFT charts, last 50 requests
 *                      (fetched incrementally: a window before the newest sample is refetched,
 *                      since a request is stored when it ends but dated when it started; the
 *                      whole day again every 10 minutes)
 *   /v1/usage/rollups  hourly rollups of the last 24 h: the per-model table
 */
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const DAY = 86400, HOUR = 3600, BUCKET = 300;
  const SAMPLE_PAGE = 10000;      // the endpoint's largest limit
  const MAX_PAGES = 30;           // 300k samples a day at most; more is shown as truncated
  const OVERLAP_S = 900;          // refetched before the newest sample on each refresh
  const RESYNC_S = 600;           // a full 24 h refetch this often
  const LAST_REQUESTS = 50;
  const COLOURS = 8;              // .c0 … .c7 in dashboard.css
  const SVGNS = "http://www.w3.org/2000/svg";
  const DASH = "–";

  const state = {
    samples: new Map(),   // "ts|rid" -> sample row
    newest: null,         // newest sample ts seen
    lastFull: 0,          // server time of the last full 24 h fetch
    truncated: false,
    refreshes: 0,
    busy: false,
    timer: null,
  };

  // -- DOM helpers -----------------------------------------------------------------------------

  function h(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function s(tag, attrs, children) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of [].concat(children || [])) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
  }

  function fill(id, children) {
    document.getElementById(id).replaceChildren(...[].concat(children).filter(Boolean));
  }

  function badge(text, kind) {
    return h("span", {class: "badge " + (kind || text), text: text});
  }

  // -- formats ---------------------------------------------------------------------------------

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  function fmtTokens(n) {
    if (!isNum(n)) return DASH;
    const sign = n < 0 ? "-" : "";
    n = Math.abs(n);
    if (n < 1000) return sign + Math.round(n);
    for (const [unit, size] of [["k", 1e3], ["M", 1e6], ["B", 1e9]]) {
      const scaled = n / size;
      if (Math.round(scaled * 10) / 10 < 1000 || unit === "B") {
        let text = scaled < 99.95 ? scaled.toFixed(1) : scaled.toFixed(0);
        if (text.endsWith(".0")) text = text.slice(0, -2);
        return sign + text + unit;
      }
    }
    return String(n);
  }

  function fmtDuration(seconds) {
    if (!isNum(seconds)) return DASH;
    const sign = seconds < 0 ? "-" : "";
    const t = Math.round(Math.abs(seconds));
    const pad = (v) => String(v).padStart(2, "0");
    if (t < 60) return `${sign}${t}s`;
    if (t < 3600) return `${sign}${Math.floor(t / 60)}m${pad(t % 60)}s`;
    if (t < 86400) return `${sign}${Math.floor(t / 3600)}h${pad(Math.floor(t % 3600 / 60))}m`;
    return `${sign}${Math.floor(t / 86400)}d${pad(Math.floor(t % 86400 / 3600))}h`;
  }

  function fmtPct(fraction) {
    if (!isNum(fraction)) return DASH;
    const p = fraction * 100;
    return Math.abs(p - Math.round(p)) < 0.05 ? `${Math.round(p)}%` : `${p.toFixed(1)}%`;
  }

  function fmtTime(ts, seconds) {
    if (!isNum(ts)) return DASH;
    const d = new Date(ts * 1000);
    const pad = (v) => String(v).padStart(2, "0");
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return seconds === false ? hm : `${hm}:${pad(d.getSeconds())}`;
  }

  function fmtMs(ms) {
    if (!isNum(ms)) return DASH;
    return ms >= 10000 ? `${(ms / 1000).toFixed(1)}s` : `${Math.round(ms)}ms`;
  }

  function percentile(values, q) {  // linear interpolation, as ccpd.quotas.percentile
    if (!values.length) return null;
    const sorted = values.slice().sort((a, b) => a - b);
    const position = (sorted.length - 1) * q;
    const low = Math.floor(position);
    const high = Math.min(low + 1, sorted.length - 1);
    return sorted[low] + (sorted[high] - sorted[low]) * (position - low);
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(v)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= v) return step * magnitude;
    }
    return 10 * magnitude;
  }

  // -- fetching --------------------------------------------------------------------------------

  async function getJSON(url, acceptStatuses) {
    let response;
    try {
      response = await fetch(url, {cache: "no-store", credentials: "same-origin",
                                   headers: {accept: "application/json"}});
    } catch (e) {
      throw new Error(`${url}: ccpd did not answer (${e.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok && !(acceptStatuses || []).includes(response.status)) {
      const message = body && body.error && body.error.message ? `: ${body.error.message}` : "";
      throw new Error(`${url}: HTTP ${response.status}${message}`);
    }
    if (body === null || typeof body !== "object") throw new Error(`${url}: not a JSON object`);
    return body;
  }

  function sampleRows(body) {
    const rows = [];
    for (const list of Object.values(body.models || {})) {
      if (Array.isArray(list)) rows.push(...list);
    }
    return rows;
  }

  async function syncSamples(now) {
    const floor = now - DAY;
    const full = state.newest === null || now - state.lastFull >= RESYNC_S;
    let since = full ? floor : Math.max(floor, state.newest - OVERLAP_S);
    const fetched = new Map();
    let truncated = false;
    for (let page = 1; ; page++) {
      const body = await getJSON(`/v1/usage/samples?since=${since.toFixed(3)}&limit=${SAMPLE_PAGE}`);
      const rows = sampleRows(body);
      let last = since;
      for (const row of rows) {
        if (!isNum(row.ts)) continue;
        fetched.set(`${row.ts}|${row.rid}`, row);
        if (row.ts > last) last = row.ts;
      }
      if (rows.length < SAMPLE_PAGE) break;
      if (last <= since || page >= MAX_PAGES) { truncated = true; break; }
      since = last;  // the rows at exactly ``last`` come again: the map keeps one of each
    }
    if (full) {
      state.samples = fetched;
      state.lastFull = now;
      state.truncated = truncated;
    } else {
      for (const [key, row] of fetched) state.samples.set(key, row);
      state.truncated = state.truncated || truncated;
    }
    let newest = null;
    for (const [key, row] of state.samples) {
      if (row.ts < floor) state.samples.delete(key);
      else if (newest === null || row.ts > newest) newest = row.ts;
    }
    state.newest = newest;
  }

  function schedule() {  // one timer at most: the next refresh
    window.clearTimeout(state.timer);
    state.timer = window.setTimeout(refresh, REFRESH_MS);
  }

  async function refresh() {
    if (state.busy) return;  // the refresh under way schedules the next one
    window.clearTimeout(state.timer);
    if (document.hidden && state.refreshes > 0) {  // a background tab asks nothing
      schedule();
      return;
    }
    state.busy = true;
    const problems = [];
    const fail = (e) => { problems.push(e.message || String(e)); };
    let usage = null, ready = null, rollups = null;
    try {
      try {
        usage = await getJSON("/v1/usage");
      } catch (e) {
        fail(e);
      }
      const now = usage && isNum(usage.ts) ? usage.ts : Date.now() / 1000;
      const hourStart = Math.floor(now / HOUR) * HOUR - 23 * HOUR;
      await Promise.all([
        getJSON("/readyz", [503]).then((b) => { ready = b; }, fail),
        getJSON(`/v1/usage/rollups?granularity=hour&since=${hourStart}`)
          .then((b) => { rollups = b; }, fail),
        syncSamples(now).catch(fail),
      ]);
      render(now, usage, ready, rollups, problems);
      state.refreshes += 1;
      document.documentElement.setAttribute("data-refreshes", String(state.refreshes));
    } finally {
      state.busy = false;
      schedule();
    }
  }

  // -- rendering -------------------------------------------------------------------------------

  function render(now, usage, ready, rollups, problems) {
    const models = modelsInView(usage);
    const parts = [
      ["summary", () => renderSummary(usage, ready)],
      ["models", () => { if (usage) renderModels(usage); }],
      ["lanes", () => { if (usage || ready) renderLanes(usage, ready); }],
      ["tokens chart", () => renderTokensChart(now, models)],
      ["TTFT chart", () => renderTtftChart(now)],
      ["rollups", () => { if (rollups) renderRollups(rollups); }],
      ["requests", () => renderRequests()],
    ];
    for (const [name, draw] of parts) {
      try {
        draw();
      } catch (e) {
        problems.push(`drawing ${name} failed: ${e.message}`);
        console.error(e);  // a bug of this page: shown, and seen by the browser test
      }
    }
    if (state.truncated) {
      problems.push(`more than ${SAMPLE_PAGE * MAX_PAGES} requests in 24 h: the charts and ` +
                    "the last requests show the oldest of them only");
    }
    fill("problems", problems.map((text) => h("p", {text: text})));
    fill("updated", [document.createTextNode(
      `updated ${fmtTime(Date.now() / 1000)}` + (problems.length ? " (with problems)" : ""))]);
  }

  function modelsInView(usage) {
    // Every model named anywhere, sorted: each keeps its colour in both charts.
    const names = new Set(Object.keys((usage && usage.models) || {}));
    for (const row of state.samples.values()) names.add(String(row.model));
    const sorted = [...names].sort();
    const colour = new Map(sorted.map((name, i) => [name, `c${i % COLOURS}`]));
    return {sorted, colour};
  }

  function renderSummary(usage, ready) {
    const items = [];
    if (ready) {
      items.push(ready.ready ? badge("ready", "ok") : badge("not ready", "block"));
      if (ready.degraded) items.push(" ", badge("degraded", "warn"));
      if (Array.isArray(ready.failing) && ready.failing.length) {
        items.push(` lanes down: ${ready.failing.join(", ")}`);
      }
      for (const [name, log] of Object.entries(ready.logs || {})) {
        if (log && log.ok === false) items.push(` · ${name} log: ${log.error || "refused"}`);
      }
    }
    if (usage) {
      const models = Object.keys(usage.models || {}).length;
      const lanes = Object.keys(usage.lanes || {}).length;
      items.push(` reroute mode ${usage.reroute_mode} · cooldown ${fmtDuration(usage.cooldown_sec)}` +
                 ` · ${models} model${models === 1 ? "" : "s"}, ${lanes} lane${lanes === 1 ? "" : "s"}` +
                 ` · server time ${fmtTime(usage.ts)}`);
    }
    fill("summary", items.length ? items : [document.createTextNode("no data")]);
  }

  // A window bar: ccpd's count against the limit (full width), a warn line at warn %, and
  // the provider's utilisation of the matching plan window underneath.
  function bar(used, limit, windowState, warnPct, provider, usedClass) {
    const counted = isNum(limit) && limit > 0 && isNum(used);
    const hasProvider = provider && isNum(provider.utilization);
    if (!counted && !hasProvider) return null;  // nothing to draw: the figures say it
    const svg = s("svg", {class: "bar", viewBox: "0 0 100 16", preserveAspectRatio: "none",
                          role: "img"});
    svg.appendChild(s("rect", {class: "track", x: 0, y: 0, width: 100, height: 16}));
    if (counted) {
      const width = Math.max(0, Math.min(100, 100 * used / limit));
      svg.appendChild(s("rect", {class: `${usedClass || "used"} ${windowState || ""}`, x: 0, y: 0,
                                 width: width.toFixed(2), height: hasProvider ? 10 : 16}));
      if (isNum(warnPct) && warnPct > 0 && warnPct < 1) {
        const x = (100 * warnPct).toFixed(2);
        svg.appendChild(s("line", {class: "warnline", x1: x, x2: x, y1: 0, y2: 16}));
      }
    }
    if (hasProvider) {
      const width = Math.max(0, Math.min(100, 100 * provider.utilization));
      svg.appendChild(s("rect", {class: `provider ${provider.status || ""}`, x: 0,
                                 y: counted ? 11 : 0, width: width.toFixed(2),
                                 height: counted ? 5 : 16}));
    }
    const title = [];
    if (counted && usedClass === "provider") title.push(`provider ${fmtPct(used / limit)}`);
    else if (counted) title.push(`ccpd counted ${fmtTokens(used)} of ${fmtTokens(limit)}`);
    if (counted && isNum(warnPct)) {
      title.push(`${usedClass === "provider" ? "threshold passed" : "warn"} at ${fmtPct(warnPct)}`);
    }
    if (hasProvider) title.push(`provider ${fmtPct(provider.utilization)}`);
    svg.appendChild(s("title", {text: title.join(", ")}));
    return svg;
  }

  function readingDetails(reading) {  // "allowed, resets in 59m59s (headers, 1s ago)"
    const parts = [];
    if (reading.status && reading.status !== "rejected") parts.push(reading.status);
    if (isNum(reading.reset_in_sec)) parts.push(`resets in ${fmtDuration(reading.reset_in_sec)}`);
    const source = [reading.source, isNum(reading.age_sec) ? `${fmtDuration(reading.age_sec)} ago` : null,
                    reading.fresh === false ? "stale" : null].filter(Boolean).join(", ");
    return parts.join(", ") + (source ? ` (${source})` : "");
  }

  function providerText(reading) {
    if (!reading) return null;
    const figure = reading.status === "rejected" ? "REJECTED"
      : isNum(reading.utilization) ? fmtPct(reading.utilization) : (reading.status || "?");
    const details = readingDetails(reading);
    return `provider ${figure}` + (details ? `, ${details}` : "");
  }

  function windowBlock(label, w, warnPct, reading) {
    w = w || {};
    const used = w.used_tokens, limit = w.limit_tokens;
    const figures = isNum(limit)
      ? `${fmtTokens(used)} / ${fmtTokens(limit)} (${fmtPct(limit > 0 ? used / limit : null)})`
      : `${fmtTokens(used)} tokens, no limit`;
    const sub = [];
    if (isNum(w.headroom_pct)) sub.push(`headroom ${fmtPct(w.headroom_pct / 100)}`);
    if (isNum(warnPct) && isNum(limit)) sub.push(`warn at ${fmtPct(warnPct)}`);
    if (isNum(w.reset_eta_sec)) sub.push(`oldest usage leaves in ${fmtDuration(w.reset_eta_sec)}`);
    const provider = providerText(reading);
    return h("div", {class: "window", "data-window": label}, [
      h("div", {class: "window-label"}, [
        h("span", {class: "name"}, [label, w.state && w.state !== "ok" ? " " : null,
                                     w.state && w.state !== "ok" ? badge(w.state) : null]),
        h("span", {class: "figures", text: figures}),
      ]),
      bar(used, limit, w.state, warnPct, reading),
      sub.length ? h("div", {class: "sub", text: sub.join(" · ")}) : null,
      provider ? h("div", {class: "sub", text: provider}) : null,
    ]);
  }

  function providerBlock(name, reading) {
    const threshold = isNum(reading.surpassed_threshold) ? reading.surpassed_threshold : null;
    return h("div", {class: "window", "data-window": name}, [
      h("div", {class: "window-label"}, [
        h("span", {class: "name"}, [name, " ", badge(reading.status || "unknown",
                                                      reading.status || "")]),
        h("span", {class: "figures", text: isNum(reading.utilization)
                     ? fmtPct(reading.utilization) : DASH}),
      ]),
      bar(reading.utilization, 1, reading.status || "", threshold, null, "provider"),
      h("div", {class: "sub", text: readingDetails(reading) || DASH}),
    ]);
  }

  const ROLLING_WINDOWS = ["five_hour"];
  const WEEKLY_WINDOWS = ["seven_day", "weekly"];

  function renderModels(usage) {
    const entries = Object.entries(usage.models || {}).sort(([a], [b]) => a.localeCompare(b));
    if (!entries.length) {
      fill("models", h("p", {class: "empty", text: "no models yet: no routes, quotas or traffic"}));
      return;
    }
    fill("models", entries.map(([name, m]) => modelCard(name, m || {})));
  }

  function modelCard(name, m) {
    const policy = m.policy || {};
    const provider = m.provider || {};
    const pick = (names) => names.map((n) => provider[n]).find(Boolean) || null;
    const rolling = m.rolling || {};
    const requests = isNum(m.requests) ? m.requests : 0;
    const head = h("div", {class: "card-head"}, [
      h("h3", {text: name}),
      badge(m.state || "ok"),
      h("span", {class: "meta", text:
        `lane ${policy.lane || DASH}` + (policy.secondary ? ` → ${policy.secondary}` : "") +
        ` · ${requests} request${requests === 1 ? "" : "s"}`}),
    ]);
    const blocks = [
      windowBlock(`rolling ${isNum(rolling.window_hours) ? rolling.window_hours : 5}h`, rolling,
                  m.warn_pct, pick(ROLLING_WINDOWS)),
      windowBlock("weekly", m.weekly, m.warn_pct, pick(WEEKLY_WINDOWS)),
    ];
    for (const [window, reading] of Object.entries(provider).sort()) {
      if (!ROLLING_WINDOWS.includes(window) && !WEEKLY_WINDOWS.includes(window) && reading) {
        blocks.push(providerBlock(`provider ${window}`, reading));
      }
    }
    const facts = [];
    if (policy.cooldown_active) {
      facts.push(`cooling down: ${fmtDuration(policy.cooldown_remaining_sec)} left` +
                 (isNum(policy.cooldown_next_ts) ? ` (until ${fmtTime(policy.cooldown_next_ts)})` : ""));
    } else {
      facts.push("no cooldown");
    }
    if (policy.last_decision) {
      facts.push(`last decision ${policy.last_decision}` +
                 (policy.last_reason ? `: ${policy.last_reason}` : ""));
    }
    if (m.evidence && m.evidence !== "none") facts.push(`evidence: ${m.evidence}`);
    if (m.warn_pct_auto !== m.warn_pct && isNum(m.warn_pct_auto)) {
      facts.push(`calibrated warn at ${fmtPct(m.warn_pct_auto)}`);
    }
    const speeds = m.speeds || {};
    if (isNum(speeds.out_tps_stream)) facts.push(`out ${speeds.out_tps_stream.toFixed(1)} tok/s`);
    if (isNum(speeds.ttft_ms_p50)) facts.push(`TTFT p50 ${fmtMs(speeds.ttft_ms_p50)}`);
    return h("div", {class: "card model", "data-model": name, "data-state": m.state || "ok"}, [
      head,
      m.state_reason ? h("p", {class: "reason", text: m.state_reason}) : null,
      ...blocks,
      h("p", {class: "facts"}, facts.map((text) => h("span", {text: text}))),
    ]);
  }

  function renderLanes(usage, ready) {
    const lanes = (usage && usage.lanes) || {};
    const probes = (ready && ready.lanes) || {};
    const names = [...new Set([...Object.keys(lanes), ...Object.keys(probes)])].sort();
    if (!names.length) {
      fill("lanes", h("p", {class: "empty", text: "no lanes"}));
      return;
    }
    fill("lanes", names.map((name) => laneCard(name, lanes[name] || {}, probes[name] || null)));
  }

  function laneCard(name, lane, probe) {
    const provider = lane.provider || {};
    const badges = [];
    if (probe) {
      badges.push(probe.up ? badge("up", "up") : badge("down", "down"));
    }
    const usable = lane.usable !== undefined ? lane.usable : (probe ? probe.usable : true);
    if (usable === false) badges.push(badge("unusable", "unusable"));
    if (provider.status) badges.push(badge(provider.status));
    const reasons = [];
    if (usable === false) {
      reasons.push(`cannot serve: ${lane.unusable_reason || (probe && probe.unusable_reason) || "?"}`);
    }
    if (probe && !probe.up && probe.error) reasons.push(`probe: ${probe.error}`);
    const facts = [];
    if (probe) {
      facts.push(`probe ${isNum(probe.status) ? probe.status : DASH}` +
                 (isNum(probe.checked_at) ? ` at ${fmtTime(probe.checked_at)}` : ""));
    }
    if (provider.representative_claim) facts.push(`deciding window ${provider.representative_claim}`);
    if (provider.overage_status) facts.push(`overage ${provider.overage_status}`);
    if (isNum(provider.age_sec)) facts.push(`provider said ${fmtDuration(provider.age_sec)} ago`);
    for (const [window, learned] of Object.entries(lane.learned_limits || {}).sort()) {
      if (learned && isNum(learned.tokens)) {
        facts.push(`learned ${window} limit ${fmtTokens(learned.tokens)} tokens ` +
                   `(${learned.samples} sample${learned.samples === 1 ? "" : "s"}, ` +
                   `confidence ${isNum(learned.confidence) ? learned.confidence.toFixed(2) : DASH})`);
      }
    }
    const blocks = [];
    for (const [window, reading] of Object.entries(provider.windows || {}).sort()) {
      if (reading) blocks.push(providerBlock(`provider ${window}`, reading));
    }
    const plan = lane.plan || {};
    for (const [window, counted] of Object.entries(lane.counted || {})) {
      if (!counted) continue;
      const planned = isNum(counted.limit_tokens);
      if (!planned && !counted.used_tokens) continue;
      blocks.push(windowBlock(`${window} (ccpd's count${planned ? " against the plan" : ""})`,
                              counted, plan.warn_pct, null));
    }
    if (!blocks.length) {
      blocks.push(h("p", {class: "empty", text: "no provider readings and nothing counted yet"}));
    }
    return h("div", {class: "card lane", "data-lane": name}, [
      h("div", {class: "card-head"}, [h("h3", {text: name}), ...badges]),
      ...reasons.map((text) => h("p", {class: "reason", text: text})),
      ...blocks,
      facts.length ? h("p", {class: "facts"}, facts.map((text) => h("span", {text: text}))) : null,
    ]);
  }

  // -- charts ----------------------------------------------------------------------------------

  const W = 1200, H = 220, ML = 58, MR = 12, MT = 10, MB = 26;
  const PW = W - ML - MR, PH = H - MT - MB;

  function chartFrame(start, end, yMax, yLabel) {
    const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"});
    for (let i = 0; i <= 4; i++) {
      const y = MT + PH - (PH * i) / 4;
      svg.appendChild(s("line", {class: "grid", x1: ML, x2: W - MR, y1: y, y2: y}));
      svg.appendChild(s("text", {x: ML - 6, y: y + 4, "text-anchor": "end",
                                 text: yLabel((yMax * i) / 4)}));
    }
    // a tick at every local hour divisible by 3
    for (let t = Math.ceil(start / 900) * 900; t <= end; t += 900) {
      const d = new Date(t * 1000);
      if (d.getMinutes() !== 0 || d.getHours() % 3 !== 0) continue;
      const x = ML + (PW * (t - start)) / (end - start);
      svg.appendChild(s("line", {class: "axis", x1: x, x2: x, y1: MT + PH, y2: MT + PH + 4}));
      svg.appendChild(s("text", {x: x, y: H - 6, "text-anchor": "middle",
                                 text: fmtTime(t, false)}));
    }
    svg.appendChild(s("line", {class: "axis", x1: ML, x2: W - MR, y1: MT + PH, y2: MT + PH}));
    return svg;
  }

  function noData(svg, text) {
    svg.appendChild(s("text", {class: "nodata", x: ML + PW / 2, y: MT + PH / 2,
                               "text-anchor": "middle", text: text}));
  }

  function legend(id, items) {
    fill(id, items.map(([label, cls]) => h("span", {}, [
      s("svg", {viewBox: "0 0 12 12"}, [s("rect", {class: cls, x: 0, y: 0, width: 12, height: 12})]),
      label,
    ])));
  }

  function renderTokensChart(now, models) {
    const end = Math.floor(now / BUCKET) * BUCKET + BUCKET;
    const count = DAY / BUCKET;
    const start = end - count * BUCKET;
    const buckets = Array.from({length: count}, () => new Map());
    const seen = new Set();
    for (const row of state.samples.values()) {
      if (row.ts < start || row.ts >= end) continue;
      const tokens = (Number(row.input_tokens) || 0) + (Number(row.output_tokens) || 0);
      if (!tokens) continue;
      const bucket = buckets[Math.floor((row.ts - start) / BUCKET)];
      const model = String(row.model);
      bucket.set(model, (bucket.get(model) || 0) + tokens);
      seen.add(model);
    }
    let max = 0;
    for (const bucket of buckets) {
      let total = 0;
      for (const v of bucket.values()) total += v;
      max = Math.max(max, total);
    }
    const yMax = niceCeil(max);
    const svg = chartFrame(start, end, yMax, fmtTokens);
    const order = models.sorted.filter((name) => seen.has(name));
    const width = PW / count;
    buckets.forEach((bucket, i) => {
      let base = 0;
      for (const model of order) {
        const v = bucket.get(model);
        if (!v) continue;
        const height = (PH * v) / yMax;
        const rect = s("rect", {class: models.colour.get(model), x: (ML + i * width).toFixed(2),
                                y: (MT + PH - base - height).toFixed(2),
                                width: Math.max(0.6, width - 0.6).toFixed(2),
                                height: Math.max(0.5, height).toFixed(2)}, [
          s("title", {text: `${fmtTime(start + i * BUCKET, false)} ${model}: ${fmtTokens(v)} tokens`}),
        ]);
        svg.appendChild(rect);
        base += height;
      }
    });
    if (!seen.size) noData(svg, "no tokens in the last 24 h");
    fill("tokens-chart", svg);
    legend("tokens-legend", order.map((name) => [name, models.colour.get(name)]));
  }

  function renderTtftChart(now) {
    const end = Math.floor(now / HOUR) * HOUR + HOUR;
    const count = 24;
    const start = end - count * HOUR;
    const values = Array.from({length: count}, () => []);
    for (const row of state.samples.values()) {
      // as the rollups count it: successful Messages requests with a first token
      if (row.ts < start || row.ts >= end || row.op !== "messages") continue;
      if (!(Number(row.status) < 400) || !(Number(row.ttft_ms) > 0)) continue;
      values[Math.floor((row.ts - start) / HOUR)].push(Number(row.ttft_ms));
    }
    const points = values.map((list) => list.length
      ? {p50: percentile(list, 0.5), p90: percentile(list, 0.9), n: list.length} : null);
    const max = Math.max(0, ...points.filter(Boolean).map((p) => p.p90));
    const yMax = niceCeil(max);
    const svg = chartFrame(start, end, yMax, fmtMs);
    const x = (i) => ML + (PW * (i + 0.5)) / count;
    const y = (v) => MT + PH - (PH * v) / yMax;
    for (const key of ["p90", "p50"]) {
      let d = "", previous = false;
      points.forEach((p, i) => {
        if (!p) { previous = false; return; }
        d += `${previous ? "L" : "M"}${x(i).toFixed(1)},${y(p[key]).toFixed(1)}`;
        previous = true;
      });
      if (d) svg.appendChild(s("path", {class: key, d: d}));
      points.forEach((p, i) => {
        if (!p) return;
        svg.appendChild(s("circle", {class: key, cx: x(i).toFixed(1), cy: y(p[key]).toFixed(1), r: 3}, [
          s("title", {text: `${fmtTime(start + i * HOUR, false)}: ${key} ${fmtMs(p[key])} ` +
                            `(${p.n} request${p.n === 1 ? "" : "s"})`}),
        ]));
      });
    }
    if (!points.some(Boolean)) noData(svg, "no successful Messages requests in the last 24 h");
    fill("ttft-chart", svg);
    legend("ttft-legend", [["p50", "swatch-p50"], ["p90", "swatch-p90"]]);
  }

  // -- tables ----------------------------------------------------------------------------------

  function table(columns, rows, rowClass) {
    return h("div", {class: "table-wrap"}, [h("table", {}, [
      h("thead", {}, [h("tr", {}, columns.map(([label, cls]) => h("th", {class: cls, text: label})))]),
      h("tbody", {}, rows.map((cells, i) => h("tr", {class: rowClass ? rowClass(i) : null},
        cells.map((cell, j) => h("td", {class: columns[j][1], text: cell}))))),
    ])]);
  }

  function renderRollups(body) {
    const rows = [];
    for (const [model, entries] of Object.entries(body.models || {}).sort(([a], [b]) => a.localeCompare(b))) {
      let count = 0, input = 0, output = 0, stream = 0, worst = null;
      for (const e of entries || []) {
        count += Number(e.count) || 0;
        input += Number(e.in_tokens) || 0;
        output += Number(e.out_tokens) || 0;
        stream += Number(e.stream_s) || 0;
        if (isNum(e.p90_ttft) && (worst === null || e.p90_ttft > worst)) worst = e.p90_ttft;
      }
      rows.push([model, String(count), fmtTokens(input), fmtTokens(output),
                 stream > 0 ? (output / stream).toFixed(1) : DASH, fmtMs(worst)]);
    }
    if (!rows.length) {
      fill("rollups", h("p", {class: "empty", text:
        "no rollups in the last 24 h (the store rolls up every rollup_interval; " +
        "a ccpd that just started may have none yet)"}));
      return;
    }
    fill("rollups", table([["model", ""], ["requests", "num"], ["input", "num"],
                           ["output", "num"], ["out tok/s", "num"], ["TTFT p90, worst hour", "num"]],
                          rows));
  }

  function renderRequests() {
    const recent = [...state.samples.values()]
      .sort((a, b) => (b.ts - a.ts) || String(b.rid).localeCompare(String(a.rid)))
      .slice(0, LAST_REQUESTS);
    if (!recent.length) {
      fill("requests", h("p", {class: "empty", text: "no requests in the last 24 h"}));
      return;
    }
    const rows = recent.map((r) => {
      const asked = r.upstream_model && r.upstream_model !== r.model ? ` → ${r.upstream_model}` : "";
      const status = String(r.status) + (r.err_type ? ` ${r.err_type}` : "");
      return [fmtTime(r.ts), r.lane || DASH, String(r.model) + asked, r.op || DASH,
              r.stream ? "yes" : "no", fmtTokens(r.input_tokens), fmtTokens(r.output_tokens),
              fmtTokens(r.cache_read_input_tokens), r.ttft_ms ? fmtMs(r.ttft_ms) : DASH,
              isNum(r.dirty_s) ? `${r.dirty_s.toFixed(2)}s` : DASH, status, r.decision || DASH];
    });
    fill("requests", table(
      [["time", ""], ["lane", ""], ["model", "wrap"], ["op", ""], ["stream", ""], ["in", "num"],
       ["out", "num"], ["cache read", "num"], ["TTFT", "num"], ["duration", "num"],
       ["status", ""], ["decision", ""]],
      rows, (i) => (Number(recent[i].status) >= 400 ? "error" : null)));
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();  // at once when the tab is shown again
  });
  refresh();
})();
