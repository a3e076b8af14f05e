"""Typed configuration, read from the environment once at start-up.

``Settings.from_env()`` (the services) and ``StoreSettings.from_env()`` (the operator
commands, which need only Postgres and maybe Redis) are the only code that reads the
environment. Each validates every variable it needs and reports all problems in one
``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from billing import live_flags
from billing.live_flags import ChargingPausedMode, FlagDefinition, LiveFlags
from billing.metering.pricing import RoundingMode
from runtime.return_to import url_origin

_T = TypeVar("_T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(Exception):
    """One or more environment variables are missing or malformed; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


#: The Credits page's FAQ answers unless ``CREDITS_REFUND_POLICY_TEXT`` / ``CREDITS_EXPIRY_TEXT``
#: say otherwise.
DEFAULT_REFUND_POLICY_TEXT = (
    "Unused credits are refundable within 14 days of purchase; contact support."
)
DEFAULT_EXPIRY_TEXT = "Credits do not expire."

#: Seconds a derived hold deadline adds to the upstream timeouts (``Settings.hold_deadline_s``).
HOLD_TTL_MARGIN_S = 60.0


@dataclass(frozen=True)
class Settings:
    """Gateway and admin service configuration. Units are in the names."""

    database_url: str
    redis_url: str
    upstream_api_key: str
    # DATABASE_REPLICA_URL: a read-only pool for read traffic (the Credits page's lists,
    # exports, statements; ``runtime.resources.postgres_ctx``); None: DATABASE_URL's pool.
    database_replica_url: str | None = None
    upstream_base_url: str = "https://api.openai.com/v1"
    # The live flags' initial values (``billing.live_flags``; a row of the flags table
    # overrides each): ``initial_flags()``.
    rounding_mode: RoundingMode = live_flags.ROUNDING_MODE.default
    charging_enabled: bool = live_flags.CHARGING_ENABLED.default
    charging_paused_mode: ChargingPausedMode = live_flags.CHARGING_PAUSED_MODE.default
    model_allowlist: frozenset[str] = live_flags.MODEL_ALLOWLIST.default
    low_balance_threshold_credits: int = live_flags.LOW_BALANCE_THRESHOLD_CREDITS.default
    charging_rollout_percent: int = live_flags.CHARGING_ROLLOUT_PERCENT.default
    host: str = "0.0.0.0"
    port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    metrics_port: int = 9464
    metrics_host: str | None = None
    """``METRICS_HOST``: the address ``/metrics`` binds (revenue and liability figures: keep it
    private); None (unset): ``host``. The compose file sets 0.0.0.0 for Prometheus's container."""
    access_log: bool = True
    """``ACCESS_LOG``: one JSON line per billed request on stderr (``creditgate.access``); it
    costs about 25 µs of CPU per request (docs/benchmarks.md, issue 14), so a deployment that
    takes its request logs elsewhere may turn it off."""
    metrics_db_refresh_s: float = 30.0
    """``METRICS_DB_REFRESH_S``: seconds between the admin service's reads of the fleet gauges
    (outstanding credits, today's margin, the latest reconciliation) from Postgres."""
    public_base_url: str = "http://127.0.0.1:8080"
    return_to_origins: frozenset[str] = frozenset()
    """``RETURN_TO_ORIGINS``: origins (``https://app.example.com``) besides our own paths that
    a ``returnTo`` may send the user back to (``runtime.return_to``); empty: paths only."""
    max_body_bytes: int = 4 * 1024 * 1024
    # The HTTP edge (runtime.http_protocol), for the gateway and the admin service alike.
    http_header_timeout_s: float = 60.0
    http_body_timeout_s: float = 120.0
    http_keepalive_timeout_s: float = 75.0
    http_max_connections: int = 4096
    prompt_count_inline_max_bytes: int = 2 * 1024
    prompt_count_threads: int = 2
    hold_ttl_s: float | None = None
    """``HOLD_TTL_S``; None (unset): ``hold_deadline_s`` derives it from the upstream timeouts."""
    auth_cache_ttl_s: float = 5.0
    rate_card_refresh_s: float = 30.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 600.0
    settlement_batch_size: int = 500
    settlement_claim_idle_ms: int = 30_000
    settlement_poster_enabled: bool = True
    sweep_interval_s: float = 5.0
    redis_socket_timeout_s: float = 5.0
    redis_connect_timeout_s: float = 5.0
    redis_cluster: bool = False
    """``REDIS_CLUSTER``: ``REDIS_URL`` names one node of a Redis Cluster (any node; the rest
    are discovered): redis-py's cluster client, and the hot path's ``ClusterChannel``."""
    postgres_command_timeout_s: float = 10.0
    postgres_connect_timeout_s: float = 5.0
    tiktoken_encodings_dir: Path | None = None
    # Stripe (issue: buying credits)
    stripe_api_key: str = ""
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_base: str | None = None
    purchases_enabled: bool = live_flags.PURCHASE_ENABLED.default
    control_refresh_s: float = 1.0
    """``CONTROL_REFRESH_S``: seconds between re-reads of the flags by each process's control
    listener (``runtime.control``), the safety net for a missed event."""
    # The Credits page's FAQ answers, shown as configured (escaped).
    credits_refund_policy_text: str = DEFAULT_REFUND_POLICY_TEXT
    credits_expiry_text: str = DEFAULT_EXPIRY_TEXT
    portal_link_ttl_s: int = 300
    """``PORTAL_LINK_TTL_S``: seconds a portal link (``billing.portal_links``) can be opened."""
    billing_session_ttl_s: int = 43200
    """``BILLING_SESSION_TTL_S``: seconds a billing session (cookie and Redis data) lasts
    from sign-in (``gateway.billing_session``)."""
    workers: int = 1
    """``WORKERS``: worker processes of ``creditgate serve`` sharing the ports (SO_REUSEPORT)
    under one parent (``creditgate.workers``); 1: one process, no parent. Unset: the usable
    cores (``len(os.sched_getaffinity(0))``)."""
    shutdown_timeout_s: float = 30.0
    """``SHUTDOWN_TIMEOUT_S``: seconds in-flight requests and streams get to finish after
    SIGTERM/SIGINT before a process cancels them and exits."""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def hold_deadline_s(self) -> float:
        """Seconds from a hold's placement to its deadline (the sweeper then voids it).

        ``HOLD_TTL_S`` when set; else the longest a request can wait for its upstream before
        the gateway gives up on it (``UPSTREAM_CONNECT_TIMEOUT_S + UPSTREAM_READ_TIMEOUT_S``)
        plus ``HOLD_TTL_MARGIN_S``: a hold whose owner died or lost Redis then frees the
        account's balance soon after its request could still have been running.
        """
        if self.hold_ttl_s is not None:
            return self.hold_ttl_s
        return self.upstream_connect_timeout_s + self.upstream_read_timeout_s + HOLD_TTL_MARGIN_S

    def initial_flags(self) -> LiveFlags:
        """The live flags as the environment sets them (before the flags table's rows)."""
        return LiveFlags(
            purchases_enabled=self.purchases_enabled,
            charging_enabled=self.charging_enabled,
            charging_paused_mode=self.charging_paused_mode,
            rounding_mode=self.rounding_mode,
            model_allowlist=self.model_allowlist,
            low_balance_threshold_credits=self.low_balance_threshold_credits,
            charging_rollout_percent=self.charging_rollout_percent,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); what ``creditgate serve`` needs.

        Raises:
            ConfigError: listing every missing or malformed variable.
        """
        read = _EnvReader(env)
        port = read.integer("PORT", 8080, minimum=1, maximum=65535)
        encodings_dir = read.text("TIKTOKEN_ENCODINGS_DIR")
        if encodings_dir and not Path(encodings_dir).is_dir():
            read.problems.append(f"TIKTOKEN_ENCODINGS_DIR is not a directory: {encodings_dir}")
        settings = cls(
            database_url=read.url("DATABASE_URL", _POSTGRES_SCHEMES),
            database_replica_url=read.optional_url("DATABASE_REPLICA_URL", _POSTGRES_SCHEMES),
            redis_url=read.url("REDIS_URL", _REDIS_SCHEMES),
            upstream_api_key=read.required("UPSTREAM_API_KEY"),
            upstream_base_url=read.url(
                "UPSTREAM_BASE_URL", _HTTP_SCHEMES, default="https://api.openai.com/v1"
            ),
            rounding_mode=read.flag(live_flags.ROUNDING_MODE),
            charging_enabled=read.flag(live_flags.CHARGING_ENABLED),
            charging_paused_mode=read.flag(live_flags.CHARGING_PAUSED_MODE),
            model_allowlist=read.flag(live_flags.MODEL_ALLOWLIST),
            low_balance_threshold_credits=read.flag(live_flags.LOW_BALANCE_THRESHOLD_CREDITS),
            charging_rollout_percent=read.flag(live_flags.CHARGING_ROLLOUT_PERCENT),
            host=read.text("HOST", "0.0.0.0"),
            port=port,
            admin_host=read.text("ADMIN_HOST", "127.0.0.1"),
            admin_port=read.integer("ADMIN_PORT", 8081, minimum=1, maximum=65535),
            metrics_port=read.integer("METRICS_PORT", 9464, minimum=0, maximum=65535),
            metrics_host=read.text("METRICS_HOST") or None,
            access_log=read.boolean("ACCESS_LOG", True),
            metrics_db_refresh_s=read.seconds("METRICS_DB_REFRESH_S", 30.0, minimum=1),
            public_base_url=read.url(
                "PUBLIC_BASE_URL", _HTTP_SCHEMES, default=f"http://127.0.0.1:{port}"
            ),
            return_to_origins=read.origins("RETURN_TO_ORIGINS"),
            max_body_bytes=read.integer("MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024),
            http_header_timeout_s=read.seconds("HTTP_HEADER_TIMEOUT_S", 60.0),
            http_body_timeout_s=read.seconds("HTTP_BODY_TIMEOUT_S", 120.0),
            http_keepalive_timeout_s=read.seconds("HTTP_KEEPALIVE_TIMEOUT_S", 75.0),
            http_max_connections=read.integer("HTTP_MAX_CONNECTIONS", 4096, minimum=1),
            prompt_count_inline_max_bytes=read.integer(
                "PROMPT_COUNT_INLINE_MAX_BYTES", 2 * 1024, minimum=0
            ),
            prompt_count_threads=read.integer("PROMPT_COUNT_THREADS", 2, minimum=1, maximum=64),
            hold_ttl_s=read.optional_seconds("HOLD_TTL_S", minimum=1),
            auth_cache_ttl_s=read.seconds("AUTH_CACHE_TTL_S", 5.0, minimum=0),
            rate_card_refresh_s=read.seconds("RATE_CARD_REFRESH_S", 30.0),
            upstream_connect_timeout_s=read.seconds("UPSTREAM_CONNECT_TIMEOUT_S", 10.0),
            upstream_read_timeout_s=read.seconds("UPSTREAM_READ_TIMEOUT_S", 600.0),
            settlement_batch_size=read.integer("SETTLEMENT_BATCH_SIZE", 500, minimum=1),
            settlement_claim_idle_ms=read.integer("SETTLEMENT_CLAIM_IDLE_MS", 30_000, minimum=100),
            settlement_poster_enabled=read.boolean("SETTLEMENT_POSTER_ENABLED", True),
            sweep_interval_s=read.seconds("SWEEP_INTERVAL_S", 5.0),
            redis_socket_timeout_s=read.seconds("REDIS_SOCKET_TIMEOUT_S", 5.0),
            redis_connect_timeout_s=read.seconds("REDIS_CONNECT_TIMEOUT_S", 5.0),
            redis_cluster=read.boolean("REDIS_CLUSTER", False),
            postgres_command_timeout_s=read.seconds("POSTGRES_COMMAND_TIMEOUT_S", 10.0),
            postgres_connect_timeout_s=read.seconds("POSTGRES_CONNECT_TIMEOUT_S", 5.0),
            tiktoken_encodings_dir=Path(encodings_dir) if encodings_dir else None,
            stripe_api_key=read.text("STRIPE_API_KEY"),
            stripe_webhook_secrets=read.items("STRIPE_WEBHOOK_SECRETS"),
            stripe_api_base=read.text("STRIPE_API_BASE") or None,
            purchases_enabled=read.flag(live_flags.PURCHASE_ENABLED),
            control_refresh_s=read.seconds("CONTROL_REFRESH_S", 1.0),
            credits_refund_policy_text=read.text(
                "CREDITS_REFUND_POLICY_TEXT", DEFAULT_REFUND_POLICY_TEXT
            ),
            credits_expiry_text=read.text("CREDITS_EXPIRY_TEXT", DEFAULT_EXPIRY_TEXT),
            portal_link_ttl_s=read.integer("PORTAL_LINK_TTL_S", 300, minimum=1),
            billing_session_ttl_s=read.integer("BILLING_SESSION_TTL_S", 43200, minimum=60),
            workers=read.integer("WORKERS", len(os.sched_getaffinity(0)), minimum=1, maximum=256),
            shutdown_timeout_s=read.seconds("SHUTDOWN_TIMEOUT_S", 30.0),
        )
        _check_worker_ports(settings, read.problems)
        if settings.redis_cluster:
            read.cluster_url(settings.redis_url)
        read.raise_problems()
        return settings


def _check_worker_ports(settings: Settings, problems: list[str]) -> None:
    """Worker i serves /metrics on ``METRICS_PORT + i``: those ports must exist and not be
    ``PORT`` or ``ADMIN_PORT``."""
    if not settings.metrics_port:
        return
    last = settings.metrics_port + settings.workers - 1
    clash = {settings.port, settings.admin_port} & set(range(settings.metrics_port, last + 1))
    if last > 65535 or clash:
        problems.append(
            f"METRICS_PORT to METRICS_PORT + WORKERS - 1 ({settings.metrics_port}..{last}, one "
            "per worker) must be ports other than PORT and ADMIN_PORT"
        )


@dataclass(frozen=True)
class StoreSettings:
    """What the operator commands (``creditgate`` other than ``serve``) need: Postgres, and
    Redis when ``REDIS_URL`` is set or the command requires it. Units are in the names."""

    database_url: str
    redis_url: str | None = None
    redis_cluster: bool = False
    """``REDIS_CLUSTER``: as ``Settings.redis_cluster``."""
    settlement_claim_idle_ms: int = 30_000
    database_replica_url: str | None = None
    """``DATABASE_REPLICA_URL``: where ``creditgate report`` reads; None: DATABASE_URL."""
    migration_snapshot_dir: Path | None = None
    """``MIGRATION_SNAPSHOT_DIR`` (read for ``creditgate migrate`` only): where ``migrate``
    writes a ``pg_dump --format=custom`` snapshot before applying a pending numbered
    migration; None (unset): no snapshot (development)."""

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        redis_required: bool = False,
        migrating: bool = False,
    ) -> StoreSettings:
        """Read ``DATABASE_URL`` (required), ``REDIS_URL`` (required when ``redis_required``,
        else optional), ``REDIS_CLUSTER``, ``SETTLEMENT_CLAIM_IDLE_MS`` and, when ``migrating``,
        ``MIGRATION_SNAPSHOT_DIR`` from ``env`` (default ``os.environ``); no other variable
        is read.

        Raises:
            ConfigError: listing every missing or malformed variable of these.
        """
        read = _EnvReader(env)
        redis_set = redis_required or bool(read.text("REDIS_URL"))
        settings = cls(
            database_url=read.url("DATABASE_URL", _POSTGRES_SCHEMES),
            redis_url=read.url("REDIS_URL", _REDIS_SCHEMES) if redis_set else None,
            redis_cluster=read.boolean("REDIS_CLUSTER", False),
            settlement_claim_idle_ms=read.integer("SETTLEMENT_CLAIM_IDLE_MS", 30_000, minimum=100),
            database_replica_url=read.optional_url("DATABASE_REPLICA_URL", _POSTGRES_SCHEMES),
            migration_snapshot_dir=read.absolute_path("MIGRATION_SNAPSHOT_DIR")
            if migrating
            else None,
        )
        if settings.redis_cluster and settings.redis_url is not None:
            read.cluster_url(settings.redis_url)
        read.raise_problems()
        return settings


_POSTGRES_SCHEMES = ("postgres://", "postgresql://")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_HTTP_SCHEMES = ("http://", "https://")


class _EnvReader:
    """Reads variables from one environment and collects every problem instead of stopping
    at the first (``raise_problems`` reports them all). Each reader returns its default when
    the variable is unset or blank, or when its value is malformed (then noting a problem)."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self._env = os.environ if env is None else env
        self.problems: list[str] = []

    def raise_problems(self) -> None:
        """Raises: ConfigError: when any variable read so far was missing or malformed."""
        if self.problems:
            raise ConfigError(self.problems)

    def text(self, name: str, default: str = "") -> str:
        """The stripped value, or ``default`` when unset or blank."""
        return self._env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        value = self.text(name)
        if not value:
            self.problems.append(f"{name} is required")
        return value

    def url(self, name: str, schemes: tuple[str, ...], *, default: str = "") -> str:
        """A URL starting with one of ``schemes``, without a trailing slash; required when
        there is no ``default``."""
        value = self.text(name, default)
        if not value:
            self.problems.append(f"{name} is required")
        elif not value.startswith(schemes):
            self.problems.append(f"{name} must start with one of {', '.join(schemes)}")
        return value.rstrip("/")

    def optional_url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        """As ``url``, but None when unset or blank."""
        return self.url(name, schemes) if self.text(name) else None

    def absolute_path(self, name: str) -> Path | None:
        """An absolute filesystem path, or None when unset or blank (or relative, then
        noting a problem)."""
        value = self.text(name)
        if not value:
            return None
        if not Path(value).is_absolute():
            self.problems.append(f"{name} must be an absolute path, got {value!r}")
            return None
        return Path(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name).lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        if value:
            self.problems.append(f"{name} must be true or false, got {self._env[name]!r}")
        return default

    def cluster_url(self, url: str) -> None:
        """Note a ``REDIS_URL`` that cannot name a Redis Cluster node (with ``REDIS_CLUSTER``):
        a Unix socket, or a database other than 0 (a cluster has only 0)."""
        if url.startswith("unix://"):
            self.problems.append("REDIS_CLUSTER needs a redis:// or rediss:// REDIS_URL")
        elif urlsplit(url).path.strip("/") not in ("", "0"):
            self.problems.append("REDIS_CLUSTER: REDIS_URL must name database 0 (or none)")

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        return int(self._number(name, default, int, minimum, maximum))

    def seconds(self, name: str, default: float, *, minimum: float = 0.1) -> float:
        return float(self._number(name, default, float, minimum, None))

    def optional_seconds(self, name: str, *, minimum: float = 0.1) -> float | None:
        """Seconds, or None when unset or blank (or malformed, then noting a problem)."""
        if not self.text(name):
            return None
        return self.seconds(name, 0.0, minimum=minimum)

    def _number(
        self,
        name: str,
        default: float,
        kind: type[int] | type[float],
        minimum: float,
        maximum: float | None,
    ) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = kind(raw)
        except ValueError:
            self.problems.append(f"{name} must be a {kind.__name__}, got {self._env[name]!r}")
            return default
        if value < minimum:
            self.problems.append(f"{name} must be >= {minimum}, got {self._env[name]!r}")
            return default
        if maximum is not None and value > maximum:
            self.problems.append(f"{name} must be <= {maximum}, got {self._env[name]!r}")
            return default
        return value

    def flag(self, flag: FlagDefinition[_T]) -> _T:
        """A live flag's initial value from its variable (``flag.env``), read and validated
        as the flag's kind says (``billing.live_flags``); its default when unset or blank."""
        raw = self.text(flag.env)
        if not raw:
            return flag.default
        try:
            return flag.kind.from_text(raw)
        except ValueError as exc:
            self.problems.append(f"{flag.env} {exc}, got {self._env[flag.env]!r}")
            return flag.default

    def origins(self, name: str) -> frozenset[str]:
        """A comma-separated list of http(s) origins (scheme, host, optional port; no path),
        normalized as ``runtime.return_to.url_origin`` spells them."""
        found = set()
        for item in self.items(name):
            origin = url_origin(item)
            parts = urlsplit(item)
            if origin is None or parts.path not in ("", "/") or parts.query or parts.fragment:
                self.problems.append(
                    f"{name} must list origins like https://app.example.com, got {item!r}"
                )
            else:
                found.add(origin)
        return frozenset(found)

    def items(self, name: str) -> tuple[str, ...]:
        """A comma-separated list, each item stripped, empty items dropped, order kept."""
        return tuple(item.strip() for item in self._env.get(name, "").split(",") if item.strip())
