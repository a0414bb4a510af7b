#!/usr/bin/env bash
# The demo, end to end, on this machine: installs what is missing, starts a local ClickHouse and
# a Kafka-protocol broker, builds sluice and the reference plugin, creates the table, produces
# 10,000 reference events (1 % malformed), runs the pipeline and prints what landed. Then the
# reference workload (demo/reference.yaml): 10,000 transactions with ~10 % repeated ids,
# deduplicated, enriched and interval-joined with a stream of user profiles.
#
#   scripts/demo.sh                   # local services on ports 18123 (ClickHouse) / 19092 (Kafka)
#   SLUICE_DEMO_EVENTS=100000 scripts/demo.sh
#
# To use your own services instead, set SLUICE_KAFKA_BROKERS and SLUICE_CLICKHOUSE_URL (and
# SLUICE_CLICKHOUSE_USER / SLUICE_CLICKHOUSE_PASSWORD): nothing local is started then.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=services/lib.sh
source scripts/services/lib.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${SLUICE_TARGET_DIR:-$HOME/.cache/sluice/target}}"
WASM_TARGET_DIR="${SLUICE_WASM_TARGET_DIR:-$HOME/.cache/sluice/wasm-target}"
EVENTS="${SLUICE_DEMO_EVENTS:-10000}"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "installing dependencies (Debian packages, Rust targets, Python venv with the local services)"
scripts/install-deps.sh

say "building sluice and the workload generator (release; the first build takes ~15 min on 2 cores)"
cargo build --release -p sluice --bin sluice -p sluice-tests --bin sluice-workload
say "building the reference plugin (plugins/rust-enrich) as a WebAssembly component"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" cargo build --release --target wasm32-wasip2 -p sluice-plugin-enrich
plugin="$WASM_TARGET_DIR/wasm32-wasip2/release/sluice_plugin_enrich.wasm"
ls -l "$plugin"

run_dir="$SLUICE_RUN/demo"
rm -rf -- "$run_dir"
mkdir -p "$run_dir"
started_services=0
cleanup() {
    set +e
    if [[ -n "${sluice_pid:-}" ]] && kill -0 "$sluice_pid" 2>/dev/null; then
        kill -TERM "$sluice_pid"
        wait "$sluice_pid"
    fi
    if ((started_services)); then
        say "stopping the local services"
        scripts/services/down.sh >/dev/null 2>&1
    fi
}
trap cleanup EXIT

if [[ -z "${SLUICE_KAFKA_BROKERS:-}" || -z "${SLUICE_CLICKHOUSE_URL:-}" ]]; then
    say "starting a local ClickHouse (chdb-core) and Kafka-protocol broker (noida-db)"
    export SLUICE_CH_DATA="$run_dir/clickhouse" SLUICE_KAFKA_DATA="$run_dir/kafka"
    scripts/services/down.sh >/dev/null 2>&1 || true
    started_services=1
    eval "$(scripts/services/up.sh)"
    export SLUICE_KAFKA_BROKERS="$SLUICE_TEST_KAFKA_BROKERS"
    export SLUICE_CLICKHOUSE_URL="$SLUICE_TEST_CLICKHOUSE_URL"
fi
ch_url="$SLUICE_CLICKHOUSE_URL"
ch_auth=(--user "${SLUICE_CLICKHOUSE_USER:-default}:${SLUICE_CLICKHOUSE_PASSWORD:-}")
query() { curl -sS --fail-with-body "${ch_auth[@]}" "$ch_url/" --data-binary "$1"; }

say "creating the table (demo/schema.sql)"
query "DROP TABLE IF EXISTS default.transactions SYNC"
query "$(cat demo/schema.sql)"

topic=transactions
say "producing $EVENTS reference events to '$topic' (1 % malformed)"
"$CARGO_TARGET_DIR/release/sluice-workload" --brokers "$SLUICE_KAFKA_BROKERS" --topic "$topic" \
    --create-partitions 3 --count "$EVENTS" --malformed-every 100

export SLUICE_DEMO_PLUGIN="$plugin" SLUICE_STATE_DIR="$run_dir/state"
say "validating demo/pipeline.yaml"
"$CARGO_TARGET_DIR/release/sluice" validate -c demo/pipeline.yaml

