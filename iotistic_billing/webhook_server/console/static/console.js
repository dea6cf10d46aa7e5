// Pages marked data-refresh reload their main content in place (the same URL with fragment=1), so a
// person sees a phase change within seconds without reloading. No other script runs on the console.
(function () {
  "use strict";
  var main = document.getElementById("main");
  if (!main || !main.dataset.refresh) { return; }
  var every = parseInt(main.dataset.refresh, 10) || 2000;
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    url.searchParams.delete("done");
    fetch(url.toString(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) { return answer.ok ? answer.text() : null; })
      .then(function (html) { if (html !== null && !document.querySelector("form:focus-within")) { main.innerHTML = html; } })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () { window.setTimeout(refresh, every); });
  }
  window.setTimeout(refresh, every);
}());
