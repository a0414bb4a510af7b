#!/usr/bin/env bash
# Builds the Go enrichment plugin into target/enrich.wasm: `wit-bindgen go` generates the
# module around enrich.go (package export_sluice_plugin_transform), Go builds it as a wasip1
# reactor (`-buildmode=c-shared`, `//go:wasmexport`), wasm-tools embeds the world and wraps
# the module into a component with the WASI preview1 adapter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../toolchains.sh
source "$here/../toolchains.sh"
wit="$(sluice_find_wit "$here")"
out="$here/target/enrich.wasm"
sluice_build_if_changed "$out" "$here/build.sh" "$here/enrich.go" "$wit/plugin.wit"

sluice_tc_go
gen="$here/target/gen"
rm -rf "$gen" && mkdir -p "$gen/export_sluice_plugin_transform"
(cd "$gen" && tc_quiet wit-bindgen go --world plugin "$wit")
cp "$here/enrich.go" "$gen/export_sluice_plugin_transform/"
cd "$gen"
go mod edit -replace "go.bytecodealliance.org/pkg=$TC_GO_PKG"
GOOS=wasip1 GOARCH=wasm go build -trimpath -buildmode=c-shared -ldflags='-s -checklinkname=0' \
    -o core.wasm .
wasm-tools component embed --world plugin "$wit" core.wasm -o embedded.wasm
wasm-tools component new embedded.wasm --adapt "wasi_snapshot_preview1=$TC_ADAPTER_WASM" -o "$out"
sluice_build_done "$out"
