"""The admin API under test: the admin app on aiohttp's test server with real Postgres and
Redis, and admin tokens of each role."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from admin_api.app import create_admin_app
from billing.admin_tokens import Role, create_admin_token
from billing.audit import CLI_ACTOR
from runtime import appkeys
from runtime.settings import Settings


def admin_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "upstream_api_key": "sk-upstream",
        "public_base_url": "http://gateway.test",
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class AdminApi:
    """The admin app's test client, its pool, and a token per role."""

    client: TestClient
    tokens: dict[Role, str]

    @property
    def pool(self) -> asyncpg.Pool:
        return self.client.app[appkeys.DB_POOL]

    async def mint(
        self, role: Role, *, name: str = "", expires_at: datetime | None = None
    ) -> tuple[str, int]:
        """A new token of ``role`` (made as the CLI makes it): ``(token, id)``."""
        async with self.pool.acquire() as conn:
            token, record = await create_admin_token(
                conn, CLI_ACTOR, role=role, name=name, expires_at=expires_at
            )
        return token, record.id

    def headers(self, role: Role | None = Role.ADMIN, token: str | None = None) -> dict[str, str]:
        """Authorization for ``role``'s token (or ``token``); none for ``role=None``."""
        chosen = token if token is not None else (self.tokens[role] if role else None)
        return {} if chosen is None else {"Authorization": f"Bearer {chosen}"}

    async def call(
        self,
        method: str,
        path: str,
        *,
        role: Role | None = Role.ADMIN,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[ClientResponse, Any]:
        """One request; returns the response and its JSON body (None when empty)."""
        response = await self.client.request(
            method,
            path,
            headers=self.headers(role, token),
            json=json,
            data=data,
            params=params,
        )
        raw = await response.read()
        return response, (await response.json() if raw else None)

    async def audit_count(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM audit_log"))


@pytest.fixture
async def admin_api(database_url: str, redis_url: str, aiohttp_client: Any) -> AdminApi:
    client = await aiohttp_client(create_admin_app(admin_settings(database_url, redis_url)))
    api = AdminApi(client, {})
    for role in Role:
        api.tokens[role], _ = await api.mint(role, name=f"test-{role.value}")
    return api
