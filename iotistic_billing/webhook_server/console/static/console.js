// Pages marked data-refresh reload their main content in place (the same URL with fragment=1), so a
// person sees a phase change within seconds without reloading. No other script runs on the console.
(function () {
  "use strict";
  var main = document.getElementById("main");
  if (!main || !main.dataset.refresh) { return; }
  var every = parseInt(main.dataset.refresh, 10) || 2000;
  var handled = 0;
  // Someone at work in the page: a form being filled, a link or button reached with the keyboard, text
  // selected to copy, or a field typed in and left (a Revoke reason half written while the person reads
  // the page). The swap would take it from under them, so it waits for them (WCAG 2.2.2). A link a
  // mouse clicked keeps the focus too (one opened in a new tab): not a reason to wait.
  function busy() {
    var active = document.activeElement;
    if (active && active !== document.body && main.contains(active) &&
        (active.closest("form") !== null || active.matches(":focus-visible"))) { return true; }
    var selection = window.getSelection();
    if (selection !== null && selection.toString() !== "") { return true; }
    return Array.prototype.some.call(main.querySelectorAll("input, textarea"), function (field) {
      return field.value !== field.defaultValue;
    });
  }
  // The new content, with the scroll of each box (a Stripe event's payload) where the person left it.
  function swap(html) {
    var boxes = main.querySelectorAll("pre");
    var scrolled = Array.prototype.map.call(boxes, function (box) { return [box.scrollTop, box.scrollLeft]; });
    main.innerHTML = html;
    Array.prototype.forEach.call(main.querySelectorAll("pre"), function (box, index) {
      if (index < scrolled.length) { box.scrollTop = scrolled[index][0]; box.scrollLeft = scrolled[index][1]; }
    });
  }
  function refresh() {
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    url.searchParams.delete("done");
    fetch(url.toString(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) {
        // Sent to sign in (the session ended or was signed out), or the page is gone or closed to
        // this session: the whole page again says so, not a sign-in page inside this one.
        if (answer.redirected || (answer.status >= 400 && answer.status < 500)) {
          window.location.reload();
          return null;
        }
        return answer.ok ? answer.text() : null;  // a server away: the next tick tries again
      })
      .then(function (html) { if (html !== null && !busy()) { swap(html); } })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () {
        // How many answers were handled (swapped in or not), for a test to wait on instead of a sleep.
        handled += 1;
        main.dataset.refreshed = String(handled);
        window.setTimeout(refresh, every);
      });
  }
  window.setTimeout(refresh, every);
}());
