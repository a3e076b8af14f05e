"""The admin API's framework: routes declared with pydantic models, token authentication,
roles, one error shape, and the route table the OpenAPI document is generated from.

A route module declares its routes on an ``AdminRouter`` and exposes it as ``router``::

    router = AdminRouter(tag="accounts")

    @router.post("/admin/v1/accounts", role=Role.OPERATOR, body=AccountCreate,
                 response=AccountOut, status=201, summary="Create an account")
    async def create_account(ctx: AdminContext) -> AccountOut:
        async with ctx.transaction() as conn:
            ...
            await record_audit(conn, ctx.actor, action="account.create", ...)

``admin_api.app`` passes every router to ``install``. For each request the framework, in
this order: authenticates the bearer token (401), checks its role against the route's
minimum (403), validates the path (``params=``), the query (``query=``) and the JSON body
(``body=``; strict types) against their models (400 with ``details``), runs the handler and
serializes what it returns through ``response=`` (camelCase JSON, ``status``). Refusals are
``admin_api.errors``'s classes; every answer carries an ``x-request-id``, the same id the
handler's ``ctx.actor`` writes into the audit log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from admin_api.auth import authenticate, last_used_ctx
from admin_api.errors import (
    AdminError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
    admin_error_response,
    database_unavailable_response,
    from_billing_error,
    from_validation_error,
)
from admin_api.models import AdminModel, Id, IdPath, Page, Paginated, decode_cursor, encode_cursor
from billing.admin_tokens import Role
from billing.audit import Actor
from billing.errors import POSTGRES_REFUSED_DATA, POSTGRES_UNAVAILABLE, BillingError
from billing.metering.holds import HoldStore
from runtime import appkeys
from runtime.errors import json_response
from runtime.request_ids import new_request_id
from runtime.settings import Settings

__all__ = [
    "API_PREFIX",
    "AdminContext",
    "AdminError",
    "AdminModel",
    "AdminRoute",
    "AdminRouter",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "Id",
    "IdPath",
    "NotFound",
    "Page",
    "Paginated",
    "Role",
    "Unauthorized",
    "Unprocessable",
    "decode_cursor",
    "encode_cursor",
    "install",
]

log = logging.getLogger(__name__)

API_PREFIX = "/admin/v1"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(slots=True)
class AdminContext:
    """What a handler gets: the validated request, who calls, and the service's resources.

    Attributes:
        body: the validated ``body=`` model, or None.
        query: the validated ``query=`` model, or None.
        params: the validated ``params=`` model (path parameters), or None.
        headers: the validated ``headers=`` model (e.g. ``Idempotency-Key``), or None.
        actor: the caller for ``record_audit``: token id and name, request id, client address.
        role: the caller's role.
        request_id: this request's ``x-request-id``.
    """

    request: web.Request
    actor: Actor
    role: Role
    request_id: str
    body: Any = None
    query: Any = None
    params: Any = None
    headers: Any = None

    @property
    def settings(self) -> Settings:
        """The service's settings."""
        return self.request.app[appkeys.SETTINGS]

    @property
    def pool(self) -> asyncpg.Pool:
        """The service's Postgres pool."""
        return self.request.app[appkeys.DB_POOL]

    @property
    def holds(self) -> HoldStore:
        """The Redis hold store (held and pending amounts, balance pushes)."""
        return self.request.app[appkeys.HOLDS]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection inside a transaction: the change, its ``record_audit`` and its
        ``notify_control`` go through it and commit together."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn


