#!/usr/bin/env bash
# Builds target/{{name}}.wasm: `wit-bindgen go` generates the module around transform.go, Go
# builds a wasip1 reactor, wasm-tools makes it a component (tools installed on first use).
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
sluice_build_if_changed "$out" "$here/build.sh" "$here/transform.go" "$wit/plugin.wit"
sluice_tc_go
gen="$here/target/gen"
rm -rf "$gen" && mkdir -p "$gen/export_sluice_plugin_transform"
(cd "$gen" && tc_quiet wit-bindgen go --world plugin "$wit")
cp "$here/transform.go" "$gen/export_sluice_plugin_transform/"
cd "$gen"
go mod edit -replace "go.bytecodealliance.org/pkg=$TC_GO_PKG"
GOOS=wasip1 GOARCH=wasm go build -trimpath -buildmode=c-shared -ldflags='-s -checklinkname=0' -o core.wasm .
wasm-tools component embed --world plugin "$wit" core.wasm -o embedded.wasm
wasm-tools component new embedded.wasm --adapt "wasi_snapshot_preview1=$TC_ADAPTER_WASM" -o "$out"
sluice_build_done "$out"
