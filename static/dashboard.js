/* The dashboard: reads /api/stats and /api/jobs, draws with the vendored Chart.js, polls while a job runs.
 * Every value from the server is inserted as text (never as HTML). */
(function () {
  "use strict";

  var FAST_MS = 5000;   // while a job runs
  var SLOW_MS = 30000;  // otherwise: notice a job that starts
  // Okabe-Ito palette: told apart with the common colour-vision deficiencies.
  var PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999"];
  // Labels whose colour says what they mean (any field that uses them: usually the sentiment's).
  var LABEL_COLOURS = { Negative: "#D55E00", Neutral: "#8C8C8C", Positive: "#009E73", Mixed: "#CC79A7" };

  var charts = {};
  var timer = null;
  var lastStats = null;

  function $(id) { return document.getElementById(id); }

  function colourFor(label, index) {
    return LABEL_COLOURS[label] || PALETTE[index % PALETTE.length];
  }

  // The figure of one label field (created on first sight): caption, canvas, table.
  function fieldFigure(field) {
    var figure = document.querySelector('#charts figure[data-field="' + field.name + '"]');
    if (!figure) {
      figure = document.createElement("figure");
      figure.className = "chart";
      figure.dataset.field = field.name;
      var caption = document.createElement("figcaption");
      var box = document.createElement("div");
      box.className = "canvas-box";
      var canvas = document.createElement("canvas");
      canvas.id = "chart-" + field.name;
      canvas.setAttribute("role", "img");
      box.appendChild(canvas);
      var details = document.createElement("details");
      var summary = document.createElement("summary");
      summary.textContent = field.title + " as a table";
      var table = document.createElement("table");
      table.className = "data";
      table.dataset.testid = "table-" + field.name;
      details.appendChild(summary);
      details.appendChild(table);
      figure.appendChild(caption);
      figure.appendChild(box);
      figure.appendChild(details);
      $("charts").appendChild(figure);
    }
    var captionText = field.title + (field.customer_only ? " (customer's turns)" : "");
    figure.querySelector("figcaption").textContent = captionText;
    figure.title = field.description || "";
    return figure;
  }

  // One figure per field of /api/stats, in its order (the taxonomy's); figures of fields no longer
  // there (the API restarted with another taxonomy) go.
  function drawFields(fields) {
    var names = fields.map(function (f) { return f.name; });
    Array.prototype.slice.call($("charts").children).forEach(function (figure) {
      if (names.indexOf(figure.dataset.field) < 0) {
        if (charts[figure.dataset.field]) { charts[figure.dataset.field].destroy(); delete charts[figure.dataset.field]; }
        figure.remove();
      }
    });
    fields.forEach(function (field) {
      fieldFigure(field);
      drawDistribution(field);
    });
  }

  // The trend's "split by" choices are the fields; the first time, the one with fewest labels.
  function fillTrendChoices(fields) {
    var select = $("trend-field");
    var chosen = select.value;
    var names = fields.map(function (f) { return f.name; });
    if (names.join("\n") !== Array.prototype.map.call(select.options, function (o) { return o.value; }).join("\n")) {
      select.textContent = "";
      fields.forEach(function (field) {
        var option = document.createElement("option");
        option.value = field.name;
        option.textContent = field.name;
        select.appendChild(option);
      });
    }
    if (names.indexOf(chosen) < 0 && fields.length) {
      chosen = fields.reduce(function (a, b) { return b.labels.length < a.labels.length ? b : a; }).name;
    }
    select.value = chosen;
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

  // The conversations page filtered like the dashboard (and by a field's label, when given).
  function conversationsLink(field, label, extra) {
    var query = new URLSearchParams(currentFilters());
    if (field) { query.set(field, label); }
    Object.keys(extra || {}).forEach(function (k) { query.set(k, extra[k]); });
    return "/conversations?" + query.toString();
  }

  function drawAgreement(agreement) {
    var parts = Object.keys(agreement || {}).filter(function (f) { return agreement[f].n > 0; }).map(function (f) {
      var a = agreement[f];
      return f + " " + Math.round(100 * a.accuracy) + "% (" + Math.round(a.accuracy * a.n) + " of " + a.n + ")";
    });
    $("agreement").textContent = parts.length ? parts.join("; ") : "no reviews yet";
  }

  function drawDistribution(field) {
    var rows = field.counts;
    var labels = rows.map(function (r) { return r.label; });
    var counts = rows.map(function (r) { return r.count; });
    var total = counts.reduce(function (a, b) { return a + b; }, 0);
    var canvas = $("chart-" + field.name);
    canvas.setAttribute("aria-label", field.name + " distribution: " + (rows.length ? rows.map(function (r) {
      return r.label + " " + r.count;
    }).join(", ") : "no results"));
    upsertChart(field.name, canvas, {
      type: "bar",
      data: {
        labels: labels,
        datasets: [{
          label: "Conversations",
          data: counts,
          backgroundColor: labels.map(function (l, i) { return colourFor(l, i); }),
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
        // A bar opens the conversations with that label (in the same date range and job).
        onClick: function (event, elements) {
          if (elements.length) { window.location.href = conversationsLink(field.name, labels[elements[0].index]); }
        },
        onHover: function (event, elements) { event.native.target.style.cursor = elements.length ? "pointer" : ""; },
      },
    });
    fillTable(document.querySelector('[data-testid="table-' + field.name + '"]'), [field.name, "conversations", "share"],
      rows.map(function (r) { return [r.label, r.count, (total ? (100 * r.count / total).toFixed(1) : "0.0") + "%"]; }));
  }

  function drawTrend(stats) {
    var field = $("trend-field").value;
    var days = stats.per_day.map(function (d) { return d.date; });
    var labelTotals = {};
    function countsOf(day) { return day.labels[field] || {}; }
    stats.per_day.forEach(function (d) {
      var counts = countsOf(d);
      Object.keys(counts).forEach(function (l) { labelTotals[l] = (labelTotals[l] || 0) + counts[l]; });
    });
    var labels = Object.keys(labelTotals).sort(function (a, b) { return labelTotals[b] - labelTotals[a] || (a < b ? -1 : 1); });
    var datasets = labels.map(function (label, i) {
      return {
        label: label,
        data: stats.per_day.map(function (d) { return countsOf(d)[label] || 0; }),
        backgroundColor: colourFor(label, i),
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
        return [d.date, d.total].concat(labels.map(function (l) { return countsOf(d)[l] || 0; }));
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
    $("review-link").href = conversationsLink(null, null, { needs_review: "true", reviewed: "false", order: "confidence" });
    drawAgreement(stats.agreement);
    $("pending").textContent = fmtNumber(stats.statuses.pending);
    $("failed").textContent = fmtNumber(stats.statuses.failed);
    drawFields(stats.fields);
    fillTrendChoices(stats.fields);
    drawTrend(stats);
    drawFailures(stats.failures);
  }

  function showError(message) {
    var box = $("error");
    if (message) { box.textContent = "The dashboard cannot read its data: " + message; box.hidden = false; }
    else { box.hidden = true; box.textContent = ""; }
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
  refresh();
}());
