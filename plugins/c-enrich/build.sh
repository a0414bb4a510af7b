#!/usr/bin/env bash
# Builds the C enrichment plugin into target/enrich.wasm (a component of the sluice:plugin
# world): wit-bindgen generates the bindings, clang compiles for wasm32-wasi as a reactor
# module, wasm-tools wraps the module into a component with the WASI preview1 adapter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../toolchains.sh
source "$here/../toolchains.sh"
wit="$(sluice_find_wit "$here")"
out="$here/target/enrich.wasm"
sluice_build_if_changed "$out" "$here/build.sh" "$here/enrich.c" "$wit/plugin.wit"

sluice_tc_c
gen="$here/target/gen"
rm -rf "$gen" && mkdir -p "$gen"
tc_quiet wit-bindgen c --world plugin --out-dir "$gen" "$wit"
"$TC_CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror \
    -Wl,--strip-all -I"$gen" -o "$gen/core.wasm" \
    "$here/enrich.c" "$gen/plugin.c" "$gen/plugin_component_type.o"
wasm-tools component new "$gen/core.wasm" \
    --adapt "wasi_snapshot_preview1=$TC_ADAPTER_WASM" -o "$out"
sluice_build_done "$out"
