"""Every call to Stripe, through the official ``stripe`` library, and webhook verification.

``StripeClient`` wraps one ``stripe.StripeClient`` whose transport is the library's aiohttp
client and whose API base can be pointed at a local stand-in (``STRIPE_API_BASE``). It creates
and retrieves Checkout Sessions and lists a charge's refunds; nothing else talks to Stripe.

``construct_webhook_event`` checks ``Stripe-Signature`` with ``stripe.WebhookSignature``
against each configured signing secret (several during a rotation), and the header's
timestamp against a 300 s window; it returns the event as a plain dict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import aiohttp
import stripe

from billing.errors import BillingError

if TYPE_CHECKING:
    from billing.purchases.packages import Package
    from billing.purchases.purchase_records import Purchase

WEBHOOK_TOLERANCE_S = 300
"""Oldest accepted ``Stripe-Signature`` timestamp, in seconds (Stripe's own default)."""

WEBHOOK_MAX_CLOCK_SKEW_S = 5
"""How far in the future a signature timestamp may be (clock skew between Stripe and us)."""

_SESSION_EXPAND = ["payment_intent", "payment_intent.latest_charge"]


class StripeUnavailableError(BillingError):
    """Stripe could not be reached, timed out, rate-limited us or failed (5xx): retry later
    (HTTP 503 to our callers; the webhook's 503 makes Stripe redeliver)."""


class StripeRequestError(BillingError):
    """Stripe refused a request (4xx): our configuration is wrong (unknown price id, bad
    API key, ...). Not retried. Attributes: ``code`` as Stripe gave it, or None."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidWebhookError(BillingError):
    """A webhook delivery that must not be processed: no or bad signature, a timestamp
    outside the window, or a body that is not a Stripe event (HTTP 400, nothing written)."""


@dataclass(frozen=True, slots=True)
class CheckoutSessionRef:
    """A created Checkout Session: its id (``cs_...``) and the URL to send the user to."""

    id: str
    url: str


def _translate(exc: stripe.StripeError) -> BillingError:
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.APIError):
        return StripeUnavailableError(f"stripe: {type(exc).__name__}: {exc.user_message or exc}")
    return StripeRequestError(
        f"stripe refused the request: {type(exc).__name__}: {exc.user_message or exc}",
        code=exc.code,
    )


class StripeClient:
    """The Stripe API calls this service makes. Open with ``connect``; ``close`` on
    shutdown (it owns an aiohttp session)."""

    def __init__(self, client: stripe.StripeClient, http_client: stripe.HTTPClient) -> None:
        """Wrap a client; ``http_client`` is the transport it was built with (closed by
        ``close``)."""
        self._client = client
        self._http_client = http_client

    @classmethod
    def connect(
        cls,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout_s: float = 20.0,
        max_network_retries: int = 2,
    ) -> StripeClient:
        """A client for ``api_key`` at ``api_base`` (a local stand-in; default Stripe's own
        API). Makes no request.

        Args:
            timeout_s: total time per HTTP attempt.
            max_network_retries: the library's retries of failed connections, 409, 429 and
                5xx answers; POSTs carry an idempotency key, so a retry cannot create twice.
        """
        http_client = stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=timeout_s))
        base_addresses = {"api": api_base} if api_base else None
        client = stripe.StripeClient(
            api_key,
            base_addresses=base_addresses,  # type: ignore[arg-type]
            http_client=http_client,
            max_network_retries=max_network_retries,
        )
        return cls(client, http_client)

    async def close(self) -> None:
        """Close the transport's aiohttp session."""
        await self._http_client.close_async()  # type: ignore[no-untyped-call]  # stripe's

    async def create_checkout_session(
        self, *, purchase: Purchase, package: Package, success_url: str, cancel_url: str
    ) -> CheckoutSessionRef:
        """Create a payment-mode Checkout Session for a pending purchase.

        The price comes from the package row only: its ``stripe_price_id`` when set, else
        inline ``price_data`` with the package's ``price_minor_units``. ``client_reference_id``
        is the account id; ``metadata`` (on the session and its payment intent) carries the
        purchase's public id and the package code. The idempotency key
        ``checkout:{public_id}`` makes a retried call return the same session.

        Raises:
            StripeUnavailableError: Stripe unreachable or failing (503).
            StripeRequestError: Stripe refused (e.g. unknown price id) (502).
        """
        if package.stripe_price_id:
            line_item: dict[str, Any] = {"price": package.stripe_price_id, "quantity": 1}
        else:
            credits = package.total_millicredits // 1000
            line_item = {
                "quantity": 1,
                "price_data": {
                    "currency": package.currency,
                    "unit_amount": package.price_minor_units,
                    "product_data": {"name": f"{package.name}: {credits:,} credits"},
                },
            }
        metadata = {
            "purchase_id": purchase.public_id,
            "package_code": package.code,
            "account_id": str(purchase.account_id),
        }
        params: dict[str, Any] = {
            "mode": "payment",
            "line_items": [line_item],
            "client_reference_id": str(purchase.account_id),
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": f"checkout:{purchase.public_id}"},
            )
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        if not session.url:
            raise StripeRequestError(f"checkout session {session.id} has no url")
        return CheckoutSessionRef(id=session.id, url=session.url)

    async def retrieve_checkout_session(self, checkout_session_id: str) -> dict[str, Any]:
        """The session as a plain dict, with ``payment_intent`` and its ``latest_charge``
        expanded (for the charge id and receipt URL).

        Raises:
            StripeUnavailableError: Stripe unreachable or failing.
            StripeRequestError: no such session (Stripe's 404) or bad credentials.
        """
        try:
            session = await self._client.v1.checkout.sessions.retrieve_async(
                checkout_session_id, params={"expand": _SESSION_EXPAND}
            )
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return session.to_dict()

    async def list_refunds(self, charge_id: str) -> list[dict[str, Any]]:
        """Every refund of a charge, as plain dicts (all pages).

        Raises:
            StripeUnavailableError: Stripe unreachable or failing.
            StripeRequestError: Stripe refused.
        """
        refunds: list[dict[str, Any]] = []
        try:
            page = await self._client.v1.refunds.list_async(
                params={"charge": charge_id, "limit": 100}
            )
            async for refund in page.auto_paging_iter():
                refunds.append(refund.to_dict())
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return refunds


def _signature_timestamp(header: str) -> int:
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            return int(value)
    raise ValueError("no t= in the header")


def construct_webhook_event(
    payload: bytes,
    signature_header: str | None,
    signing_secrets: Sequence[str],
    *,
    tolerance_s: int = WEBHOOK_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Verify a webhook delivery and return its event as a plain dict.

    Args:
        payload: the raw request body, exactly as received (the signature covers its bytes).
        signature_header: the ``Stripe-Signature`` header (``t=...,v1=...[,v1=...]``).
        signing_secrets: ``whsec_...`` secrets, newest first; any one may match (rotation).
        tolerance_s: the oldest accepted timestamp, in seconds before ``now``.
        now: the current Unix time (tests); default ``time.time()``.

    Returns:
        The event: a dict with ``id`` (``evt_...``), ``type``, ``created`` and
        ``data.object``.

    Raises:
        InvalidWebhookError: no header or secret, no matching ``v1`` signature (HMAC-SHA256 of
            ``"{t}.{body}"``, checked by ``stripe.WebhookSignature``), a timestamp older than
            ``tolerance_s`` or more than ``WEBHOOK_MAX_CLOCK_SKEW_S`` in the future, or a
            body that is not UTF-8 JSON of a Stripe event (nested too deep to parse included).
    """
    if not signature_header:
        raise InvalidWebhookError("missing Stripe-Signature header")
    if not signing_secrets:
        raise InvalidWebhookError("no webhook signing secret is configured")
    try:
        text = payload.decode("utf-8")
        timestamp = _signature_timestamp(signature_header)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidWebhookError(f"unreadable body or signature header: {exc}") from exc
    for secret in signing_secrets:
        try:
            stripe.WebhookSignature.verify_header(text, signature_header, secret, tolerance=None)
        except stripe.SignatureVerificationError:
            continue
        break
    else:
        raise InvalidWebhookError("no signature matches a configured signing secret")
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise InvalidWebhookError(f"signature timestamp is more than {tolerance_s} s old")
    if timestamp > current + WEBHOOK_MAX_CLOCK_SKEW_S:
        raise InvalidWebhookError("signature timestamp is in the future")
    try:
        event = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the stack
        raise InvalidWebhookError(f"body is not JSON: {exc}") from exc
    if not _is_event(event):
        raise InvalidWebhookError("body is not a Stripe event")
    return event


def _is_event(event: object) -> TypeGuard[dict[str, Any]]:
    if not isinstance(event, dict):  # json.loads gives dicts
        return False
    data = event.get("data")
    return (
        isinstance(event.get("id"), str)
        and bool(event["id"])
        and isinstance(event.get("type"), str)
        and isinstance(data, Mapping)
        and isinstance(data.get("object"), Mapping)
        and isinstance(data["object"].get("id"), str)  # every Stripe object has one
        and bool(data["object"]["id"])
    )
