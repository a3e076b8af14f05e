# The gateway and admin service: `creditgate serve` (gateway on 8080, admin API on 8081).
# Configuration comes from the environment (DATABASE_URL, REDIS_URL, UPSTREAM_API_KEY, ...);
# run `creditgate migrate` once per release, e.g. `docker run --rm IMAGE creditgate migrate`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

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

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin creditgate
USER creditgate
WORKDIR /app

# Inside the container both services listen on every interface; publish 8081 (admin) only
# where admins can reach it.
ENV HOST=0.0.0.0 \
    ADMIN_HOST=0.0.0.0 \
    PORT=8080 \
    ADMIN_PORT=8081
EXPOSE 8080 8081

CMD ["creditgate", "serve"]
