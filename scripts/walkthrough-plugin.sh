#!/usr/bin/env bash
# Follows the walk-through of docs/plugins.md ("Walk-through: a plugin from zero") as a new
# user would: in an empty folder outside the repository, with nothing but the `sluice` binary
# on PATH, every command exactly as the doc spells it. Exits non-zero at the first step that
# does not do what the doc says.
#
#   scripts/walkthrough-plugin.sh [LANG]        LANG: rust c python js go (default: python)
#
#   SLUICE_BIN          the sluice binary (default: cargo build --release -p sluice, then
#                       $CARGO_TARGET_DIR/release/sluice)
#   CARGO_TARGET_DIR    default ${SLUICE_TARGET_DIR:-~/.cache/sluice/target}
#   SLUICE_HOME         toolchain cache, as for every plugin build (default ~/.cache/sluice)
#
# The project is left in the work folder when a step fails (its path is printed).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lang="${1:-python}"
case "$lang" in
rust | c | python | js | go) ;;
*)
    echo "usage: $0 [rust|c|python|js|go]" >&2
    exit 2
    ;;
esac

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${SLUICE_TARGET_DIR:-$HOME/.cache/sluice/target}}"
if [[ -z "${SLUICE_BIN:-}" ]]; then
    (cd "$root" && cargo build --release -p sluice)
    SLUICE_BIN="$CARGO_TARGET_DIR/release/sluice"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/sluice-walkthrough.XXXXXX")"
mkdir "$work/bin"
ln -s "$(realpath "$SLUICE_BIN")" "$work/bin/sluice"
export PATH="$work/bin:$PATH"
finish() {
    local rc=$?
    if ((rc == 0)); then
        rm -rf "$work"
        printf '\n==> walk-through (%s): every step as documented\n' "$lang"
    else
        printf '\n==> walk-through (%s) FAILED (exit %s); the project is in %s/hello\n' "$lang" "$rc" "$work" >&2
    fi
}
trap finish EXIT
cd "$work"

step() { printf '\n==> %s\n' "$*"; }
# Prints a command as the doc shows it, then runs it.
run() {
    printf '$ %s\n' "$*"
    "$@"
}
fail() {
    echo "walk-through: $*" >&2
    exit 1
}

step "1. create a project"
run sluice plugin new --lang "$lang" hello
[[ -x hello/build.sh && -f hello/fixtures/input.jsonl && -f hello/wit/plugin.wit ]] ||
    fail "sluice plugin new did not write the project"

step "2. build it (installs the toolchain on first use)"
printf '$ %s\n' "sluice plugin build hello"
wasm="$(sluice plugin build hello)"
echo "$wasm"
[[ "$wasm" == hello/target/hello.wasm && -f "$wasm" ]] || fail "build printed '$wasm'"

step "3. test it against its fixtures"
run sluice plugin test hello/target/hello.wasm --input hello/fixtures/input.jsonl --expect hello/fixtures/expected.jsonl

step "4. add a record of your own: the test fails and shows the difference"
line='{"note": "my first record", "json": {"id": 2, "user": "grace"}}'
printf "$ echo '%s' >> hello/fixtures/input.jsonl\n" "$line"
echo "$line" >>hello/fixtures/input.jsonl
printf '$ %s\n' "sluice plugin test hello/target/hello.wasm --input hello/fixtures/input.jsonl --expect hello/fixtures/expected.jsonl"
rc=0
out="$(sluice plugin test hello/target/hello.wasm --input hello/fixtures/input.jsonl --expect hello/fixtures/expected.jsonl)" || rc=$?
echo "$out"
((rc != 0)) || fail "the test passed although expected.jsonl says nothing of the new record"
if ! grep -q -- '-   nothing (filtered out)' <<<"$out" || ! grep -q -- '+   row {' <<<"$out"; then
    fail "no diff for the new record"
fi

step "5. record the plugin's answer, review it, test again"
run sluice plugin test hello/target/hello.wasm --input hello/fixtures/input.jsonl --expect hello/fixtures/expected.jsonl --update
run tail -n 1 hello/fixtures/expected.jsonl
grep -q '"offset":4' hello/fixtures/expected.jsonl || fail "--update did not record the new record"
run sluice plugin test hello/target/hello.wasm --input hello/fixtures/input.jsonl --expect hello/fixtures/expected.jsonl

