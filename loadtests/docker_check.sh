#!/bin/sh
# Build the pgwarden image and check it against a throwaway PostgreSQL on this machine.
#
#   make sysdeps && make .venv/.installed   # PostgreSQL binaries, psql, the repo's virtualenv
#   sh loadtests/docker_check.sh            # from the repository root; Linux, Docker daemon
#
# Not part of `make test` (CI has no Docker).  Needs: docker (a daemon that can build the
# Dockerfile: its base image python:3.11-slim-bookworm, Debian and PyPI reachable from the
# build), psql, curl, the repo's .venv (for proxy.sandbox.cluster).  Optional: redis-server
# for the compose-service step; docker-compose or `docker compose` for the parse step.
#
# Containers run with --network host (the cluster listens on 127.0.0.1), so this checks
# Linux hosts only.  Set SKIP_BUILD=1 to test an already built image (IMAGE, default
# pgwarden:check).  Everything it starts (containers, volume, PostgreSQL, Redis, the
# port forwarder) is removed on exit.  Exit status 0 means every check passed.
set -eu

IMAGE=${IMAGE:-pgwarden:check}
PYTHON=${PYTHON:-.venv/bin/python}
NAME=pgwarden-check-$$
VOLUME=pgwarden-check-state-$$
WORK=$(mktemp -d)
FAILED=0

say() { printf '%s\n' "docker_check: $*" >&2; }
ok() { say "ok: $*"; }
bad() { say "FAIL: $*"; FAILED=1; }

