#!/usr/bin/env bash
# Builds the Python enrichment plugin into target/enrich.wasm: componentize-py bundles CPython,
# app.py and the generated bindings (`wit_world`) into a component of the sluice:plugin world.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../toolchains.sh
source "$here/../toolchains.sh"
wit="$(sluice_find_wit "$here")"
out="$here/target/enrich.wasm"
sluice_build_if_changed "$out" "$here/build.sh" "$here/app.py" "$wit/plugin.wit"

sluice_tc_python
tc_quiet componentize-py --wit-path "$wit" --world plugin componentize --python-path "$here" app \
    --output "$out.tmp"
mv "$out.tmp" "$out"
sluice_build_done "$out"
