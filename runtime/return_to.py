"""Where to send a user back to after the Credits page: the one ``returnTo`` validator.

A return target is either a path on our own site (``/dashboard?tab=credits``) or an absolute
``http(s)`` URL whose origin is listed in ``RETURN_TO_ORIGINS`` (``Settings.return_to_origins``;
empty by default, then only paths). Anything else would make the Credits page an open
redirect. Used by the checkout body (``returnTo``/``returnPath``), the portal links and the
402 answer's ``buyCreditsUrl``.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import quote, urlsplit

from aiohttp import web

from runtime.errors import InvalidRequestError

MAX_RETURN_TO_CHARS = 512
RETURN_TO_HEADER = "X-Return-To"
RETURN_TO_QUERY = "returnTo"


def url_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL, lower-cased, default port
    dropped; None when ``url`` is not one (no scheme, no host, user info, bad port)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    default_port = 443 if scheme == "https" else 80
    suffix = f":{port}" if port is not None and port != default_port else ""
    return f"{scheme}://{parts.hostname.lower()}{suffix}"


def _is_site_path(value: str) -> bool:
    return value.startswith("/") and not value.startswith("//")


def validated_return_to(
    value: object, allowed_origins: Collection[str] = (), *, param: str = "returnTo"
) -> str | None:
    """``value`` when it is a safe return target, None when it is None.

    Args:
        value: a path on this site (``/...``, not ``//``) or an absolute http(s) URL;
            at most ``MAX_RETURN_TO_CHARS``, no backslash, no control characters.
        allowed_origins: origins (``https://app.example.com``, as ``url_origin`` spells
            them) an absolute URL may point to; ``Settings.return_to_origins``. Empty:
            paths only.
        param: the request field ``value`` came from, named in the error.

    Raises:
        InvalidRequestError: anything else (400, code ``invalid_return_path``).
    """
    if value is None:
        return None
    if (
        isinstance(value, str)
        and len(value) <= MAX_RETURN_TO_CHARS
        and "\\" not in value
        and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
        and (_is_site_path(value) or url_origin(value) in allowed_origins)
    ):
        return value
    raise InvalidRequestError(
        f"{param} must be a path on this site starting with '/'"
        + (" or a URL on an allowed origin." if allowed_origins else "."),
        param=param,
        code="invalid_return_path",
    )


def buy_credits_url_for(
    request: web.BaseRequest, *, credits_url: str, allowed_origins: Collection[str] = ()
) -> str:
    """``credits_url`` with ``?returnTo=<target>`` when the request names a valid target in
    its ``X-Return-To`` header or ``returnTo`` query parameter (the header wins).

    Called only while building an error answer (``runtime.errors.answer_errors``), so the
    proxy's hot path pays nothing. An invalid target is ignored: never an error of its own.
    """
    target = request.headers.get(RETURN_TO_HEADER) or request.query.get(RETURN_TO_QUERY)
    if not target:
        return credits_url
    try:
        valid = validated_return_to(target, allowed_origins)
    except InvalidRequestError:
        return credits_url
    return f"{credits_url}?{RETURN_TO_QUERY}={quote(str(valid), safe='')}"
