#!/usr/bin/env bash
# Runs the whole test suite, as CI does (.ci/run calls this):
#
#   0. scripts/install-deps.sh (idempotent; a fresh machine gets everything it needs)
#   1. cargo fmt --check
#   2. cargo clippy (release profile, all targets, warnings are errors), build the sluice binary
#      and the non-Rust plugins (plugins/build-all.sh)
#   3. local ClickHouse + noida-db broker, then cargo test --release --workspace against them
#   4. a tansu broker, then the core end-to-end tests (names containing `e2e_`) against it, so no
#      quirk of one Kafka emulator passes for correct behaviour
#
# Every step runs even when an earlier one failed (one run reports everything); the exit code is
# non-zero if any step failed. Services use their own ports and data dirs (below) so that they
# do not collide with instances started by scripts/services/up.sh, and are stopped on exit.
#
#   CARGO_TARGET_DIR     default ${SLUICE_TARGET_DIR:-~/.cache/sluice/target}
#   SLUICE_TEST_CH_PORT, SLUICE_TEST_NOIDA_PORT, SLUICE_TEST_TANSU_PORT   service ports
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=services/lib.sh
source scripts/services/lib.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${SLUICE_TARGET_DIR:-$HOME/.cache/sluice/target}}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

CH_PORT="${SLUICE_TEST_CH_PORT:-18223}"
NOIDA_PORT="${SLUICE_TEST_NOIDA_PORT:-19192}"
TANSU_PORT="${SLUICE_TEST_TANSU_PORT:-19193}"
CH_DATA="$SLUICE_RUN/test-clickhouse"
NOIDA_DATA="$SLUICE_RUN/test-noida"
TANSU_DATA="$SLUICE_RUN/test-tansu"

declare -a STEP_NAMES=() STEP_RESULTS=() STEP_TIMES=()
failed=0
suite_start=$SECONDS

fmt_duration() {
    printf '%dm%02ds' $(($1 / 60)) $(($1 % 60))
}

# step NAME CMD...: runs CMD, records ok/FAILED and its duration, never exits.
step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    printf '\n==> [%s] %s\n' "$name" "$*"
    "$@" || rc=$?
    local dt=$((SECONDS - t0))
    STEP_NAMES+=("$name")
    STEP_TIMES+=("$dt")
    if ((rc == 0)); then
        STEP_RESULTS+=(ok)
        printf '==> [%s] ok in %s\n' "$name" "$(fmt_duration "$dt")"
    else
        STEP_RESULTS+=("FAILED (exit $rc)")
        failed=1
        printf '==> [%s] FAILED (exit %s) in %s\n' "$name" "$rc" "$(fmt_duration "$dt")"
    fi
}

skip() { # NAME REASON
    STEP_NAMES+=("$1")
    STEP_TIMES+=(0)
    STEP_RESULTS+=("FAILED (not run: $2)")
    failed=1
    printf '\n==> [%s] not run: %s\n' "$1" "$2"
}

ch() { SLUICE_CH_PORT=$CH_PORT SLUICE_CH_DATA=$CH_DATA scripts/services/clickhouse.sh "$@"; }
noida() {
    SLUICE_KAFKA_BROKER=noida SLUICE_KAFKA_PORT=$NOIDA_PORT SLUICE_KAFKA_DATA=$NOIDA_DATA \
        scripts/services/kafka.sh "$@"
}
tansu() {
    SLUICE_KAFKA_BROKER=tansu SLUICE_KAFKA_PORT=$TANSU_PORT SLUICE_KAFKA_DATA=$TANSU_DATA \
        scripts/services/kafka.sh "$@"
}

# Fresh instance: stop a leftover from an interrupted run (its pid file is in the data dir),
# start from an empty data dir, and tie it to this script so a killed run leaves nothing behind.
fresh_start() { # FN DATA_DIR
    local fn=$1 dir=$2
    "$fn" stop >/dev/null
    rm -rf -- "$dir"
    "$fn" start --parent-pid $$
}

stop_services() {
    set +e
    tansu stop >/dev/null 2>&1
    noida stop >/dev/null 2>&1
    ch stop >/dev/null 2>&1
    rm -rf -- "$CH_DATA" "$NOIDA_DATA" "$TANSU_DATA"
}
trap stop_services EXIT

start_main_services() {
    fresh_start ch "$CH_DATA" && fresh_start noida "$NOIDA_DATA"
}

run_tests() {
    SLUICE_TEST_CLICKHOUSE_URL="http://127.0.0.1:$CH_PORT" \
        SLUICE_TEST_KAFKA_BROKERS="127.0.0.1:$NOIDA_PORT" \
        SLUICE_TEST_KAFKA_BROKER=noida \
        cargo test --release --workspace --no-fail-fast
}

run_e2e_tansu() {
    SLUICE_TEST_CLICKHOUSE_URL="http://127.0.0.1:$CH_PORT" \
        SLUICE_TEST_KAFKA_BROKERS="127.0.0.1:$TANSU_PORT" \
        SLUICE_TEST_KAFKA_BROKER=tansu \
        cargo test --release -p sluice-tests --no-fail-fast -- e2e_
}

echo "==> CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
# Without its dependencies nothing below can run: stop at once if the install fails.
t0=$SECONDS
echo "==> [install-deps] scripts/install-deps.sh"
scripts/install-deps.sh
echo "==> [install-deps] ok in $(fmt_duration $((SECONDS - t0)))"
step fmt cargo fmt --all -- --check
step clippy cargo clippy --release --workspace --all-targets -- -D warnings
# The end-to-end tests run the real binary (target/release/sluice), which `cargo test` does not
# build for another package's tests.
step build cargo build --release -p sluice
# The reference plugin in C, Python, JavaScript and Go for the conformance tests (toolchains
# are installed on first use and cached; a no-op when nothing changed).
step plugins plugins/build-all.sh

step services start_main_services
ch_ok=0
if [[ "${STEP_RESULTS[-1]}" == ok ]]; then
    ch_ok=1
    step test run_tests
else
    skip test "services did not start"
fi

# The noida broker is no longer needed: free its memory before the second round.
noida stop >/dev/null 2>&1 || true
step services-tansu fresh_start tansu "$TANSU_DATA"
if [[ "${STEP_RESULTS[-1]}" == ok ]] && ((ch_ok)); then
    step e2e-tansu run_e2e_tansu
else
    skip e2e-tansu "services did not start"
fi

printf '\n==> summary\n'
for i in "${!STEP_NAMES[@]}"; do
    printf '    %-15s %-32s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "$(fmt_duration "${STEP_TIMES[$i]}")"
done
total="$(fmt_duration $((SECONDS - suite_start)))"
if ((failed)); then
    bad=()
    for i in "${!STEP_NAMES[@]}"; do
        [[ "${STEP_RESULTS[$i]}" == ok ]] || bad+=("${STEP_NAMES[$i]}")
    done
    echo "==> TEST SUITE FAILED in $total: ${bad[*]}"
    exit 1
fi
echo "==> TEST SUITE OK: all ${#STEP_NAMES[@]} steps passed in $total"
