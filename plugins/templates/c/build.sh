#!/usr/bin/env bash
# Builds target/{{name}}.wasm: wit-bindgen generates the bindings, clang compiles a wasm32-wasi
# reactor, wasm-tools wraps it into a component (tools installed on first use).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# toolchains.sh: next to this script in a project made by `sluice plugin new`; in the sluice
# repository, in plugins/ (a copy in plugins/<name>/, or plugins/templates/<lang>/ itself).
for tc in "$here/toolchains.sh" "$here/../toolchains.sh" "$here/../../toolchains.sh"; do
    [[ -f "$tc" ]] && break
done
# shellcheck source=/dev/null
source "$tc"
wit="$(sluice_find_wit "$here")"
out="$here/target/{{name}}.wasm"
sluice_build_if_changed "$out" "$here/build.sh" "$here/plugin.c" "$wit/plugin.wit"
sluice_tc_c
gen="$here/target/gen"
rm -rf "$gen" && mkdir -p "$gen"
tc_quiet wit-bindgen c --world plugin --out-dir "$gen" "$wit"
"$TC_CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -Wl,--strip-all \
    -I"$gen" -o "$gen/core.wasm" "$here/plugin.c" "$gen/plugin.c" "$gen/plugin_component_type.o"
wasm-tools component new "$gen/core.wasm" --adapt "wasi_snapshot_preview1=$TC_ADAPTER_WASM" -o "$out"
sluice_build_done "$out"
