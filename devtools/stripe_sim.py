"""Simulated Stripe: a local stand-in for the few Stripe API endpoints creditgate calls, Stripe's
hosted Checkout page, webhook delivery, and Stripe's side of a payment (the customer pays, a
refund, a dispute) for building realistic webhook events.

The official ``stripe`` client reaches it with its API base overridden (``STRIPE_API_BASE``):

    POST /v1/checkout/sessions         create (form-encoded params; Idempotency-Key honoured)
    GET  /v1/checkout/sessions/{id}    retrieve (``expand[]`` of payment_intent[.latest_charge])
    GET  /v1/refunds?charge=ch_...     list a charge's refunds
    GET  /v1/events?type=...           list the events sent, newest first
    POST /v1/events/{id}/retry         deliver an event again (``stripe events resend``)

A session's ``url`` is the stand-in's own Checkout page, which a browser opens (no API key):

    GET  /checkout/{id}                the amount, the package, a "no real payment" banner
    POST /checkout/{id}/pay            pay: the session completes, ``checkout.session.completed``
                                       goes signed to the webhook URL, 303 to ``success_url``
    POST /checkout/{id}/cancel         303 to ``cancel_url`` (the session stays open, as at Stripe)

A webhook delivery that fails (no answer, or not 2xx) is retried in the background a few times
and logged, like Stripe's retries but over seconds instead of days.

Objects follow Stripe's shapes at recent API versions: Checkout creates the payment intent
when the customer pays; ``charge.refunded`` carries no ``refunds`` list.

``sign(payload, secret)`` builds a ``Stripe-Signature`` header the way Stripe does:
``t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{raw body}">``, written here from the definition so the
service's use of the library is checked against an independent implementation.

``python -m devtools.stripe_sim --port P --webhook-url U --webhook-secret S`` serves it until
interrupted (``make run`` starts it when STRIPE_API_KEY is not set).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import hmac
import html
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from devtools.localservices import free_port

API_VERSION = "2025-06-30.basil"
_PARAMS = web.RequestKey("params", dict)
TEST_API_KEY = "sk_test_creditgate_stub"
WEBHOOK_SECRET = "whsec_test_current"
OLD_WEBHOOK_SECRET = "whsec_test_previous"
DEFAULT_PORT = 8091
#: Seconds before each retry of a failed webhook delivery (after the first attempt).
RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
_DELIVERY_TIMEOUT_S = 10.0
_HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)

log = logging.getLogger(__name__)


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload`` signed with ``secret`` at ``timestamp``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event_body(event: dict[str, Any]) -> bytes:
    """An event serialized as Stripe sends it (pretty JSON)."""
    return json.dumps(event, indent=2).encode()


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=v``) back to nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        node: Any = root
        for part, nxt in zip(parts, [*parts[1:], None], strict=True):
            if nxt is None:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            node = child
    return _lists(root)


def _lists(node: Any) -> Any:
    if isinstance(node, dict):
        converted = {k: _lists(v) for k, v in node.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return node


class StubRequestError(Exception):
    """A request the stand-in answers 400 for, as Stripe would."""

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


def _stripe_error(status: int, message: str, *, code: str | None = None, param: str | None = None):
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    if code:
        body["error"]["code"] = code
    if param:
        body["error"]["param"] = param
    return web.json_response(body, status=status)


@dataclass
class WebhookDelivery:
    """One event's delivery to the webhook URL.

    Attributes:
        attempts: each attempt's outcome: the HTTP status answered, or the connection error.
        delivered: a 2xx answer arrived.
    """

    event_id: str
    event_type: str
    attempts: list[int | str] = field(default_factory=list)
    delivered: bool = False


class StripeStub:
    """The stand-in's state, its aiohttp app, and Stripe's side of each payment.

    Attributes:
        requests: ``(method, path, params, headers)`` of every API request received (the
            Checkout page's requests are not API requests and are not recorded).
        prices: Price objects by id (register them to test ``stripe_price_id``).
        fail_with: when set, the next API requests answer this HTTP status (e.g. 500).
        refused_paths: API paths answered 403 (a restricted key without that permission).
        webhook_url: where the Checkout page's events go (None: nowhere, only recorded).
        webhook_secret: the signing secret of those events.
        retry_delays_s: seconds before each retry of a failed delivery.
        async_settle_delay_s: None (default): Pay is a card payment, paid at once. A number:
            Pay is an asynchronous payment (a bank debit): the session completes unpaid and
            settles that many seconds later, with ``checkout.session.async_payment_succeeded``
            (a purchase shows "pending" in between).
        deliveries: every webhook delivery, oldest first.
    """

    def __init__(
        self,
        api_key: str = TEST_API_KEY,
        *,
        webhook_url: str | None = None,
        webhook_secret: str = WEBHOOK_SECRET,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    ) -> None:
        self.api_key = api_key
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.retry_delays_s = tuple(retry_delays_s)
        self.async_settle_delay_s: float | None = None
        self.deliveries: list[WebhookDelivery] = []
        self.events: dict[str, dict[str, Any]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.payment_intents: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.disputes: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
        self.fail_with: int | None = None
        self.refused_paths: set[str] = set()
        self._idempotent: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self.base_url = ""

    # -- the HTTP stand-in -------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving the API endpoints and the Checkout page."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_get("/v1/checkout/sessions/{id}", self._retrieve_session)
        app.router.add_get("/v1/refunds", self._list_refunds)
        app.router.add_get("/v1/events", self._list_events)
        app.router.add_post("/v1/events/{id}/retry", self._retry_event)
        app.router.add_get("/checkout/{id}", self._checkout_page)
        app.router.add_post("/checkout/{id}/pay", self._checkout_pay)
        app.router.add_post("/checkout/{id}/cancel", self._checkout_cancel)
        app.cleanup_ctx.append(self._http_ctx)
        return app

    async def start(self, port: int | None = None, host: str = "127.0.0.1") -> str:
        """Serve on ``host:port`` (default: a free loopback port); returns the base URL for
        ``STRIPE_API_BASE``, which is also the origin of the sessions' Checkout pages."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        port = free_port() if port is None else port
        await web.TCPSite(self._runner, host, port).start()
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        """Stop serving; webhook retries still waiting are abandoned (and logged)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _http_ctx(self, app: web.Application) -> AsyncIterator[None]:
        app[_HTTP] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_DELIVERY_TIMEOUT_S))
        self._app = app
        yield
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await app[_HTTP].close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/checkout/"):
            return await handler(request)  # the customer's browser: no API key
        if request.method == "POST":
            params = decode_form(parse_qsl(await request.text(), keep_blank_values=True))
        else:
            params = decode_form(list(request.query.items()))
        self.requests.append((request.method, request.path, params, dict(request.headers)))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _stripe_error(401, "Invalid API Key provided.")
        if self.fail_with is not None:
            return _stripe_error(self.fail_with, "stub failure", code="api_error")
        if request.path in self.refused_paths:
            return _stripe_error(403, "The provided key does not have access.", code="forbidden")
        request[_PARAMS] = params
        return await handler(request)

    async def _create_session(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key and key in self._idempotent:
            return web.json_response(self._idempotent[key])
        try:
            body = self.create_session(request[_PARAMS])
        except StubRequestError as exc:
            return _stripe_error(400, str(exc), code=exc.code, param=exc.param)
        if key:
            self._idempotent[key] = body
        return web.json_response(body)

    def create_session(self, params: dict[str, Any]) -> dict[str, Any]:
        """Create a Checkout Session from (decoded) create params; returns it.

        Raises:
            StubRequestError: what Stripe answers 400 for (no line item, unknown price).
        """
        items = params.get("line_items") or []
        if len(items) != 1:
            raise StubRequestError("line_items is required", param="line_items")
        item = items[0]
        if "price" in item:
            price = self.prices.get(item["price"])
            if price is None:
                raise StubRequestError(
                    f"No such price: '{item['price']}'",
                    code="resource_missing",
                    param="line_items[0][price]",
                )
            amount, currency = price["unit_amount"], price["currency"]
        else:
            amount = int(item["price_data"]["unit_amount"])
            currency = item["price_data"]["currency"]
        amount *= int(item.get("quantity", 1))
        session_id = _id("cs")
        created = int(time.time())
        session = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": None,
            "amount_subtotal": amount,
            "amount_total": amount,
            "automatic_tax": {"enabled": False, "liability": None, "status": None},
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "client_secret": None,
            "consent": None,
            "created": created,
            "currency": currency,
            "custom_fields": [],
            "customer": None,
            "customer_creation": "if_required",
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": created + 86_400,
            "invoice": None,
            "livemode": False,
            "locale": None,
            "metadata": params.get("metadata", {}),
            "mode": params.get("mode"),
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "if_required",
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": params.get("success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"{self.base_url}/checkout/{session_id}",
            "_payment_intent_data": params.get("payment_intent_data", {}),
            "_product_name": _product_name(item, self.prices),
        }
        self.sessions[session_id] = session
        return self._public(session)

    async def _retrieve_session(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return _stripe_error(
                404,
                f"No such checkout.session: '{request.match_info['id']}'",
                code="resource_missing",
                param="id",
            )
        expand = request[_PARAMS].get("expand") or []
        body = self._public(session)
        if "payment_intent" in expand and body["payment_intent"]:
            pi = copy.deepcopy(self.payment_intents[body["payment_intent"]])
            if "payment_intent.latest_charge" in expand and pi["latest_charge"]:
                pi["latest_charge"] = self._public(self.charges[pi["latest_charge"]])
            body["payment_intent"] = pi
        return web.json_response(body)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        charge = request[_PARAMS].get("charge")
        data = [self._public(r) for r in self.refunds.values() if r["charge"] == charge]
        data.sort(key=lambda r: r["created"], reverse=True)
        return web.json_response(
            {"object": "list", "data": data, "has_more": False, "url": "/v1/refunds"}
        )

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in obj.items() if not k.startswith("_")}

    # -- the hosted Checkout page (what the customer's browser sees) -----------------------

    def _page_session(self, request: web.Request) -> dict[str, Any]:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            raise web.HTTPNotFound(
                text=_page("Unknown checkout session", "<p>No such Checkout session.</p>"),
                content_type="text/html",
            )
        return session

    async def _checkout_page(self, request: web.Request) -> web.Response:
        session = self._page_session(request)
        return web.Response(text=checkout_page_html(session), content_type="text/html")

    async def _checkout_pay(self, request: web.Request) -> web.Response:
        """Pay: the session completes, its event goes to the webhook URL, 303 to success_url.

        A second Pay (a double click, the back button) sends no second event."""
        session = self._page_session(request)
        if session["status"] == "expired":
            raise web.HTTPGone(text=checkout_page_html(session), content_type="text/html")
        if session["status"] == "open":
            delay_s = self.async_settle_delay_s
            paid = self.pay(session["id"], asynchronous=delay_s is not None)
            await self.deliver(self.event("checkout.session.completed", paid))
            if delay_s is not None:
                self._in_background(self._settle_later(session["id"], delay_s))
        url = str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session["id"])
        raise web.HTTPSeeOther(url)

    async def _checkout_cancel(self, request: web.Request) -> web.Response:
        session = self._page_session(request)
        raise web.HTTPSeeOther(str(session["cancel_url"]))

    async def _list_events(self, request: web.Request) -> web.Response:
        wanted = request[_PARAMS].get("type")
        events = [e for e in self.events.values() if wanted in (None, e["type"])]
        return web.json_response(
            {"object": "list", "data": events[::-1], "has_more": False, "url": "/v1/events"}
        )

    async def _retry_event(self, request: web.Request) -> web.Response:
        """Deliver a sent event again, as ``stripe events resend`` (and a Stripe retry)
        does: the same event id, signed anew."""
        event = self.events.get(request.match_info["id"])
        if event is None:
            return _stripe_error(404, "No such event.", code="resource_missing", param="id")
        await self.deliver(event)
        return web.json_response(event)

    # -- webhook delivery ----------------------------------------------------------------

    async def deliver(self, event: dict[str, Any]) -> WebhookDelivery:
        """Send ``event``, signed with ``webhook_secret``, to ``webhook_url``; returns its
        delivery record. The first attempt is awaited; after a failure the retries run in the
        background (``wait_for_deliveries`` awaits them). Only while serving (``start``)."""
        delivery = WebhookDelivery(event_id=event["id"], event_type=event["type"])
        self.events[event["id"]] = event
        self.deliveries.append(delivery)
        if self.webhook_url is None or self._app is None:
            log.warning("no webhook URL: %s %s not delivered", event["type"], event["id"])
            return delivery
        if not await self._attempt(delivery, event):
            self._in_background(self._retry(delivery, event))
        return delivery

    async def wait_for_deliveries(self) -> None:
        """Wait until every delivery has succeeded or used up its retries, and every
        asynchronous payment has settled."""
        while self._background:
            await asyncio.gather(*self._background)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_later(self, session_id: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        settled = self.settle_async(session_id, succeeded=True)
        await self.deliver(self.event("checkout.session.async_payment_succeeded", settled))

    async def _retry(self, delivery: WebhookDelivery, event: dict[str, Any]) -> None:
        try:
            for delay_s in self.retry_delays_s:
                await asyncio.sleep(delay_s)
                if await self._attempt(delivery, event):
                    return
            log.error(
                "webhook %s %s not delivered after %d attempts: %s",
                delivery.event_type,
                delivery.event_id,
                len(delivery.attempts),
                delivery.attempts,
            )
        except asyncio.CancelledError:
            log.error("stopping: webhook %s retries abandoned", delivery.event_id)
            raise

    async def _attempt(self, delivery: WebhookDelivery, event: dict[str, Any]) -> bool:
        """One POST of the event, signed now (as Stripe signs each attempt); True on 2xx."""
        assert self._app is not None and self.webhook_url is not None
        payload = event_body(event)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(payload, self.webhook_secret),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        outcome: int | str
        try:
            async with self._app[_HTTP].post(
                self.webhook_url, data=payload, headers=headers
            ) as response:
                await response.read()
                outcome = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        delivery.attempts.append(outcome)
        delivery.delivered = isinstance(outcome, int) and 200 <= outcome < 300
        level = logging.INFO if delivery.delivered else logging.WARNING
        log.log(
            level,
            "webhook %s %s attempt %d -> %s",
            delivery.event_type,
            delivery.event_id,
            len(delivery.attempts),
            outcome,
        )
        return delivery.delivered

    # -- Stripe's side of a payment ------------------------------------------------------

    def pay(self, session_id: str, *, asynchronous: bool = False) -> dict[str, Any]:
        """The customer completes Checkout. Card: paid at once. ``asynchronous`` (a bank
        debit): complete but unpaid until ``settle_async``. Returns the session."""
        session = self.sessions[session_id]
        pi_id, charge_id = _id("pi"), _id("ch")
        created = int(time.time())
        metadata = session["_payment_intent_data"].get("metadata", {})
        self.payment_intents[pi_id] = {
            "id": pi_id,
            "object": "payment_intent",
            "amount": session["amount_total"],
            "amount_received": 0 if asynchronous else session["amount_total"],
            "currency": session["currency"],
            "created": created,
            "latest_charge": charge_id,
            "livemode": False,
            "metadata": metadata,
            "payment_method": _id("pm"),
            "status": "processing" if asynchronous else "succeeded",
        }
        self.charges[charge_id] = {
            "id": charge_id,
            "object": "charge",
            "amount": session["amount_total"],
            "amount_captured": session["amount_total"],
            "amount_refunded": 0,
            "balance_transaction": _id("txn"),
            "captured": True,
            "created": created,
            "currency": session["currency"],
            "disputed": False,
            "livemode": False,
            "metadata": {},
            "paid": not asynchronous,
            "payment_intent": pi_id,
            "receipt_url": f"https://pay.stripe.com/receipts/payment/{secrets.token_urlsafe(24)}",
            "refunded": False,
            "status": "pending" if asynchronous else "succeeded",
        }
        session.update(
            status="complete",
            payment_status="unpaid" if asynchronous else "paid",
            payment_intent=pi_id,
            customer_details={
                "email": "buyer@example.com",
                "name": "Test Buyer",
                "address": {"country": "US", "postal_code": "94107"},
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )
        return self._public(session)

    def settle_async(self, session_id: str, *, succeeded: bool) -> dict[str, Any]:
        """The asynchronous payment of a completed session succeeds or fails."""
        session = self.sessions[session_id]
        pi = self.payment_intents[session["payment_intent"]]
        charge = self.charges[pi["latest_charge"]]
        if succeeded:
            session["payment_status"] = "paid"
            pi.update(status="succeeded", amount_received=pi["amount"])
            charge.update(status="succeeded", paid=True)
        else:
            pi.update(status="requires_payment_method")
            charge.update(status="failed")
        return self._public(session)

    def expire(self, session_id: str) -> dict[str, Any]:
        """The session expires unpaid."""
        self.sessions[session_id].update(status="expired")
        return self._public(self.sessions[session_id])

    def session(self, session_id: str) -> dict[str, Any]:
        """The session as Stripe would render it now."""
        return self._public(self.sessions[session_id])

    def charge_of(self, session_id: str) -> dict[str, Any]:
        """The session's charge (after ``pay``)."""
        pi = self.payment_intents[self.sessions[session_id]["payment_intent"]]
        return self._public(self.charges[pi["latest_charge"]])

    def refund(
        self, session_id: str, amount: int | None = None, *, status: str = "succeeded"
    ) -> dict[str, Any]:
        """Refund ``amount`` (default: what is left) of the session's charge."""
        charge = self.charges[self.charge_of(session_id)["id"]]
        left = charge["amount"] - charge["amount_refunded"]
        amount = left if amount is None else amount
        refund_id = _id("re")
        refund = {
            "id": refund_id,
            "object": "refund",
            "amount": amount,
            "balance_transaction": _id("txn"),
            "charge": charge["id"],
            "created": int(time.time()),
            "currency": charge["currency"],
            "destination_details": {"card": {"type": "refund"}, "type": "card"},
            "metadata": {},
            "payment_intent": charge["payment_intent"],
            "reason": "requested_by_customer",
            "receipt_number": None,
            "source_transfer_reversal": None,
            "status": status,
            "transfer_reversal": None,
        }
        self.refunds[refund_id] = refund
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        return self._public(refund)

    def update_refund(self, refund_id: str, status: str) -> dict[str, Any]:
        """A refund changes status (``failed`` / ``canceled`` give the money back to us)."""
        refund = self.refunds[refund_id]
        refund["status"] = status
        if status in ("failed", "canceled"):
            charge = self.charges[refund["charge"]]
            charge["amount_refunded"] -= refund["amount"]
            charge["refunded"] = False
            refund["failure_reason"] = "expired_or_canceled_card"
        return self._public(refund)

    def dispute(
        self, session_id: str, *, status: str = "needs_response", amount: int | None = None
    ) -> dict[str, Any]:
        """The cardholder disputes the session's charge (default: its whole amount)."""
        charge = self.charges[self.charge_of(session_id)["id"]]
        dispute_id = _id("du")
        dispute = {
            "id": dispute_id,
            "object": "dispute",
            "amount": charge["amount"] if amount is None else amount,
            "balance_transactions": [],
            "charge": charge["id"],
            "created": int(time.time()),
            "currency": charge["currency"],
            "evidence_details": {
                "due_by": int(time.time()) + 7 * 86_400,
                "has_evidence": False,
                "past_due": False,
                "submission_count": 0,
            },
            "is_charge_refundable": False,
            "livemode": False,
            "metadata": {},
            "payment_intent": charge["payment_intent"],
            "reason": "fraudulent",
            "status": status,
        }
        self.disputes[dispute_id] = dispute
        charge["disputed"] = True
        return self._public(dispute)

    def close_dispute(self, dispute_id: str, *, won: bool) -> dict[str, Any]:
        """The dispute is decided."""
        self.disputes[dispute_id]["status"] = "won" if won else "lost"
        return self._public(self.disputes[dispute_id])

    @staticmethod
    def event(
        event_type: str, obj: dict[str, Any], *, created: int | None = None
    ) -> dict[str, Any]:
        """A webhook event carrying a snapshot of ``obj``."""
        return {
            "id": _id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(time.time()) if created is None else created,
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }


def _product_name(item: dict[str, Any], prices: dict[str, dict[str, Any]]) -> str:
    if "price" in item:
        return str(prices[item["price"]].get("nickname") or item["price"])
    return str(item["price_data"].get("product_data", {}).get("name", ""))


_STYLE = """
body { font-family: system-ui, sans-serif; background: #f6f9fc; color: #1a1f36; margin: 0; }
main { max-width: 28rem; margin: 3rem auto; background: #fff; padding: 2rem;
       border-radius: 8px; box-shadow: 0 2px 8px rgba(0,0,0,.1); }
.banner { background: #fff3cd; color: #664d03; border: 1px solid #ffe69c; padding: .75rem;
          border-radius: 6px; font-weight: 600; }
.amount { font-size: 2rem; font-weight: 700; margin: .5rem 0; }
.actions { display: flex; gap: 1rem; margin-top: 1.5rem; }
button { font-size: 1rem; padding: .6rem 1.4rem; border-radius: 6px; border: 1px solid #635bff;
         cursor: pointer; }
.pay { background: #635bff; color: #fff; }
.cancel { background: #fff; color: #635bff; }
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main><p class="banner" role="note">Simulated Stripe: no real payment</p>'
        f"{body}</main></body></html>\n"
    )


def checkout_page_html(session: dict[str, Any]) -> str:
    """The hosted Checkout page of ``session``: amount, product, and Pay and Cancel forms
    while it is open; a paid or expired session says so instead. No external assets."""
    amount = int(session["amount_total"])
    currency = str(session["currency"]).upper()
    name = html.escape(str(session.get("_product_name") or "creditgate credits"))
    action = f"/checkout/{html.escape(session['id'])}"
    summary = (
        f"<h1>Pay creditgate</h1><p>{name}</p>"
        f'<p class="amount" data-amount-minor-units="{amount}">'
        f"{amount // 100}.{amount % 100:02d} {html.escape(currency)}</p>"
    )
    if session["status"] == "open":
        body = (
            f'{summary}<div class="actions">'
            f'<form method="post" action="{action}/pay">'
            '<button class="pay" type="submit">Pay</button></form>'
            f'<form method="post" action="{action}/cancel">'
            '<button class="cancel" type="submit">Cancel</button></form></div>'
        )
    elif session["status"] == "complete":
        success = str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session["id"])
        body = (
            f'{summary}<p>This session is already paid. <a href="{html.escape(success)}">'
            "Return to the merchant</a></p>"
        )
    else:
        body = f"{summary}<p>This Checkout session has expired.</p>"
    return _page("Simulated Stripe Checkout", body)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m devtools.stripe_sim``: serve the stand-in until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.stripe_sim",
        description="Simulated Stripe (API stand-in, Checkout page, signed webhooks). "
        "No real payment is ever made.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", default=TEST_API_KEY, help="the key clients must send")
    parser.add_argument("--webhook-url", help="where checkout.session.completed is POSTed")
    parser.add_argument("--webhook-secret", default=WEBHOOK_SECRET)
    parser.add_argument(
        "--settle-after-s",
        type=float,
        help="Pay is a bank debit that settles this many seconds later (default: a card, "
        "paid at once)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="stripe-sim: %(message)s")
    stub = StripeStub(
        args.api_key, webhook_url=args.webhook_url, webhook_secret=args.webhook_secret
    )
    stub.async_settle_delay_s = args.settle_after_s
    stub.base_url = f"http://{args.host}:{args.port}"
    print(
        f"Simulated Stripe on {stub.base_url} (no real payment); "
        f"webhooks to {args.webhook_url or 'nowhere'}",
        flush=True,
    )
    web.run_app(stub.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
