// The deposit page: create a session, show its QR, wait for "paid" on the gateway's stream,
// fall back to polling when the stream fails, give up after the wait, resume after a reload.
//
// A stream that drops (a gateway rollout closes every stream, a network blip) is not a reason
// to poll: EventSource reconnects by itself after the server's jittered `retry:`, sending
// Last-Event-ID, and the gateway's first event is the current status. The page polls only
// after several consecutive failures without the stream opening in between, or where EventSource
// does not exist; while polling it tries the stream again now and then, and stops polling once
// the stream is back. A gateway rollout so costs reconnects spread over seconds, not a wave of
// 5-second pollers on session-api (issue 15).
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const STORE_KEY = "paypush.session";
  const $ = (id) => document.getElementById(id);
  const money = new Intl.NumberFormat("vi-VN", { style: "currency", currency: "VND" });

  let session = null;      // {uuid, accountNumber, amount, waitStartedAt}
  let stream = null;
  let pollTimer = null;
  let probeTimer = null;
  let reopenTimer = null;
  let streamFailures = 0;   // consecutive failures, without the stream opening in between
  window.paypushStreamOpens = 0;
  window.paypushPolls = 0;
  let clockTimer = null;
  let finished = false;

  function setState(state) {
    document.body.dataset.state = state;
  }

  function setStatus(text, kind) {
    const el = $("status");
    el.textContent = text;
    el.className = "status" + (kind ? " " + kind : "");
  }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
  }

  function newUuid() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  async function api(path, options) {
    const resp = await fetch(path, options);
    let body = {};
    try { body = await resp.json(); } catch (_) { /* empty or not JSON */ }
    return { status: resp.status, body };
  }

  function save() {
    localStorage.setItem(STORE_KEY, JSON.stringify(session));
  }

  function forget() {
    localStorage.removeItem(STORE_KEY);
  }

  function stopWaiting() {
    finished = true;
    if (stream) { stream.close(); stream = null; }
    stopPolling();
    clearTimeout(reopenTimer);
    streamFailures = 0;
    clearInterval(clockTimer);
    $("new-qr").hidden = false;
  }

  function showPayment(s) {
    $("deposit-form").hidden = true;
    $("payment").hidden = false;
    $("qr").src = `/api/sessions/${encodeURIComponent(s.uuid)}/qr.svg`;
    $("pay-amount").textContent = money.format(s.amount);
    $("pay-note").textContent = s.description || "";
    $("pay-order").textContent = String(s.orderCode);
    const link = $("checkout");
    link.href = s.checkoutUrl;
    link.hidden = !s.checkoutUrl;
    $("pay-title").focus();
  }

  function onStatus(ev) {
    if (finished || !ev || ev.uuid !== session.uuid) return;
    if (ev.status === "done") {
      stopWaiting();
      forget();
      $("payment").hidden = true;
      setState("paid");
      setStatus(`Payment received: ${money.format(ev.amountPaid || ev.amount)}. Thank you!`, "ok");
      window.paypushPaidAt = Date.now();
    } else if (ev.status === "expired") {
      stopWaiting();
      forget();
      $("payment").hidden = true;
      setState("expired");
      setStatus("This payment session has expired. Create a new QR code to pay.", "warn");
    } else if (ev.amountPaid > 0) {
      setState("partial");
      setStatus(`Received ${money.format(ev.amountPaid)} of ${money.format(ev.amount)}. ` +
        `Please transfer the remaining ${money.format(ev.amount - ev.amountPaid)}.`, "warn");
    } else {
      setStatus(document.body.dataset.transport === "polling"
        ? "Waiting for your transfer (checking every few seconds)…"
        : "Waiting for your transfer…");
    }
  }

  function jittered(ms) {
    return Math.round(ms * (0.5 + Math.random()));
  }

  function openStream() {
    if (finished) return;
    if (typeof EventSource === "undefined") { startPolling(); return; }
    if (pollTimer === null) document.body.dataset.transport = "connecting";
    const es = new EventSource(`${config.streamUrl}/api/webhooks/stream?uuid=${encodeURIComponent(session.uuid)}`);
    stream = es;
    es.onopen = () => {
      if (stream !== es || finished) return;
      window.paypushStreamOpens += 1;
      streamFailures = 0;
      stopPolling();
      document.body.dataset.transport = "stream";
    };
    es.onmessage = (e) => {
      if (stream !== es) return;
      streamFailures = 0;
      onStatus(JSON.parse(e.data));
    };
    es.onerror = () => {
      if (finished || stream !== es) return;
      if (pollTimer !== null) {
        // A try while polling failed: keep polling, try again later.
        es.close();
        stream = null;
        probeTimer = setTimeout(openStream, jittered(config.streamProbeMs));
        return;
      }
      streamFailures += 1;
      if (streamFailures >= config.streamFailuresBeforePolling) {
        // Really unavailable (blocked, a proxy that buffers, every gateway gone): poll.
        es.close();
        stream = null;
        startPolling();
        probeTimer = setTimeout(openStream, jittered(config.streamProbeMs));
      } else if (es.readyState === EventSource.CLOSED) {
        // Refused (503 from a full or stopping gateway): EventSource gives up, we do not.
        stream = null;
        document.body.dataset.transport = "reconnecting";
        reopenTimer = setTimeout(openStream, jittered(config.reconnectMs));
      } else {
        // Dropped: EventSource reconnects itself after `retry:`, with Last-Event-ID.
        document.body.dataset.transport = "reconnecting";
      }
    };
  }

  function startPolling() {
    document.body.dataset.transport = "polling";
    if (pollTimer !== null) return;
    const poll = async () => {
      if (finished) return;
      window.paypushPolls += 1;
      try {
        const { status, body } = await api(`/api/webhooks?uuid=${encodeURIComponent(session.uuid)}`);
        if (status === 200) onStatus(body);
        else if (status === 404) onStatus({ uuid: session.uuid, status: "expired" });
      } catch (_) { /* offline for a moment: the next poll tries again */ }
    };
    poll();
    pollTimer = setInterval(poll, config.pollIntervalMs);
  }

  function stopPolling() {
    clearInterval(pollTimer);
    clearTimeout(probeTimer);
    pollTimer = null;
  }

  function startClock() {
    const tick = () => {
      const left = session.waitStartedAt + config.maxWaitMs - Date.now();
      if (left <= 0) {
        stopWaiting();
        setState("timeout");
        showError("We stopped waiting after 10 minutes. If you already paid, the deposit is " +
          "still credited. Otherwise create a new QR code.");
        return;
      }
      const s = Math.ceil(left / 1000);
      $("countdown").textContent = `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
    };
    tick();
    clockTimer = setInterval(tick, 1000);
  }

  async function begin(accountNumber, amount, uuid, waitStartedAt, freshUuid) {
    showError("");
    $("create").disabled = true;
    try {
      const { status, body } = await api("/api/sessions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ accountNumber, amount, uuid }),
      });
      if (status === 409 && body.retryable === false && !freshUuid) {
        // The uuid names a session that is over (it expired since we checked, say) and a
        // uuid never names a second one: deposit again under a fresh uuid, once.
        forget();
        await begin(accountNumber, amount, newUuid(), undefined, true);
        return;
      }
      if (status === 429) {
        setState("limit");
        showError(`${body.error} (${body.pendingCount} of ${body.maxAllowed} pending deposits).`);
        return;
      }
      if (status !== 200 && status !== 201) {
        showError(body.error || `Could not create the payment (HTTP ${status}). Try again.`);
        return;
      }
      session = { uuid: body.uuid, accountNumber, amount, waitStartedAt: waitStartedAt || Date.now() };
      save();
      finished = false;
      setState("waiting");
      showPayment(body);
      setStatus("Waiting for your transfer…");
      startClock();
      if (!finished) openStream();
    } catch (_) {
      showError("The server cannot be reached. Check your connection and try again.");
    } finally {
      $("create").disabled = false;
    }
  }

  async function resume() {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (_) { saved = null; }
    if (!saved || !saved.uuid) return;
    const { status, body } = await api(
      `/api/webhooks/check-session-limit?uuid=${encodeURIComponent(saved.uuid)}`);
    if (status === 200 && body.exists && body.status === "pending") {
      $("account").value = saved.accountNumber;
      $("amount").value = saved.amount;
      await begin(saved.accountNumber, saved.amount, saved.uuid, saved.waitStartedAt);
    } else {
      forget();
    }
  }

  $("deposit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const account = $("account");
    const amount = $("amount");
    if (!account.checkValidity()) {
      showError("Enter your account number: 6 to 20 digits.");
      account.focus();
      return;
    }
    const value = Number(amount.value);
    if (!Number.isInteger(value) || value < 1000) {
      showError("Enter an amount of at least 1,000 VND.");
      amount.focus();
      return;
    }
    begin(account.value, value, newUuid(), undefined, true);
  });

  $("new-qr").addEventListener("click", () => {
    forget();
    session = null;
    finished = false;
    $("new-qr").hidden = true;
    $("payment").hidden = true;
    $("deposit-form").hidden = false;
    showError("");
    setStatus("");
    setState("form");
    $("account").focus();
  });

  setState("form");
  resume();
})();
