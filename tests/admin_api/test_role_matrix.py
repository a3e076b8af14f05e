"""The role × endpoint matrix over the whole route table (every router the app installs, so
routes other modules add are covered as they are merged): each caller is refused with 401
or 403 exactly when it should be, an allowed call is never refused for its credentials, and
every successful mutating call leaves exactly one audit row (a refused or read-only call
none)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from admin_api.app import ROUTERS
from admin_api.framework import ROUTES, AdminRoute
from billing.admin_tokens import Role
from tests.admin_api.conftest import AdminApi

# A path parameter the matrix cannot know a real value for: a row that does not exist
# (an allowed caller then gets 404, which is not a refusal for its credentials).
_ABSENT_ID = 987_654_321


def _example(model: type[BaseModel] | None) -> dict[str, Any]:
    """The model's first JSON Schema example, or {} when it has none."""
    if model is None:
        return {}
    examples = model.model_json_schema().get("examples") or [{}]
    return dict(examples[0])


def _creator(routes: tuple[AdminRoute, ...], route: AdminRoute) -> AdminRoute | None:
    """The route that creates what ``route``'s ``{id}`` names: a POST of the same tag without
    path parameters whose answer has an ``id``."""
    for candidate in routes:
        if (
            candidate.tag == route.tag
            and candidate.method == "POST"
            and not candidate.path_names
            and candidate.response is not None
            and "id" in candidate.response.model_fields
        ):
            return candidate
    return None


async def _path(admin_api: AdminApi, routes: tuple[AdminRoute, ...], route: AdminRoute) -> str:
    """``route``'s path for one call: ``{id}`` names a row made for it by its creator route
    (as an admin, with its example body) when there is one and it succeeds, so the mutation
    really happens; other placeholders take the ``params=`` model's example, or name a row
    that does not exist."""
    values: dict[str, Any] = {name: _ABSENT_ID for name in route.path_names}
    values.update(_example(route.params))
    creator = _creator(routes, route) if "id" in route.path_names else None
    if creator is not None:
        response, created = await admin_api.call(
            "POST", creator.path, json=_example(creator.body) if creator.body else None
        )
        if 200 <= response.status < 300:
            values["id"] = created["id"]
    return route.path.format(**values)


async def _token(admin_api: AdminApi, caller: str) -> str | None:
    if caller == "anonymous":
        return None
    if caller == "revoked":
        token, token_id = await admin_api.mint(Role.ADMIN)
        await admin_api.pool.execute(
            "UPDATE admin_tokens SET revoked_at = now() WHERE id = $1", token_id
        )
        return token
    if caller == "expired":
        token, token_id = await admin_api.mint(Role.ADMIN)
        await admin_api.pool.execute(
            "UPDATE admin_tokens SET expires_at = $2 WHERE id = $1",
            token_id,
            datetime.now(UTC) - timedelta(seconds=1),
        )
        return token
    return (await admin_api.mint(Role(caller)))[0]


CALLERS = ["anonymous", "revoked", "expired", "viewer", "operator", "admin"]


def _expected_refusal(route: AdminRoute, caller: str) -> int | None:
    if caller in ("anonymous", "revoked", "expired"):
        return 401
    return None if Role(caller).allows(route.role) else 403


@pytest.mark.parametrize("caller", CALLERS)
async def test_every_route_refuses_exactly_the_callers_below_its_role(
    admin_api: AdminApi, caller: str
):
    routes: tuple[AdminRoute, ...] = admin_api.client.app[ROUTES]
    assert len(routes) >= 6
    problems = []
    for route in routes:
        token = await _token(admin_api, caller)
        path = await _path(admin_api, routes, route)
        audit_before = await admin_api.audit_count()
        response, body = await admin_api.call(
            route.method,
            path,
            role=None,
            token=token,
            json=_example(route.body) if route.body else None,
        )
        audit_rows = await admin_api.audit_count() - audit_before
        label = f"{route.method} {path} as {caller}: {response.status} {body}"
        refusal = _expected_refusal(route, caller)
        if refusal is not None:
            if response.status != refusal or audit_rows != 0:
                problems.append(f"{label} (expected {refusal}, no audit row)")
            continue
        if response.status in (401, 403) or response.status >= 500:
            problems.append(f"{label} (expected to be allowed)")
        succeeded = 200 <= response.status < 300
        wanted_rows = 1 if route.mutates and succeeded else 0
        if audit_rows != wanted_rows:
            problems.append(f"{label}: {audit_rows} audit rows, expected {wanted_rows}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/admin/v1/tokens"),
        ("PATCH", "/admin/v1/tokens/{id}"),
        ("POST", "/admin/v1/tokens/{id}/revoke"),
        ("POST", "/admin/v1/accounts/{id}/portal-sessions"),
        ("POST", "/admin/v1/reconciliation-runs"),
    ],
)
async def test_matrix_calls_really_mutate(admin_api: AdminApi, method: str, path: str):
    """The audit half of the matrix is not vacuous: these calls, made as the matrix makes
    them, succeed (so their one audit row is checked there)."""
    routes: tuple[AdminRoute, ...] = admin_api.client.app[ROUTES]
    route = next(r for r in routes if (r.method, r.path) == (method, path))
    response, body = await admin_api.call(
        method,
        await _path(admin_api, routes, route),
        json=_example(route.body) if route.body else None,
    )
    assert 200 <= response.status < 300, body


@pytest.mark.parametrize(
    "route",
    [route for router in ROUTERS for route in router.routes if route.body is not None],
    ids=lambda route: f"{route.method} {route.path}",
)
def test_body_example_of_every_route_is_valid(route: AdminRoute):
    """The examples the matrix sends (and the OpenAPI document shows) pass their own model,
    so an allowed caller's call reaches the handler."""
    assert route.body is not None
    examples = route.body.model_json_schema().get("examples")
    assert examples, f"{route.body.__name__} has no example (json_schema_extra)"
    for example in examples:
        route.body.model_validate_json(orjson.dumps(example), strict=True)


def _required_role(method: str, path: str) -> Role:
    """The issue's rule, written independently of the route table: viewer reads everything;
    operator also mutates accounts, keys and adjustments; admin everything else."""
    if method == "GET":
        return Role.VIEWER
    if path.startswith(("/admin/v1/accounts", "/admin/v1/keys")):
        return Role.OPERATOR
    return Role.ADMIN


def test_every_route_declares_the_role_the_issue_gives_it() -> None:
    # The matrix above checks each route against its own declaration; this pins the
    # declarations, so that a mutating token route declared viewer cannot pass.
    routes = [route for router in ROUTERS for route in router.routes]
    assert routes
    wrong = [
        (route.method, route.path, route.role.value)
        for route in routes
        if route.role is not _required_role(route.method, route.path)
    ]
    assert wrong == []
