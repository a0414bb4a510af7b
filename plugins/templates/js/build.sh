#!/usr/bin/env bash
# Builds target/{{name}}.wasm with componentize-js (installed on first use).
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
sluice_build_if_changed "$out" "$here/build.sh" "$here/plugin.js" "$wit/plugin.wit"
sluice_tc_js
tc_quiet "$TC_COMPONENTIZE_JS_BIN" "$here/plugin.js" --wit "$wit" --world-name plugin \
    --disable http fetch-event --out "$out"
sluice_build_done "$out"
