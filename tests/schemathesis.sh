#!/usr/bin/env bash
# Runs schemathesis against both services' /openapi.json, on SQLite and on
# Postgres, and fails on any finding (a 5xx, an undocumented status, a wrong
# content type, a body that violates the schema).
#
#   tests/schemathesis.sh [sqlite|postgres]...     (default: both)
#
# Needs the debug binaries (`cargo build -p order-service -p shipping-service`)
# and schemathesis on PATH or in $SCHEMATHESIS (see .ci/run for the pinned
# version). Postgres: $TEST_POSTGRES_URL (default the local trust server); a
# fresh database is created for the run and dropped after it.
#
# Tunables: ST_MAX_EXAMPLES (default 60), ST_SEED (default 20240601).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
ORDER_BIN=$TARGET/debug/order-service
SHIPPING_BIN=$TARGET/debug/shipping-service
ST=${SCHEMATHESIS:-schemathesis}
case $ST in */*) ST=$(realpath "$ST") ;; esac
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-60}
SEED=${ST_SEED:-20240601}
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
PG_ADMIN_URL=${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BACKENDS=("$@")
[ ${#BACKENDS[@]} -gt 0 ] || BACKENDS=(sqlite postgres)

for b in "$ORDER_BIN" "$SHIPPING_BIN"; do
    [ -x "$b" ] || { echo "missing $b: cargo build -p order-service -p shipping-service" >&2; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
PG_DB=""
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    if [ -n "$PG_DB" ]; then
        psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null || true
        PG_DB=""
    fi
}
trap 'cleanup; rm -rf "$WORK"' EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_ready() {
    local url=$1
    for _ in $(seq 1 150); do
        curl -fsS "$url/readyz" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "$url did not become ready" >&2
    return 1
}

run_backend() {
    local backend=$1 order_db shipping_db
    case $backend in
    sqlite)
        order_db="sqlite://$WORK/order.db?mode=rwc"
        shipping_db="sqlite://$WORK/shipping.db?mode=rwc"
        ;;
    postgres)
        PG_DB="st_$(date +%s)_$$"
        psql "$PG_ADMIN_URL" -qc "CREATE DATABASE \"$PG_DB\"" >/dev/null
        order_db="${PG_ADMIN_URL%/*}/$PG_DB"
        shipping_db=$order_db
        ;;
    *) echo "unknown backend $backend" >&2; return 1 ;;
    esac
    local order_port shipping_port
    order_port=$(free_port)
    shipping_port=$(free_port)
    local secret="schemathesis-secret-0123456789"
    env DATABASE_URL="$order_db" PORT="$order_port" SERVICE_SECRET="$secret" \
        SHIPPING_URL="http://127.0.0.1:$shipping_port" RUST_LOG=warn \
        "$ORDER_BIN" >"$WORK/order-$backend.log" 2>&1 &
    PIDS+=($!)
    env DATABASE_URL="$shipping_db" PORT="$shipping_port" SERVICE_SECRET="$secret" \
        ORDER_URL="http://127.0.0.1:$order_port" RUST_LOG=warn WAREHOUSE_DELAY=100ms \
        "$SHIPPING_BIN" >"$WORK/shipping-$backend.log" 2>&1 &
    PIDS+=($!)
    wait_ready "http://127.0.0.1:$order_port"
    wait_ready "http://127.0.0.1:$shipping_port"

    local status=0 name port pass
    for name in order shipping; do
        port=$order_port
        [ $name = shipping ] && port=$shipping_port
        # Two passes: unsigned (the signed routes must answer a documented
        # 401), then signed by the hook module (they are fuzzed past it).
        for pass in unsigned signed; do
            echo "== schemathesis: $name-service on $backend, $pass"
            local hooks=()
            [ $pass = signed ] && hooks=(SCHEMATHESIS_HOOKS=schemathesis_sign PYTHONPATH="$PWD/tests")
            # From the scratch directory: schemathesis keeps a cache in the
            # working directory.
            (cd "$WORK" && env "${hooks[@]}" SERVICE_SECRET="$secret" "$ST" run "http://127.0.0.1:$port/openapi.json" \
                --checks "$CHECKS" \
                --mode all \
                --max-examples "$MAX_EXAMPLES" \
                --seed "$SEED" \
                --workers 1 \
                --request-timeout 40 \
                --suppress-health-check all \
                --generation-database none \
                --no-color) || status=1
        done
        if grep -E 'panicked|ERROR' "$WORK/$name-$backend.log" >/dev/null; then
            echo "$name-service logged errors on $backend:" >&2
            grep -E 'panicked|ERROR' "$WORK/$name-$backend.log" | head -20 >&2
            status=1
        fi
    done
    cleanup
    return $status
}

overall=0
for backend in "${BACKENDS[@]}"; do
    run_backend "$backend" || overall=1
done
if [ $overall -ne 0 ]; then
    echo "schemathesis: findings (see above)" >&2
fi
exit $overall
