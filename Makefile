# pgwarden: every target sets up what it needs itself (virtualenv, PostgreSQL binaries).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo serve test lint typecheck check bench bench-analysis bench-audit bench-ledger bench-values bench-workers loadtest fuzz compat soak replay sysdeps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# PostgreSQL server, client tools, pgbench, PgBouncer, Redis and Chromium (the HTML report is
# rendered in it by the tests): installed through apt when we are root, otherwise we say
# exactly what is missing.
sysdeps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null || missing="$$missing postgresql"; \
	command -v psql >/dev/null || missing="$$missing postgresql-client"; \
	command -v pgbench >/dev/null || ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || missing="$$missing postgresql-contrib"; \
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || missing="$$missing pgbouncer"; \
	command -v redis-server >/dev/null || test -x /usr/bin/redis-server || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing"; \
	    echo "install them with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

demo: $(STAMP) sysdeps
	@$(BIN)/pgwarden demo

serve: $(STAMP) sysdeps
	@$(BIN)/pgwarden demo --serve

# PGWARDEN_REQUIRE_BROWSER: sysdeps installed chromium, so a report test that cannot find it
# fails instead of skipping.
test: $(STAMP) sysdeps
	@PGWARDEN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

lint: $(STAMP)
	@$(BIN)/ruff check proxy policy audit loadtests tests
	@$(BIN)/ruff format --check proxy policy audit loadtests tests

typecheck: $(STAMP)
	@$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.bench_proxy

bench-analysis: $(STAMP)
	@$(BIN)/python -m loadtests.bench_analysis

bench-audit: $(STAMP)
	@$(BIN)/python -m loadtests.bench_audit

bench-ledger: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.bench_ledger

bench-values: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.bench_values

bench-workers: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.bench_workers

# The reference setup: config/policy.yaml with need-to-know enforcing, and the audit trail in
# SQLite with synchronous=FULL (the shipped default) -- the headline support_ratio -- beside
# the same with synchronous=NORMAL (support_ratio_normal), measured in the same run beside
# PostgreSQL itself, PgBouncer and pgwarden as a pass-through relay.
loadtest: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.support_load --enforce --audit-sync FULL,NORMAL \
	    --targets direct,pgbouncer,passthrough,pgwarden

# Mutated recordings of real client sessions against pgwarden, pass-through and with the
# shipped policy + SQLite audit (loadtests/README.md). FUZZ_ITERATIONS sessions per mode.
FUZZ_ITERATIONS ?= 20000
FUZZ_SEED ?= 1
fuzz: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.fuzz_sessions --iterations $(FUZZ_ITERATIONS) --seed $(FUZZ_SEED)

# psycopg's and asyncpg's own test suites directly and through pgwarden (pass-through, and
# the shipped policy + SQLite audit): the tests that differ. Their source trees are not part
# of this repository: PSYCOPG_SRC=... ASYNCPG_SRC=... (unset ones are skipped; see
# loadtests/README.md). COMPAT_ARGS passes options on, e.g. --psycopg-args '-m "not slow"'.
PSYCOPG_SRC ?=
ASYNCPG_SRC ?=
COMPAT_ARGS ?=
compat: $(STAMP) sysdeps
	@PSYCOPG_SRC="$(PSYCOPG_SRC)" ASYNCPG_SRC="$(ASYNCPG_SRC)" $(BIN)/python -m loadtests.compat $(COMPAT_ARGS)

# Not part of `make test`: 2,000 sessions, a 1 MB/s reader of 1M rows, then 30 minutes of
# the agents' workload with faults injected (SOAK_ARGS=--quick checks the script in ~3 min).
soak: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.soak $(SOAK_ARGS)

# Issue 13's insider replay: every red-team technique through pgwarden in monitor mode, then
# `pgwarden audit records-seen --person` compared with what each client received (counted
# client-side).  REPLAY_VARIANT=search_path,app runs both; results in loadtests/results/.
REPLAY_VARIANT ?= search_path
REPLAY_ARGS ?=

replay: $(STAMP) sysdeps
	@$(BIN)/python -m loadtests.replay --variant $(REPLAY_VARIANT) $(REPLAY_ARGS)

clean:
	rm -rf $(VENV) .venv-compat .pytest_cache .mypy_cache .ruff_cache .hypothesis
