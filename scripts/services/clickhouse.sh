#!/usr/bin/env bash
# A local ClickHouse 26.9 (chdb-core's embedded engine serving the real HTTP interface, see
# clickhouse-server.py) on 127.0.0.1.
#
#   clickhouse.sh start [--parent-pid PID [--remove-data-on-exit]]
#   clickhouse.sh stop | status
#
#   SLUICE_CH_PORT   HTTP port (default 18123)
#   SLUICE_CH_DATA   data dir (default $SLUICE_HOME/run/clickhouse-$PORT); holds config.xml,
#                    server.log and server.pid too
#
# --parent-pid: stop the server when that process exits (used by the Rust test harness);
# --remove-data-on-exit: also delete the data dir then.
# `start` exits 3 if the port is already taken by another process.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${SLUICE_CH_PORT:-18123}"
DATA="${SLUICE_CH_DATA:-$SLUICE_RUN/clickhouse-$PORT}"
PIDFILE="$DATA/server.pid"
LOG="$DATA/server.log"
URL="http://127.0.0.1:$PORT"
START_TIMEOUT=60

ping_ok() {
    [[ "$(curl -fsS --max-time 2 "$URL/ping" 2>/dev/null)" == "Ok." ]]
}

start() {
    parse_start_options "$@"
    need_venv
    local pid
    if pid="$(read_pidfile "$PIDFILE")"; then
        if ping_ok; then
            echo "clickhouse already running (pid $pid) at $URL"
            return 0
        fi
        die "clickhouse pid $pid from $PIDFILE is alive but $URL/ping does not answer"
    fi
    # Otherwise /ping could be answered by some other server on that port.
    if port_in_use "$PORT"; then
        printf 'error: port %s is already in use; pick another with SLUICE_CH_PORT\n' "$PORT" >&2
        exit "$EXIT_PORT_IN_USE"
    fi
    mkdir -p "$DATA"
    : >"$LOG"
    pid="$(spawn_detached "$LOG" "$SLUICE_VENV/bin/python" -u "$SERVICES_DIR/clickhouse-server.py" \
        --port "$PORT" --data-dir "$DATA")"
    echo "$pid" >"$PIDFILE"
    if [[ -n "$PARENT_PID" ]]; then
        local rm_dir=""
        ((REMOVE_DATA_ON_EXIT)) && rm_dir="$DATA"
        spawn_watchdog "$PARENT_PID" "$pid" "$PIDFILE" "$rm_dir"
    fi

    local deadline=$((SECONDS + START_TIMEOUT))
    until ping_ok; do
        if ! pid_alive "$pid"; then
            rm -f "$PIDFILE"
            log_tail "$LOG"
            die "clickhouse exited during startup (log: $LOG)"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$LOG"
            stop_pid "$pid" clickhouse 5 || true
            rm -f "$PIDFILE"
            die "clickhouse did not answer $URL/ping within ${START_TIMEOUT}s (log: $LOG)"
        fi
        sleep 0.1
    done
    echo "clickhouse started (pid $pid) at $URL, data in $DATA"
}

stop() {
    local pid
    if pid="$(read_pidfile "$PIDFILE")"; then
        stop_pid "$pid" clickhouse 15
        rm -f "$PIDFILE"
        echo "clickhouse stopped (pid $pid)"
    else
        rm -f "$PIDFILE"
        echo "clickhouse not running (no live pid in $PIDFILE)"
    fi
}

status() {
    local pid
    if pid="$(read_pidfile "$PIDFILE")" && ping_ok; then
        echo "clickhouse running (pid $pid) at $URL"
    else
        echo "clickhouse not running at $URL"
        return 1
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
start) start "$@" ;;
stop) stop ;;
status) status ;;
*) die "usage: $0 start [--parent-pid PID [--remove-data-on-exit]] | stop | status" ;;
esac