step "6. use it in a pipeline"
cat >pipeline.yaml <<'YAML'
name: hello
kafka:
  brokers: 127.0.0.1:9092
  topics: [events]
  group_id: hello
stages:
  - name: hello
    wasm:
      plugin: hello/target/hello.wasm
      config: {greeting: hi}
      limits: {memory_mb: 128, timeout_ms: 2000}
sink:
  clickhouse:
    url: http://127.0.0.1:8123
    table: events
dead_letter:
  topic: events-dlq
YAML
echo "(wrote pipeline.yaml as in the doc)"
run sluice validate --offline -c pipeline.yaml

# ---- 7. upload and hot-swap into a running pipeline -----------------------------------------
# A new user has their own Kafka and ClickHouse; the walk-through starts the local ones
# (scripts/services) on ports of its own, tied to this script's lifetime.
step "7. upload it and hot-swap it into a running pipeline"
ch_port="${SLUICE_WALK_CH_PORT:-18523}"
kafka_port="${SLUICE_WALK_KAFKA_PORT:-19592}"
api_port="${SLUICE_WALK_API_PORT:-18580}"
SLUICE_CH_PORT=$ch_port SLUICE_CH_DATA="$work/clickhouse" \
    "$root/scripts/services/clickhouse.sh" start --parent-pid $$ >/dev/null
SLUICE_KAFKA_BROKER=noida SLUICE_KAFKA_PORT=$kafka_port SLUICE_KAFKA_DATA="$work/kafka" \
    "$root/scripts/services/kafka.sh" start --parent-pid $$ >/dev/null
curl -fsS "http://127.0.0.1:$ch_port/" --data-binary \
    "CREATE TABLE events (id String, user_id UInt64, greeting String) ENGINE = MergeTree ORDER BY id" >/dev/null
(cd "$root" && cargo build --release -q -p sluice-tests --bin sluice-workload)
workload="$CARGO_TARGET_DIR/release/sluice-workload"
"$workload" --brokers "127.0.0.1:$kafka_port" --topic events --count 1000 --create-partitions 1 --seed 1 >/dev/null
sed -e "s/127.0.0.1:9092/127.0.0.1:$kafka_port/" -e "s#http://127.0.0.1:8123#http://127.0.0.1:$ch_port#" \
    -e 's/^  group_id: hello$/  group_id: hello\n  start_offset: earliest/' pipeline.yaml >pipeline-local.yaml
export SLUICE_API_URL="http://127.0.0.1:$api_port"
echo "\$ sluice run -c pipeline-local.yaml --api-listen 127.0.0.1:$api_port &"
sluice run -c pipeline-local.yaml --api-listen "127.0.0.1:$api_port" >"$work/sluice.log" 2>&1 &
sluice_pid=$!
rows() { curl -fsS "http://127.0.0.1:$ch_port/" --data-binary "SELECT count() FROM events WHERE greeting LIKE '$1%'"; }
wait_rows() { # PREFIX N
    for _ in $(seq 1 240); do
        [[ "$(rows "$1")" -ge "$2" ]] && return 0
        kill -0 "$sluice_pid" 2>/dev/null || { tail -n 40 "$work/sluice.log"; fail "sluice exited"; }
        sleep 0.5
    done
    tail -n 40 "$work/sluice.log"
    fail "expected $2 rows greeting '$1', found $(rows "$1")"
}
wait_rows "hi from hello" 1000
echo "1000 rows from the file plugin"
# The change to ship: another greeting, in the source.
grep -rl 'from hello' hello --include='*.rs' --include='*.c' --include='*.py' --include='*.js' --include='*.go' \
    | xargs sed -i 's/ from hello/ from hello v2/'
run sluice plugin build hello
run sluice plugin push hello hello/target/hello.wasm
run sluice plugin list
run sluice plugin swap hello hello hello 1
run sluice pipeline status hello
"$workload" --brokers "127.0.0.1:$kafka_port" --topic events --count 1000 --seed 2 >/dev/null
wait_rows "hi from hello v2" 1000
[[ "$(rows "hi from hello")" -eq 2000 ]] || fail "rows lost or duplicated: $(rows "hi from hello") of 2000"
echo "the next 1000 rows came from the uploaded version"
run sluice plugin rollback hello hello
kill -TERM "$sluice_pid"
wait "$sluice_pid" || true
# ---------------------------------------------------------------------------------------------
echo
echo "walk-through complete: every step of docs/plugins.md worked"
