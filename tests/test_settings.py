"""``Settings.from_env``: defaults, parsing, and one error listing every problem."""

from __future__ import annotations

import pytest

from billing.live_flags import ChargingPausedMode, LiveFlags
from billing.metering.pricing import RoundingMode
from runtime.settings import ConfigError, Settings, StoreSettings

REQUIRED = {
    "DATABASE_URL": "postgresql://cg@127.0.0.1:5432/cg",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "UPSTREAM_API_KEY": "sk-upstream",
}


def _problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def test_from_env_empty_lists_all_required_problems_at_once():
    problems = _problems({})
    assert problems == [
        "DATABASE_URL is required",
        "REDIS_URL is required",
        "UPSTREAM_API_KEY is required",
    ]


def test_from_env_many_malformed_values_all_reported():
    env = {
        **REQUIRED,
        "DATABASE_URL": "mysql://db/cg",
        "REDIS_URL": "memcached://cache",
        "PORT": "eighty",
        "CHARGING_ENABLED": "maybe",
        "ROUNDING_MODE": "floor",
        "HOLD_TTL_S": "-1",
        "MAX_BODY_BYTES": "12",
    }
    problems = _problems(env)
    for name in env.keys() - {"UPSTREAM_API_KEY"}:
        assert sum(name in problem for problem in problems) == 1, (name, problems)
    assert len(problems) == 7


def test_from_env_ignores_process_environment_when_given_env(monkeypatch):
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    assert len(_problems({})) == 3


def test_from_env_reads_process_environment_by_default(monkeypatch):
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PORT", "9090")
    assert Settings.from_env().port == 9090


def test_from_env_minimal_env_gives_defaults():
    settings = Settings.from_env(REQUIRED)
    assert settings.port == 8080
    assert settings.host == "0.0.0.0"
    assert settings.upstream_base_url == "https://api.openai.com/v1"
    assert settings.rounding_mode is RoundingMode.EXACT
    assert settings.charging_enabled is True
    assert settings.model_allowlist == frozenset()
    assert settings.public_base_url == "http://127.0.0.1:8080"
    assert settings.max_body_bytes == 4 * 1024 * 1024
    assert settings.database_url == REQUIRED["DATABASE_URL"]
    assert settings.upstream_api_key == "sk-upstream"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", True),
    ],
)
def test_from_env_charging_enabled_parses_booleans(raw, expected):
    assert Settings.from_env({**REQUIRED, "CHARGING_ENABLED": raw}).charging_enabled is expected


@pytest.mark.parametrize("raw", ["2", "enabled", "tru", "nope"])
def test_from_env_bad_boolean_is_a_problem(raw):
    [problem] = _problems({**REQUIRED, "PURCHASES_ENABLED": raw})
    assert "PURCHASES_ENABLED" in problem
    assert repr(raw) in problem


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("exact", RoundingMode.EXACT), ("ceil", RoundingMode.CEIL), (" CEIL ", RoundingMode.CEIL)],
)
def test_from_env_rounding_mode_parses(raw, expected):
    assert Settings.from_env({**REQUIRED, "ROUNDING_MODE": raw}).rounding_mode is expected


@pytest.mark.parametrize("raw", ["floor", "round", "exactly"])
def test_from_env_bad_rounding_mode_is_a_problem(raw):
    [problem] = _problems({**REQUIRED, "ROUNDING_MODE": raw})
    assert "ROUNDING_MODE" in problem
    assert "'exact' or 'ceil'" in problem


def test_from_env_model_allowlist_splits_and_trims():
    env = {**REQUIRED, "MODEL_ALLOWLIST": " gpt-4o , gpt-4o-mini,,"}
    assert Settings.from_env(env).model_allowlist == frozenset({"gpt-4o", "gpt-4o-mini"})


def test_from_env_upstream_base_url_trailing_slash_stripped():
    env = {**REQUIRED, "UPSTREAM_BASE_URL": "http://127.0.0.1:8090/v1/"}
    assert Settings.from_env(env).upstream_base_url == "http://127.0.0.1:8090/v1"


def test_from_env_port_sets_public_base_url_default():
    settings = Settings.from_env({**REQUIRED, "PORT": "9000"})
    assert settings.port == 9000
    assert settings.public_base_url == "http://127.0.0.1:9000"


@pytest.mark.parametrize("raw", ["0", "70000", "-5"])
def test_from_env_port_out_of_range_is_a_problem(raw):
    [problem] = _problems({**REQUIRED, "PORT": raw})
    assert "PORT" in problem


@pytest.mark.parametrize(("raw", "expected"), [(None, 9464), ("0", 0), ("9100", 9100)])
def test_from_env_metrics_port_defaults_and_0_disables(raw, expected):
    env = REQUIRED if raw is None else {**REQUIRED, "METRICS_PORT": raw}
    assert Settings.from_env(env).metrics_port == expected


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("", None), ("10.0.0.5", "10.0.0.5")])
def test_from_env_metrics_host_unset_is_none_meaning_host(raw, expected):
    env = REQUIRED if raw is None else {**REQUIRED, "METRICS_HOST": raw}
    assert Settings.from_env(env).metrics_host == expected


