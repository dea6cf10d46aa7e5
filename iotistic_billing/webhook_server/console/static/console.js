// Pages marked data-refresh reload their main content in place (the same URL with fragment=1), so a
// person sees a phase change within seconds without reloading; and an action's banner is said once.
// No other script runs on the console.
(function () {
  "use strict";
  // An action's banner (?done=revoke) belongs to the moment after the action: out of the address, a
  // reload or a link copied from it does not say "Licence revoked" again.
  var address = new URL(window.location.href);
  if (address.searchParams.has("done")) {
    address.searchParams.delete("done");
    window.history.replaceState(window.history.state, "", address.toString());
  }

  var main = document.getElementById("main");
  if (!main || !main.dataset.refresh) { return; }
  var every = parseInt(main.dataset.refresh, 10) || 2000;
  var handled = 0;
  var timer = null;
  var notice = null;  // what the page says while a form held on to keeps it (say)
  var noticeKind = null;
  var pressed = false;  // a mouse button down on the page and not yet up

  // The person can stop the updates (WCAG 2.2.2), for the tab's pages until they press it again.
  var PAUSED = "iotistic-console-live-updates-paused";
  var toggle = document.getElementById("live-toggle");
  function remembered() {
    try { return window.sessionStorage.getItem(PAUSED) === "1"; } catch (error) { return false; }
  }
  function paused() { return toggle !== null && toggle.getAttribute("aria-pressed") === "true"; }
  if (toggle !== null) {
    toggle.setAttribute("aria-pressed", remembered() ? "true" : "false");
    toggle.hidden = false;  // without this script the page does not update itself: nothing to pause
    toggle.addEventListener("click", function () {
      var pause = !paused();
      toggle.setAttribute("aria-pressed", pause ? "true" : "false");
      try {
        if (pause) { window.sessionStorage.setItem(PAUSED, "1"); } else { window.sessionStorage.removeItem(PAUSED); }
      } catch (error) { /* storage refused: paused for this page only */ }
      if (!pause) { window.clearTimeout(timer); timer = window.setTimeout(refresh, 0); }
    });
  }

  // A click is a press and a release on the same element: a swap between the two loses it. A release
  // outside the window (or a link dragged away) sends no mouseup; the next move without a button does.
  document.addEventListener("mousedown", function () { pressed = true; }, true);
  document.addEventListener("mouseup", function () { pressed = false; }, true);
  document.addEventListener("dragend", function () { pressed = false; }, true);
  document.addEventListener("mousemove", function (event) { if (event.buttons === 0) { pressed = false; } }, true);
  window.addEventListener("blur", function () { pressed = false; });

  // Someone at work in the page: a mouse button pressed, a form being filled, a link or button reached
  // with the keyboard, text selected to copy, or a field typed in or a box ticked and left (a Revoke
  // reason half written while the person reads the page). The swap would take it from under them, so it
  // waits for them. A link a mouse clicked keeps the focus too (one opened in a new tab): not a reason to
  // wait.
  function busy() {
    if (pressed) { return true; }
    var active = document.activeElement;
    if (active && active !== document.body && main.contains(active) &&
        (active.closest("form") !== null || active.matches(":focus-visible"))) { return true; }
    var selection = window.getSelection();
    if (selection !== null && selection.toString() !== "") { return true; }
    return Array.prototype.some.call(main.querySelectorAll("input, textarea"), function (field) {
      return field.value !== field.defaultValue || field.checked !== field.defaultChecked;
    });
  }

  // The texts that changed between the shown nodes and the fresh ones, when nothing else did (the page's
  // clock, "Updated 14:02:11 UTC", a condition's "3 min" ago, a count); null when anything else differs.
  function changedTexts(shown, fresh, changes) {
    if (shown.length !== fresh.length) { return null; }
    for (var index = 0; index < shown.length; index += 1) {
      var old = shown[index];
      var now = fresh[index];
      if (old.nodeType !== now.nodeType || old.nodeName !== now.nodeName) { return null; }
      if (old.nodeType !== Node.ELEMENT_NODE) {
        if (old.nodeValue !== now.nodeValue) { changes.push([old, now.nodeValue]); }
        continue;
      }
      if (old.attributes.length !== now.attributes.length) { return null; }
      for (var at = 0; at < now.attributes.length; at += 1) {
        if (old.getAttribute(now.attributes[at].name) !== now.attributes[at].value) { return null; }
      }
      if (changedTexts(old.childNodes, now.childNodes, changes) === null) { return null; }
    }
    return changes;
  }

  // The new content. Texts alone changed: each is set where it is, and every other node stays, with what a
  // screen reader, the browser's find or a selection holds of it. Else the content is replaced, with the
  // scroll of each box (a Stripe event's payload) where the person left it.
  function show(fresh) {
    var changes = changedTexts(main.childNodes, fresh.content.childNodes, []);
    if (changes !== null) {
      changes.forEach(function (change) { change[0].nodeValue = change[1]; });
      return;
    }
    var boxes = main.querySelectorAll("pre");
    var scrolled = Array.prototype.map.call(boxes, function (box) { return [box.scrollTop, box.scrollLeft]; });
    main.replaceChildren(fresh.content);
    Array.prototype.forEach.call(main.querySelectorAll("pre"), function (box, index) {
      if (index < scrolled.length) { box.scrollTop = scrolled[index][0]; box.scrollLeft = scrolled[index][1]; }
    });
  }

  // Said while the person is at work in the page, which a reload would throw away: the session ended
  // ("ended": sign in elsewhere and submit), or the page is gone or closed to this session ("gone").
  var NOTICES = {
    ended: "Your session has ended: sign in again in another tab, then submit.",
    gone: "This page is gone or closed to this session (a Customer deleted, say): what you typed stays here."
  };
  function say(kind) {
    if (notice === null) {
      notice = document.createElement("p");
      notice.setAttribute("role", "alert");
      main.parentNode.insertBefore(notice, main);
    }
    noticeKind = kind;
    notice.className = "ended";
    notice.textContent = NOTICES[kind];
  }

  // Each session has its own CSRF token: a form kept from before a sign-in in another tab would be refused
  // with the old one, so every fresh answer's token goes to the page's forms (the header's Sign out too),
  // whether or not this page saw the session end. False when the answer holds no form (a viewer's page).
  function takeToken(fresh) {
    var token = fresh.content.querySelector("input[name=csrf]");
    if (token === null) { return false; }
    Array.prototype.forEach.call(document.querySelectorAll("input[name=csrf]"), function (field) {
      if (field.value !== token.value) { field.value = token.value; field.defaultValue = token.value; }
    });
    return true;
  }

  // A fresh answer after a notice: signed in again (saying whether this session may submit), or the page
  // is back.
  function sayBack(tokenTaken) {
    if (noticeKind === "ended") {
      notice.className = "done";
      notice.textContent = tokenTaken ? "Signed in again: you may submit."
        : "Signed in again, as a session that may not act on this page.";
    } else {
      notice.remove();
    }
    notice = null;
    noticeKind = null;
  }

  function refresh() {
    timer = null;
    if (paused()) { return; }
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (answer) {
        // Sent to sign in (the session ended or was signed out), or the page is gone or closed to this
        // session: the whole page again says so, not a sign-in page inside this one; but not while the
        // person is at work in it.
        if (answer.redirected || (answer.status >= 400 && answer.status < 500)) {
          if (!busy()) {
            window.location.reload();
          } else {
            say(answer.redirected || answer.status === 401 ? "ended" : "gone");
          }
          return null;
        }
        return answer.ok ? answer.text() : null;  // a server away: the next tick tries again
      })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = document.createElement("template");
        fresh.innerHTML = html;
        var tokenTaken = takeToken(fresh);
        if (notice !== null) { sayBack(tokenTaken); }
        if (!busy() && !paused()) { show(fresh); }
      })
      .catch(function () { /* the next tick tries again */ })
      .finally(function () {
        // How many answers were handled (swapped in or not), for a test to wait on instead of a sleep.
        handled += 1;
        main.dataset.refreshed = String(handled);
        if (timer === null && !paused()) { timer = window.setTimeout(refresh, every); }
      });
  }
  if (!paused()) { timer = window.setTimeout(refresh, every); }
}());
