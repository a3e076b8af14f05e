"""The HTTP client of ``creditgate qa``: the gateway's and the admin service's APIs as the
script uses them, its options, and the throwaway accounts it makes (``qa+<run id>-<label>``)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

#: ``max_tokens`` of every call the script makes (keeps holds and charges small).
MAX_TOKENS = 16
#: Seconds to wait for settlements to reach Postgres (usage rows, ledger entries).
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.2


class QaError(Exception):
    """A call answered something the script cannot go on from (the section fails)."""


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's options."""

    gateway: str
    admin: str
    admin_token: str
    smoke: bool = False
    rate_model: str | None = None
    stripe_api_key: str | None = None


@dataclass(slots=True)
class Account:
    """A throwaway account and its API key."""

    id: int
    key: str
    key_prefix: str


class Client:
    """The gateway's and the admin service's HTTP APIs, as the script uses them."""

    def __init__(self, http: aiohttp.ClientSession, options: Options) -> None:
        self.http = http
        self.options = options

    async def admin(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        idempotent: bool = False,
        params: dict[str, str] | None = None,
    ) -> Any:
        """An admin API call; returns its JSON. Raises QaError on a non-2xx answer.
        ``idempotent``: send a new ``Idempotency-Key``."""
        url = self.options.admin.rstrip("/") + "/admin/v1" + path
        headers = {"Authorization": f"Bearer {self.options.admin_token}"}
        if idempotent:
            headers["Idempotency-Key"] = f"qa-{secrets.token_hex(12)}"
        async with self.http.request(
            method, url, json=json, headers=headers, params=params or None
        ) as response:
            body = await response.read()
            if not 200 <= response.status < 300:
                raise QaError(f"{method} {path}: {response.status} {body[:500]!r}")
            return orjson.loads(body) if body else None

    async def admin_all(self, path: str, **params: str) -> list[dict[str, Any]]:
        """Every row of a cursor-paged admin listing."""
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_params = {**params, "limit": "200"} | ({"cursor": cursor} if cursor else {})
            page = await self.admin("GET", path, params=page_params)
            rows.extend(page["data"])
            cursor = page["nextCursor"]
            if cursor is None:
                return rows

    async def gateway(
        self, method: str, path: str, key: str, json: Any = None
    ) -> tuple[int, dict[str, str], Any]:
        """A gateway call with an API key: ``(status, headers, JSON body or None)``."""
        url = self.options.gateway.rstrip("/") + path
        async with self.http.request(
            method, url, json=json, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            body = await response.read()
            try:
                doc = orjson.loads(body) if body else None
            except orjson.JSONDecodeError:
                doc = None
            return response.status, {k.lower(): v for k, v in response.headers.items()}, doc

    async def chat(self, key: str, model: str) -> tuple[int, dict[str, str], Any]:
        """One small chat completion through the gateway."""
        body = {
            "model": model,
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"creditgate qa {secrets.token_hex(4)}"}],
        }
        return await self.gateway("POST", "/v1/chat/completions", key, body)
