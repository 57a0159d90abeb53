/* The conversations page: filter, page through, open one, review its labels.
 * Reads /api/taxonomy, /api/session and /api/conversations. Every value from the server (transcripts
 * above all: customer text) is inserted with textContent, never as HTML. */
(function () {
  "use strict";

  var PAGE = 50;
  var fields = [];          // [{name, labels}] of the taxonomy
  var csrf = null;          // the session's CSRF token (a browser session), sent with the review
  var nextCursor = null;
  var openId = null;

  function $(id) { return document.getElementById(id); }

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (className) { node.className = className; }
    return node;
  }

  function showError(message) {
    var box = $("error");
    box.textContent = "";
    box.appendChild(document.createTextNode(message));
    box.hidden = false;
    document.body.dataset.state = "error";
  }

  function request(url, options) {
    options = options || {};
    options.headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    options.credentials = "same-origin";
    return fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (response.status === 401) {
          var box = $("error");
          box.textContent = "";
          box.appendChild(document.createTextNode("Reading conversations needs a login. "));
          var link = el("a", "Log in");
          link.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
          link.id = "login-link";
          box.appendChild(link);
          box.hidden = false;
          document.body.dataset.state = "login";
          throw new Error("login needed");
        }
        if (!response.ok) {
          var error = body && body.error ? body.error : { message: "HTTP " + response.status };
          throw new Error(error.message + (error.hint ? " " + error.hint : ""));
        }
        return body;
      });
    });
  }

  function fmtTime(iso) {
    if (!iso) { return "-"; }
    var d = new Date(iso);
    return isNaN(d.getTime()) ? String(iso) : d.toISOString().slice(0, 16).replace("T", " ");
  }

  function lowest(confidence) {
    if (!confidence) { return null; }
    var values = Object.keys(confidence).map(function (k) { return confidence[k]; })
      .filter(function (v) { return typeof v === "number"; });
    return values.length ? Math.min.apply(null, values) : null;
  }

  // --- filters ---------------------------------------------------------------------------------
  function buildFilters(params) {
    var box = $("field-filters");
    fields.forEach(function (field) {
      var label = el("label", field.name.charAt(0).toUpperCase() + field.name.slice(1) + " ");
      var select = el("select");
      select.id = "filter-" + field.name;
      select.name = field.name;
      select.appendChild(new Option("any", ""));
      field.labels.forEach(function (name) { select.appendChild(new Option(name, name)); });
      select.value = params.get(field.name) || "";
      label.appendChild(select);
      box.appendChild(label);
    });
    ["needs_review", "reviewed", "from", "to", "job", "q", "order"].forEach(function (name) {
      if (params.get(name)) { $(name).value = params.get(name); }
    });
    $("filters").addEventListener("submit", function (event) {
      event.preventDefault();
      window.history.replaceState(null, "", "?" + currentQuery().toString());
      load(false);
    });
    $("more").addEventListener("click", function () { load(true); });
    $("next-review").addEventListener("click", nextNeedingReview);
  }

  function currentQuery() {
    var query = new URLSearchParams();
    fields.forEach(function (field) {
      var value = $("filter-" + field.name).value;
      if (value) { query.set(field.name, value); }
    });
    ["needs_review", "reviewed", "from", "to", "job", "q"].forEach(function (name) {
      if ($(name).value) { query.set(name, $(name).value); }
    });
    if ($("order").value !== "newest") { query.set("order", $("order").value); }
    return query;
  }

  // --- the list --------------------------------------------------------------------------------
  function buildHead() {
    var head = $("list-head");
    ["Conversation"].concat(fields.map(function (f) { return f.name; }))
      .concat(["Lowest confidence", "Review", "Processed", "Job", ""]).forEach(function (text) {
        var th = el("th", text);
        th.scope = "col";
        head.appendChild(th);
      });
  }

  function load(append) {
    var query = currentQuery();
    query.set("limit", String(PAGE));
    if (append && nextCursor) { query.set("cursor", nextCursor); }
    return request("/api/conversations?" + query.toString()).then(function (body) {
      var tbody = $("list").tBodies[0];
      if (!append) { tbody.textContent = ""; }
      body.items.forEach(function (item) { tbody.appendChild(row(item)); });
      if (!tbody.rows.length) {
        var empty = el("tr");
        var td = el("td", "No conversation matches these filters.");
        td.colSpan = fields.length + 6;
        empty.appendChild(td);
        tbody.appendChild(empty);
      }
      nextCursor = body.next_cursor;
      $("more").hidden = !nextCursor;
      $("count").textContent = "(" + tbody.querySelectorAll("tr[data-id]").length + (nextCursor ? "+" : "") + ")";
      document.body.dataset.state = "ready";
    }).catch(function (error) { if (document.body.dataset.state !== "login") { showError(error.message); } });
  }

  function row(item) {
    var tr = el("tr");
    tr.dataset.id = item.id;
    tr.dataset.number = item.conversation_number || "";
    tr.appendChild(el("td", item.conversation_number));
    fields.forEach(function (field) {
      var td = el("td", item.labels[field.name] || "-");
      td.dataset.field = field.name;
      tr.appendChild(td);
    });
    var low = lowest(item.confidence);
    var conf = el("td", low === null ? "-" : low.toFixed(2), "num");
    if (item.needs_review) { conf.appendChild(document.createTextNode(" ")); conf.appendChild(el("span", "needs review", "badge flag")); }
    tr.appendChild(conf);
    var state = item.review ? (item.review.stale ? "stale" : "reviewed by " + item.review.by) : "-";
    tr.appendChild(el("td", state));
    tr.appendChild(el("td", fmtTime(item.processed_at)));
    tr.appendChild(el("td", item.job_id || "-"));
    var td = el("td");
    var button = el("button", "Open");
    button.type = "button";
    button.addEventListener("click", function () { open(item.id); });
    td.appendChild(button);
    tr.appendChild(td);
    if (item.id === openId) { tr.className = "selected"; }
    return tr;
  }

  function nextNeedingReview() {
    var query = new URLSearchParams({ needs_review: "true", reviewed: "false", order: "confidence", limit: "1" });
    request("/api/conversations?" + query.toString()).then(function (body) {
      if (!body.items.length) { $("saved").textContent = ""; showError("Nothing needs review: every flagged conversation is reviewed."); return; }
      open(body.items[0].id);
    }).catch(function (error) { if (document.body.dataset.state !== "login") { showError(error.message); } });
  }

  // --- one conversation ------------------------------------------------------------------------
  function open(id) {
    openId = id;
    Array.prototype.forEach.call($("list").tBodies[0].rows, function (tr) {
      tr.className = tr.dataset.id === id ? "selected" : "";
    });
    return request("/api/conversations/" + encodeURIComponent(id)).then(showDetail)
      .catch(function (error) { if (document.body.dataset.state !== "login") { showError(error.message); } });
  }

  function fact(list, name, value) {
    list.appendChild(el("dt", name));
    var dd = el("dd", value);
    dd.dataset.fact = name;
    list.appendChild(dd);
  }

  function showDetail(item) {
    $("detail").hidden = false;
    $("detail").dataset.id = item.id;
    $("detail-number").textContent = item.conversation_number || "";
    var facts = $("facts");
    facts.textContent = "";
    fields.forEach(function (field) {
      var confidence = item.confidence && typeof item.confidence[field.name] === "number"
        ? " (confidence " + item.confidence[field.name].toFixed(2) + ")" : "";
      var model = item.model_labels[field.name];
      var shown = (item.labels[field.name] || "-") + confidence +
        (model && model !== item.labels[field.name] ? "; the model said " + model : "");
      fact(facts, field.name, shown);
    });
    fact(facts, "categorization", item.categorization || "-");
    fact(facts, "model", item.model || "-");
    fact(facts, "job", item.job_id || "-");
    fact(facts, "processed", fmtTime(item.processed_at));

    var list = $("transcript");
    list.textContent = "";
    if (!item.transcript) {
      list.appendChild(el("li", "The conversation is no longer in the source collection."));
    } else {
      item.transcript.forEach(function (turn) {
        var li = el("li", null, turn.role);
        li.appendChild(el("span", turn.role + (turn.time ? " · " + turn.time : ""), "role"));
        li.appendChild(document.createTextNode(turn.text));  // text, never markup
        list.appendChild(li);
      });
    }

    var review = item.review;
    $("review-state").textContent = !review ? "Not reviewed yet: the labels are the model's."
      : (review.stale ? "A review by " + review.by + " was made before the conversation changed (stale): "
        + "the labels are the model's again."
        : "Reviewed by " + review.by + " on " + fmtTime(review.at) + (review.note ? ": " + review.note : "."));
    var box = $("review-fields");
    box.textContent = "";
    fields.forEach(function (field) {
      var label = el("label", field.name.charAt(0).toUpperCase() + field.name.slice(1) + " ");
      var select = el("select");
      select.id = "review-" + field.name;
      select.name = field.name;
      field.labels.forEach(function (name) { select.appendChild(new Option(name, name)); });
      select.value = item.labels[field.name] || "";
      label.appendChild(select);
      box.appendChild(label);
    });
    $("note").value = review && !review.stale && review.note ? review.note : "";
    $("saved").textContent = "";
    document.body.dataset.detail = item.id;
  }

  function saveReview(event) {
    event.preventDefault();
    var id = $("detail").dataset.id;
    var labels = {};
    fields.forEach(function (field) { labels[field.name] = $("review-" + field.name).value; });
    var headers = { "Content-Type": "application/json" };
    if (csrf) { headers["X-CSRF-Token"] = csrf; }
    request("/api/conversations/" + encodeURIComponent(id) + "/review", {
      method: "POST", headers: headers, body: JSON.stringify({ labels: labels, note: $("note").value || null })
    }).then(function (item) {
      return open(id).then(function () {
        var old = document.querySelector('#list tr[data-id="' + CSS.escape(id) + '"]');
        if (old) { old.replaceWith(row(item)); }
        $("saved").textContent = "Saved.";
      });
    }).catch(function (error) { if (document.body.dataset.state !== "login") { showError(error.message); } });
  }

  // --- start -----------------------------------------------------------------------------------
  function start() {
    var params = new URLSearchParams(window.location.search);
    Promise.all([request("/api/taxonomy"), request("/api/session")]).then(function (answers) {
      // Labels as names, whether the taxonomy lists them as strings or as {name, description}.
      fields = answers[0].fields.map(function (f) {
        return { name: f.name, labels: f.labels.map(function (l) { return typeof l === "string" ? l : l.name; }) };
      });
      var session = answers[1];
      csrf = session.csrf_token;
      $("who").textContent = session.via === "loopback" ? "local (no login needed on this address)" : session.user;
      $("logout").hidden = session.via !== "session";
      buildFilters(params);
      buildHead();
      $("review-form").addEventListener("submit", saveReview);
      return load(false);
    }).catch(function (error) { if (document.body.dataset.state !== "login") { showError(error.message); } });
  }

  start();
}());
