// The deposit page: create a session, show its QR, wait for "paid" on the gateway's stream,
// fall back to polling when the stream fails, give up after the wait, resume after a reload.
//
// A stream that drops (a gateway rollout closes every stream, a network blip) is not a reason
// to poll: EventSource reconnects by itself after the server's jittered `retry:`, sending
// Last-Event-ID, and the gateway's first event is the current status. The page polls only
// after several consecutive failures without the stream opening in between and once the stream
// has been down longer than a gateway restart takes, or where EventSource does not exist;
// while polling it tries the stream again now and then, and stops polling once the stream is
// back. A gateway rollout so costs reconnects spread over seconds, not a wave of
// 5-second pollers on session-api (issue 15).
"use strict";

(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const STORE_KEY = "paypush.session";
  const $ = (id) => document.getElementById(id);
  // Every word the page shows comes from the language's catalogue (locales/*.json), which
  // the server put in the config; amounts and times are formatted in that language's locale,
  // times in Vietnam's zone (the shop's and PayOS's).
  const messages = config.messages;
  const t = (key, params) => messages[key].replace(/\{(\w+)\}/g, (_, name) => String(params[name]));
  const money = new Intl.NumberFormat(messages.locale, { style: "currency", currency: "VND" });
  const clock = new Intl.DateTimeFormat(messages.locale, {
    timeZone: "Asia/Ho_Chi_Minh", hour: "2-digit", minute: "2-digit",
    day: "2-digit", month: "2-digit", year: "numeric",
  });

  // A signed account link from the shop (`/?account=…&token=…`): the account is proven, not
  // typed, and the token goes with every request that names it.
  const link = new URLSearchParams(location.search);
  const linked = link.get("account") && link.get("token")
    ? { account: link.get("account"), token: link.get("token") } : null;

  // PayOS's cancel return URL (`/?cancelled=1&cancel=true&status=CANCELLED&orderCode=…`): the
  // query only says where the shopper comes from (it is not signed); the saved session is
  // what gets cancelled. The address is cleaned so a reload does not cancel again.
  const cancelReturn = link.has("cancelled") || link.get("cancel") === "true";
  if (cancelReturn) {
    const kept = new URLSearchParams(location.search);
    ["cancelled", "cancel", "code", "id", "status", "orderCode"].forEach((k) => kept.delete(k));
    history.replaceState(null, "", location.pathname + (kept.toString() ? `?${kept}` : ""));
  }

  let session = null;      // {uuid, accountNumber, accountToken, amount, waitStartedAt}
  let stream = null;
  let pollTimer = null;
  let probeTimer = null;
  let reopenTimer = null;
  let streamFailures = 0;   // consecutive failures, without the stream opening in between
  let streamUpAt = 0;       // when the stream last worked (or was first tried)
  let lastVersion = 0;      // the version of the last event the stream brought (this session)
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
      const paidAt = ev.updatedAt ? new Date(ev.updatedAt) : new Date();
      setStatus(t("status.paid", {
        amount: money.format(ev.amountPaid || ev.amount), time: clock.format(paidAt),
      }), "ok");
      window.paypushPaidAt = Date.now();
    } else if (ev.status === "expired") {
      stopWaiting();
      forget();
      $("payment").hidden = true;
      setState("expired");
      setStatus(t("status.expired"), "warn");
    } else if (ev.status === "cancelled") {
      stopWaiting();
      forget();
      $("payment").hidden = true;
      setState("cancelled");
      setStatus(ev.amountPaid > 0
        ? t("status.cancelled_partial", { paid: money.format(ev.amountPaid) })
        : t("status.cancelled"), "warn");
    } else if (ev.amountPaid > 0) {
      setState("partial");
      setStatus(t("status.partial", {
        paid: money.format(ev.amountPaid),
        amount: money.format(ev.amount),
        remaining: money.format(ev.amount - ev.amountPaid),
      }), "warn");
    } else {
      setStatus(t(document.body.dataset.transport === "polling"
        ? "status.waiting_polling" : "status.waiting"));
    }
  }

  function jittered(ms) {
    return Math.round(ms * (0.5 + Math.random()));
  }

  function openStream() {
    if (finished) return;
    if (typeof EventSource === "undefined") { startPolling(); return; }
    if (pollTimer === null) document.body.dataset.transport = "connecting";
    if (streamUpAt === 0) streamUpAt = Date.now();
    // A new EventSource sends no Last-Event-ID: say which version we have, so the gateway
    // sends nothing it already sent (and 204 for a final status we saw).
    const since = lastVersion ? `&lastEventId=${lastVersion}` : "";
    const es = new EventSource(
      `${config.streamUrl}/api/webhooks/stream?uuid=${encodeURIComponent(session.uuid)}${since}`);
    stream = es;
    es.onopen = () => {
      if (stream !== es || finished) return;
      window.paypushStreamOpens += 1;
      streamFailures = 0;
      streamUpAt = Date.now();
      stopPolling();
      document.body.dataset.transport = "stream";
    };
    es.onmessage = (e) => {
      if (stream !== es) return;
      streamFailures = 0;
      streamUpAt = Date.now();
      if (/^\d+$/.test(e.lastEventId)) lastVersion = Number(e.lastEventId);
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
      if (streamFailures >= config.streamFailuresBeforePolling
          && Date.now() - streamUpAt >= config.streamDownBeforePollingMs) {
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
        showError(t("error.timeout", { minutes: Math.round(config.maxWaitMs / 60000) }));
        return;
      }
      const s = Math.ceil(left / 1000);
      $("countdown").textContent = t("pay.time_left", {
        time: `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`,
      });
    };
    tick();
    clockTimer = setInterval(tick, 1000);
  }

  // The server's own messages are for developers, in English: the reader is told, in their
  // language, what the status means for them.
  function failure(status, body) {
    if (status === 429) return t("error.rate", { seconds: body.retryAfter || 60 });
    if (status === 400 || status === 413) return t("error.invalid");
    if (status === 502 || status === 504) return t("error.payos");
    if (status === 503 || status === 409) return t("error.busy");
    return t("error.other", { status });
  }

  async function begin(accountNumber, accountToken, amount, uuid, waitStartedAt, freshUuid) {
    showError("");
    $("create").disabled = true;
    try {
      const { status, body } = await api("/api/sessions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ accountNumber, accountToken, amount, uuid }),
      });
      if (status === 409 && body.retryable === false && !freshUuid) {
        // The uuid names a session that is over (it expired since we checked, say) and a
        // uuid never names a second one: deposit again under a fresh uuid, once.
        forget();
        await begin(accountNumber, accountToken, amount, newUuid(), undefined, true);
        return;
      }
      if (status === 401) {
        forget();
        setState("link");
        const reasons = { expired: "error.link_expired", missing: "error.link_missing" };
        showError(t(reasons[body.reason] || "error.link_invalid"));
        return;
      }
      if (status === 429 && body.maxAllowed !== undefined) {
        setState("limit");
        showError(t("error.limit", { pending: body.pendingCount, max: body.maxAllowed }));
        return;
      }
      if (status !== 200 && status !== 201) {
        showError(failure(status, body));
        return;
      }
      session = {
        uuid: body.uuid, accountNumber, accountToken, amount,
        waitStartedAt: waitStartedAt || Date.now(),
      };
      lastVersion = 0;
      save();
      finished = false;
      setState("waiting");
      showPayment(body);
      setStatus(t("status.waiting"));
      startClock();
      if (!finished) openStream();
    } catch (_) {
      showError(t("error.offline"));
    } finally {
      $("create").disabled = false;
    }
  }

  // Cancel (the button, or back from PayOS's checkout through its cancel URL). The payment
  // wins: a session paid meanwhile answers 409 with its paid state, shown as paid.
  async function cancelSession() {
    if (!session || finished) return;
    $("cancel").disabled = true;
    showError("");
    setStatus(t("status.cancelling"));
    try {
      const { status, body } = await api(
        `/api/sessions/${encodeURIComponent(session.uuid)}/cancel`, { method: "POST" });
      if (status === 200) onStatus(body);
      else if (status === 409 && body.session) onStatus(body.session);
      else if (status === 404) onStatus({ uuid: session.uuid, status: "expired" });
      else showError(status === 502 || status === 504 ? t("error.payos") : t("error.cancel"));
    } catch (_) {
      showError(t("error.offline"));
    } finally {
      $("cancel").disabled = false;
    }
  }

  async function resume() {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch (_) { saved = null; }
    if (!saved || !saved.uuid) {
      // Cancelled on PayOS's checkout from another browser: PayOS closed the link, and
      // the reconciler closes the session it was for.
      if (cancelReturn) { setState("cancelled"); setStatus(t("status.cancelled"), "warn"); }
      return;
    }
    if (linked && saved.accountNumber !== linked.account) {
      // The shop sent this browser here for another account: that one's deposit is not ours.
      forget();
      return;
    }
    if (cancelReturn) {
      // Back from the checkout's "cancel": cancel the session it was for.
      session = saved;
      finished = false;
      await cancelSession();
      if (!finished) forget();
      return;
    }
    const { status, body } = await api(
      `/api/webhooks/check-session-limit?uuid=${encodeURIComponent(saved.uuid)}`);
    if (status === 200 && body.exists && body.status === "pending") {
      $("account").value = saved.accountNumber;
      $("amount").value = saved.amount;
      await begin(saved.accountNumber, saved.accountToken, saved.amount, saved.uuid,
        saved.waitStartedAt);
    } else {
      forget();
    }
  }

  $("deposit-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const account = $("account");
    const amount = $("amount");
    if (!account.checkValidity()) {
      showError(t("error.account"));
      account.focus();
      return;
    }
    const value = Number(amount.value);
    if (!Number.isInteger(value) || value < 1000) {
      showError(t("error.amount", { min: money.format(1000) }));
      amount.focus();
      return;
    }
    begin(account.value, linked ? linked.token : undefined, value, newUuid(), undefined, true);
  });

  $("cancel").addEventListener("click", cancelSession);

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
  if (linked) {
    $("account").value = linked.account;
    $("account").readOnly = true;
    $("account-hint").textContent = t("form.account_linked");
  } else if (config.signedAccounts) {
    // Only the shop can say who the shopper is: without its link there is nothing to do here.
    setState("link");
    $("create").disabled = true;
    showError(t("error.link_missing"));
  }
  resume();
})();
