#!/usr/bin/env bash
# Builds the C enrichment plugin for this machine (target/native-bench): enrich.c and its
# generated bindings (from build.sh) linked with native/harness.c, which calls the plugin's
# export the way the host does. sluice-bench uses it to compare the same C code native and in
# WebAssembly (docs/benchmarks.md); nothing else needs it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/build.sh"
# shellcheck source-path=SCRIPTDIR source=../toolchains.sh
source "$here/../toolchains.sh"
gen="$here/target/gen"
out="$here/target/native-bench"
sluice_build_if_changed "$out" "$here/build-native.sh" "$here/enrich.c" "$here/native/harness.c" \
    "$gen/plugin.c" "$gen/plugin.h"
sluice_tc_c
# The same optimisation level as the WebAssembly build; the bindings' wasm import and export
# attributes mean nothing here.
"$TC_CLANG" -O2 -Wall -Wextra -Werror -Wno-unknown-attributes -Wno-ignored-attributes \
    -I"$gen" -o "$out" "$here/native/harness.c" "$here/enrich.c" "$gen/plugin.c"
sluice_build_done "$out"
