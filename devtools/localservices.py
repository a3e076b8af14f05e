"""Real PostgreSQL and Redis servers on 127.0.0.1, with their files in a directory we choose.

Used by the test fixtures (throwaway servers in temporary directories) and by ``make run``
(persistent servers under ``.data/``). Nothing happens at import time.

PostgreSQL refuses to run as root. When we are root, every PostgreSQL server command runs as
the ``postgres`` user (created by Debian's ``postgresql`` package) through ``runuser``, and the
server's directory is handed to that user. Redis runs as whoever we are.

A server started here ends with the process that started it, however that ends: ``stop()``,
``atexit``, or, when the process is killed (SIGTERM from a CI timeout, SIGKILL), a watchdog
process that stops the server then. The exception is a persistent PostgreSQL (``make run``): it
outlives a killed run, and the next ``start_postgres(..., persistent=True)`` adopts it.

Run as ``python -m devtools.localservices COMMAND...``, this module is that watchdog.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_PG_USER = "postgres"
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 60.0
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 30
# Redis Cluster's bus listens on the client port + 10,000, which must be a valid port.
_CLUSTER_BUS_PORT_OFFSET = 10_000
_MAX_CLUSTER_PORT = 65_535 - _CLUSTER_BUS_PORT_OFFSET
# A Unix socket path holds at most 107 bytes; PostgreSQL appends "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 90


class LocalServiceError(RuntimeError):
    """A local PostgreSQL or Redis server could not be found, started or stopped.

    Attributes:
        log_path: the server's log file, whose last lines end the message; None when the
            failure came before the server wrote one.
    """

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        if log_path is not None:
            message += f"\n--- last lines of {log_path} ---\n{_tail(log_path)}"
        super().__init__(message)
        self.log_path = log_path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it).

    Another process may take it before the caller binds it; the servers started here fail
    loudly when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_pg_bindir() -> Path:
    """The directory of the newest installed PostgreSQL server's programs (initdb, pg_ctl).

    Looks in Debian's ``/usr/lib/postgresql/<version>/bin``, then for ``pg_ctl`` on PATH.

    Raises:
        LocalServiceError: no PostgreSQL server is installed.
    """
    found = [
        (_version_key(bindir.parent.name), bindir)
        for bindir in Path("/usr/lib/postgresql").glob("*/bin")
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()
    ]
    if found:
        return max(found)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        return Path(pg_ctl).resolve().parent
    raise LocalServiceError(
        "PostgreSQL server programs not found in /usr/lib/postgresql/*/bin or on PATH; "
        "install them with `apt-get install postgresql` (or run `make system-deps`)"
    )


def unreachable_ancestor(path: Path) -> Path | None:
    """The first existing directory on the way to ``path`` that the postgres user cannot enter.

    Only matters when we are root (PostgreSQL then runs as ``postgres``), for instance with a
    checkout under ``/root`` (mode 0700); otherwise always None. Checks permission bits only,
    not ACLs.

    Raises:
        LocalServiceError: running as root and there is no ``postgres`` user.
    """
    if os.geteuid() != 0:
        return None
    user = _postgres_user()
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    path = path.resolve()
    for directory in [*reversed(path.parents), path]:
        try:
            info = directory.stat()
        except FileNotFoundError:
            return None  # created by us below here, so reachable
        if info.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None


class PostgresServer:
    """A PostgreSQL server on 127.0.0.1 whose files all live in ``base_dir``.

    Layout: ``base_dir/pgdata`` (the cluster), ``base_dir/postgres.log``, and the Unix socket
    in ``base_dir`` itself. Superuser ``postgres`` with trust authentication: for tests and
    development only.
    """

    def __init__(self, *, bindir: Path, base_dir: Path, port: int) -> None:
        self.bindir = bindir
        self.base_dir = base_dir
        self.port = port
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        """The cluster directory (PGDATA)."""
        return self.base_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        """The server log, appended to across restarts."""
        return self.base_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """Connection URL of the ``postgres`` database as the superuser."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """Connection URL of another database on this server, as the superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def is_running(self) -> bool:
        """Whether a server runs on this data directory (``pg_ctl status``)."""
        return _pg_running(self.bindir, self.data_dir)

    def stop(self) -> None:
        """Stop the server with a fast shutdown (open transactions roll back); no-op if stopped.

        Raises:
            LocalServiceError: ``pg_ctl stop`` failed or took over 60 s.
        """
        atexit.unregister(self.stop)
        _dismiss(self._watchdog)
        if not self.is_running():
            return
        result = _run_pg(self._stop_command(), cwd=self.base_dir)
        if result.returncode != 0:
            raise LocalServiceError(
                f"pg_ctl stop failed: {result.stdout}{result.stderr}", log_path=self.log_path
            )

    def _stop_command(self) -> list[str]:
        return [
            *(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir)),
            *("-m", "fast", "-w", "-t", str(int(_STOP_TIMEOUT_S)), "stop"),
        ]


