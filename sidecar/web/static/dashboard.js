/* atlas-sidecar dashboard: polls /api/report and /api/rollout and draws them.
 * Charts use the vendored uPlot (static/vendor/uplot, version in VERSION). */
(function () {
  "use strict";

  const COLORS = ["#5eb1ff", "#c084fc", "#3fb950", "#d29922", "#f778ba", "#79c0ff"];
  const $ = (id) => document.getElementById(id);
  const charts = {};
  let refreshMs = 5000;

  function fmtSigned(x, digits) {
    if (x === null || x === undefined) return "–";
    const s = x.toFixed(digits === undefined ? 3 : digits);
    return x > 0 ? "+" + s : s;
  }
  function fmtTime(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  function fmtAgo(ms) {
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 129600) return Math.round(s / 3600) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function setFilled(panel, filled) {
    const el = document.querySelector('[data-panel="' + panel + '"]');
    el.dataset.filled = filled ? "true" : "false";
    const empty = el.querySelector(".empty");
    if (empty) empty.hidden = filled;
  }
  function setDelta(id, value, text) {
    const el = $(id);
    el.textContent = text;
    el.className = "delta" + (value > 0 ? " up" : value < 0 ? " down" : "");
  }
  function chartWidth(id) {
    return Math.max(240, $(id).clientWidth);
  }

  // -- metric cards --------------------------------------------------------
  function drawCards(r) {
    $("total-updates").textContent = r.total_updates;
    setDelta("total-updates-delta", r.deltas.total_updates,
      (r.deltas.total_updates > 0 ? "▲ " + r.deltas.total_updates : "no change") + " in 24 h · " + r.updates_today + " today");
    $("avg-improvement").textContent = fmtSigned(r.avg_improvement);
    const da = r.deltas.avg_improvement;
    setDelta("avg-improvement-delta", da,
      da === null ? "per promoted update, measured in the canary"
        : Math.abs(da) < 0.0005 ? "recent updates match the average"
        : (da > 0 ? "▲ " : "▼ ") + fmtSigned(da) + " recent vs. all (" + fmtSigned(r.recent_improvement) + ")");
    $("learning-velocity").textContent = fmtSigned(r.learning_velocity) + "/d";
    const dv = r.deltas.learning_velocity;
    setDelta("learning-velocity-delta", dv,
      (dv > 0 ? "▲ " : dv < 0 ? "▼ " : "") + fmtSigned(dv) + "/d vs. previous window");
    $("stability").textContent = Math.round(r.stability_score * 100) + "%";
    setDelta("stability-detail", 0, r.rollbacks + " rollback" + (r.rollbacks === 1 ? "" : "s"));
    $("stable-version").textContent = "stable: " + (r.stable_version || "–");
    setFilled("cards", true);
  }

  // -- performance over time with update markers -----------------------------
  function markerPlugin(markers) {
    return {
      hooks: {
        draw: [function (u) {
          const ctx = u.ctx;
          const top = u.bbox.top, height = u.bbox.height;
          ctx.save();
          ctx.font = (11 * devicePixelRatio) + "px sans-serif";
          for (const m of markers) {
            const x = u.valToPos(m.t, "x", true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = m.color;
            ctx.fillStyle = m.color;
            ctx.setLineDash([4 * devicePixelRatio, 4 * devicePixelRatio]);
            ctx.lineWidth = devicePixelRatio;
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, top + height);
            ctx.stroke();
            ctx.setLineDash([]);
            ctx.fillText(m.glyph + " " + m.label, x + 4 * devicePixelRatio, top + 12 * devicePixelRatio);
          }
          ctx.restore();
        }],
      },
    };
  }

  function drawPerformance(r) {
    const pts = r.performance.points.filter((p) => p.score !== null);
    const filled = pts.length > 0;
    setFilled("performance", filled);
    const el = $("performance-chart");
    if (!filled) { el.innerHTML = ""; delete charts.performance; return; }
    const xs = pts.map((p) => p.time_ms / 1000);
    const ys = pts.map((p) => p.score);
    const err = pts.map((p) => p.error_rate);
    const markers = r.updates.map((u) => ({ t: u.time_ms / 1000, label: u.version + " " + fmtSigned(u.improvement), glyph: "▲", color: "#3fb950" }))
      .concat(r.rollback_markers.map((m) => ({ t: m.time_ms / 1000, label: m.version, glyph: "▼", color: "#f85149" })));
    // keep markers visible even when they fall just outside the buckets
    const allT = xs.concat(markers.map((m) => m.t));
    const lo = Math.min.apply(null, allT), hi = Math.max.apply(null, allT);
    const bucket = r.performance.bucket_seconds;
    const pad = Math.max(bucket / 2, (hi - lo) * 0.03);
    const opts = {
      width: chartWidth("performance-chart"),
      height: 260,
      scales: { x: { time: true, range: [lo - pad, hi + pad] }, y: { range: [0, 1] }, err: { range: [0, 1] } },
      axes: [
        { stroke: "#8b98a8", grid: { stroke: "#2a3441" }, ticks: { stroke: "#2a3441" } },
        { stroke: "#8b98a8", grid: { stroke: "#2a3441" }, ticks: { stroke: "#2a3441" }, label: "reward", labelSize: 18 },
        { scale: "err", side: 1, stroke: "#8b98a8", grid: { show: false }, label: "error rate", labelSize: 18 },
      ],
      series: [
        {},
        { label: "feedback reward", stroke: "#5eb1ff", width: 2, fill: "rgba(94,177,255,0.10)", points: { show: pts.length < 40 }, spanGaps: true },
        { label: "error rate", scale: "err", stroke: "#f85149", width: 1, dash: [4, 4], points: { show: false }, spanGaps: true },
      ],
      legend: { show: true },
      plugins: [markerPlugin(markers)],
    };
    if (charts.performance) charts.performance.destroy();
    el.innerHTML = "";
    charts.performance = new uPlot(opts, [xs, ys, err], el);
  }

  // -- feedback distribution ---------------------------------------------------
  function drawFeedback(r) {
    const fb = r.feedback;
    const filled = fb.total > 0;
    setFilled("feedback", filled);
    $("feedback-total").textContent = filled ? fb.total.toLocaleString() + " feedback events" : "";
    const sig = Object.entries(fb.signals).sort((a, b) => b[1] - a[1]);
    $("feedback-signals").innerHTML = sig.map(([k, v]) => "<span>" + esc(k.toLowerCase().replace("_", " ")) + "<b>" + v.toLocaleString() + "</b></span>").join("");
    const el = $("feedback-chart");
    if (!filled) { el.innerHTML = ""; delete charts.feedback; return; }
    const xs = fb.bins.map((_, i) => i);
    const labels = fb.bins.map((_, i) => fb.edges[i].toFixed(1));
    const opts = {
      width: chartWidth("feedback-chart"),
      height: 200,
      scales: { x: { time: false, range: [-0.6, fb.bins.length - 0.4] }, y: { range: (u, mn, mx) => [0, Math.max(1, mx) * 1.1] } },
      axes: [
        { stroke: "#8b98a8", grid: { show: false }, ticks: { stroke: "#2a3441" }, values: (u, vals) => vals.map((v) => labels[v] !== undefined && Number.isInteger(v) ? labels[v] : ""), label: "reward", labelSize: 18 },
        { stroke: "#8b98a8", grid: { stroke: "#2a3441" }, ticks: { stroke: "#2a3441" } },
      ],
      series: [
        {},
        { label: "events", stroke: "#c084fc", fill: "rgba(192,132,252,0.55)", width: 1, paths: uPlot.paths.bars({ size: [0.8, 64] }), points: { show: false } },
      ],
      legend: { show: false },
    };
    if (charts.feedback) charts.feedback.destroy();
    el.innerHTML = "";
    charts.feedback = new uPlot(opts, [xs, fb.bins], el);
  }

  // -- recent learning events ----------------------------------------------------
  function drawEvents(r) {
    const filled = r.events.length > 0;
    setFilled("events", filled);
    $("events").innerHTML = r.events.map((e) =>
      '<li><time title="' + esc(new Date(e.time_ms).toISOString()) + '">' + esc(fmtTime(e.time_ms)) + "</time>" +
      '<span><i class="k ' + esc(e.kind) + '"></i>' + esc(e.summary) + "</span></li>").join("");
  }

  // -- live rollout and traffic split ----------------------------------------------
  function flatten(obj, prefix, out) {
    for (const [k, v] of Object.entries(obj || {})) {
      const key = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
      else out.push([key, v]);
    }
    return out;
  }
  function fmtVal(v) {
    if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString() : v.toFixed(4);
    if (Array.isArray(v)) return v.join(", ");
    return String(v);
  }

  function drawRollout(d) {
    const ro = d.rollout;
    const badge = $("rollout-state");
    setFilled("rollout", !!ro);
    if (!ro) { badge.textContent = "none"; badge.className = "badge"; $("rollout-body").innerHTML = ""; return; }
    badge.textContent = ro.state + (ro.state === "CANARY" && ro.stage_index !== null && ro.stage_index !== undefined ? " · stage " + ro.stage_index : "");
    badge.className = "badge " + ro.state;
    const w = ro.candidate_weight_bps;
    const ev = flatten(ro.evidence, "", []).slice(0, 10);
    $("rollout-body").innerHTML =
      '<dl class="kv">' +
      "<dt>candidate</dt><dd>" + esc(ro.candidate_version || "–") + "</dd>" +
      "<dt>stable</dt><dd>" + esc(ro.stable_version || "–") + "</dd>" +
      "<dt>updated</dt><dd>" + (ro.updated_ms ? esc(fmtAgo(ro.updated_ms)) : "–") + "</dd>" +
      "<dt>reason</dt><dd title=\"" + esc(ro.reason || "") + "\">" + esc(ro.reason || "–") + "</dd>" +
      "</dl>" +
      (w !== null && w !== undefined
        ? '<div class="hint">candidate share ' + (w / 100).toFixed(w % 100 ? 2 : 0) + ' %</div><div class="progress"><span style="width:' + (w / 100) + '%"></span></div>'
        : "") +
      (ev.length
        ? '<table class="evidence"><tr><th colspan="2">evidence</th></tr>' +
          ev.map(([k, v]) => "<tr><td>" + esc(k) + "</td><td>" + esc(fmtVal(v)) + "</td></tr>").join("") + "</table>"
        : "");
  }

  function splitBar(title, parts) {
    const total = parts.reduce((a, p) => a + p.value, 0) || 1;
    return '<div class="split"><h3>' + esc(title) + '</h3><div class="bar">' +
      parts.map((p) => {
        const pct = (100 * p.value) / total;
        return '<span style="width:' + pct + "%;background:" + p.color + '" title="' + esc(p.version) + '">' + (pct >= 12 ? pct.toFixed(pct < 10 ? 1 : 0) + "%" : "") + "</span>";
      }).join("") + '</div><div class="legend">' +
      parts.map((p) => "<span><i style=\"background:" + p.color + '"></i>' + esc(p.version) + " · " + esc(p.text) + "</span>").join("") + "</div></div>";
  }

  function drawTraffic(d) {
    const t = d.traffic;
    const colorOf = {};
    let next = 0;
    const color = (v) => (colorOf[v] = colorOf[v] || COLORS[next++ % COLORS.length]);
    let html = "";
    if (t.desired && t.desired.routes.length) {
      html += splitBar("desired split" + (t.desired.revision !== null ? " · rev " + t.desired.revision : ""),
        t.desired.routes.map((r) => ({ version: r.version, value: r.weight_bps, color: color(r.version), text: (r.weight_bps / 100).toFixed(r.weight_bps % 100 ? 2 : 0) + " %" })));
      if (t.desired.shadow) html += '<div class="hint">shadow: ' + esc(t.desired.shadow.version) + " mirrors " + (t.desired.shadow.mirror_bps / 100) + " %</div>";
    }
    const obs = t.observed;
    if (obs.requests > 0) {
      html += splitBar("observed · last " + Math.round(obs.window_seconds / 60) + " min · " + obs.requests.toLocaleString() + " requests",
        obs.versions.map((v) => ({ version: v.version, value: v.requests, color: color(v.version), text: (100 * v.share).toFixed(1) + " %" })));
    }
    $("traffic-body").innerHTML = html;
    setFilled("traffic", html !== "");
  }

  // -- polling ---------------------------------------------------------------------
  async function getJSON(path) {
    const resp = await fetch(path, { cache: "no-store" });
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  }

  async function refresh() {
    const live = $("live");
    try {
      const [report, rollout] = await Promise.all([getJSON("/api/report"), getJSON("/api/rollout")]);
      drawCards(report);
      drawPerformance(report);
      drawFeedback(report);
      drawEvents(report);
      drawRollout(rollout);
      drawTraffic(rollout);
      live.className = "live ok";
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = "true";
    } catch (err) {
      live.className = "live err";
      $("updated").textContent = "offline: " + err.message;
    }
  }

  async function start() {
    try {
      const cfg = await getJSON("/api/dashboard-config");
      refreshMs = Math.max(1000, 1000 * cfg.refresh_seconds);
    } catch (err) { /* keep the default */ }
    await refresh();
    setInterval(refresh, refreshMs);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(refresh, 200);
    });
  }

  start();
})();