def test_from_env_metrics_port_out_of_range_is_a_problem():
    assert _problems({**REQUIRED, "METRICS_PORT": "65536"}) == [
        "METRICS_PORT must be <= 65535, got '65536'"
    ]


def test_from_env_missing_tiktoken_dir_is_a_problem(tmp_path):
    missing = tmp_path / "nowhere"
    [problem] = _problems({**REQUIRED, "TIKTOKEN_ENCODINGS_DIR": str(missing)})
    assert str(missing) in problem


def test_from_env_webhook_secrets_split_in_order():
    env = {**REQUIRED, "STRIPE_WEBHOOK_SECRETS": "whsec_new, whsec_old"}
    assert Settings.from_env(env).stripe_webhook_secrets == ("whsec_new", "whsec_old")


# -- StoreSettings: the operator commands ------------------------------------------------


def _store_problems(env: dict[str, str], **kwargs: bool) -> list[str]:
    with pytest.raises(ConfigError) as info:
        StoreSettings.from_env(env, **kwargs)
    return info.value.problems


def test_store_settings_need_only_database_url():
    settings = StoreSettings.from_env({"DATABASE_URL": REQUIRED["DATABASE_URL"]})
    assert settings == StoreSettings(database_url=REQUIRED["DATABASE_URL"], redis_url=None)


def test_store_settings_read_redis_url_when_set():
    settings = StoreSettings.from_env({**REQUIRED, "REDIS_URL": "redis://127.0.0.1:6379/0/"})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


def test_store_settings_ignore_what_the_commands_do_not_use():
    env = {"DATABASE_URL": REQUIRED["DATABASE_URL"], "PORT": "eighty", "ROUNDING_MODE": "x"}
    assert StoreSettings.from_env(env).database_url == REQUIRED["DATABASE_URL"]


def test_store_settings_report_every_problem_of_theirs_at_once():
    env = {"DATABASE_URL": "mysql://db", "REDIS_URL": "http://cache", "PORT": "eighty"}
    problems = _store_problems(env)
    assert len(problems) == 2
    assert "DATABASE_URL" in problems[0] and "REDIS_URL" in problems[1]


def test_store_settings_redis_required_lists_it_with_database_url():
    assert _store_problems({}, redis_required=True) == [
        "DATABASE_URL is required",
        "REDIS_URL is required",
    ]
    assert _store_problems({}) == ["DATABASE_URL is required"]


def test_from_env_http_edge_limits_parse_and_default():
    defaults = Settings.from_env(REQUIRED)
    assert (
        defaults.http_header_timeout_s,
        defaults.http_body_timeout_s,
        defaults.http_keepalive_timeout_s,
        defaults.http_max_connections,
    ) == (60.0, 120.0, 75.0, 4096)
    settings = Settings.from_env(
        {
            **REQUIRED,
            "HTTP_HEADER_TIMEOUT_S": "5",
            "HTTP_BODY_TIMEOUT_S": "7",
            "HTTP_KEEPALIVE_TIMEOUT_S": "2.5",
            "HTTP_MAX_CONNECTIONS": "100",
        }
    )
    assert (
        settings.http_header_timeout_s,
        settings.http_body_timeout_s,
        settings.http_keepalive_timeout_s,
        settings.http_max_connections,
    ) == (5.0, 7.0, 2.5, 100)
    problems = _problems({**REQUIRED, "HTTP_MAX_CONNECTIONS": "0", "HTTP_HEADER_TIMEOUT_S": "x"})
    assert len(problems) == 2


def test_from_env_prompt_counting_defaults_read_and_bounds():
    defaults = Settings.from_env(REQUIRED)
    assert (defaults.prompt_count_inline_max_bytes, defaults.prompt_count_threads) == (2048, 2)
    env = {**REQUIRED, "PROMPT_COUNT_INLINE_MAX_BYTES": "0", "PROMPT_COUNT_THREADS": "4"}
    settings = Settings.from_env(env)
    assert (settings.prompt_count_inline_max_bytes, settings.prompt_count_threads) == (0, 4)
    [problem] = _problems({**REQUIRED, "PROMPT_COUNT_THREADS": "0"})
    assert "PROMPT_COUNT_THREADS" in problem


def test_hold_deadline_unset_follows_the_upstream_timeouts():
    settings = Settings.from_env(
        {**REQUIRED, "UPSTREAM_CONNECT_TIMEOUT_S": "5", "UPSTREAM_READ_TIMEOUT_S": "120"}
    )
    assert settings.hold_ttl_s is None
    assert settings.hold_deadline_s == 5 + 120 + 60
    assert Settings.from_env(REQUIRED).hold_deadline_s == 10 + 600 + 60