def start_postgres(
    base_dir: Path, port: int | None = None, *, fast: bool = False, persistent: bool = False
) -> PostgresServer:
    """Start a PostgreSQL server whose files live in ``base_dir``, running initdb first if needed.

    Returns once the server accepts TCP connections on 127.0.0.1.

    Args:
        base_dir: created if missing; when we are root it is handed to the postgres user.
        port: TCP port on 127.0.0.1; None picks a free one.
        fast: fsync, synchronous_commit and full_page_writes off; for data that may die with
            the machine (tests).
        persistent: the data outlive this process (``make run``). A server already running on
            ``base_dir/pgdata`` is adopted when it listens on ``port`` (or ``port`` is None);
            without this flag, or on another port, it is stopped and started afresh. Without
            this flag a watchdog stops the server if this process is killed.

    Raises:
        LocalServiceError: PostgreSQL or ``runuser`` missing, the postgres user cannot reach
            ``base_dir``, or initdb or the start failed (the message ends with the log's tail).
    """
    bindir = find_pg_bindir()
    base_dir = base_dir.resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _hand_to_postgres_user(base_dir)
    data_dir = base_dir / "pgdata"
    if _pg_running(bindir, data_dir):
        running_port = _postmaster_port(data_dir)
        if persistent and port in (None, running_port):
            adopted = PostgresServer(bindir=bindir, base_dir=base_dir, port=running_port)
            _wait_for_postgres(adopted)
            return adopted
        PostgresServer(bindir=bindir, base_dir=base_dir, port=running_port).stop()

    server = PostgresServer(bindir=bindir, base_dir=base_dir, port=port or free_port())
    if not (data_dir / "PG_VERSION").is_file():
        _initdb(server, fast=fast)
    _pg_ctl_start(server, fast=fast)
    atexit.register(server.stop)
    if not persistent:
        server._watchdog = _start_watchdog(_as_pg_user(server._stop_command()))
    try:
        _wait_for_postgres(server)
    except BaseException:
        server.stop()
        raise
    return server


