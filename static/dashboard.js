/* The dashboard: reads /api/stats and /api/jobs, draws with the vendored Chart.js, polls while a job runs.
 * Every value from the server is inserted as text (never as HTML). */
(function () {
  "use strict";

  var FAST_MS = 5000;   // while a job runs
  var SLOW_MS = 30000;  // otherwise: notice a job that starts
  // Okabe-Ito palette: told apart with the common colour-vision deficiencies.
  var PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999"];
  var SENTIMENT_COLOURS = { Negative: "#D55E00", Neutral: "#8C8C8C", Positive: "#009E73", Mixed: "#CC79A7" };

  var charts = {};
  var timer = null;
  var lastStats = null;

  function $(id) { return document.getElementById(id); }

  function colourFor(field, label, index) {
    if (field === "sentiment" && SENTIMENT_COLOURS[label]) { return SENTIMENT_COLOURS[label]; }
    return PALETTE[index % PALETTE.length];
  }

  function isoDay(d) { return d.toISOString().slice(0, 10); }

  function initFilters() {
    var params = new URLSearchParams(window.location.search);
    var today = new Date();
    var monthAgo = new Date(today.getTime() - 29 * 86400000);
    $("from").value = params.get("from") || isoDay(monthAgo);
    $("to").value = params.get("to") || isoDay(today);
    if (params.get("job")) { addJobOption(params.get("job")); $("job").value = params.get("job"); }
    $("filters").addEventListener("submit", function (event) {
      event.preventDefault();
      var query = new URLSearchParams(currentFilters());
      window.history.replaceState(null, "", "?" + query.toString());
      refresh();
    });
    $("trend-field").addEventListener("change", function () { if (lastStats) { drawTrend(lastStats); } });
  }

  function currentFilters() {
    var filters = {};
    ["from", "to", "job"].forEach(function (name) { if ($(name).value) { filters[name] = $(name).value; } });
    return filters;
  }

  function addJobOption(jobId) {
    var select = $("job");
    for (var i = 0; i < select.options.length; i++) { if (select.options[i].value === jobId) { return; } }
    var option = document.createElement("option");
    option.value = jobId;
    option.textContent = jobId;
    select.appendChild(option);
  }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" } }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (!response.ok) {
          var error = body && body.error ? body.error : { message: "HTTP " + response.status };
          throw new Error(error.message + (error.hint ? " " + error.hint : ""));
        }
        return body;
      });
    });
  }

  function fmtNumber(n) { return (n === null || n === undefined) ? "-" : Number(n).toLocaleString("en"); }
  function fmtTime(iso) {
    if (!iso) { return "-"; }
    var d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString("en-GB", { dateStyle: "short", timeStyle: "short" });
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) { td.className = className; }
    row.appendChild(td);
    return td;
  }

  function emptyRow(tbody, columns, text) {
    var row = tbody.insertRow();
    var td = cell(row, text);
    td.colSpan = columns;
  }

  function drawJobs(body) {
    var tbody = $("jobs").tBodies[0];
    tbody.textContent = "";
    if (!body.jobs.length) { emptyRow(tbody, 9, "No job recorded yet."); }
    body.jobs.forEach(function (job) {
      addJobOption(job.job_id);
      var row = tbody.insertRow();
      row.dataset.job = job.job_id;
      cell(row, job.job_id + (job.mode ? " (" + job.mode + ")" : ""));
      cell(row, job.status, "status status-" + job.status);
      var progressCell = cell(row, "");
      var bar = document.createElement("progress");
      bar.max = Math.max(job.total, 1);
      bar.value = Math.min(job.processed, bar.max);
      bar.setAttribute("aria-label", "Progress of " + job.job_id);
      progressCell.appendChild(bar);
      progressCell.appendChild(document.createTextNode(" " + fmtNumber(job.processed) + " / " + fmtNumber(job.total)));
      cell(row, fmtNumber(job.successful), "num");
      cell(row, fmtNumber(job.failed), "num");
      cell(row, fmtNumber(job.queued_for_retry), "num");
      cell(row, job.rate ? job.rate.toFixed(2) + "/s" : "-", "num");
      cell(row, job.status === "running" ? fmtTime(job.eta) : "-");
      cell(row, fmtTime(job.started_at));
    });
  }

  function fillTable(table, headers, rows) {
    table.textContent = "";
    var head = table.createTHead().insertRow();
    headers.forEach(function (h) { var th = document.createElement("th"); th.scope = "col"; th.textContent = h; head.appendChild(th); });
    var tbody = table.createTBody();
    rows.forEach(function (values) {
      var row = tbody.insertRow();
      values.forEach(function (v, i) { cell(row, String(v), i > 0 ? "num" : ""); });
    });
  }

  function upsertChart(key, canvas, config) {
    if (charts[key]) {
      charts[key].data = config.data;
      charts[key].options = config.options;
      charts[key].update("none");
    } else {
      charts[key] = new Chart(canvas, config);
    }
    canvas.dataset.rendered = "true";
  }

  function drawDistribution(field, rows) {
    var labels = rows.map(function (r) { return r.label; });
    var counts = rows.map(function (r) { return r.count; });
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    var canvas = $("chart-" + field);
    canvas.setAttribute("aria-label", field + " distribution: " + (rows.length ? rows.map(function (r) {
      return r.label + " " + r.count;
    }).join(", ") : "no results"));
    upsertChart(field, canvas, {
      type: "bar",
      data: {
        labels: labels,
        datasets: [{
          label: "Conversations",
          data: counts,
          backgroundColor: labels.map(function (l, i) { return colourFor(field, l, i); }),
        }],
      },
      options: {
        indexAxis: "y",
        maintainAspectRatio: false,
        animation: false,
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: function (ctx) {
            return ctx.raw + " (" + (total ? Math.round(100 * ctx.raw / total) : 0) + "%)";
          } } },
        },
        scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
      },
    });
    fillTable(document.querySelector('[data-testid="table-' + field + '"]'), [field, "conversations", "share"],
      rows.map(function (r) { return [r.label, r.count, (total ? (100 * r.count / total).toFixed(1) : "0.0") + "%"]; }));
  }

  function drawTrend(stats) {
    var field = $("trend-field").value;
    var days = stats.per_day.map(function (d) { return d.date; });
    var labelTotals = {};
    stats.per_day.forEach(function (d) {
      Object.keys(d[field]).forEach(function (l) { labelTotals[l] = (labelTotals[l] || 0) + d[field][l]; });
    });
    var labels = Object.keys(labelTotals).sort(function (a, b) { return labelTotals[b] - labelTotals[a] || (a < b ? -1 : 1); });
    var datasets = labels.map(function (label, i) {
      return {
        label: label,
        data: stats.per_day.map(function (d) { return d[field][label] || 0; }),
        backgroundColor: colourFor(field, label, i),
      };
    });
    var canvas = $("chart-trend");
    canvas.setAttribute("aria-label", "Conversations per day by " + field + ": " + (days.length ? stats.per_day.map(function (d) {
      return d.date + " " + d.total;
    }).join(", ") : "no results"));
    upsertChart("trend", canvas, {
      type: "bar",
      data: { labels: days, datasets: datasets },
      options: {
        maintainAspectRatio: false,
        animation: false,
        plugins: { legend: { position: "bottom" } },
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
      },
    });
    fillTable(document.querySelector('[data-testid="table-trend"]'), ["day", "total"].concat(labels),
      stats.per_day.map(function (d) {
        return [d.date, d.total].concat(labels.map(function (l) { return d[field][l] || 0; }));
      }));
  }

  function drawFailures(failures) {
    var tbody = $("failures").tBodies[0];
    tbody.textContent = "";
    if (!failures.length) { emptyRow(tbody, 4, "No failures in this range."); }
    failures.forEach(function (f) {
      var row = tbody.insertRow();
      cell(row, fmtTime(f.failed_at));
      cell(row, f.conversation_number || "-");
      cell(row, f.failure_type || "-");
      cell(row, f.reason || "-");
    });
  }

  function drawStats(stats) {
    lastStats = stats;
    (stats.job_ids || []).forEach(addJobOption);
    $("total").textContent = fmtNumber(stats.total);
    $("review").textContent = stats.review.share === null ? "no confidences"
      : (100 * stats.review.share).toFixed(1) + "% (" + fmtNumber(stats.review.needs_review) + " of " +
        fmtNumber(stats.review.with_confidence) + ")";
    $("pending").textContent = fmtNumber(stats.statuses.pending);
    $("failed").textContent = fmtNumber(stats.statuses.failed);
    ["intent", "topic", "sentiment"].forEach(function (field) { drawDistribution(field, stats[field]); });
    drawTrend(stats);
    drawFailures(stats.failures);
  }

  function showError(message) {
    var box = $("error");
    if (message) { box.textContent = "The dashboard cannot read its data: " + message; box.hidden = false; }
    else { box.hidden = true; box.textContent = ""; }
  }

  // The embedded model (OLLAMA_ENDPOINT=embedded) is for trying the tool: nobody should take its labels
  // for a real model's. Asked once: the API's model does not change while the page is open.
  function showModel() {
    return getJSON("/api/model").then(function (body) {
      if (!body.embedded) { return; }
      $("embedded").textContent = "The API classifies with the embedded model " + body.embedded +
        ": a 135M model that shows the machinery, not a real model's quality. " +
        "For real labels, run it with Ollama or another LLM server (LLM_ENDPOINT).";
      $("embedded").hidden = false;
    }).catch(function () { /* an older API without /api/model: no notice */ }).then(function () {
      $("embedded").dataset.checked = "true";
    });
  }

  function schedule(running) {
    clearTimeout(timer);
    var delay = running ? FAST_MS : SLOW_MS;
    $("live").textContent = "Updated " + new Date().toLocaleTimeString("en-GB") + (running
      ? " · a job is running: refreshing every " + FAST_MS / 1000 + " s"
      : " · no job running: checking every " + SLOW_MS / 1000 + " s");
    timer = setTimeout(refresh, delay);
  }

  function refresh() {
    var query = new URLSearchParams(currentFilters()).toString();
    var running = false;
    return Promise.all([getJSON("/api/jobs"), getJSON("/api/stats?" + query)]).then(function (bodies) {
      running = bodies[0].running > 0;
      drawJobs(bodies[0]);
      drawStats(bodies[1]);
      showError(null);
      document.body.dataset.state = "ready";
    }).catch(function (error) {
      showError(error.message);
      document.body.dataset.state = "error";
    }).then(function () { schedule(running); });
  }

  if (window.Chart) {
    Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
    Chart.defaults.color = "#1b1f24";
  }
  initFilters();
  showModel();
  refresh();
}());
