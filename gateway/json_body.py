"""Request bodies that must be one JSON object: the proxy's and the billing routes'."""

from __future__ import annotations

from typing import Any

import orjson

from runtime.errors import InvalidRequestError


def json_object(raw: bytes, *, empty_is_object: bool = False) -> dict[str, Any]:
    """``raw`` parsed as a JSON object (orjson); with ``empty_is_object`` a blank body is ``{}``.

    Raises:
        InvalidRequestError: not JSON, or not an object (400, ``invalid_json``).
    """
    if empty_is_object and not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return body
