"""The billing sessions' storage: aiohttp-session's ``AbstractStorage`` on the gateway's
Redis client (see ``gateway.billing_session`` for how sessions are used).

The cookie ``creditgate_billing`` holds only a random id; the data is JSON in Redis under
``cg:v1:billing_session:<id>``, expiring with the session.
"""

from __future__ import annotations

import secrets

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp_session import AbstractStorage, Session

COOKIE_NAME = "creditgate_billing"
COOKIE_PATH = "/api/billing"

_KEY_PREFIX = "cg:v1:billing_session:"
_MAX_SESSION_ID_CHARS = 64


class BillingSessionStore(AbstractStorage):
    """aiohttp-session's storage for billing sessions, on the gateway's Redis client.

    Not aiohttp-session's ``RedisStorage``: that one needs a client answering bytes, and the
    gateway's answers text (``decode_responses=True``); it also keeps an emptied session as
    ``{}`` where this one deletes it (sign-out removes the data server-side).
    """

    def __init__(self, client: aioredis.Redis, *, ttl_s: int, secure: bool) -> None:
        super().__init__(
            cookie_name=COOKIE_NAME,
            max_age=ttl_s,
            path=COOKIE_PATH,
            secure=secure,
            httponly=True,
            samesite="Lax",
            encoder=lambda value: orjson.dumps(value).decode(),
        )
        self._redis = client

    async def load_session(self, request: web.Request) -> Session:
        """The session the request's cookie names, or a new empty one (no cookie, an unknown
        or expired id).

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis unreachable.
        """
        session_id = self.load_cookie(request)
        if session_id and len(session_id) <= _MAX_SESSION_ID_CHARS:
            raw = await self._redis.get(_KEY_PREFIX + session_id)
            if raw is not None:
                return Session(session_id, data=orjson.loads(raw), new=False, max_age=self.max_age)
        return Session(None, data=None, new=True, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        """Store the session and set its cookie; an empty session is deleted and its cookie
        cleared.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError: Redis unreachable.
        """
        if session.empty:
            if session.identity is not None:
                await self._redis.delete(_KEY_PREFIX + str(session.identity))
            self.save_cookie(response, "")
            return
        if session.identity is None:
            session.set_new_identity(secrets.token_urlsafe(32))
        session_id = str(session.identity)
        data = self._encoder(self._get_session_data(session))
        await self._redis.set(_KEY_PREFIX + session_id, data, ex=self.max_age)
        self.save_cookie(response, session_id, max_age=session.max_age)