class RedisServer:
    """A Redis server on 127.0.0.1 with its config, append-only file and log in one directory."""

    def __init__(self, *, port: int, base_dir: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.base_dir = base_dir
        self.log_path = base_dir / "redis.log"
        self._process = process
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Connection URL of logical database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server: SIGTERM (Redis syncs its append-only file and exits), SIGKILL after
        60 s; a no-op once stopped."""
        atexit.unregister(self.stop)
        _dismiss(self._watchdog)
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def start_redis(
    base_dir: Path,
    port: int | None = None,
    *,
    appendonly: bool = True,
    cluster_node_timeout_ms: int | None = None,
) -> RedisServer:
    """Start ``redis-server`` with a generated config, its files in ``base_dir``.

    Returns once the server answers PING. The config binds 127.0.0.1, never evicts keys
    (``maxmemory-policy noeviction``: holds must not vanish), and takes no RDB snapshots.

    Args:
        base_dir: created if missing; holds ``redis.conf``, ``redis.log`` and the
            append-only file.
        port: TCP port on 127.0.0.1; None picks a free one.
        appendonly: log every write to the append-only file, fsynced every second.
        cluster_node_timeout_ms: a Redis Cluster node (``cluster-enabled yes``, its state in
            ``base_dir/nodes.conf``) that counts a peer silent this long as failing; None:
            a standalone server. ``start_redis_cluster`` joins such nodes into a cluster.

    Raises:
        LocalServiceError: ``redis-server`` missing, or it exited or did not answer within 60 s
            (the message ends with the log's tail), e.g. because the port is taken.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise LocalServiceError(
            "redis-server not found on PATH; install it with `apt-get install redis-server` "
            "(or run `make system-deps`)"
        )
    base_dir = base_dir.resolve()
    base_dir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    config_path = base_dir / "redis.conf"
    config = _redis_config(base_dir, port, appendonly=appendonly)
    if cluster_node_timeout_ms is not None:
        config += _redis_cluster_config(cluster_node_timeout_ms)
    config_path.write_text(config, encoding="utf-8")
    with (base_dir / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            [executable, str(config_path)],
            cwd=base_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches only our process, which stops
            # Redis after the clients that still write to it.
            process_group=0,
        )
    server = RedisServer(port=port, base_dir=base_dir, process=process)
    atexit.register(server.stop)
    server._watchdog = _start_watchdog(["kill", "-TERM", str(process.pid)])
    try:
        _wait_for_redis(server, process)
    except BaseException:
        server.stop()
        raise
    return server


class LocalRedisCluster:
    """A Redis Cluster on 127.0.0.1: masters with their replicas, one ``RedisServer`` each.

    Which node is a master changes under a failover; ask the cluster (``CLUSTER NODES``),
    not the start order.
    """

    def __init__(self, nodes: list[RedisServer], *, cluster_node_timeout_ms: int) -> None:
        self.nodes = nodes
        self.cluster_node_timeout_ms = cluster_node_timeout_ms

    @property
    def url(self) -> str:
        """Connection URL of one node (any node leads a cluster client to the others)."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        """Every node's port, in start order."""
        return [node.port for node in self.nodes]

    def stop(self) -> None:
        """Stop every node (see ``RedisServer.stop``); a no-op once stopped."""
        for node in self.nodes:
            node.stop()

    def restart(self, port: int) -> RedisServer:
        """Start the stopped node of ``port`` again on its files: it rejoins the cluster
        (its ``nodes.conf``), as a replica if its slots were taken over meanwhile.

        Raises:
            LocalServiceError: it did not start (``start_redis``).
        """
        index = self.ports.index(port)
        old = self.nodes[index]
        old.stop()
        self.nodes[index] = start_redis(
            old.base_dir,
            port,
            appendonly=False,
            cluster_node_timeout_ms=self.cluster_node_timeout_ms,
        )
        return self.nodes[index]


def start_redis_cluster(
    base_dir: Path,
    masters: int = 3,
    replicas_per_master: int = 1,
    *,
    cluster_node_timeout_ms: int = 2000,
) -> LocalRedisCluster:
    """Start ``masters * (1 + replicas_per_master)`` cluster nodes on free loopback ports and
    join them with ``redis-cli --cluster create`` (the slots split evenly over the masters).

    Returns once every node reports ``cluster_state:ok``, sees every node, and every replica's
    link to its master is up (so a ``CLUSTER FAILOVER`` can start at once). Each node's files
    live in ``base_dir/node-PORT`` (configured as in ``start_redis``, no append-only file).

    Args:
        masters: 3 at least (Redis Cluster's minimum for ``--cluster create``).
        cluster_node_timeout_ms: how long a silent node has before the others fail it over.

    Raises:
        LocalServiceError: ``redis-server`` or ``redis-cli`` missing, a node did not start,
            the create command failed, or the cluster was not ready within 60 s.
    """
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        raise LocalServiceError(
            "redis-cli not found on PATH; install it with `apt-get install redis-tools`"
        )
    base_dir = base_dir.resolve()
    nodes: list[RedisServer] = []
    cluster = LocalRedisCluster(nodes, cluster_node_timeout_ms=cluster_node_timeout_ms)
    try:
        for _ in range(masters * (1 + replicas_per_master)):
            port = free_cluster_port()
            nodes.append(
                start_redis(
                    base_dir / f"node-{port}",
                    port,
                    appendonly=False,
                    cluster_node_timeout_ms=cluster_node_timeout_ms,
                )
            )
        create = [
            *(redis_cli, "--cluster", "create"),
            *(f"127.0.0.1:{node.port}" for node in nodes),
            *("--cluster-replicas", str(replicas_per_master), "--cluster-yes"),
        ]
        result = subprocess.run(
            create, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise LocalServiceError(f"redis-cli --cluster create failed:\n{result.stdout}")
        wait_for_redis_cluster(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_for_redis_cluster(cluster: LocalRedisCluster, timeout_s: float = _START_TIMEOUT_S) -> None:
    """Wait until every running node says ``cluster_state:ok``, knows every running node,
    agrees with the others on which master serves which slots, and (a replica) has its master
    link up: after a create, a failover or a slot migration.

    Raises:
        LocalServiceError: not so within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while not _redis_cluster_ready(cluster):
        if time.monotonic() > deadline:
            raise LocalServiceError(
                f"Redis Cluster on ports {cluster.ports} not ready within {timeout_s:.0f} s"
            )
        time.sleep(_POLL_INTERVAL_S)


def _redis_cluster_ready(cluster: LocalRedisCluster) -> bool:
    running = [node for node in cluster.nodes if node._process.poll() is None]
    views: set[frozenset[tuple[str, bool, str]]] = set()  # each node's (node, master?, slots)
    for node in running:
        with _redis_client(node.port) as client:
            try:
                info = client.cluster("INFO")
                known = client.cluster("NODES")
                replication = client.info("replication")
            except redis.RedisError:
                return False
        if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) < len(running):
            return False
        if any("fail" in peer["flags"] for peer in known.values()):  # fail or fail? (pfail)
            return False
        if replication["role"] == "slave" and replication["master_link_status"] != "up":
            return False
        views.add(
            frozenset(
                (address, "master" in peer["flags"], str(peer["slots"]))
                for address, peer in known.items()
            )
        )
    return len(views) == 1  # every node agrees who is a master and serves which slots


# --- PostgreSQL steps ------------------------------------------------------------------------


def _postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_PG_USER)
    except KeyError:
        raise LocalServiceError(
            "running as root, so PostgreSQL must run as the `postgres` user, which does not "
            "exist; `apt-get install postgresql` creates it"
        ) from None


def _hand_to_postgres_user(base_dir: Path) -> None:
    user = _postgres_user()
    if shutil.which("runuser") is None:
        raise LocalServiceError(
            "running as root needs `runuser` (util-linux) to run PostgreSQL as `postgres`"
        )
    os.chown(base_dir, user.pw_uid, user.pw_gid)
    blocked = unreachable_ancestor(base_dir)
    if blocked is not None:
        raise LocalServiceError(
            f"PostgreSQL runs as the postgres user, who cannot enter {blocked} "
            f"(mode {stat.filemode(blocked.stat().st_mode)}); put {base_dir} elsewhere "
            f"or allow traversal with `chmod o+x {blocked}`"
        )


def _run_pg(args: list[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program, as the postgres user when we are root."""
    return subprocess.run(
        _as_pg_user(args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def _as_pg_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", _PG_USER, "--", *args] if os.geteuid() == 0 else args


def _pg_running(bindir: Path, data_dir: Path) -> bool:
    if not (data_dir / "PG_VERSION").is_file():
        return False
    # pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
    status = _run_pg([str(bindir / "pg_ctl"), "-D", str(data_dir), "status"], cwd=data_dir.parent)
    return status.returncode == 0


def _postmaster_port(data_dir: Path) -> int:
    # postmaster.pid, line 4: the port (documented in PostgreSQL's pidfile.h).
    lines = (data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
    return int(lines[3])


def _initdb(server: PostgresServer, *, fast: bool) -> None:
    args = [
        *(str(server.bindir / "initdb"), "-D", str(server.data_dir)),
        *("-A", "trust", "-U", "postgres", "--encoding=UTF8", "--locale=C"),
    ]
    if fast:
        args.append("--no-sync")
    result = _run_pg(args, cwd=server.base_dir)
    if result.returncode != 0:
        raise LocalServiceError(f"initdb failed:\n{result.stdout}{result.stderr}")


def _pg_ctl_start(server: PostgresServer, *, fast: bool) -> None:
    socket_dir = str(server.base_dir)
    if len(socket_dir) > _MAX_SOCKET_DIR_LEN:
        socket_dir = ""  # TCP only; a longer path cannot hold the socket
    options = [
        *("-p", str(server.port)),
        *("-c", "listen_addresses=127.0.0.1"),
        *("-c", f"unix_socket_directories={socket_dir}"),
        *("-c", "max_connections=200"),
    ]
    if fast:
        options += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
        options += ["-c", "full_page_writes=off"]
    result = _run_pg(
        [
            *(str(server.bindir / "pg_ctl"), "-D", str(server.data_dir)),
            *("-l", str(server.log_path), "-w", "-t", str(int(_START_TIMEOUT_S))),
            # pg_ctl hands these to /bin/sh, hence the shell quoting.
            *("-o", shlex.join(options), "start"),
        ],
        cwd=server.base_dir,
    )
    if result.returncode != 0:
        raise LocalServiceError(
            f"pg_ctl start on port {server.port} failed: {result.stdout}{result.stderr}",
            log_path=server.log_path,
        )


def _wait_for_postgres(server: PostgresServer) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    pg_isready = [
        *(str(server.bindir / "pg_isready"), "-q", "-h", "127.0.0.1"),
        *("-p", str(server.port), "-U", "postgres", "-d", "postgres", "-t", "1"),
    ]
    while True:
        result = subprocess.run(pg_isready, stdin=subprocess.DEVNULL, check=False)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise LocalServiceError(
                f"PostgreSQL did not accept connections on 127.0.0.1:{server.port} "
                f"within {_START_TIMEOUT_S:.0f} s",
                log_path=server.log_path,
            )
        time.sleep(_POLL_INTERVAL_S)


# --- Redis steps -----------------------------------------------------------------------------


def _redis_config(base_dir: Path, port: int, *, appendonly: bool) -> str:
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            f'dir "{base_dir}"',
            "daemonize no",
            'logfile ""',
            'save ""',
            f"appendonly {'yes' if appendonly else 'no'}",
            "appendfsync everysec",
            "maxmemory-policy noeviction",
            "",
        ]
    )


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10,000, so at most 55,535) is free too."""
    while True:
        port = free_port()
        if port > _MAX_CLUSTER_PORT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + _CLUSTER_BUS_PORT_OFFSET))
            except OSError:
                continue
        return port


def _redis_cluster_config(node_timeout_ms: int) -> str:
    return "\n".join(
        [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {node_timeout_ms}",
            # A test cluster on one host: let a replica take over however long it was away.
            "cluster-replica-validity-factor 0",
            "",
        ]
    )


def _redis_client(port: int) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=1,
        socket_timeout=5,
        decode_responses=True,
        retry=Retry(NoBackoff(), retries=0),  # callers poll themselves
    )


def _redis_ping(port: int) -> bool:
    with _redis_client(port) as client:
        try:
            return bool(client.ping())
        except redis.RedisError:  # not listening yet, or still loading its data
            return False


def _wait_for_redis(server: RedisServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _redis_ping(server.port):
        returncode = process.poll()
        if returncode is not None:
            raise LocalServiceError(
                f"redis-server on port {server.port} exited with code {returncode}",
                log_path=server.log_path,
            )
        if time.monotonic() > deadline:
            raise LocalServiceError(
                f"Redis did not answer PING on 127.0.0.1:{server.port} "
                f"within {_START_TIMEOUT_S:.0f} s",
                log_path=server.log_path,
            )
        time.sleep(_POLL_INTERVAL_S)


# --- watchdog --------------------------------------------------------------------------------


def _start_watchdog(stop_command: list[str]) -> subprocess.Popen[bytes]:
    """Start a process that runs ``stop_command`` once this process has ended, however.

    The watchdog blocks reading a pipe whose only writer is this process. The kernel closes
    that end when this process ends, even by SIGKILL, and the read returns. A clean ``stop()``
    kills the watchdog first, so the command never runs twice.
    """
    return subprocess.Popen(
        [sys.executable, "-m", __name__, *stop_command],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # out of reach of a Ctrl-C meant for us
    )


def _dismiss(watchdog: subprocess.Popen[bytes] | None) -> None:
    """End a watchdog without letting it act (the caller stops the server itself)."""
    if watchdog is None:
        return
    if watchdog.poll() is None:
        watchdog.kill()  # before closing its pipe, which would set it off
        watchdog.wait()
    if watchdog.stdin is not None:
        watchdog.stdin.close()


def _watchdog_main(stop_command: list[str]) -> None:
    sys.stdin.buffer.read()  # returns at end of file: the starting process has ended
    subprocess.run(stop_command, stdin=subprocess.DEVNULL, check=False)


# --- helpers ---------------------------------------------------------------------------------


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        return f"(cannot read: {exc})"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


if __name__ == "__main__":
    _watchdog_main(sys.argv[1:])
