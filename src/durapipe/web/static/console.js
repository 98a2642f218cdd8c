// durapipe console: redraw the live part of a run page when the run's event stream (SSE,
// /runs/<id>/events) says something happened: a node started or ended, a gate waits or
// was answered. The server renders the HTML; this only fetches it again, at most a few
// times a second, plus once every 5 s so the bars of work in flight grow. Without
// EventSource it falls back to fetching once a second. A redraw waits while someone is
// typing into a form inside it.
(function () {
  "use strict";
  var HEARTBEAT = 5000, BATCH = 150;
  function typing(el) {
    var a = document.activeElement;
    if (a && el.contains(a) && (a.tagName === "INPUT" || a.tagName === "SELECT")) return true;
    var inputs = el.querySelectorAll("input[type=text], input:not([type])");
    for (var i = 0; i < inputs.length; i++) if (inputs[i].value) return true;
    return false;
  }
  function live(el) {
    var busy = false, again = false, source = null, timer = null;
    function stop() {
      el.dataset.liveActive = "0";
      if (source) source.close();
      if (timer) clearInterval(timer);
    }
    function redraw() {
      if (el.dataset.liveActive !== "1") return;
      if (busy || typing(el)) { again = true; return; }
      busy = true;
      fetch(el.dataset.liveSrc, { headers: { accept: "text/html" }, credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html === null) return;
          el.innerHTML = html;
          var head = el.querySelector("[data-run-active]");
          if (head && head.dataset.runActive === "0") {
            stop();
            location.reload(); // the run ended: refresh actions, state and inputs once
          }
        })
        .catch(function () {})
        .then(function () {
          busy = false;
          if (again) { again = false; setTimeout(redraw, BATCH); }
        });
    }
    var pending = null;
    function soon() {
      if (pending === null) pending = setTimeout(function () { pending = null; redraw(); }, BATCH);
    }
    if (window.EventSource && el.dataset.eventsSrc) {
      source = new EventSource(el.dataset.eventsSrc); // reconnects with Last-Event-ID itself
      source.onmessage = soon;
      ["run_started", "run_resumed", "run_finished", "node_started", "node_finished",
       "node_failed", "node_skipped", "gate_waiting", "gate_answered", "task_dispatched",
       "task_progress", "task_joined", "retry", "model_started", "model_restarted"]
        .forEach(function (t) { source.addEventListener(t, soon); });
      timer = setInterval(redraw, HEARTBEAT);
    } else {
      timer = setInterval(redraw, 1000);
    }
  }
  document.querySelectorAll("[data-live-src]").forEach(function (el) {
    if (el.dataset.liveActive === "1") live(el);
  });
})();