def test_hold_deadline_set_is_taken_as_is():
    assert Settings.from_env({**REQUIRED, "HOLD_TTL_S": "30"}).hold_deadline_s == 30


def test_redis_timeouts_read_from_env():
    settings = Settings.from_env(
        {**REQUIRED, "REDIS_SOCKET_TIMEOUT_S": "2.5", "REDIS_CONNECT_TIMEOUT_S": "1"}
    )
    assert (settings.redis_socket_timeout_s, settings.redis_connect_timeout_s) == (2.5, 1.0)
    assert _problems({**REQUIRED, "REDIS_SOCKET_TIMEOUT_S": "0"}) == [
        "REDIS_SOCKET_TIMEOUT_S must be >= 0.1, got '0'"
    ]


def test_postgres_timeouts_default_and_read_from_env():
    assert (
        Settings.from_env(REQUIRED).postgres_command_timeout_s,
        Settings.from_env(REQUIRED).postgres_connect_timeout_s,
    ) == (10.0, 5.0)
    settings = Settings.from_env(
        {**REQUIRED, "POSTGRES_COMMAND_TIMEOUT_S": "2.5", "POSTGRES_CONNECT_TIMEOUT_S": "1"}
    )
    assert (settings.postgres_command_timeout_s, settings.postgres_connect_timeout_s) == (2.5, 1.0)
    [problem] = _problems({**REQUIRED, "POSTGRES_COMMAND_TIMEOUT_S": "never"})
    assert "POSTGRES_COMMAND_TIMEOUT_S" in problem


def test_from_env_live_flag_initial_values():
    env = {
        **REQUIRED,
        "CHARGING_PAUSED_MODE": " Block ",
        "LOW_BALANCE_THRESHOLD_CREDITS": "0",
        "CHARGING_ROLLOUT_PERCENT": "25",
        "CONTROL_REFRESH_S": "0.5",
    }
    settings = Settings.from_env(env)
    assert settings.charging_paused_mode is ChargingPausedMode.BLOCK
    assert settings.low_balance_threshold_credits == 0
    assert settings.charging_rollout_percent == 25
    assert settings.control_refresh_s == 0.5
    flags = settings.initial_flags()
    assert (flags.charging_paused_mode, flags.charging_rollout_percent) == (
        ChargingPausedMode.BLOCK,
        25,
    )


def test_from_env_live_flag_defaults():
    flags = Settings.from_env(REQUIRED).initial_flags()
    assert flags == LiveFlags()
    assert (flags.low_balance_threshold_credits, flags.charging_rollout_percent) == (500, 100)


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("CHARGING_PAUSED_MODE", "stop", "must be 'free' or 'block'"),
        ("CHARGING_ROLLOUT_PERCENT", "101", "must be an integer from 0 to 100"),
        ("CHARGING_ROLLOUT_PERCENT", "half", "must be an integer from 0 to 100"),
        ("LOW_BALANCE_THRESHOLD_CREDITS", "-1", "must be an integer from 0 to 1000000000000"),
    ],
)
def test_from_env_bad_live_flag_is_a_problem(name, raw, reason):
    assert _problems({**REQUIRED, name: raw}) == [f"{name} {reason}, got {raw!r}"]


def test_billing_session_ttls_default_and_read_from_env():
    defaults = Settings.from_env(REQUIRED)
    assert (defaults.portal_link_ttl_s, defaults.billing_session_ttl_s) == (300, 43200)
    settings = Settings.from_env(
        {**REQUIRED, "PORTAL_LINK_TTL_S": "60", "BILLING_SESSION_TTL_S": "3600"}
    )
    assert (settings.portal_link_ttl_s, settings.billing_session_ttl_s) == (60, 3600)
    problems = _problems({**REQUIRED, "PORTAL_LINK_TTL_S": "0", "BILLING_SESSION_TTL_S": "soon"})
    assert problems == [
        "PORTAL_LINK_TTL_S must be >= 1, got '0'",
        "BILLING_SESSION_TTL_S must be a int, got 'soon'",
    ]


def test_from_env_database_replica_url_is_optional_and_checked():
    replica = "postgresql://cg@replica.internal:5432/cg"
    assert Settings.from_env(REQUIRED).database_replica_url is None
    assert Settings.from_env(
        {**REQUIRED, "DATABASE_REPLICA_URL": replica}
    ).database_replica_url == (replica)
    stores = StoreSettings.from_env(
        {"DATABASE_URL": REQUIRED["DATABASE_URL"], "DATABASE_REPLICA_URL": replica}
    )
    assert stores.database_replica_url == replica
    problems = _problems({**REQUIRED, "DATABASE_REPLICA_URL": "mysql://cg@replica/cg"})
    assert any("DATABASE_REPLICA_URL must start with" in p for p in problems)
