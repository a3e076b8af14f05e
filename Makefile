# Developer entry points; `make help` lists them. `make run` and `make test` work on a fresh
# Debian/Ubuntu machine: they install PostgreSQL, Redis, wrk, Chromium (the Credits page's
# browser tests) and Prometheus (promtool, the alert rules' tests) with apt-get when missing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# What ships in the wheel and the image (devtools/, tests/ and bench/ do not).
PRODUCTION := creditgate runtime gateway admin_api billing

.PHONY: help venv system-deps test run lint fmt bench bench-paired bench-workers bench-ledger clean restore-drill

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## Create .venv and install the package with its dev extras

# Re-run when pyproject.toml changes; the stamp marks a finished install.
$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

# Checks for the programs, not the packages: anything already on the machine is left alone.
system-deps: ## Install postgresql, redis-server, wrk, chromium and prometheus (promtool) with apt-get, if missing
	@missing=(); \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
		|| missing+=(postgresql); \
	command -v redis-server >/dev/null || missing+=(redis-server); \
	command -v wrk >/dev/null || missing+=(wrk); \
	command -v chromium >/dev/null || missing+=(chromium); \
	command -v promtool >/dev/null || missing+=(prometheus); \
	if [ $${#missing[@]} -eq 0 ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "warning: no apt-get; install these yourself: $${missing[*]}" >&2; exit 0; \
	fi; \
	sudo=(); [ "$$(id -u)" -eq 0 ] || sudo=(sudo); \
	echo "installing with apt-get: $${missing[*]}"; \
	"$${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	"$${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends "$${missing[@]}"

test: system-deps venv ## Run the tests against throwaway PostgreSQL and Redis (PYTEST_ARGS=...)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

run: system-deps venv ## Run the gateway with local PostgreSQL, Redis and a simulated upstream
	$(VENV)/bin/python -m devtools.devstack

restore-drill: system-deps venv ## Back up a live database under traffic, restore it to a point in time, reconcile the copy
	$(VENV)/bin/python -m devtools.restore_drill

lint: venv ## ruff (complexity <= 10 in production code), ruff format, mypy --strict, import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff check --select C901 --config 'lint.mccabe.max-complexity=10' $(PRODUCTION)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: venv ## Format the code and apply ruff's safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: system-deps venv ## Run the benchmarks (bench/run.py); they print numbers
	$(VENV)/bin/python bench/run.py

bench-ledger: system-deps venv ## The ledger at 50M usage rows (bench/ledger_scale.py); BENCH_ARGS adds flags (--rows 1000000: a smoke)
	$(VENV)/bin/python bench/ledger_scale.py $(BENCH_ARGS)

bench-paired: system-deps venv ## Pass-through vs gateway back to back (5 rounds), then 60 s of settlement; BENCH_ARGS adds flags
	$(VENV)/bin/python bench/paired.py --sustain 60 $(BENCH_ARGS)

bench-workers: system-deps venv ## 1 worker vs 2 workers, plain chat at c=32 (3 rounds); BENCH_ARGS adds flags
	$(VENV)/bin/python bench/workers.py $(BENCH_ARGS)

clean: ## Remove caches and build output (keeps .venv and the dev data in .data/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
