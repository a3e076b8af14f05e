"""The unbilled routes: the model list (from the active rate cards), and the 404 (or 405) for
every path no other route serves, in OpenAI's shapes."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing.errors import UnknownModelError
from gateway import appkeys as gateway_keys
from runtime import appkeys
from runtime.errors import NotFoundError, json_response


async def handle_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the models on the active rate card (the live allow list applied)."""
    await request.app[gateway_keys.AUTH].authenticate(request)
    return json_response({"object": "list", "data": _model_objects(request.app)}, 200)


async def handle_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``: one model, or 404 ``model_not_found``."""
    await request.app[gateway_keys.AUTH].authenticate(request)
    model_id = request.match_info["model"]
    for obj in _model_objects(request.app):
        if obj["id"] == model_id:
            return json_response(obj, 200)
    raise UnknownModelError(model_id)


def _model_objects(app: web.Application) -> list[dict[str, Any]]:
    flags = app[appkeys.CONTROL].flags
    return [
        {
            "id": card.model,
            "object": "model",
            "created": int(card.effective_at.timestamp()),
            "owned_by": "creditgate",
        }
        for card in app[gateway_keys.RATE_CARDS].models()
        if flags.serves_model(card.model)
    ]


async def handle_unknown_v1(request: web.Request) -> web.Response:
    """Any other ``/v1`` path: 404 in OpenAI's shape; nothing is forwarded unbilled."""
    raise NotFoundError(f"Invalid URL ({request.method} {request.path})", code="unknown_url")


async def handle_unmatched(request: web.Request) -> web.Response:
    """Any path outside ``/v1`` that no route serves: 405 when the path is served for other
    methods, else 404 (both in OpenAI's envelope, by ``runtime.errors.answer_errors``)."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not this:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()