cleanup() {
    for c in "$NAME-a" "$NAME-b" "$NAME-c"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
    docker volume rm "$VOLUME" "$VOLUME-c" >/dev/null 2>&1 || true
    for f in redis.pid fwd.pid; do
        [ -f "$WORK/$f" ] && kill "$(cat "$WORK/$f")" 2>/dev/null || true
    done
    # A cluster's holder stops and removes PostgreSQL itself once its .hold is gone (a
    # signal would skip that); give it time, then insist.
    rm -f "$WORK"/*.hold
    for f in pg.pid pgimage.pid; do
        [ -f "$WORK/$f" ] || continue
        i=0
        while kill -0 "$(cat "$WORK/$f")" 2>/dev/null && [ $i -lt 30 ]; do
            sleep 1; i=$((i + 1))
        done
        kill "$(cat "$WORK/$f")" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { "$PYTHON" -c 'from proxy.sandbox.cluster import free_port; print(free_port())'; }
port_free() {  # nothing accepts connections on 127.0.0.1:$1
    "$PYTHON" -c "import socket,sys; sys.exit(1 if socket.socket().connect_ex(('127.0.0.1', $1)) == 0 else 0)"
}

wait_healthy() {  # container, seconds
    i=0
    while [ $i -lt "$2" ]; do
        s=$(docker inspect --format '{{.State.Health.Status}}' "$1" 2>/dev/null || echo gone)
        [ "$s" = healthy ] && return 0
        [ "$s" = gone ] && return 1
        sleep 1; i=$((i + 1))
    done
    return 1
}

[ -f Dockerfile ] && [ -d proxy ] || { say "run me from the repository root"; exit 2; }
for tool in docker psql curl; do
    command -v $tool >/dev/null || { say "$tool is missing"; exit 2; }
done
[ -x "$PYTHON" ] || { say "$PYTHON missing: run 'make .venv/.installed' first"; exit 2; }

# 1. Build -------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    say "building $IMAGE (log: $WORK/build.log)"
    if docker build -t "$IMAGE" . >"$WORK/build.log" 2>&1; then ok "docker build"; else
        tail -30 "$WORK/build.log" >&2; bad "docker build"; exit 1
    fi
fi

# 2. A throwaway PostgreSQL (roles postgres, trust_user, support_app, analyst; database
#    support with config/support_schema.sql), held open until cleanup removes its .hold.
#    Kind "image" is set up the way the postgres image and config/docker-compose.yml do it
#    instead: password on postgres, scram-sha-256 for every TCP login, then the compose
#    init scripts (support_schema.sql, compose/roles.sql).
start_cluster() {  # name kind; sets $WORK/name.port
    touch "$WORK/$1.hold"
    "$PYTHON" - "$WORK" "$1" "$2" >"$WORK/$1.log" 2>&1 <<'EOF' &
import os, shutil, sys, tempfile, time
from pathlib import Path
from proxy.sandbox.cluster import Cluster, find_bindir, free_port, running_cluster
work, name, kind = sys.argv[1:4]
def hold(c):
    with open(os.path.join(work, name + ".port.tmp"), "w") as f:
        f.write(str(c.port))
    os.rename(os.path.join(work, name + ".port.tmp"), os.path.join(work, name + ".port"))
    while os.path.exists(os.path.join(work, name + ".hold")):
        time.sleep(0.5)
if kind == "plain":
    with running_cluster() as c:
        hold(c)
else:
    root = Path(tempfile.mkdtemp(prefix="pgwarden-check-"))
    c = Cluster(root=root, port=free_port(), bindir=find_bindir())
    try:
        c.init(tls=False)
        (c.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        c.start()
        c.psql("ALTER ROLE postgres PASSWORD 'change-me'; CREATE DATABASE support;",
               database="postgres")
        c.psql(Path("config/support_schema.sql").read_text())
        c.psql(Path("config/compose/roles.sql").read_text())
        hold(c)
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
EOF
    echo $! >"$WORK/$1.pid"
    i=0; while [ ! -f "$WORK/$1.port" ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
    [ -f "$WORK/$1.port" ] || { cat "$WORK/$1.log" >&2; say "PostgreSQL ($2) did not start"; exit 1; }
}
start_cluster pg plain
PG=$(cat "$WORK/pg.port")
ok "PostgreSQL on 127.0.0.1:$PG"

# 3. Plain proxy: non-root, /healthz, Docker health, a query through it -------------------
LISTEN=$(free_port); ADMIN=$(free_port)
docker run -d --name "$NAME-a" --network host \
    -e PGWARDEN_HEALTHCHECK_URL="http://127.0.0.1:$ADMIN/healthz" "$IMAGE" \
    serve --listen "127.0.0.1:$LISTEN" --upstream "127.0.0.1:$PG" --admin "127.0.0.1:$ADMIN" \
    >/dev/null
sleep 3
uid=$(docker exec "$NAME-a" id -u 2>/dev/null || echo none)
[ "$uid" != 0 ] && [ "$uid" != none ] && ok "runs as $(docker exec "$NAME-a" id)" || bad "runs as root"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN/healthz" || true)
[ "$code" = 200 ] && ok "/healthz 200" || bad "/healthz answered $code"
out=$(psql -h 127.0.0.1 -p "$LISTEN" -U postgres -d support -Atc 'select 1' 2>&1 || true)
[ "$out" = 1 ] && ok "psql select 1 through the container" || bad "psql: $out"
wait_healthy "$NAME-a" 60 && ok "Docker health: healthy" ||
    bad "Docker health: $(docker inspect --format '{{json .State.Health}}' "$NAME-a")"

# 4. Example config + policy + SQLite audit trail in a named volume on the state dir -------
LISTEN=$(free_port); ADMIN=$(free_port)
docker run -d --name "$NAME-b" --network host -v "$VOLUME:/var/lib/pgwarden" \
    -v "$PWD/config/pgwarden.yaml:/etc/pgwarden/pgwarden.yaml:ro" \
    -e PGWARDEN_HEALTHCHECK_URL="http://127.0.0.1:$ADMIN/healthz" "$IMAGE" \
    serve -c /etc/pgwarden/pgwarden.yaml --listen "127.0.0.1:$LISTEN" \
    --upstream "127.0.0.1:$PG" --admin "127.0.0.1:$ADMIN" \
    --policy /etc/pgwarden/examples/policy.yaml --catalog-user postgres \
    --audit-db /var/lib/pgwarden/audit.db >/dev/null
sleep 4
out=$(psql -h 127.0.0.1 -p "$LISTEN" -U postgres -d support -Atc 'select count(*) >= 0 from customers' 2>&1 || true)
[ "$out" = t ] && ok "policy: the DBA reads customers" || bad "policy, DBA: $out"
out=$(psql -h 127.0.0.1 -p "$LISTEN" -U support_app -d support -Atc 'select * from customers' 2>&1 || true)
case $out in
    *"blocked by rule agent-statement-shapes"*) ok "policy: SELECT * by support_app blocked" ;;
    *) bad "policy, support_app SELECT *: $out" ;;
esac
out=$(docker exec "$NAME-b" pgwarden audit verify --db /var/lib/pgwarden/audit.db 2>&1 || true)
case $out in
    *intact*) ok "audit trail written by the non-root user: $(echo "$out" | head -1)" ;;
    *) bad "audit verify: $out" ;;
esac
wait_healthy "$NAME-b" 60 && ok "with policy and audit: healthy" || bad "with policy and audit: not healthy"

# 5. The compose file parses and its files exist --------------------------------------------
if command -v docker-compose >/dev/null; then DC=docker-compose
elif docker compose version >/dev/null 2>&1; then DC="docker compose"
else DC=""; fi
if [ -n "$DC" ]; then
    if $DC -f config/docker-compose.yml config >"$WORK/compose.out" 2>&1; then
        ok "$DC config parses config/docker-compose.yml"
    else
        bad "$DC config: $(cat "$WORK/compose.out")"
    fi
    for f in config/support_schema.sql config/compose/pgwarden.yaml config/compose/policy.yaml \
        config/compose/prometheus.yml; do
        [ -f "$f" ] || bad "compose references missing $f"
    done
else
    say "skip: no docker-compose / docker compose"
fi

# 6. The compose pgwarden service as compose runs it (its config, policy and entrypoint,
#    two workers, Redis window store, PostgreSQL audit sink), on the host network with the
#    names postgres and redis pointing at 127.0.0.1, against a PostgreSQL set up like the
#    postgres image (SCRAM, compose/roles.sql).  Needs redis-server and free ports 5432,
#    6379, 6432, 9930, 9931.
busy=""
for p in 5432 6379 6432 9930 9931; do port_free $p || busy="$busy $p"; done
if ! command -v redis-server >/dev/null; then
    say "skip compose-service step: redis-server missing"
elif [ -n "$busy" ]; then
    say "skip compose-service step: ports in use:$busy"
else
    start_cluster pgimage image
    PGI=$(cat "$WORK/pgimage.port")
    ok "PostgreSQL set up like the postgres image on 127.0.0.1:$PGI"
    redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
    echo $! >"$WORK/redis.pid"
    "$PYTHON" - "$PGI" >"$WORK/fwd.log" 2>&1 <<'EOF' &
# 127.0.0.1:5432 -> the throwaway cluster, so the compose DSN postgres:5432 reaches it.
import asyncio, sys
target = int(sys.argv[1])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    finally:
        w.close()
async def handle(r, w):
    tr, tw = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(r, tw), pipe(tr, w))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 5432)
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
    echo $! >"$WORK/fwd.pid"
    sleep 1
    # The entrypoint exactly as config/docker-compose.yml gives it.
    docker run -d --name "$NAME-c" --network host \
        --add-host postgres:127.0.0.1 --add-host redis:127.0.0.1 \
        -e PGWARDEN_CATALOG_PASSWORD=change-me -v "$VOLUME-c:/var/lib/pgwarden" \
        -v "$PWD/config/compose/pgwarden.yaml:/etc/pgwarden/pgwarden.yaml:ro" \
        -v "$PWD/config/compose/policy.yaml:/etc/pgwarden/policy.yaml:ro" \
        --entrypoint sh "$IMAGE" -c \
        'test -s /var/lib/pgwarden/ledger.key || pgwarden audit keygen --ledger --out /var/lib/pgwarden/ledger.key; exec pgwarden "$@"' \
        pgwarden serve -c /etc/pgwarden/pgwarden.yaml >/dev/null
    sleep 6
    export PGPASSWORD=change-me
    out=$(psql -h 127.0.0.1 -p 6432 -U postgres -d support -Atc 'select 1' 2>&1 || true)
    [ "$out" = 1 ] && ok "compose service: psql (SCRAM) through two workers" ||
        bad "compose service psql: $out"
    psql -h 127.0.0.1 -p 6432 -U postgres -d support -qAtc "INSERT INTO customers
        (customer_id, full_name, email, phone, tier, country)
        VALUES (1, 'Ann Example', 'ann@example.com', '+1 555 0100', 'vip', 'DE')" >/dev/null 2>&1 || true
    out=$(psql -h 127.0.0.1 -p 6432 -U support_app -d support -Atc 'select email from customers where customer_id = 1' 2>&1 || true)
    [ "$out" = ann@example.com ] && ok "compose service: support_app looks up one customer" ||
        bad "compose service, support_app lookup: $out"
    out=$(psql -h 127.0.0.1 -p 6432 -U support_app -d support -Atc 'select * from customers' 2>&1 || true)
    case $out in
        *blocked*) ok "compose service: policy blocks support_app SELECT *" ;;
        *) bad "compose service policy: $out" ;;
    esac
    out=$(psql -h 127.0.0.1 -p 6432 -U analyst -d support -Atc "select email from customers where tier = 'vip'" 2>&1 || true)
    [ "$out" = "a*n@example.com" ] && ok "compose service: analyst sees $out" ||
        bad "compose service, analyst mask: $out"
    unset PGPASSWORD
    for p in 9930 9931; do
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p/metrics" || true)
        [ "$code" = 200 ] && ok "compose service: worker /metrics on $p" || bad "/metrics on $p: $code"
    done
    out=$(docker exec "$NAME-c" pgwarden audit verify \
        --dsn postgresql://postgres:change-me@postgres/support 2>&1 || true)
    case $out in
        *intact*) ok "compose service: PostgreSQL audit sink chains intact" ;;
        *) bad "compose service audit: $out" ;;
    esac
    wait_healthy "$NAME-c" 60 && ok "compose service: healthy" || bad "compose service: not healthy"
    docker stop -t 40 "$NAME-c" >/dev/null
    rc=$(docker inspect --format '{{.State.ExitCode}}' "$NAME-c")
    [ "$rc" = 0 ] && ok "compose service: docker stop -> exit 0" || bad "compose service exit $rc"
    [ "$FAILED" = 0 ] || docker logs "$NAME-c" 2>&1 | tail -20 >&2
fi

if [ "$FAILED" = 0 ]; then say "all checks passed"; else say "some checks FAILED"; fi
exit "$FAILED"
