# Shared helpers for the local service scripts (sourced, not run).
# shellcheck shell=bash

SLUICE_HOME="${SLUICE_HOME:-$HOME/.cache/sluice}"
SLUICE_VENV="$SLUICE_HOME/venv"
SLUICE_RUN="$SLUICE_HOME/run"
SERVICES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Exit code of `start` when the port is already taken by something else: callers that picked a
# random free port (the Rust test harness) retry with another one.
EXIT_PORT_IN_USE=3

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

need_venv() {
    [[ -x "$SLUICE_VENV/bin/python" ]] ||
        die "no Python venv at $SLUICE_VENV: run scripts/install-deps.sh first"
}

# Path of a file or directory inside an installed Python package, without importing the package.
package_path() { # PACKAGE RELATIVE_PATH
    "$SLUICE_VENV/bin/python" - "$1" "$2" <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec(sys.argv[1])
if spec is None or not spec.submodule_search_locations:
    sys.exit(f"python package {sys.argv[1]} is not installed")
print(os.path.join(list(spec.submodule_search_locations)[0], sys.argv[2]))
PY
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True while PID exists and is not a zombie. Detached services are reparented to PID 1, which in
# some containers never reaps them, so `kill -0` alone would report a dead service as alive.
pid_alive() {
    local pid=$1 stat
    [[ -n "$pid" ]] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    # Field 3 (state) follows the parenthesised command name, which may contain spaces.
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

read_pidfile() { # FILE -> prints the PID if the file names a live process
    local pid
    [[ -f "$1" ]] || return 1
    pid="$(<"$1")"
    pid_alive "$pid" || return 1
    printf '%s\n' "$pid"
}

# SIGTERM, wait up to TIMEOUT seconds, then SIGKILL.
stop_pid() { # PID NAME [TIMEOUT_SECONDS]
    local pid=$1 name=$2 timeout=${3:-15} i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    printf 'warning: %s (pid %s) ignored SIGTERM for %ss, sending SIGKILL\n' "$name" "$pid" "$timeout" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    die "$name (pid $pid) survived SIGKILL"
}

# Runs a command detached from the caller (own session, stdio to LOG) and prints its PID.
# The caller's pipes must not leak into the service: the Rust harness waits for EOF on them.
spawn_detached() { # LOG CMD ARGS...
    local log=$1
    shift
    setsid "$@" >>"$log" 2>&1 </dev/null &
    printf '%s\n' "$!"
}

# Ties a service's lifetime to another process (the Rust test binary): a detached watchdog polls
# PARENT and stops SERVICE (SIGTERM, then SIGKILL) once PARENT is gone, then removes PIDFILE and,
# if given, the service's data dir. Chosen over an at-exit hook because a test process can end in
# ways that run no hook (panic=abort, SIGKILL, timeouts), and Rust statics are never dropped.
spawn_watchdog() { # PARENT_PID SERVICE_PID PIDFILE [DIR_TO_REMOVE]
    local parent=$1 svc=$2 pidfile=$3 dir=${4:-}
    setsid bash -c '
        source "$1"
        parent=$2 svc=$3 pidfile=$4 dir=$5
        while pid_alive "$parent" && pid_alive "$svc"; do sleep 0.5; done
        (stop_pid "$svc" "service" 10) || true
        if [[ -f "$pidfile" && "$(<"$pidfile")" == "$svc" ]]; then rm -f "$pidfile"; fi
        if [[ -n "$dir" ]]; then rm -rf -- "$dir"; fi
    ' watchdog "$SERVICES_DIR/lib.sh" "$parent" "$svc" "$pidfile" "$dir" >/dev/null 2>&1 </dev/null &
}

log_tail() { # FILE [LINES]
    if [[ -f "$1" ]]; then
        printf -- '--- last lines of %s ---\n' "$1" >&2
        tail -n "${2:-30}" "$1" >&2
        printf -- '---\n' >&2
    fi
}

# Parses the options shared by every `start`: --parent-pid PID, --remove-data-on-exit.
PARENT_PID=""
REMOVE_DATA_ON_EXIT=0
parse_start_options() {
    while (($#)); do
        case "$1" in
        --parent-pid)
            [[ $# -ge 2 ]] || die "--parent-pid needs a PID"
            PARENT_PID=$2
            shift 2
            ;;
        --remove-data-on-exit)
            REMOVE_DATA_ON_EXIT=1
            shift
            ;;
        *) die "unknown option: $1" ;;
        esac
    done
    if ((REMOVE_DATA_ON_EXIT)) && [[ -z "$PARENT_PID" ]]; then
        die "--remove-data-on-exit needs --parent-pid"
    fi
}
