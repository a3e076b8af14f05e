"""A local stand-in for the few Stripe API endpoints creditgate calls, and Stripe's side of
a payment (the customer pays, a refund, a dispute) for building realistic webhook events.

The official ``stripe`` client reaches it with its API base overridden (``STRIPE_API_BASE``):

    POST /v1/checkout/sessions         create (form-encoded params; Idempotency-Key honoured)
    GET  /v1/checkout/sessions/{id}    retrieve (``expand[]`` of payment_intent[.latest_charge])
    GET  /v1/refunds?charge=ch_...     list a charge's refunds

Objects follow Stripe's shapes at recent API versions: Checkout creates the payment intent
when the customer pays; ``charge.refunded`` carries no ``refunds`` list.

``sign(payload, secret)`` builds a ``Stripe-Signature`` header the way Stripe does:
``t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{raw body}">``, written here from the definition so the
service's use of the library is checked against an independent implementation.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from devtools.localservices import free_port

API_VERSION = "2025-06-30.basil"
_PARAMS = web.RequestKey("params", dict)
TEST_API_KEY = "sk_test_creditgate_stub"
WEBHOOK_SECRET = "whsec_test_current"
OLD_WEBHOOK_SECRET = "whsec_test_previous"


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


class StripeStub:
    """The stand-in's state, its aiohttp app, and Stripe's side of each payment.

    Attributes:
        requests: ``(method, path, params, headers)`` of every API request received.
        prices: Price objects by id (register them to test ``stripe_price_id``).
        fail_with: when set, the next API requests answer this HTTP status (e.g. 500).
        refused_paths: API paths answered 403 (a restricted key without that permission).
    """

    def __init__(self, api_key: str = TEST_API_KEY) -> None:
        self.api_key = api_key
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
        self.base_url = ""

    # -- the HTTP stand-in -------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving the API endpoints."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_get("/v1/checkout/sessions/{id}", self._retrieve_session)
        app.router.add_get("/v1/refunds", self._list_refunds)
        return app

    async def start(self) -> str:
        """Serve on a loopback port; returns the base URL for ``STRIPE_API_BASE``."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
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
            "url": f"https://checkout.stripe.com/c/pay/{session_id}#fidkdWxOYHwnPyd1blpxYHZxWjA0",
            "_payment_intent_data": params.get("payment_intent_data", {}),
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
