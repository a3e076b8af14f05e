"""Key-shaped strings never reach a log line or an error body."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from billing.api_keys import generate_key
from creditgate import serve as serve_module
from runtime.errors import error_response
from runtime.redaction import REDACTED, RedactingFilter, install_redacting_filter, redact
from runtime.settings import Settings

KEY = generate_key()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Bearer {KEY}", f"Authorization: Bearer {REDACTED}"),
        (f"b'Bearer {KEY}xxxx...'.", f"b'Bearer {REDACTED}'."),
        (f"bearer\t{KEY}", f"bearer\t{REDACTED}"),
        (f"GET /v1/{KEY}/x", f"GET /v1/cg_live_{REDACTED}/x"),
        ("cg_admin_abc-DEF_123", f"cg_admin_{REDACTED}"),
        ("key sk-proj-abc123XYZabc123XYZ end", f"key sk-{REDACTED} end"),
        # As aiohttp's parser echoes a header with control characters: escaped, so a letter
        # or digit precedes the key; and keys glued to a word (a header name, a path).
        (f"b'Bearer\\t{KEY}\\x00'", f"b'Bearer\\t{REDACTED}'"),
        (
            f"Invalid header value char: b'\\x00{KEY}'",
            f"Invalid header value char: b'\\x00cg_live_{REDACTED}'",
        ),
        (f"Bad Header{KEY}: x", f"Bad Headercg_live_{REDACTED}: x"),
        (f"/v1/x_{KEY}", f"/v1/x_cg_live_{REDACTED}"),
        (
            "whsec_abc sk_live_1 sk_test_2 rk_live_3 rk_test_4",
            f"whsec_{REDACTED} sk_live_{REDACTED} sk_test_{REDACTED} rk_live_{REDACTED} "
            f"rk_test_{REDACTED}",
        ),
        # Not secrets: words that merely contain a prefix, a publishable Stripe key.
        (
            "task-list ask-me sk-short pk_test_123 cg_live",
            "task-list ask-me sk-short pk_test_123 cg_live",
        ),
    ],
)
def test_redact_replaces_secrets_and_keeps_their_prefix(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.fixture
def stream_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own with one formatting handler, as ``creditgate serve`` has."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def test_filter_redacts_message_arguments_and_traceback(stream_logger) -> None:
    logger, stream = stream_logger
    install_redacting_filter(logger)
    install_redacting_filter(logger)  # a second install adds nothing
    assert len(logger.handlers[0].filters) == 1

    logger.error("bad header %r from %s", f"Bearer {KEY}", "127.0.0.1")
    try:
        raise ValueError(f"Got more than 8190 bytes when reading: b'{KEY}'")
    except ValueError:
        logger.exception("Error handling request")
    logger.warning("no secret here: %d%%", 5)

    text = stream.getvalue()
    assert KEY[len("cg_live_") :] not in text
    assert "bad header 'Bearer [REDACTED]' from 127.0.0.1" in text
    assert f"ValueError: Got more than 8190 bytes when reading: b'cg_live_{REDACTED}'" in text
    assert "no secret here: 5%" in text


def test_child_logger_records_are_redacted_by_the_handler_filter(stream_logger) -> None:
    logger, stream = stream_logger
    install_redacting_filter(logger)
    logger.getChild("aiohttp").error("key %s", KEY)
    assert KEY not in stream.getvalue()


def test_serve_installs_the_filter_on_the_root_handlers(monkeypatch) -> None:
    handler = logging.NullHandler()
    logging.getLogger().addHandler(handler)

    async def no_services(settings: Settings) -> None:
        return None

    monkeypatch.setattr(serve_module, "run_services", no_services)
    try:
        serve_module.serve(Settings(database_url="", redis_url="", upstream_api_key=""))
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    finally:
        logging.getLogger().removeHandler(handler)


def test_error_bodies_are_redacted() -> None:
    response = error_response(404, f"Unknown request URL: GET /{KEY}.")
    assert response.body is not None
    assert KEY not in orjson.loads(response.body)["error"]["message"]
