#!/usr/bin/env bash
# Builds target/{{name}}.wasm, a component of the sluice:plugin world (`cargo test` runs the
# unit tests natively).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --target wasm32-wasip2 --manifest-path "$here/Cargo.toml" \
    --target-dir "$here/target/cargo"
cp "$here/target/cargo/wasm32-wasip2/release/$(echo '{{name}}' | tr - _).wasm" "$here/target/{{name}}.wasm"
echo "==> built $here/target/{{name}}.wasm"
