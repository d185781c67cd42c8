// The operator console's one script: on the overview, fetch the counters every few seconds
// and redraw the chart (the server writes every figure in the reader's language; this only
// puts them in place). No other page needs a script.
"use strict";
(function () {
  const PERIOD_MS = 2000;
  if (document.body.dataset.page !== "overview") return;
  const note = document.getElementById("live-note");
  const chart = document.getElementById("chart");
  const summary = document.getElementById("chart-summary");
  const liveText = note.textContent;
  let lastPayments = null;

  async function refresh() {
    try {
      const resp = await fetch("/admin/api/counters", {
        headers: { Accept: "application/json" },
        cache: "no-store",
        credentials: "same-origin",
      });
      if (resp.status === 401) {
        window.location.assign("/admin/signin?expired=1");
        return;
      }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      const body = await resp.json();
      for (const [key, text] of Object.entries(body.counters)) {
        const cell = document.querySelector('[data-counter="' + key + '"]');
        if (cell && cell.textContent !== text) cell.textContent = text;
      }
      summary.textContent = body.chartSummary;
      chart.alt = body.chartSummary;
      // The chart changes with the payments (and each minute): fetched again then only.
      const minute = Math.floor(Date.now() / 60000);
      const stamp = body.paymentsLastHour + "-" + minute;
      if (stamp !== lastPayments) {
        if (lastPayments !== null) chart.src = "/admin/chart.svg?t=" + encodeURIComponent(stamp);
        lastPayments = stamp;
      }
      note.textContent = liveText;
      note.classList.remove("stale");
      document.body.dataset.updated = String(Date.now());
    } catch (err) {
      note.textContent = note.dataset.stale;
      note.classList.add("stale");
    } finally {
      window.setTimeout(refresh, PERIOD_MS);
    }
  }
  window.setTimeout(refresh, PERIOD_MS);
})();
