"""Where a user may be sent back to after signing in or buying: ``validated_return_to``.

Minimal version (helper "portal"): paths on our own site only. Helper "billing-api" owns
this module and adds absolute URLs whose origin is in ``RETURN_TO_ORIGINS``; its version
replaces this one when merged.
"""

from __future__ import annotations

from runtime.errors import InvalidRequestError

MAX_RETURN_TO_CHARS = 512


def validated_return_to(value: object) -> str | None:
    """``value`` when it is a path on this site (``/...``, not ``//``, no backslash or
    control character, at most ``MAX_RETURN_TO_CHARS``), None when it is None.

    Raises:
        InvalidRequestError: anything else (param ``returnTo``): an open redirect refused.
    """
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or len(value) > MAX_RETURN_TO_CHARS
        or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)
    ):
        raise InvalidRequestError(
            "returnTo must be a path on this site starting with '/'.",
            param="returnTo",
            code="invalid_return_to",
        )
    return value
