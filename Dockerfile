# The gateway and admin service: `creditgate serve` (gateway on 8080, admin API on 8081).
# Configuration comes from the environment (DATABASE_URL, REDIS_URL, UPSTREAM_API_KEY, ...);
# run `creditgate migrate` once per release, e.g. `docker run --rm IMAGE creditgate migrate`
# (docker-compose.yml runs it before `serve`, with MIGRATION_SNAPSHOT_DIR set).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pg_dump for `creditgate migrate`'s snapshot before a migration (MIGRATION_SNAPSHOT_DIR),
# from PostgreSQL's own apt repository: pg_dump must be at least the server's version
# (docker-compose.yml runs postgres:16; Debian's own client is older).
ARG PG_CLIENT_VERSION=16
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-common ca-certificates \
    && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
    && apt-get install -y --no-install-recommends "postgresql-client-${PG_CLIENT_VERSION}" \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# README.md* : the glob lets the build go on while the README does not exist yet.
COPY pyproject.toml README.md* ./
# Production packages only; devtools/ (simulated upstream, local services), tests/ and bench/
# stay out. migrations/ ships inside the wheel as creditgate.migrations (package data).
COPY creditgate/ creditgate/
COPY runtime/ runtime/
COPY gateway/ gateway/
COPY billing/ billing/
COPY admin_api/ admin_api/
COPY migrations/ migrations/
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin creditgate \
    && install -d -o creditgate -g creditgate /var/lib/creditgate/snapshots
USER creditgate
WORKDIR /app

# Inside the container both services listen on every interface; publish 8081 (admin) only
# where admins can reach it, and 9464 (/metrics) only to Prometheus.
ENV HOST=0.0.0.0 \
    ADMIN_HOST=0.0.0.0 \
    PORT=8080 \
    ADMIN_PORT=8081 \
    METRICS_PORT=9464
EXPOSE 8080 8081 9464

CMD ["creditgate", "serve"]
