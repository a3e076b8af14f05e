"""docker-compose.yml, checked without Docker (no daemon in CI): parsed with PyYAML and
compared with the repository and the settings the gateway reads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from runtime.settings import Settings, StoreSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::?(?P<op>[-?])(?P<arg>[^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    """.env.example's variables; the blank (required) ones filled with a sample value."""
    values = {}
    for line in (REPO_ROOT / ".env.example").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip() or "sample1"
    return values


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        found = env.get(match["name"], "")
        if match["op"] == "-" and not found:
            return match["arg"]
        assert found or match["op"] != "?", f"{match['name']} is required and not in .env"
        return found

    return _VARIABLE.sub(one, value).replace("$$", "$")


def _service_env(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {name: _interpolate(str(value), env) for name, value in service["environment"].items()}


class _RecordingEnv(dict[str, str]):
    """An environment that notes every variable read from it."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


def _bind_mounts(compose: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                yield name, source, target


def test_compose_has_the_whole_stack(compose):
    assert set(compose["services"]) >= {
        "migrate",
        "gateway",
        "postgres",
        "redis",
        "prometheus",
        "grafana",
        "backup",
    }
    assert compose["services"]["gateway"]["build"] == "."


def test_every_mounted_host_path_exists_in_the_repository(compose):
    mounts = list(_bind_mounts(compose))
    sources = {source for _, source, _ in mounts}
    assert {
        "./prometheus/prometheus.yml",
        "./prometheus/rules",
        "./grafana/provisioning",
        "./grafana/dashboards",
        "./postgres/pg_hba.conf",
        "./postgres/backup.sh",
        "./postgres/app_role.sql",
    } <= sources
    missing = [(name, source) for name, source, _ in mounts if not (REPO_ROOT / source).exists()]
    assert missing == []


def test_grafana_and_prometheus_mounts_are_where_their_files_expect(compose):
    targets = {(name, source): target for name, source, target in _bind_mounts(compose)}
    assert targets["grafana", "./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert targets["grafana", "./grafana/dashboards"] == "/var/lib/grafana/dashboards"
    assert targets["prometheus", "./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert targets["prometheus", "./prometheus/rules"] == "/etc/prometheus/rules"


def test_redis_keeps_every_write_and_never_evicts(compose):
    command = compose["services"]["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert command[0] == "redis-server"
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "always"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in compose["services"]["redis"]["volumes"])


def test_postgres_archives_wal_into_its_volume_and_commits_synchronously(compose):
    postgres = compose["services"]["postgres"]
    command = postgres["command"]
    assert command[0] == "postgres"
    settings = dict(value.split("=", 1) for value in command[2::2])
    assert set(command[1::2]) == {"-c"}
    assert settings["archive_mode"] == "on"
    assert settings["wal_level"] == "replica"
    assert settings["synchronous_commit"] == "on"
    assert "cp %p /wal-archive/%f" in settings["archive_command"]
    assert "wal-archive:/wal-archive" in postgres["volumes"]
    backup = compose["services"]["backup"]
    assert "wal-archive:/wal-archive" in backup["volumes"]
    assert "backups:/backups" in backup["volumes"]
    assert {"wal-archive", "backups", "pgdata"} <= set(compose["volumes"])


def test_backup_service_takes_daily_base_backups_with_pg_basebackup(compose):
    backup = compose["services"]["backup"]
    assert backup["command"] == ["daily"]
    assert backup["image"] == compose["services"]["postgres"]["image"]  # same major version
    script = (REPO_ROOT / "postgres" / "backup.sh").read_text(encoding="utf-8")
    assert "pg_basebackup" in script
    assert "pg_archivecleanup" in script
    assert int(backup["environment"]["BACKUP_INTERVAL_S"]) == 86400


def test_gateway_environment_names_only_settings_the_gateway_reads(compose, env_example):
    env = _RecordingEnv(_service_env(compose["services"]["gateway"], env_example))
    Settings.from_env(env)  # valid as configured: raises ConfigError otherwise
    assert set(env) - env.read == set()


def test_migrate_environment_names_only_what_migrate_and_psql_read(compose, env_example):
    migrate = compose["services"]["migrate"]
    env = _RecordingEnv(_service_env(migrate, env_example))
    StoreSettings.from_env(env, migrating=True)
    assert set(env) - env.read == {"APP_DB_PASSWORD"}  # psql's, for postgres/app_role.sql
    assert env["MIGRATION_SNAPSHOT_DIR"] in {volume.split(":")[1] for volume in migrate["volumes"]}


def test_gateway_ports_match_the_settings_defaults(compose, env_example):
    gateway = compose["services"]["gateway"]
    env = _service_env(gateway, env_example)
    settings = Settings.from_env(env)
    defaults = Settings(database_url="", redis_url="", upstream_api_key="")
    assert (settings.port, settings.admin_port, settings.metrics_port) == (
        defaults.port,
        defaults.admin_port,
        defaults.metrics_port,
    )
    published = {port.rsplit(":", 1)[1] for port in gateway["ports"]}
    assert published == {str(defaults.port), str(defaults.admin_port)}
    assert "127.0.0.1:8081:8081" in gateway["ports"]  # the admin service stays private
    # One /metrics port per worker (docs/design.md, "Workers").
    assert settings.workers == 2
    assert gateway["expose"] == [str(defaults.metrics_port + i) for i in range(settings.workers)]
    assert settings.host == settings.admin_host == "0.0.0.0"
    assert settings.metrics_host == "0.0.0.0"  # Prometheus scrapes from its own container
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"


def test_dependencies_wait_for_healthy_services(compose):
    services = compose["services"]
    assert services["gateway"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        # the `cluster` profile's one-shot create job, when that profile runs
        "redis-cluster-create": {"condition": "service_completed_successfully", "required": False},
    }
    for name, service in services.items():
        for needed, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits on {needed}"
    assert all("healthcheck" in services[name] for name in ("gateway", "postgres", "redis"))


def test_env_example_documents_every_variable_compose_reads(env_example):
    text = (REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    used = {match["name"] for match in _VARIABLE.finditer(text)}
    assert used - set(env_example) == set()


def test_the_image_ships_a_pg_dump_as_new_as_the_compose_server(compose):
    # pg_dump refuses to dump a server newer than itself: creditgate migrate's snapshot
    # (MIGRATION_SNAPSHOT_DIR, set by the compose file) needs the server's major version.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    client = re.search(r"^ARG PG_CLIENT_VERSION=(\d+)$", dockerfile, re.MULTILINE)
    assert client is not None
    assert '"postgresql-client-${PG_CLIENT_VERSION}"' in dockerfile
    server = compose["services"]["postgres"]["image"]
    assert server == f"postgres:{client[1]}"
    snapshots = compose["services"]["migrate"]["environment"]["MIGRATION_SNAPSHOT_DIR"]
    assert f"install -d -o creditgate -g creditgate {snapshots}" in dockerfile


def _app_role() -> str:
    """The application's role, as the first migration creates it."""
    sql = (REPO_ROOT / "migrations" / "0001_create_money_path.sql").read_text(encoding="utf-8")
    found = re.search(r"CREATE ROLE (\w+) NOLOGIN;", sql)
    assert found is not None
    return found[1]


def test_the_owner_migrates_and_the_gateway_serves_as_the_application_role(compose, env_example):
    services = compose["services"]
    migrate, gateway = services["migrate"], services["gateway"]
    owner = URL(_service_env(migrate, env_example)["DATABASE_URL"])
    served = URL(_service_env(gateway, env_example)["DATABASE_URL"])
    assert owner.user == env_example["POSTGRES_USER"]
    assert owner.password == env_example["POSTGRES_PASSWORD"]
    assert served.user == _app_role() == "creditgate_app"
    assert served.password == env_example["APP_DB_PASSWORD"]
    assert (served.host, served.port, served.path) == (owner.host, owner.port, owner.path)
    # The gateway no longer migrates (it could not: the role owns nothing); migrate does,
    # then lets the role log in with APP_DB_PASSWORD through postgres/app_role.sql.
    assert gateway["command"] == ["creditgate", "serve"]
    assert migrate["image"] == gateway["image"]
    script = migrate["command"][-1]
    assert migrate["command"][:2] == ["sh", "-c"]
    assert script.startswith("creditgate migrate && psql ")
    assert '-v app_password="$$APP_DB_PASSWORD"' in script
    assert "-v ON_ERROR_STOP=1" in script
    mounted = {target: source for _, source, target in _bind_mounts(compose)}
    target = script.rsplit("-f ", 1)[1].strip()
    assert mounted[target] == "./postgres/app_role.sql"
    sql = (REPO_ROOT / "postgres" / "app_role.sql").read_text(encoding="utf-8")
    assert f"ALTER ROLE {_app_role()} LOGIN PASSWORD :'app_password';" in sql
    # Backups keep the superuser (pg_basebackup needs REPLICATION).
    assert services["backup"]["environment"]["PGUSER"] == "${POSTGRES_USER:-creditgate}"


def test_prometheus_scrapes_every_gateway_replica_on_the_metrics_port(compose, env_example):
    config = yaml.safe_load((REPO_ROOT / "prometheus/prometheus.yml").read_text(encoding="utf-8"))
    [job] = config["scrape_configs"]
    assert "static_configs" not in job  # one static target would see one replica of --scale
    settings = Settings.from_env(_service_env(compose["services"]["gateway"], env_example))
    # One discovery per worker's /metrics port: worker i serves METRICS_PORT + i.
    discoveries = job["dns_sd_configs"]
    for discovery in discoveries:
        assert (discovery["names"], discovery["type"]) == (["gateway"], "A")
    assert [d["port"] for d in discoveries] == [
        settings.metrics_port + i for i in range(settings.workers)
    ]


def _nginx_locations(text: str) -> dict[str, str]:
    """edge/nginx.conf's ``location`` blocks: their match (``= /stripe/webhook``) -> body
    (comments dropped; the blocks nest one level at most)."""
    text = re.sub(r"#[^\n]*", "", text)
    blocks = re.finditer(r"location\s+([^{]+?)\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text)
    return {match[1]: match[2] for match in blocks}


def test_optional_edge_passes_only_the_stripe_webhook_to_the_admin_service(compose):
    from admin_api.stripe_webhook import WEBHOOK_PATH

    edge = compose["services"]["edge"]
    assert edge["profiles"] == ["edge"]  # optional: `docker compose --profile edge up -d`
    targets = {(name, source): target for name, source, target in _bind_mounts(compose)}
    assert targets["edge", "./edge/nginx.conf"] == "/etc/nginx/conf.d/default.conf"
    text = (REPO_ROOT / "edge" / "nginx.conf").read_text(encoding="utf-8")
    defaults = Settings(database_url="", redis_url="", upstream_api_key="")
    locations = _nginx_locations(text)
    assert set(locations) == {f"= {WEBHOOK_PATH}", "/"}
    webhook, rest = locations[f"= {WEBHOOK_PATH}"], locations["/"]
    # Exactly that path, POST only, to the admin port; everything else to the public port.
    assert re.search(r"limit_except\s+POST\s*\{\s*deny all;\s*\}", webhook)
    assert f"gateway:{defaults.admin_port};" in webhook
    assert f"gateway:{defaults.port};" in rest
    assert re.findall(rf":{defaults.admin_port}\b", re.sub(r"#[^\n]*", "", text)) == [
        f":{defaults.admin_port}"
    ]
    assert "proxy_buffering off;" in rest  # streamed completions pass as they come


def test_cluster_profile_is_six_persistent_nodes_a_create_job_and_the_gateway_env(
    compose, env_example
):
    services = compose["services"]
    nodes = [f"redis-node-{n}" for n in range(1, 7)]
    for name in nodes:
        node = services[name]
        assert node["profiles"] == ["cluster"]
        assert node["hostname"] == name
        assert any(volume.endswith(":/data") for volume in node["volumes"])
        flags = node["command"][-1].split()
        for flag, value in (
            ("--cluster-enabled", "yes"),
            ("--appendonly", "yes"),
            ("--appendfsync", "always"),
            ("--maxmemory-policy", "noeviction"),
        ):
            assert flags[flags.index(flag) + 1] == value
    create = services["redis-cluster-create"]
    assert create["profiles"] == ["cluster"]
    assert set(create["depends_on"]) == set(nodes)
    script = create["command"][-1]
    assert "--cluster-replicas 1" in script and "for n in 1 2 3 4 5 6" in script
    # The single Redis stays the default; .env's cluster lines point the gateway at a node.
    cluster_env = {
        **env_example,
        "REDIS_URL": "redis://redis-node-1:6379/0",
        "REDIS_CLUSTER": "true",
    }
    settings = Settings.from_env(_service_env(services["gateway"], cluster_env))
    assert settings.redis_cluster and settings.redis_url == "redis://redis-node-1:6379/0"
    default = Settings.from_env(_service_env(services["gateway"], env_example))
    assert not default.redis_cluster
