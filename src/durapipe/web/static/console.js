// durapipe console: refresh the live part of a run page once a second while the run is
// active. The server renders the HTML; this only fetches it again. A refresh waits while
// someone is typing into a form inside it.
(function () {
  "use strict";
  function typing(el) {
    var a = document.activeElement;
    if (a && el.contains(a) && (a.tagName === "INPUT" || a.tagName === "SELECT")) return true;
    var inputs = el.querySelectorAll("input[type=text], input:not([type])");
    for (var i = 0; i < inputs.length; i++) if (inputs[i].value) return true;
    return false;
  }
  function tick(el) {
    if (typing(el)) { setTimeout(function () { tick(el); }, 1000); return; }
    fetch(el.dataset.liveSrc, { headers: { accept: "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        el.innerHTML = html;
        var head = el.querySelector("[data-run-active]");
        if (head && head.dataset.runActive === "0") {
          el.dataset.liveActive = "0";
          location.reload(); // the run ended: refresh actions, state and inputs once
        }
      })
      .catch(function () {})
      .then(function () {
        if (el.dataset.liveActive === "1") setTimeout(function () { tick(el); }, 1000);
      });
  }
  document.querySelectorAll("[data-live-src]").forEach(function (el) {
    if (el.dataset.liveActive === "1") setTimeout(function () { tick(el); }, 1000);
  });
})();