# wait_rows TABLE EXPECTED LOG: until TABLE holds EXPECTED rows (sluice must stay up meanwhile).
wait_rows() {
    local table="$1" expected="$2" log="$3" n t0=$SECONDS
    while :; do
        n="$(query "SELECT count() FROM default.$table" 2>/dev/null || echo 0)"
        printf '\r    rows in ClickHouse: %s / %s' "$n" "$expected"
        if ((n >= expected)); then break; fi
        if ! kill -0 "$sluice_pid" 2>/dev/null; then
            echo
            tail -40 "$log"
            die "sluice exited early (log above: $log)"
        fi
        if ((SECONDS - t0 > 300)); then
            echo
            tail -40 "$log"
            die "timed out waiting for rows"
        fi
        sleep 0.5
    done
    echo
}

say "running the pipeline"
"$CARGO_TARGET_DIR/release/sluice" run -c demo/pipeline.yaml >"$run_dir/sluice.log" 2>&1 &
sluice_pid=$!
expected=$((EVENTS - EVENTS / 100))
wait_rows transactions "$expected" "$run_dir/sluice.log"
say "stopping sluice (SIGTERM: flush and commit)"
kill -TERM "$sluice_pid"
wait "$sluice_pid"
sluice_pid=
grep -E "progress|stopped" "$run_dir/sluice.log" | tail -2 || true

say "rows in ClickHouse"
query "SELECT id, user_id, amount, amount_cents, amount_bucket, currency, kind, ts, source_partition AS part, source_offset AS off, plugin_version AS v FROM default.transactions ORDER BY id LIMIT 10 FORMAT PrettyCompactMonoBlock"
query "SELECT count() AS rows, uniqExact(id) AS distinct_ids, sum(amount) AS total, min(ts), max(ts) FROM default.transactions FORMAT PrettyCompactMonoBlock"
query "SELECT amount_bucket, currency, count() AS n, sum(amount) AS total FROM default.transactions GROUP BY ALL ORDER BY ALL FORMAT PrettyCompactMonoBlock"
dead=$((EVENTS / 100))
say "$expected rows landed exactly once; the $dead malformed events went to the dead-letter topic '$topic-dlq' with their reasons (log: $run_dir/sluice.log)"

say "the reference workload: dedup (24 h) -> enrich (WASM) -> interval join with users (±5 min) -> ClickHouse"
query "DROP TABLE IF EXISTS default.transactions_joined SYNC"
query "$("$CARGO_TARGET_DIR/release/sluice-workload" --reference-ddl transactions_joined)"
produced="$("$CARGO_TARGET_DIR/release/sluice-workload" --brokers "$SLUICE_KAFKA_BROKERS" \
    --topic ref-transactions --reference-users-topic ref-users --create-partitions 2 \
    --count "$EVENTS")"
echo "$produced"
ref_expected="$(sed -n 's/^expected rows: \([0-9]*\) .*/\1/p' <<<"$produced")"
ref_matched="$(sed -n 's/^expected rows: [0-9]* (\([0-9]*\) with a user)/\1/p' <<<"$produced")"
[[ -n "$ref_expected" && -n "$ref_matched" ]] || die "sluice-workload did not print the expected rows"
export SLUICE_STATE_DIR="$run_dir/state-reference"
"$CARGO_TARGET_DIR/release/sluice" validate -c demo/reference.yaml
"$CARGO_TARGET_DIR/release/sluice" run -c demo/reference.yaml >"$run_dir/sluice-reference.log" 2>&1 &
sluice_pid=$!
wait_rows transactions_joined "$ref_expected" "$run_dir/sluice-reference.log"
kill -TERM "$sluice_pid"
wait "$sluice_pid"
sluice_pid=
query "SELECT id, user_id, amount, ts, user_name, user_country FROM default.transactions_joined ORDER BY id LIMIT 5 FORMAT PrettyCompactMonoBlock"
summary="$(query "SELECT count(), uniqExact(id), countIf(user_name IS NOT NULL) FROM default.transactions_joined FORMAT TSV")"
read -r rows ids matched <<<"$summary"
echo "    rows $rows, distinct ids $ids, with a user $matched (expected $ref_expected and $ref_matched)"
((rows == ref_expected && ids == ref_expected && matched == ref_matched)) \
    || die "the reference workload's rows are not what the workload expects"
say "done: both pipelines landed exactly the expected rows (logs: $run_dir)"