Handler = Callable[[AdminContext], Awaitable[BaseModel | Mapping[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class AdminRoute:
    """One route of the table: what ``install`` mounts and the OpenAPI document describes.

    Attributes:
        role: the minimum role.
        status: the success status; 204 answers no body (the handler returns None).
        response: the success body's model (None with 204).
    """

    method: str
    path: str
    handler: Handler
    role: Role
    tag: str
    summary: str
    status: int
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    params: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    path_names: tuple[str, ...] = field(default=())

    @property
    def operation_id(self) -> str:
        """The handler's name, unique in the table."""
        return self.handler.__name__

    @property
    def mutates(self) -> bool:
        """Whether the route changes something (and so writes one audit row)."""
        return self.method != "GET"


class AdminRouter:
    """Collects the routes of one module (``tag`` groups them in the OpenAPI document)."""

    def __init__(self, *, tag: str) -> None:
        self.tag = tag
        self.routes: list[AdminRoute] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        role: Role,
        summary: str,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        params: type[BaseModel] | None = None,
        headers: type[BaseModel] | None = None,
        response: type[BaseModel] | None = None,
        status: int = 200,
    ) -> Callable[[Handler], Handler]:
        """Declare a route; ``path`` is absolute (``/admin/v1/...``) or relative to it.

        A path with ``{name}`` placeholders needs ``params=``, a model with those fields
        (``IdPath`` for ``{id}``). ``headers=`` is a model whose fields' aliases are header
        names (``Field(alias="Idempotency-Key")``), matched case-insensitively.
        """
        full_path = (
            path if path.startswith(API_PREFIX + "/") else API_PREFIX + "/" + path.lstrip("/")
        )
        names = tuple(_PLACEHOLDER.findall(full_path))
        if names and (params is None or set(names) != set(params.model_fields)):
            raise TypeError(f"{method} {full_path}: params= must declare exactly {names}")
        if (status == 204) != (response is None):
            raise TypeError(f"{method} {full_path}: response= is required unless status=204")

        def register(handler: Handler) -> Handler:
            self.routes.append(
                AdminRoute(
                    method=method,
                    path=full_path,
                    handler=handler,
                    role=role,
                    tag=self.tag,
                    summary=summary,
                    status=status,
                    body=body,
                    query=query,
                    params=params,
                    headers=headers,
                    response=response,
                    path_names=names,
                )
            )
            return handler

        return register

    def get(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """``route("GET", ...)``."""
        return self.route("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """``route("POST", ...)``."""
        return self.route("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """``route("PUT", ...)``."""
        return self.route("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """``route("PATCH", ...)``."""
        return self.route("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Callable[[Handler], Handler]:
        """``route("DELETE", ...)``."""
        return self.route("DELETE", path, **kwargs)


#: The installed route table, for the OpenAPI document and the tests.
ROUTES: web.AppKey[tuple[AdminRoute, ...]] = web.AppKey("admin_routes")


def install(app: web.Application, routers: Iterable[AdminRouter]) -> tuple[AdminRoute, ...]:
    """Mount every route of ``routers`` on ``app`` and keep the table in ``app[ROUTES]``.

    Also starts the ``last_used_at`` writer (``admin_api.auth``) with the app. Call after
    the app's Postgres ``cleanup_ctx`` is added.

    Raises:
        ValueError: two routes share a method and path, or a handler name.
    """
    table = tuple(route for router in routers for route in router.routes)
    seen: set[tuple[str, str]] = set()
    operation_ids: set[str] = set()
    for route in table:
        if (route.method, route.path) in seen or route.operation_id in operation_ids:
            raise ValueError(f"admin route declared twice: {route.method} {route.path}")
        seen.add((route.method, route.path))
        operation_ids.add(route.operation_id)
        app.router.add_route(route.method, route.path, _endpoint(route))
    app[ROUTES] = table
    app.cleanup_ctx.append(last_used_ctx)
    return table


def _endpoint(route: AdminRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def endpoint(request: web.Request) -> web.StreamResponse:
        request_id = new_request_id()
        try:
            ctx = await _context(route, request, request_id)
            result = await route.handler(ctx)
        except AdminError as exc:
            return admin_error_response(exc, request_id)
        except BillingError as exc:
            answer = from_billing_error(exc)
            if answer is None:
                raise
            return admin_error_response(answer, request_id)
        except POSTGRES_REFUSED_DATA:
            raise  # the error middleware answers: 400 for a value Postgres refuses, else 500
        except POSTGRES_UNAVAILABLE as exc:
            log.warning("admin %s %s: Postgres unavailable: %s", route.method, route.path, exc)
            return database_unavailable_response(request_id)
        return _success(route, result, request_id)

    endpoint.__name__ = route.operation_id
    return endpoint


async def _context(route: AdminRoute, request: web.Request, request_id: str) -> AdminContext:
    identity = await authenticate(request)
    if not identity.role.allows(route.role):
        raise Forbidden(
            f"This route needs the {route.role.value} role; this token is {identity.role.value}."
        )
    actor = Actor(
        kind="token",
        name=identity.name,
        token_id=identity.token_id,
        request_id=request_id,
        client_address=request.remote,
    )
    ctx = AdminContext(request=request, actor=actor, role=identity.role, request_id=request_id)
    if route.params is not None:
        ctx.params = _validate(route.params, dict(request.match_info), "path")
    if route.query is not None:
        ctx.query = _validate(route.query, _query_values(request), "query")
    if route.headers is not None:
        ctx.headers = _validate(route.headers, _header_values(route.headers, request), "header")
    if route.body is not None:
        ctx.body = _validate_body(route.body, await request.read())
    return ctx


def _query_values(request: web.Request) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in request.query:
        given = request.query.getall(name)
        values[name] = given[0] if len(given) == 1 else given
    return values


def _header_values(model: type[BaseModel], request: web.Request) -> dict[str, str]:
    names = (field.alias or name for name, field in model.model_fields.items())
    return {name: request.headers[name] for name in names if name in request.headers}


def _validate(model: type[BaseModel], values: Mapping[str, Any], location: str) -> BaseModel:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise from_validation_error(exc, location=location) from None


def _validate_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("The body is not JSON.", code="invalid_json") from None
    if not isinstance(document, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    try:
        # Strict: a string is not an integer, a number is not a string (JSON's own types).
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc, location="body") from None


def _success(route: AdminRoute, result: Any, request_id: str) -> web.Response:
    headers = {"x-request-id": request_id}
    if route.response is None:
        return web.Response(status=route.status, headers=headers)
    if not isinstance(result, route.response):
        result = route.response.model_validate(result)
    return json_response(result.model_dump(mode="json", by_alias=True), route.status, headers)
