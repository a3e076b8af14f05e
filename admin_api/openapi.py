"""The admin API's OpenAPI 3.1 document, generated from the installed route table, so it
cannot drift from the handlers: every ``AdminRoute`` is one operation, its path, query and
body parameters and its answer come from the route's pydantic models (their JSON Schema, in
``components/schemas``), and its error answers from ``admin_api.errors.ERROR_STATUSES``.

Served without authentication at ``GET /admin/v1/openapi.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from admin_api.errors import ERROR_STATUSES
from admin_api.framework import API_PREFIX, ROUTES, AdminRoute, Role

OPENAPI_PATH = API_PREFIX + "/openapi.json"
_REF = "#/components/schemas/{model}"
_SECURITY_SCHEME = "adminToken"


class ErrorDetail(BaseModel):
    """One refused field of a 400."""

    field: str
    message: str


class ErrorObject(BaseModel):
    """OpenAI's error object (``runtime.errors.error_body``)."""

    message: str
    type: str
    param: str | None
    code: str | None
    details: list[ErrorDetail] | None = Field(None, description="400: one per refused field.")


class Error(BaseModel):
    """Every error answer: OpenAI's envelope."""

    error: ErrorObject


def _error_statuses(route: AdminRoute) -> list[int]:
    statuses = [401, 503]
    if route.body or route.query or route.params or route.headers:
        statuses.append(400)
    if route.role is not Role.VIEWER:
        statuses.append(403)
    if route.params or route.mutates:
        statuses.append(404)
    if route.mutates:
        statuses += [409, 422]
    return sorted(statuses)


def _models(routes: Iterable[AdminRoute]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Error, "serialization"): None}
    for route in routes:
        for model in (route.params, route.query, route.headers, route.body):
            if model is not None:
                wanted[(model, "validation")] = None
        if route.response is not None:
            wanted[(route.response, "serialization")] = None
    return list(wanted)


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query or path parameter's schema: an absent parameter is None, so ``null`` (which
    a URL cannot carry) leaves the alternatives and the default."""
    schema = dict(schema)
    alternatives = schema.pop("anyOf", None)
    if alternatives is not None:
        kept = [option for option in alternatives if option != {"type": "null"}]
        if len(kept) == 1:
            schema = {**kept[0], **schema}
        else:
            schema["anyOf"] = kept
    if schema.get("default", ...) is None:
        del schema["default"]
    return schema


class _Schemas:
    """The JSON Schemas of the routes' models: ``ref`` for a body or an answer, ``of`` for the
    object schema of a path or query model (its properties become parameters)."""

    def __init__(self, routes: Sequence[AdminRoute]) -> None:
        self._refs, definitions = models_json_schema(_models(routes), ref_template=_REF)
        self.components: dict[str, Any] = definitions.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self._refs[(model, mode)])

    def of(self, model: type[BaseModel]) -> dict[str, Any]:
        name = self._refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]
        schema: dict[str, Any] = self.components[name]
        return schema


def _parameters(
    model: type[BaseModel] | None, where: Literal["path", "query", "header"], schemas: _Schemas
) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = schemas.of(model)
    required = set(schema.get("required", ()))
    parameters = []
    for name, property_schema in schema["properties"].items():
        parameter: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": _without_null(property_schema),
        }
        if "description" in property_schema:
            parameter["description"] = property_schema["description"]
        parameters.append(parameter)
    return parameters


def _operation(route: AdminRoute, schemas: _Schemas) -> dict[str, Any]:
    success: dict[str, Any] = {"description": route.summary, "headers": _REQUEST_ID_HEADER}
    if route.response is not None:
        success["content"] = {
            "application/json": {"schema": schemas.ref(route.response, "serialization")}
        }
    responses: dict[str, Any] = {str(route.status): success}
    for status in _error_statuses(route):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "description": f"Role: {route.role.value} or above.",
        "parameters": _parameters(route.params, "path", schemas)
        + _parameters(route.query, "query", schemas)
        + _parameters(route.headers, "header", schemas),
        "responses": responses,
    }
    if route.handler.__doc__:
        operation["description"] += "\n\n" + route.handler.__doc__.strip()
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.ref(route.body, "validation")}},
        }
    return operation


_REQUEST_ID_HEADER = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}


def build_openapi(routes: Sequence[AdminRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    schemas = _Schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, schemas)
    error_ref = schemas.ref(Error, "serialization")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "creditgate admin API",
            "version": "1",
            "description": (
                "Operators manage accounts, keys, rate cards, packages, flags and admin "
                "tokens. Authenticate with `Authorization: Bearer cg_admin_...`; roles: "
                "viewer < operator < admin."
            ),
        },
        "security": [{_SECURITY_SCHEME: []}],
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                _SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "bearerFormat": "cg_admin_"}
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id (also in the audit log).",
                    "schema": {"type": "string"},
                }
            },
            "responses": {
                f"Error{status}": {
                    "description": description,
                    "headers": _REQUEST_ID_HEADER,
                    "content": {"application/json": {"schema": error_ref}},
                }
                for status, description in ERROR_STATUSES.items()
            },
        },
    }


_DOCUMENT = web.AppKey("admin_openapi_document", bytes)


def add_openapi_route(app: web.Application) -> None:
    """Serve the document of ``app[ROUTES]`` (built at start-up) at ``OPENAPI_PATH``."""

    async def build(app: web.Application) -> None:
        routes = app[ROUTES]
        app[_DOCUMENT] = orjson.dumps(build_openapi(routes))

    app.on_startup.append(build)
    app.router.add_get(OPENAPI_PATH, _serve)


async def _serve(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_DOCUMENT], content_type="application/json")
