"""The whole stack on this machine: what ``make run`` executes (``python -m devtools.devstack``).

Each step is skipped when the environment already provides what it would:

1. PostgreSQL and Redis on 127.0.0.1, with their data under ``./.data/`` (ports 54329 and
   63799, or PG_PORT and REDIS_PORT), unless DATABASE_URL / REDIS_URL are set. The data persist
   between runs; a PostgreSQL left running by an earlier run that was killed is adopted.
   As root, PostgreSQL runs as the ``postgres`` user; when that user cannot enter the checkout
   (e.g. under ``/root``), PostgreSQL's files go to ``/var/tmp/creditgate-<hash>/`` instead.
2. The simulated OpenAI upstream (``python -m devtools.simulator`` on 127.0.0.1:8090, or
   SIMULATOR_PORT), unless UPSTREAM_API_KEY is set. A banner says so: its answers are
   canned, not a model's.
3. The simulated Stripe (``python -m devtools.stripe_sim`` on 127.0.0.1:8091, or
   STRIPE_SIM_PORT), unless STRIPE_API_KEY is set: the gateway's STRIPE_API_KEY,
   STRIPE_API_BASE and STRIPE_WEBHOOK_SECRETS point at it (a new webhook secret each run), and
   its Checkout page's Pay sends signed webhooks to the admin service. No money moves.
4. ``creditgate migrate``, ``creditgate seed``, and a demo account (demo@example.com, 10,000
   credits) with an API key, kept in ``.data/demo.json`` and reused while that account exists.
5. ``creditgate serve`` on 127.0.0.1:8080 (HOST and PORT override), then copy-paste examples
   and a link that opens the demo account's Credits page.

Stopping: Ctrl-C (or SIGTERM, SIGHUP) stops everything this run started, newest first: the
gateway (while Redis and PostgreSQL are still up, so it can settle requests in flight), the
simulated Stripe, the simulator, Redis, PostgreSQL. The children run in their own process
groups so that a terminal's Ctrl-C reaches only this process, which keeps that order. Killed
outright (SIGKILL), it leaves PostgreSQL running for the next run to adopt (Redis stops, see
``devtools.localservices``), and the gateway and simulators holding their ports, which the next
run names. Data stay in
``.data/``; delete it, once stopped, to start from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

from billing.admin_tokens import find_active_admin_token
from devtools import stripe_sim
from devtools.localservices import (
    LocalServiceError,
    start_postgres,
    start_redis,
    unreachable_ancestor,
)

DATABASE_NAME = "creditgate"
DEMO_EMAIL = "demo@example.com"
DEMO_CREDITS = 10_000
DEFAULT_SIMULATOR_PORT = 8090
SIMULATED_API_KEY = "sk-simulated"
_READY_TIMEOUT_S = 60.0
# aiohttp gives open requests 60 s to finish on shutdown; a little more before SIGKILL.
_GATEWAY_STOP_TIMEOUT_S = 70.0
_SIMULATOR_STOP_TIMEOUT_S = 10.0
_PORTAL_LINK_TIMEOUT_S = 10.0

_SIMULATED_BANNER = """
##########################################################################
##                                                                      ##
##   SIMULATED UPSTREAM -- NO REAL MODEL IS CALLED                      ##
##                                                                      ##
##   UPSTREAM_API_KEY is not set, so the gateway forwards to the local  ##
##   simulator (devtools.simulator on 127.0.0.1). Every answer is       ##
##   canned text and its token counts are rough estimates; credits are  ##
##   still charged for them exactly as for real usage.                  ##
##                                                                      ##
##   For a real upstream: UPSTREAM_API_KEY=sk-... make run              ##
##   (and UPSTREAM_BASE_URL for a server other than OpenAI's).          ##
##                                                                      ##
##########################################################################
"""


class DevstackError(Exception):
    """A step of ``make run`` failed; the message says which and what to do."""


@dataclass(frozen=True)
class _Options:
    """What the environment asks of this run; read once, by ``from_env``."""

    database_url: str | None
    redis_url: str | None
    upstream_api_key: str | None
    stripe_api_key: str | None
    pg_port: int
    redis_port: int
    gateway_port: int
    admin_port: int
    stripe_sim_port: int
    simulator_port: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> _Options:
        """Read DATABASE_URL, REDIS_URL, UPSTREAM_API_KEY, STRIPE_API_KEY, PG_PORT,
        REDIS_PORT, PORT, ADMIN_PORT, STRIPE_SIM_PORT and SIMULATOR_PORT.

        Raises:
            DevstackError: a port variable is not a TCP port number.
        """

        def port(name: str, default: int) -> int:
            raw = env.get(name, "").strip() or str(default)
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise DevstackError(f"{name} must be a TCP port number, got {raw!r}")
            return int(raw)

        return cls(
            database_url=env.get("DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            upstream_api_key=env.get("UPSTREAM_API_KEY") or None,
            stripe_api_key=env.get("STRIPE_API_KEY") or None,
            pg_port=port("PG_PORT", 54329),
            redis_port=port("REDIS_PORT", 63799),
            gateway_port=port("PORT", 8080),
            admin_port=port("ADMIN_PORT", 8081),
            stripe_sim_port=port("STRIPE_SIM_PORT", stripe_sim.DEFAULT_PORT),
            simulator_port=port("SIMULATOR_PORT", DEFAULT_SIMULATOR_PORT),
        )


def main() -> int:
    """Run the stack until Ctrl-C; returns the exit status (the gateway's, if it stops first)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            try:
                return _run(stack, _Options.from_env(os.environ), Path(".data").resolve())
            except KeyboardInterrupt:
                print("\nstopping what `make run` started ...", flush=True)
                return 0
            finally:
                # A second Ctrl-C must not cut the shutdown short and leave servers behind.
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
    except (DevstackError, LocalServiceError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _run(stack: contextlib.ExitStack, options: _Options, data_dir: Path) -> int:
    simulated = options.upstream_api_key is None
    # Checked first: a second `make run` must fail before it adopts (and, failing, stops) the
    # PostgreSQL of a first one that is still running.
    _require_free_port(options.gateway_port, "the gateway")
    if simulated:
        _require_free_port(options.simulator_port, "the upstream simulator")
    if options.stripe_api_key is None:
        _require_free_port(options.stripe_sim_port, "the simulated Stripe")
    if options.redis_url is None:
        _require_free_port(options.redis_port, "Redis")

    data_dir.mkdir(exist_ok=True)
    env = dict(os.environ)
    started: list[str] = []  # what Ctrl-C stops, oldest first
    if options.database_url is None:
        env["DATABASE_URL"] = _start_postgres(stack, data_dir, options.pg_port)
        started.append("PostgreSQL")
    if options.redis_url is None:
        redis_server = start_redis(data_dir / "redis", options.redis_port)
        stack.callback(redis_server.stop)
        env["REDIS_URL"] = redis_server.url
        started.append("Redis")
        print(f"Redis:      {redis_server.url}  (files in {redis_server.base_dir})", flush=True)
    if simulated:
        _start_simulator(stack, env, options.simulator_port)
        started.append("the simulator")
        env["UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{options.simulator_port}/v1"
        env["UPSTREAM_API_KEY"] = SIMULATED_API_KEY
        print(_SIMULATED_BANNER, flush=True)
    if options.stripe_api_key is None:
        env.update(start_stripe_sim(stack, env, options.stripe_sim_port, options.admin_port))
        started.append("the simulated Stripe")

    print(f"migrate:    {json.dumps(_creditgate(env, 'migrate'))}", flush=True)
    print(f"seed:       {json.dumps(_creditgate(env, 'seed'))}", flush=True)
    account_id, key = _demo_key(env, data_dir / "demo.json")
    admin_token = _demo_admin_token(env, data_dir / "demo.json")

    env.setdefault("HOST", "127.0.0.1")
    gateway = subprocess.Popen(
        [str(_console_script()), "serve"], env=env, stdin=subprocess.DEVNULL, process_group=0
    )
    stack.callback(_terminate, gateway, _GATEWAY_STOP_TIMEOUT_S)
    _wait_for_port(gateway, _client_host(env["HOST"]), options.gateway_port, "creditgate serve")
    started.append("the gateway")
    _wait_for_port(gateway, "127.0.0.1", options.admin_port, "the admin service")
    _print_examples(key, options.gateway_port, env, simulated=simulated, started=started)
    _print_admin_examples(admin_token, options.admin_port)
    _print_payments(env, options)
    _print_credits_page(account_id, admin_token, options)
    return gateway.wait()


def _start_postgres(stack: contextlib.ExitStack, data_dir: Path, port: int) -> str:
    """Start (or adopt) the dev PostgreSQL, create the app database; returns its URL."""
    base_dir = data_dir / "postgres"
    if unreachable_ancestor(data_dir) is not None:
        digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
        base_dir = Path("/var/tmp") / f"creditgate-{digest}" / "postgres"
    server = start_postgres(base_dir, port, persistent=True)
    stack.callback(server.stop)
    asyncio.run(_create_database(server.dsn, DATABASE_NAME))
    print(f"PostgreSQL: {server.dsn_for(DATABASE_NAME)}  (files in {base_dir})", flush=True)
    return server.dsn_for(DATABASE_NAME)


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _start_simulator(stack: contextlib.ExitStack, env: dict[str, str], port: int) -> None:
    command = [sys.executable, "-m", "devtools.simulator", "--host", "127.0.0.1"]
    simulator = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        process_group=0,
    )
    stack.callback(_terminate, simulator, _SIMULATOR_STOP_TIMEOUT_S)
    _wait_for_port(simulator, "127.0.0.1", port, "the upstream simulator")


def _demo_key(env: Mapping[str, str], state_path: Path) -> tuple[int, str]:
    """The demo account's id and API key: the saved key while its account exists, else a
    new one.

    ``state_path`` holds ``{"database", "account_id", "key"}``; ``database`` is a digest of
    DATABASE_URL (which may hold a password) so a key is never offered for another database.
    """
    database = hashlib.sha256(env["DATABASE_URL"].encode()).hexdigest()
    account_id = asyncio.run(_account_id_by_email(env["DATABASE_URL"], DEMO_EMAIL))
    saved = _read_json(state_path)
    if (
        account_id is not None
        and saved.get("database") == database
        and saved.get("account_id") == account_id
        and isinstance(saved.get("key"), str)
    ):
        return account_id, str(saved["key"])
    if account_id is None:
        created = _creditgate(
            env, "accounts", "create", "--email", DEMO_EMAIL, "--credits", str(DEMO_CREDITS)
        )
        account_id = int(created["id"])
    key = str(
        _creditgate(env, "keys", "create", "--account", str(account_id), "--name", "demo")["key"]
    )
    state = {"database": database, "account_id": account_id, "key": key}
    state_path.touch(mode=0o600)
    state_path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    return account_id, key


def start_stripe_sim(
    stack: contextlib.ExitStack, env: Mapping[str, str], port: int, admin_port: int
) -> dict[str, str]:
    """Start the simulated Stripe on 127.0.0.1:``port``, its webhooks going to the admin
    service on ``admin_port``, stopped by ``stack``; returns the gateway's Stripe settings
    for it (STRIPE_API_KEY, STRIPE_API_BASE, STRIPE_WEBHOOK_SECRETS: a new secret each run).

    Raises:
        DevstackError: it exited or did not listen within 60 s.
    """
    secret = f"whsec_sim_{secrets.token_hex(16)}"
    webhook_url = f"http://127.0.0.1:{admin_port}/stripe/webhook"
    command = [sys.executable, "-m", "devtools.stripe_sim", "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--webhook-url", webhook_url, "--webhook-secret", secret],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        process_group=0,
    )
    stack.callback(_terminate, process, _SIMULATOR_STOP_TIMEOUT_S)
    _wait_for_port(process, "127.0.0.1", port, "the simulated Stripe")
    return {
        "STRIPE_API_KEY": stripe_sim.TEST_API_KEY,
        "STRIPE_API_BASE": f"http://127.0.0.1:{port}",
        "STRIPE_WEBHOOK_SECRETS": secret,
    }


def _demo_admin_token(env: Mapping[str, str], state_path: Path) -> str:
    """An admin-role token for the admin API: the saved one while it is active in this
    database, else a new one (``creditgate admin create-token``), saved beside the demo key."""
    database = hashlib.sha256(env["DATABASE_URL"].encode()).hexdigest()
    saved = _read_json(state_path)
    token = saved.get("admin_token")
    if (
        saved.get("database") == database
        and isinstance(token, str)
        and asyncio.run(_admin_token_active(env["DATABASE_URL"], token))
    ):
        return token
    token = str(
        _creditgate(env, "admin", "create-token", "--role", "admin", "--name", "make-run")["token"]
    )
    state_path.write_text(
        json.dumps({**saved, "admin_token": token}, indent=2) + "\n", encoding="utf-8"
    )
    return token


async def _admin_token_active(dsn: str, token: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return await find_active_admin_token(conn, token) is not None
    finally:
        await conn.close()


async def _account_id_by_email(dsn: str, email: str) -> int | None:
    conn = await asyncpg.connect(dsn)
    try:
        account_id: int | None = await conn.fetchval(
            "SELECT id FROM accounts WHERE email = $1", email
        )
        return account_id
    finally:
        await conn.close()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _console_script() -> Path:
    """The ``creditgate`` script beside this interpreter (the same virtualenv)."""
    script = Path(sys.executable).parent / "creditgate"
    if not script.is_file():
        raise DevstackError(f"{script} not found; install the package first: `make venv`")
    return script


def _creditgate(env: Mapping[str, str], *args: str) -> dict[str, Any]:
    """Run a ``creditgate`` command to completion; returns the JSON document it printed.

    Raises:
        DevstackError: the command failed or printed something other than a JSON object.
    """
    command = f"creditgate {' '.join(args)}"
    result = subprocess.run(
        [str(_console_script()), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevstackError(f"`{command}` failed (exit {result.returncode}): {result.stdout}")
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise DevstackError(f"`{command}` printed no JSON object: {result.stdout!r}")
    return document


def _require_free_port(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        in_use = sock.connect_ex(("127.0.0.1", port)) == 0
    if in_use:
        raise DevstackError(
            f"port {port}, wanted by {what}, is in use (left over from an earlier run? "
            f"see `ss -ltnp 'sport = :{port}'`)"
        )


def _client_host(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("", "0.0.0.0", "::") else bind_host


def _wait_for_port(process: subprocess.Popen[bytes], host: str, port: int, what: str) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises:
        DevstackError: the process exited first, or 60 s passed.
    """
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        returncode = process.poll()
        if returncode is not None:
            raise DevstackError(f"{what} exited with code {returncode} (its output is above)")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise DevstackError(f"{what} did not listen on {host}:{port} within 60 s")
        time.sleep(0.1)


def _terminate(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (a graceful stop for aiohttp apps), then SIGKILL after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _print_examples(
    key: str, port: int, env: Mapping[str, str], *, simulated: bool, started: list[str]
) -> None:
    base_url = f"http://127.0.0.1:{port}/v1"
    body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
    upstream = "SIMULATED (canned answers, see the banner above)" if simulated else "real"
    print(
        f"""
creditgate is running: {base_url}   upstream: {upstream}

Demo account {DEMO_EMAIL}, API key:

    {key}

curl:

    curl {base_url}/chat/completions -H "Authorization: Bearer {key}" \\
      -H 'Content-Type: application/json' \\
      -d '{body}'

Python (pip install openai):

    from openai import OpenAI
    client = OpenAI(base_url="{base_url}", api_key="{key}")
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]
    )
    print(reply.choices[0].message.content)

The command line, in a second terminal:

    export DATABASE_URL={shlex.quote(env["DATABASE_URL"])} REDIS_URL={shlex.quote(env["REDIS_URL"])}
    .venv/bin/creditgate accounts show 1

Ctrl-C stops {", ".join(reversed(started))}; data stay in .data/.
""",
        flush=True,
    )


def _print_admin_examples(token: str, port: int) -> None:
    print(
        f"""Admin API (README, "Admin API"), admin token (role admin):

    export ADMIN_TOKEN={token}
    curl http://127.0.0.1:{port}/admin/v1/accounts -H "Authorization: Bearer $ADMIN_TOKEN"
""",
        flush=True,
    )


def _print_payments(env: Mapping[str, str], options: _Options) -> None:
    if options.stripe_api_key is None:
        print(
            f"Payments: simulated Stripe at {env['STRIPE_API_BASE']} (no real money; Pay and "
            "Cancel on its Checkout page)\n",
            flush=True,
        )
        return
    mode = (
        "test mode"
        if options.stripe_api_key.startswith(("sk_test_", "rk_test_"))
        else ("LIVE mode: real money")
    )
    webhooks = (
        "webhooks verified with STRIPE_WEBHOOK_SECRETS"
        if env.get("STRIPE_WEBHOOK_SECRETS")
        else "STRIPE_WEBHOOK_SECRETS is not set: webhooks are refused"
    )
    print(
        f"Payments: Stripe {mode} (STRIPE_API_KEY is set); {webhooks}. Forward Stripe's events: "
        f"stripe listen --forward-to http://127.0.0.1:{options.admin_port}/stripe/webhook\n",
        flush=True,
    )


def _print_credits_page(account_id: int, admin_token: str, options: _Options) -> None:
    """A link that opens the demo account's Credits page signed in (a portal link from the
    admin API), or the page's address when this build has no portal links."""
    endpoint = (
        f"http://127.0.0.1:{options.admin_port}/admin/v1/accounts/{account_id}/portal-sessions"
    )
    request = urllib.request.Request(
        endpoint,
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=_PORTAL_LINK_TIMEOUT_S) as response:
            url = str(json.load(response)["url"])
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        print(
            f"Credits page: http://127.0.0.1:{options.gateway_port}/credits "
            f"(sign in there with the demo API key; no portal link: {exc})\n",
            flush=True,
        )
        return
    print(
        f"""Credits page of the demo account: open this link, then click "Continue to your
Credits page" to sign in (single use, expires in minutes):

    {url}

A new link: curl -X POST {endpoint} -H "Authorization: Bearer $ADMIN_TOKEN" \\
    -H 'Content-Type: application/json' -d '{{}}'
""",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
