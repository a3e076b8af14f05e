"""Typed configuration, read from the environment once at start-up.

``Settings.from_env()`` is the only code that reads the environment. It validates every
variable and reports all problems in one ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from billing.metering.pricing import RoundingMode

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """One or more environment variables are missing or malformed; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """Gateway and admin service configuration. Units are in the names."""

    database_url: str
    redis_url: str
    upstream_api_key: str
    upstream_base_url: str = "https://api.openai.com/v1"
    rounding_mode: RoundingMode = RoundingMode.EXACT
    charging_enabled: bool = True
    model_allowlist: frozenset[str] = frozenset()
    host: str = "0.0.0.0"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    public_base_url: str = "http://127.0.0.1:8080"
    max_body_bytes: int = 4 * 1024 * 1024
    hold_ttl_s: float = 900.0
    auth_cache_ttl_s: float = 5.0
    rate_card_refresh_s: float = 30.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 600.0
    settlement_batch_size: int = 500
    settlement_claim_idle_ms: int = 30_000
    settlement_writer_enabled: bool = True
    sweep_interval_s: float = 5.0
    tiktoken_encodings_dir: Path | None = None
    # Stripe (issue: buying credits)
    stripe_api_key: str = ""
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_base: str | None = None
    purchases_enabled: bool = True
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``).

        Raises:
            ConfigError: listing every missing or malformed variable.
        """
        env = os.environ if env is None else env
        problems: list[str] = []

        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                problems.append(f"{name} is required")
            return value

        def boolean(name: str, default: bool) -> bool:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            value = raw.strip().lower()
            if value in _TRUE:
                return True
            if value in _FALSE:
                return False
            problems.append(f"{name} must be true or false, got {raw!r}")
            return default

        def number(name: str, default: float, *, kind: type = int, minimum: float = 0) -> float:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default
            try:
                value = kind(raw.strip())
            except ValueError:
                problems.append(f"{name} must be a {kind.__name__}, got {raw!r}")
                return default
            if value < minimum:
                problems.append(f"{name} must be >= {minimum}, got {raw!r}")
                return default
            return value

        def url(name: str, default: str | None, schemes: tuple[str, ...]) -> str:
            value = env.get(name, "").strip() or (default or "")
            if not value:
                problems.append(f"{name} is required")
            elif not value.startswith(schemes):
                problems.append(f"{name} must start with one of {', '.join(schemes)}")
            return value.rstrip("/")

        database_url = url("DATABASE_URL", None, ("postgres://", "postgresql://"))
        redis_url = url("REDIS_URL", None, ("redis://", "rediss://", "unix://"))
        upstream_base_url = url(
            "UPSTREAM_BASE_URL", "https://api.openai.com/v1", ("http://", "https://")
        )
        upstream_api_key = required("UPSTREAM_API_KEY")
        rounding_raw = env.get("ROUNDING_MODE", "exact").strip().lower() or "exact"
        try:
            rounding_mode = RoundingMode(rounding_raw)
        except ValueError:
            problems.append(f"ROUNDING_MODE must be 'exact' or 'ceil', got {rounding_raw!r}")
            rounding_mode = RoundingMode.EXACT
        allowlist = frozenset(
            m.strip() for m in env.get("MODEL_ALLOWLIST", "").split(",") if m.strip()
        )
        port = int(number("PORT", 8080, minimum=1))
        admin_port = int(number("ADMIN_PORT", 8081, minimum=1))
        if port > 65535 or admin_port > 65535:
            problems.append("PORT and ADMIN_PORT must be <= 65535")
        encodings_dir = env.get("TIKTOKEN_ENCODINGS_DIR", "").strip()
        if encodings_dir and not Path(encodings_dir).is_dir():
            problems.append(f"TIKTOKEN_ENCODINGS_DIR is not a directory: {encodings_dir}")
        secrets = tuple(
            s.strip() for s in env.get("STRIPE_WEBHOOK_SECRETS", "").split(",") if s.strip()
        )
        public_base_url = url(
            "PUBLIC_BASE_URL", f"http://127.0.0.1:{port}", ("http://", "https://")
        )
        settings = cls(
            database_url=database_url,
            redis_url=redis_url,
            upstream_api_key=upstream_api_key,
            upstream_base_url=upstream_base_url,
            rounding_mode=rounding_mode,
            charging_enabled=boolean("CHARGING_ENABLED", True),
            model_allowlist=allowlist,
            host=env.get("HOST", "0.0.0.0").strip() or "0.0.0.0",
            port=port,
            admin_host=env.get("ADMIN_HOST", "127.0.0.1").strip() or "127.0.0.1",
            admin_port=admin_port,
            public_base_url=public_base_url,
            max_body_bytes=int(number("MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024)),
            hold_ttl_s=float(number("HOLD_TTL_S", 900.0, kind=float, minimum=1)),
            auth_cache_ttl_s=float(number("AUTH_CACHE_TTL_S", 5.0, kind=float)),
            rate_card_refresh_s=float(number("RATE_CARD_REFRESH_S", 30.0, kind=float, minimum=0.1)),
            upstream_connect_timeout_s=float(
                number("UPSTREAM_CONNECT_TIMEOUT_S", 10.0, kind=float, minimum=0.1)
            ),
            upstream_read_timeout_s=float(
                number("UPSTREAM_READ_TIMEOUT_S", 600.0, kind=float, minimum=0.1)
            ),
            settlement_batch_size=int(number("SETTLEMENT_BATCH_SIZE", 500, minimum=1)),
            settlement_claim_idle_ms=int(number("SETTLEMENT_CLAIM_IDLE_MS", 30_000, minimum=100)),
            settlement_writer_enabled=boolean("SETTLEMENT_WRITER_ENABLED", True),
            sweep_interval_s=float(number("SWEEP_INTERVAL_S", 5.0, kind=float, minimum=0.1)),
            tiktoken_encodings_dir=Path(encodings_dir) if encodings_dir else None,
            stripe_api_key=env.get("STRIPE_API_KEY", "").strip(),
            stripe_webhook_secrets=secrets,
            stripe_api_base=env.get("STRIPE_API_BASE", "").strip() or None,
            purchases_enabled=boolean("PURCHASES_ENABLED", True),
        )
        if problems:
            raise ConfigError(problems)
        return settings
