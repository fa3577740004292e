// tunelab console: the little script the pages need (no build step). Everything here is progressive:
// pages are complete HTML without it; it localizes times, draws charts, follows live streams, adds shortcuts.
(function () {
  "use strict";

  // Times: the server writes UTC in <time datetime=…>; show them in the reader's locale and zone.
  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) { t.title = t.textContent; t.textContent = d.toLocaleString(); }
    });
  }

  // Charts: <div class="chart" data-chart="ID"> with <script type="application/json" id="ID"> holding
  // {x: "step", series: [{key, label}], rows: [...]}: every row is drawn (no sampling).
  var palette = ["#0b5cad", "#c4251c", "#1a7f37", "#9a6700", "#6639ba", "#bf3989"];
  var charts = {};

  // rows → uPlot columns: one point per x (rows of the same step, e.g. a training and a validation row, merge)
  function columns(spec, rows) {
    var byX = new Map();
    rows.forEach(function (r) {
      var x = r[spec.x];
      if (x === undefined || x === null) return;
      var m = byX.get(x) || {};
      spec.series.forEach(function (s) { if (r[s.key] !== undefined && r[s.key] !== null) m[s.key] = r[s.key]; });
      byX.set(x, m);
    });
    var xs = Array.from(byX.keys()).sort(function (a, b) { return a - b; });
    return [xs].concat(spec.series.map(function (s) {
      return xs.map(function (x) { var v = byX.get(x)[s.key]; return v === undefined ? null : v; });
    }));
  }

  function makeChart(el) {
    if (el.dataset.drawn) return;
    var src = document.getElementById(el.dataset.chart);
    if (!src || typeof uPlot === "undefined") return;
    var spec = JSON.parse(src.textContent);
    el.dataset.drawn = "1";
    var rows = spec.rows || [];
    var width = Math.max(280, el.clientWidth || 600);
    var opts = {
      width: width, height: spec.height || 300,
      scales: { x: { time: false } },
      axes: [{ label: spec.xlabel || spec.x }, { label: spec.ylabel || "" }],
      series: [{ label: spec.xlabel || spec.x }].concat(spec.series.map(function (s, i) {
        return { label: s.label, stroke: palette[i % palette.length], width: 2, spanGaps: true,
                 points: { show: true, size: 4 } };
      }))
    };
    var plot = new uPlot(opts, columns(spec, rows), el);
    var counter = el.parentNode.querySelector("[data-points]");
    var chart = { plot: plot, spec: spec, rows: rows, add: function (more) {
      more.forEach(function (r) { rows.push(r); });
      plot.setData(columns(spec, rows));
      if (counter) counter.textContent = plot.data[0].length;
    } };
    charts[el.dataset.chart] = chart;
    if (counter) counter.textContent = plot.data[0].length;
    window.addEventListener("resize", function () { plot.setSize({ width: Math.max(280, el.clientWidth), height: opts.height }); });
  }

  // A live stream (server-sent events) on <div data-stream="URL" data-from="M" data-log-from="L"
  // data-chart-target="ID">: "metrics" rows join the chart; "state" replaces its pane; "log" text is appended to
  // the log pane (or replaces it when the server skipped ahead), which keeps its last 16 KB; "end" closes it. The
  // page already holds every point and the log so far (up to byte M of the metrics and L of the log, as the API
  // answered), so a reload loses nothing and the stream sends only what is new.
  var LOG_KEEP = 16384;
  function follow(el) {
    if (el.dataset.following || !window.EventSource) return;
    el.dataset.following = "1";
    var url = el.dataset.stream;
    var es = new EventSource(url + (url.indexOf("?") < 0 ? "?" : "&") + "from=" + (el.dataset.from || 0) +
                             "&log_from=" + (el.dataset.logFrom || 0));
    es.addEventListener("metrics", function (e) {
      var c = charts[el.dataset.chartTarget];
      if (c) c.add(JSON.parse(e.data));
    });
    es.addEventListener("state", function (e) {
      var s = JSON.parse(e.data), st = document.getElementById("job-state");
      if (st) { st.textContent = s.status; st.className = "badge " + s.status; }
      document.querySelectorAll("[data-when-state]").forEach(function (b) {
        b.hidden = b.dataset.whenState.split(" ").indexOf(s.status) < 0;
      });
      var err = document.getElementById("job-error");
      if (err) { err.textContent = s.error ? s.error.message : ""; err.hidden = !s.error; }
      el.dataset.state = s.status;
    });
    es.addEventListener("log", function (e) {
      var lg = document.getElementById("job-log");
      if (!lg) return;
      var atEnd = lg.scrollTop + lg.clientHeight >= lg.scrollHeight - 4;
      var d = JSON.parse(e.data);
      var text = (d.reset || lg.dataset.empty ? "" : lg.textContent) + d.text;
      if (text.length > LOG_KEEP) text = text.slice(text.length - LOG_KEEP);
      if (text) delete lg.dataset.empty;
      lg.textContent = text || "(nothing logged yet)";
      if (atEnd) lg.scrollTop = lg.scrollHeight;
    });
    es.addEventListener("end", function () {
      es.close();
      el.dataset.ended = "1";
      // the job ended while the page was open: show its result (the page as the server now renders it)
      if (el.dataset.reloadOnEnd !== "no") window.location.reload();
    });
  }

  // Shortcuts: any element with data-key="k" is clicked when k is pressed outside a text field.
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    var hit = null;
    document.querySelectorAll("[data-key]").forEach(function (b) {
      if (!hit && !b.disabled && !b.hidden && b.dataset.key.split(" ").indexOf(e.key) >= 0) hit = b;
    });
    if (hit) { e.preventDefault(); hit.click(); }
  });

  // Ctrl+Enter (or Cmd+Enter) in a textarea with data-submit-on-ctrl-enter sends its form
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && t && t.matches && t.matches("textarea[data-submit-on-ctrl-enter]")
        && t.form) {
      e.preventDefault();
      t.form.requestSubmit();
    }
  });

  function init(root) {
    localizeTimes(root);
    root.querySelectorAll(".chart[data-chart]").forEach(makeChart);
    root.querySelectorAll("[data-stream]").forEach(follow);
    root.querySelectorAll("[data-autofocus]").forEach(function (el) { el.focus(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (window.htmx) { htmx.config.includeIndicatorStyles = false; htmx.config.allowEval = false; }
    init(document);
  });
  document.addEventListener("htmx:afterSwap", function (e) { init(e.detail.elt || document); });
})();
