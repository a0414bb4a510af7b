#!/usr/bin/env bash
# Builds the JavaScript enrichment plugin into target/enrich.wasm: componentize-js embeds
# enrich.js in the StarlingMonkey (SpiderMonkey) engine as a component of the sluice:plugin
# world. The http and fetch-event features are left out: a plugin needs neither.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../toolchains.sh
source "$here/../toolchains.sh"
wit="$(sluice_find_wit "$here")"
out="$here/target/enrich.wasm"
sluice_build_if_changed "$out" "$here/build.sh" "$here/enrich.js" "$wit/plugin.wit"

sluice_tc_js
tc_quiet "$TC_COMPONENTIZE_JS_BIN" "$here/enrich.js" --wit "$wit" --world-name plugin \
    --disable http fetch-event --out "$out.tmp"
mv "$out.tmp" "$out"
sluice_build_done "$out"
