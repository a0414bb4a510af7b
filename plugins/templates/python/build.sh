#!/usr/bin/env bash
# Builds target/{{name}}.wasm with componentize-py (installed on first use).
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
sluice_build_if_changed "$out" "$here/build.sh" "$here/app.py" "$wit/plugin.wit"
sluice_tc_python
tc_quiet componentize-py --wit-path "$wit" --world plugin componentize --python-path "$here" app \
    --output "$out"
sluice_build_done "$out"
