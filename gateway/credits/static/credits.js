// The Credits page's script: calls our own /api/billing (session cookie, CSRF header on POSTs),
// never stores anything in the browser, and formats every amount from its millicredit string
// with BigInt (exact beyond 2^53). All text comes from the #strings catalogue.
"use strict";

(() => {
  const S = JSON.parse(document.getElementById("strings").textContent);
  const $ = (id) => document.getElementById(id);
  const PAGE_SIZE = 25;
  const POLL_MS = 1500;
  const POLL_LIMIT = 400; // about ten minutes
  const FINAL_STATUSES = new Set(["paid", "failed", "expired", "needs_review"]);

  let csrfToken = null;
  let me = null;

  // -- text and numbers ------------------------------------------------------------------

  /** Fill "{name}" placeholders of a catalogue string. */
  function t(template, values = {}) {
    return template.replace(/\{(\w+)\}/g, (whole, key) =>
      Object.prototype.hasOwnProperty.call(values, key) ? String(values[key]) : whole);
  }

  function groupDigits(digits) {
    return digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  /** amount / divisor with `decimals` places, rounded half away from zero, grouped. */
  function formatScaled(amount, divisor, decimals) {
    let value = BigInt(amount);
    const negative = value < 0n;
    if (negative) value = -value;
    const scale = 10n ** BigInt(decimals);
    const scaled = (value * scale * 2n + divisor) / (2n * divisor);
    const whole = groupDigits((scaled / scale).toString());
    const frac = decimals ? "." + (scaled % scale).toString().padStart(decimals, "0") : "";
    return (negative && scaled !== 0n ? "-" : "") + whole + frac;
  }

  /** Millicredits (string) -> credits text, 2 decimals unless told. */
  function credits(millicredits, decimals = 2) {
    return formatScaled(millicredits, 1000n, decimals);
  }

  /** Millicredits -> credits without a zero fraction ("9,990" but "2,500.5"). */
  function creditsCompact(millicredits) {
    const text = credits(millicredits, 3);
    return text.replace(/\.?0+$/, "");
  }

  /** Millicredits -> approximate US dollars (1,000,000 mc = $1.00). */
  function usd(millicredits, decimals = 2) {
    return formatScaled(millicredits, 1000000n, decimals);
  }

  /** "2.400" (credits, up to 3 decimals) -> 2400n millicredits. */
  function decimalToMillicredits(text) {
    const [whole, frac = ""] = String(text).split(".");
    return BigInt(whole || "0") * 1000n + BigInt((frac + "000").slice(0, 3));
  }

  function integerText(value) {
    return groupDigits(BigInt(value ?? 0).toString());
  }

  /** An ISO time as "YYYY-MM-DD HH:MM UTC" (the same on every machine). */
  function dateText(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function safeHttpUrl(value) {
    try {
      const url = new URL(value, window.location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch {
      return null;
    }
  }

  // -- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super(body?.error?.message || t(S.page.httpError, { status }));
      this.status = status;
      this.code = body?.error?.code || null;
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // -- small DOM helpers -----------------------------------------------------------------

  function el(tag, { text, className, attrs } = {}, children = []) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function setBusy(button, busy, busyText) {
    if (busy) {
      button.dataset.label = button.textContent;
      button.textContent = busyText;
      button.setAttribute("aria-busy", "true");
      button.disabled = true;
    } else {
      if (button.dataset.label) button.textContent = button.dataset.label;
      button.removeAttribute("aria-busy");
      button.disabled = false;
    }
  }

  function showError(error) {
    if (error instanceof ApiError && error.status === 401) {
      signedOut();
      return;
    }
    const box = $("page-error");
    box.textContent = t(S.page.error, { message: error.message });
    show(box, true);
  }

  function clearError() {
    show($("page-error"), false);
  }

  // -- signing in and out ----------------------------------------------------------------

  async function signedIn(session) {
    csrfToken = session.csrfToken;
    show($("sign-in"), false);
    show($("account"), true);
    show($("sign-out"), true);
    await loadAccount();
    usageTable.reset();
    ledgerTable.reset();
    followPurchase();
    lookUpPurchase();
  }

  function signedOut(message) {
    csrfToken = null;
    me = null;
    show($("account"), false);
    show($("sign-out"), false);
    show($("signed-in-as"), false);
    show($("sign-in"), true);
    const error = $("sign-in-error");
    error.textContent = message || "";
    show(error, Boolean(message));
    const notice = $("purchase-notice");
    if (notice.dataset.follow === "true") {
      const line = $("purchase-balance");
      line.textContent = S.purchase.signInToFollow;
      show(line, true);
    }
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("api-key");
    const apiKey = input.value.trim();
    input.value = ""; // the key leaves the page with this request and is kept nowhere
    const button = $("sign-in-submit");
    const error = $("sign-in-error");
    show(error, false);
    if (!apiKey) {
      error.textContent = S.signIn.failed;
      show(error, true);
      input.focus();
      return;
    }
    setBusy(button, true, S.signIn.submitting);
    try {
      const session = await api("/api/billing/session", { method: "POST", body: { apiKey } });
      await signedIn(session);
      $("balance-heading").focus(); // announce the signed-in page, not the vanished form
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? S.signIn.failed
        : t(S.page.error, { message: err.message });
      show(error, true);
      input.focus();
    } finally {
      setBusy(button, false);
    }
  }

  async function signOut() {
    try {
      await api("/api/billing/sign-out", { method: "POST", body: {} });
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 401)) {
        showError(err);
        return;
      }
    }
    signedOut(S.signIn.signedOut);
    $("api-key").focus();
  }

  // -- the account: balance, banners, packages, rates -----------------------------------

  async function loadAccount() {
    me = await api("/api/billing/me");
    clearError();
    renderBalance();
    renderPackages();
    renderRates();
    renderModelChoices();
  }

  function renderBalance() {
    const who = $("signed-in-as");
    who.textContent = t(S.signIn.signedInAs, { account: me.email || me.accountId });
    show(who, true);
    $("balance-credits").textContent = t(S.balance.credits, { amount: credits(me.balanceMillicredits) });
    $("balance-usd").textContent = t(S.balance.usd, { amount: usd(me.balanceMillicredits) });
    $("available-credits").textContent = t(S.balance.credits, { amount: credits(me.availableMillicredits) });
    $("held-credits").textContent = t(S.balance.credits, { amount: credits(me.heldMillicredits) });
    $("low-balance-text").textContent = t(S.banners.lowBalance, {
      threshold: integerText(me.lowBalanceThresholdCredits),
    });
    show($("banner-low-balance"), Boolean(me.lowBalance));
    show($("banner-charging-paused"), Boolean(me.chargingPaused));
    show($("purchases-off"), !me.purchasesEnabled);
  }

  function renderPackages() {
    const grid = $("package-grid");
    grid.replaceChildren();
    for (const pkg of me.packages || []) {
      const item = el("li", { className: "package", attrs: { "data-code": pkg.code } });
      if (pkg.badge) item.append(el("span", { className: "badge", text: pkg.badge }));
      item.append(el("h3", { text: pkg.name }));
      if (pkg.tagline) item.append(el("p", { className: "muted", text: pkg.tagline }));
      item.append(el("p", { className: "price", text: t(S.packages.price, { price: pkg.price }) }));
      item.append(el("p", {
        className: "total",
        text: t(S.packages.totalCredits, { amount: creditsCompact(pkg.totalMillicredits) }),
      }));
      item.append(el("p", {
        className: "bonus",
        text: BigInt(pkg.bonusMillicredits) > 0n
          ? t(S.packages.bonus, { amount: creditsCompact(pkg.bonusMillicredits) })
          : S.packages.noBonus,
      }));
      item.append(el("p", { text: t(S.packages.pricePer1k, { price: pkg.pricePer1kCredits }) }));
      if (pkg.savingsPercent && Number(pkg.savingsPercent) > 0) {
        item.append(el("p", {
          className: "savings",
          text: t(S.packages.savings, { percent: pkg.savingsPercent }),
        }));
      }
      const button = el("button", {
        className: "buy",
        text: t(S.packages.buy, { name: pkg.name, price: pkg.price }),
        attrs: { type: "button", "data-code": pkg.code },
      });
      button.disabled = !me.purchasesEnabled;
      button.addEventListener("click", () => buy(button, pkg.code));
      item.append(button);
      grid.append(item);
    }
  }

  function returnTo() {
    const link = $("return-to");
    return link ? link.getAttribute("href") : null;
  }

  async function buy(button, code) {
    const error = $("buy-error");
    show(error, false);
    const buttons = [...document.querySelectorAll("button.buy")];
    for (const other of buttons) other.disabled = true;
    setBusy(button, true, S.packages.buying);
    try {
      const body = { packageCode: code };
      const target = returnTo();
      if (target) body.returnTo = target;
      const checkout = await api("/api/billing/checkout", { method: "POST", body });
      window.location.assign(checkout.checkoutUrl);
    } catch (err) {
      setBusy(button, false);
      for (const other of buttons) other.disabled = !me?.purchasesEnabled;
      if (err instanceof ApiError && err.status === 401) {
        showError(err);
        return;
      }
      error.textContent = t(S.packages.buyFailed, { message: err.message });
      show(error, true);
      button.focus();
    }
  }

  function addCredits() {
    const section = $("packages");
    section.scrollIntoView({ behavior: "smooth", block: "start" });
    const first = section.querySelector("button.buy:not(:disabled)");
    (first || section).focus({ preventScroll: true });
  }

  /** The models with a label ("Eco", "Advanced") first, each group by model id. */
  function sortedRates() {
    return [...(me.activeRates || [])].sort((a, b) =>
      Number(!a.label) - Number(!b.label) || a.model.localeCompare(b.model));
  }

  function renderRates() {
    const body = $("rates-table").tBodies[0];
    body.replaceChildren();
    for (const rate of sortedRates()) {
      body.append(el("tr", {}, [
        el("td", {}, rate.label
          ? [el("span", { text: rate.label }), document.createTextNode(" "), el("code", { text: t(S.rates.modelId, { model: rate.model }) })]
          : [el("code", { text: rate.model })]),
        el("td", { className: "num", text: rate.inputCreditsPer1k, attrs: { "data-label": S.rates.input } }),
        el("td", { className: "num", text: rate.outputCreditsPer1k, attrs: { "data-label": S.rates.output } }),
        el("td", { text: dateText(rate.updatedAt), attrs: { "data-label": S.rates.updated } }),
      ]));
    }
    renderExample();
  }

  /** The worked example: gpt-4o at its current rates, computed exactly in millicredits. */
  function renderExample() {
    const model = "gpt-4o";
    const rate = (me.activeRates || []).find((r) => r.model === model);
    const line = $("rates-example");
    if (!rate) {
      line.textContent = t(S.rates.noExample, { model });
      return;
    }
    const inputTokens = 2000n;
    const outputTokens = 1000n;
    // Whole thousands of tokens: the cost is exact, no rounding mode involved.
    const costMillicredits = (inputTokens * decimalToMillicredits(rate.inputCreditsPer1k)
      + outputTokens * decimalToMillicredits(rate.outputCreditsPer1k)) / 1000n;
    line.textContent = t(S.rates.example, {
      model: rate.displayName || model,
      inputTokens: integerText(inputTokens),
      outputTokens: integerText(outputTokens),
      inputRate: rate.inputCreditsPer1k,
      outputRate: rate.outputCreditsPer1k,
      credits: credits(costMillicredits.toString(), 3),
      usd: usd(costMillicredits.toString(), 4),
    });
  }

  function renderModelChoices() {
    const estimate = $("estimate-model");
    const filter = $("usage-model");
    const chosen = estimate.value;
    const filtered = filter.value;
    estimate.replaceChildren();
    filter.replaceChildren(el("option", { text: S.usage.allModels, attrs: { value: "" } }));
    for (const rate of sortedRates()) {
      const label = rate.displayName || rate.model;
      estimate.append(el("option", { text: label, attrs: { value: rate.model } }));
      filter.append(el("option", { text: label, attrs: { value: rate.model } }));
    }
    if (chosen) estimate.value = chosen;
    else if ((me.activeRates || []).some((r) => r.model === "gpt-4o")) estimate.value = "gpt-4o";
    filter.value = filtered;
  }

  // -- the purchase the page was opened for ----------------------------------------------

  let following = false;

  async function followPurchase() {
    const notice = $("purchase-notice");
    const id = notice.dataset.purchaseId;
    if (following || !id || notice.dataset.follow !== "true") return;
    following = true;
    for (let round = 0; round < POLL_LIMIT; round += 1) {
      let purchase;
      try {
        purchase = await api(`/api/billing/purchases/${encodeURIComponent(id)}`);
      } catch (err) {
        following = false;
        if (err instanceof ApiError && (err.status === 401 || err.status === 404)) return;
        showError(err);
        return;
      }
      showPurchase(purchase);
      if (FINAL_STATUSES.has(purchase.status)) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    following = false;
  }

  /** A purchase named by a bare `?purchase=` (not a proven Checkout return): the server showed
   * nothing about it; ask the API with the session cookie, which answers only its owner. */
  async function lookUpPurchase() {
    const notice = $("purchase-notice");
    const id = notice.dataset.purchaseId;
    if (!id || notice.dataset.lookup !== "true") return;
    notice.dataset.lookup = "false";
    try {
      const purchase = await api(`/api/billing/purchases/${encodeURIComponent(id)}`);
      showPurchase(purchase, purchase.status === "pending" ? "unpaid" : purchase.status);
    } catch (err) {
      // 404: not this account's purchase (or none); 401: signed out. Say nothing about it.
      if (!(err instanceof ApiError && (err.status === 401 || err.status === 404))) showError(err);
    }
  }

  function showPurchase(purchase, key = purchase.status) {
    const notice = $("purchase-notice");
    notice.dataset.status = purchase.status;
    notice.dataset.key = key;
    notice.className = `notice notice-${purchase.status}`;
    show(notice, true);
    const text = S.purchase[key] || S.purchase.pending;
    $("purchase-text").textContent = t(text, { credits: credits(purchase.creditsMillicredits) });
    if (purchase.status === "paid") {
      notice.dataset.follow = "false";
      const line = $("purchase-balance");
      line.textContent = t(S.purchase.paidBalance, { amount: credits(purchase.balanceMillicredits) });
      show(line, true);
      loadAccount().then(() => ledgerTable.reset()).catch(showError);
    }
  }

  // -- usage and ledger tables -----------------------------------------------------------

  function openDetails(title, fields, opener) {
    const dialog = $("detail-dialog");
    $("detail-heading").textContent = t(S.table.detailsFor, { what: title });
    const list = $("detail-list");
    list.replaceChildren();
    for (const [label, value] of fields) {
      list.append(el("dt", { text: label }));
      const dd = el("dd");
      if (value instanceof Node) dd.append(value);
      else dd.textContent = value === null || value === undefined || value === "" ? S.table.noValue : String(value);
      list.append(dd);
    }
    dialog.addEventListener("close", () => opener.focus(), { once: true });
    dialog.showModal();
    $("detail-close").focus();
  }

  function detailsButton(title, fields) {
    const button = el("button", {
      className: "secondary",
      text: S.table.details,
      attrs: { type: "button", "aria-label": t(S.table.detailsFor, { what: title }) },
    });
    button.addEventListener("click", () => openDetails(title, fields, button));
    return el("td", {}, [button]);
  }

  function receiptLink(url) {
    const href = url ? safeHttpUrl(url) : null;
    if (!href) return null;
    return el("a", { text: S.ledger.receiptLink, attrs: { href, rel: "noreferrer" } });
  }

  /** A filtered, cursor-paged table of one list endpoint, with a CSV link on the same filters. */
  function pagedTable({ name, path, row }) {
    const form = $(`${name}-filters`);
    const body = $(`${name}-table`).tBodies[0];
    const csv = $(`${name}-csv`);
    const previous = $(`${name}-prev`);
    const next = $(`${name}-next`);
    let cursors = [null];
    let page = 0;
    let nextCursor = null;
    let loading = 0;

    function filters() {
      const params = new URLSearchParams();
      for (const [key, value] of new FormData(form)) {
        if (String(value).trim()) params.set(key, String(value).trim());
      }
      return params;
    }

    /** From before To (both "YYYY-MM-DD", so text order is date order), checked here with the
     * page's own words before the API is asked. */
    function rangeValid(params) {
      const since = params.get("since");
      const until = params.get("until");
      return !since || !until || since < until;
    }

    function showRangeError(visible) {
      const error = $(`${name}-range-error`);
      error.textContent = visible ? S.table.rangeInvalid : "";
      show(error, visible);
    }

    function updateCsv() {
      const params = filters();
      if (!rangeValid(params)) {
        csv.removeAttribute("href");
        csv.setAttribute("aria-disabled", "true");
        return;
      }
      params.set("format", "csv");
      csv.href = `${path}?${params}`;
      csv.removeAttribute("aria-disabled");
    }

    async function load() {
      const ticket = ++loading;
      const params = filters();
      params.set("limit", String(PAGE_SIZE));
      if (cursors[page]) params.set("cursor", cursors[page]);
      previous.disabled = true;
      next.disabled = true;
      body.setAttribute("aria-busy", "true");
      try {
        const list = await api(`${path}?${params}`);
        if (ticket !== loading) return;
        body.replaceChildren(...list.data.map(row));
        nextCursor = list.nextCursor;
        show($(`${name}-empty`), list.data.length === 0);
        $(`${name}-page`).textContent = t(S.table.page, { page: page + 1 });
      } catch (err) {
        showError(err);
      } finally {
        body.removeAttribute("aria-busy");
        previous.disabled = page === 0;
        next.disabled = !nextCursor;
      }
    }

    function reset() {
      cursors = [null];
      page = 0;
      updateCsv();
      return load();
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const valid = rangeValid(filters());
      showRangeError(!valid);
      if (!valid) {
        updateCsv();
        form.querySelector('[name="until"]').focus();
        return;
      }
      reset();
    });
    form.addEventListener("change", updateCsv);
    form.addEventListener("input", updateCsv);
    next.addEventListener("click", () => {
      if (!nextCursor) return;
      cursors[page + 1] = nextCursor;
      page += 1;
      load();
    });
    previous.addEventListener("click", () => {
      if (page === 0) return;
      page -= 1;
      load();
    });
    return { reset };
  }

  function usageRow(item) {
    const title = `${item.model} ${dateText(item.date)}`;
    return el("tr", { attrs: { "data-id": item.id } }, [
      el("td", { text: dateText(item.date) }),
      el("td", { text: item.model }),
      el("td", { className: "num", text: integerText(item.inputTokens) }),
      el("td", { className: "num", text: integerText(item.outputTokens) }),
      el("td", { className: "num", text: credits(item.chargedMillicredits, 3) }),
      detailsButton(title, [
        [S.usage.date, dateText(item.date)],
        [S.usage.model, item.model],
        [S.usage.inputTokens, integerText(item.inputTokens)],
        [S.usage.cachedInputTokens, integerText(item.cachedInputTokens)],
        [S.usage.outputTokens, integerText(item.outputTokens)],
        [S.usage.charged, credits(item.chargedMillicredits, 3)],
        [S.usage.requestId, item.requestId],
        [S.usage.keyPrefix, item.keyPrefix],
        [S.usage.usageSource, item.usageSource],
      ]),
    ]);
  }

  function ledgerRow(item) {
    const type = S.ledger.types[item.type] || item.type;
    const title = `${type} ${dateText(item.date)}`;
    const receipt = receiptLink(item.receiptUrl);
    return el("tr", { attrs: { "data-id": item.id } }, [
      el("td", { text: dateText(item.date) }),
      el("td", { text: type }),
      el("td", { className: "num", text: credits(item.amountMillicredits, 3) }),
      el("td", { className: "num", text: credits(item.balanceAfterMillicredits, 3) }),
      el("td", {}, receipt ? [receipt] : []),
      detailsButton(title, [
        [S.ledger.date, dateText(item.date)],
        [S.ledger.type, type],
        [S.ledger.amount, credits(item.amountMillicredits, 3)],
        [S.ledger.balanceAfter, credits(item.balanceAfterMillicredits, 3)],
        [S.ledger.reference, item.reference],
        [S.ledger.receipt, receiptLink(item.receiptUrl)],
      ]),
    ]);
  }

  const usageTable = pagedTable({ name: "usage", path: "/api/billing/usage", row: usageRow });
  const ledgerTable = pagedTable({ name: "ledger", path: "/api/billing/ledger", row: ledgerRow });

  // -- estimator and statements ----------------------------------------------------------

  function fieldError(input, message) {
    const error = $(`${input.id}-error`);
    error.textContent = message || "";
    show(error, Boolean(message));
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  /** A token count field's value: ASCII digits only, 0 to the field's max; else null with the
   * error shown beside the field. A number input reports text it cannot parse as "". */
  function tokenCount(input) {
    const value = input.value.trim();
    if (input.validity.badInput || !/^[0-9]+$/.test(value)) {
      fieldError(input, S.estimator.invalidTokens);
      return null;
    }
    if (BigInt(value) > BigInt(input.max)) {
      fieldError(input, t(S.estimator.tooManyTokens, { max: integerText(input.max) }));
      return null;
    }
    fieldError(input, null);
    return Number(value);
  }

  /** The estimate request's body, or null when a field is invalid (its error is shown). */
  function estimateBody() {
    const body = { model: $("estimate-model").value };
    const text = $("estimate-text").value;
    const fields = [["outputTokens", $("estimate-output")]];
    if (text.trim()) {
      body.text = text;
      fieldError($("estimate-input"), null);
    } else {
      fields.unshift(["inputTokens", $("estimate-input")]);
    }
    let valid = true;
    for (const [name, input] of fields) {
      const count = tokenCount(input);
      if (count === null) {
        if (valid) input.focus();
        valid = false;
      }
      body[name] = count;
    }
    return valid ? body : null;
  }

  async function estimate(event) {
    event.preventDefault();
    const button = $("estimate-submit");
    const error = $("estimate-error");
    show(error, false);
    const body = estimateBody();
    if (!body) {
      $("estimate-result").textContent = "";
      return;
    }
    setBusy(button, true, S.page.loading);
    try {
      const result = await api("/api/billing/estimate", { method: "POST", body });
      $("estimate-result").textContent = t(S.estimator.result, {
        model: result.model,
        inputTokens: integerText(result.inputTokens),
        outputTokens: integerText(result.outputTokens),
        credits: credits(result.estimatedMillicredits, 3),
        usd: usd(result.estimatedMillicredits, 4),
      });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        showError(err);
      } else {
        error.textContent = t(S.page.error, { message: err.message });
        show(error, true);
      }
    } finally {
      setBusy(button, false);
    }
  }

  function updateStatementLinks() {
    const month = $("statement-month").value;
    for (const format of ["csv", "pdf"]) {
      const link = $(`statement-${format}`);
      if (/^\d{4}-\d{2}$/.test(month)) {
        link.href = `/api/billing/statements/${month}?format=${format}`;
        link.removeAttribute("aria-disabled");
      } else {
        link.removeAttribute("href");
        link.setAttribute("aria-disabled", "true");
      }
    }
  }

  // -- start -----------------------------------------------------------------------------

  /** Back from Checkout through the browser's history: buttons left busy come back. */
  function restoreButtons(event) {
    if (!event.persisted) return;
    for (const button of document.querySelectorAll("button[aria-busy]")) setBusy(button, false);
    for (const button of document.querySelectorAll("button.buy")) button.disabled = !me?.purchasesEnabled;
  }

  async function start() {
    window.addEventListener("pageshow", restoreButtons);
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("add-credits").addEventListener("click", addCredits);
    $("refresh").addEventListener("click", () => loadAccount().catch(showError));
    $("estimator-form").addEventListener("submit", estimate);
    const month = $("statement-month");
    month.value = new Date().toISOString().slice(0, 7);
    month.addEventListener("input", updateStatementLinks);
    month.addEventListener("change", updateStatementLinks);
    updateStatementLinks();
    try {
      const session = await api("/api/billing/session");
      await signedIn(session);
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) signedOut();
      else showError(err);
    } finally {
      show($("page-loading"), false);
    }
  }

  start();
})();
