"""``GET /admin/v1/openapi.json``: served without a token, a valid OpenAPI 3.1 document, and
in step with the routes the app really serves."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from openapi_spec_validator import validate

from admin_api.app import create_admin_app
from admin_api.framework import API_PREFIX, ROUTES
from admin_api.openapi import OPENAPI_PATH, build_openapi
from tests.admin_api.conftest import AdminApi, admin_settings

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def _served_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route aiohttp's router holds under the API's prefix."""
    served = set()
    for resource in app.router.resources():
        path = resource.canonical
        if not path.startswith(API_PREFIX + "/") or path == OPENAPI_PATH:
            continue
        for route in resource:
            if route.method in _METHODS:
                served.add((route.method, path))
    return served


def _documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


async def test_openapi_served_without_token_is_valid_3_1(admin_api: AdminApi):
    response = await admin_api.client.get(OPENAPI_PATH)
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises OpenAPIValidationError when the document is not valid


async def test_openapi_documents_every_served_admin_route(admin_api: AdminApi):
    document = await (await admin_api.client.get(OPENAPI_PATH)).json()
    served = _served_operations(admin_api.client.app)
    assert served  # the comparison below means something
    assert _documented_operations(document) == served


async def _rogue(request: web.Request) -> web.Response:
    return web.Response()


def test_route_added_outside_the_table_is_caught_as_undocumented(database_url, redis_url):
    """The drift check fails for a handler mounted around the framework."""
    app = create_admin_app(admin_settings(database_url, redis_url))
    app.router.add_get(API_PREFIX + "/rogue", _rogue)
    document = build_openapi(app[ROUTES])
    missing = _served_operations(app) - _documented_operations(document)
    assert missing == {("GET", API_PREFIX + "/rogue")}


async def test_openapi_operations_document_errors_and_bearer_auth(admin_api: AdminApi):
    document = await (await admin_api.client.get(OPENAPI_PATH)).json()
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    assert document["security"] == [{"adminToken": []}]
    revoke = document["paths"]["/admin/v1/tokens/{id}/revoke"]["post"]
    assert {"400", "401", "403", "404", "409", "422", "503", "200"} == set(revoke["responses"])
    me = document["paths"]["/admin/v1/me"]["get"]
    assert set(me["responses"]) == {"200", "401", "503"}
    listing = document["paths"]["/admin/v1/audit-log"]["get"]
    names = {parameter["name"] for parameter in listing["parameters"]}
    assert {"limit", "cursor", "actorTokenId", "action", "since", "until"} <= names
    error = document["components"]["schemas"]["ErrorObject"]
    assert {"message", "type", "param", "code", "details"} <= set(error["properties"])
