#!/usr/bin/env bash
# The benchmark (docs/benchmarks.md): installs what is missing, builds the release `sluice`
# binary, the bench driver and the reference plugin, then runs `sluice-bench`, which starts its
# own ClickHouse (chdb-core) and broker (noida-db) on ports of their own with fresh data dirs,
# measures, stops them and prints the results table.
#
#   scripts/bench.sh                          # the full run: 1 M-record backlog (~5 min after the build)
#   scripts/bench.sh --records 200000         # extra arguments go to `sluice-bench run`
#   scripts/bench.sh --phases wasm,latency    # a subset: backlog, full, latency, wasm, dedup, scaling, swap
#   scripts/bench.sh --phases backlog --perf  # also profile sluice on the backlog (perf record)
#
#   SLUICE_BENCH_CH_PORT     ClickHouse HTTP port (default 18323)
#   SLUICE_BENCH_KAFKA_PORT  broker port (default 19292)
#   SLUICE_BENCH_DIR         work dir: service data, logs, results.json/.md (default ~/.cache/sluice/run/bench)
#
# The machine should be otherwise idle: every number is wall time or CPU time on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=services/lib.sh
source scripts/services/lib.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${SLUICE_TARGET_DIR:-$HOME/.cache/sluice/target}}"
WASM_TARGET_DIR="${SLUICE_WASM_TARGET_DIR:-$HOME/.cache/sluice/wasm-target}"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

say "installing dependencies"
scripts/install-deps.sh >&2

say "building sluice and sluice-bench (release)"
cargo build --release -p sluice --bin sluice -p sluice-tests --bin sluice-bench >&2
say "building the reference plugin (plugins/rust-enrich) for wasm32-wasip2"
CARGO_TARGET_DIR="$WASM_TARGET_DIR" cargo build --release --target wasm32-wasip2 \
    -p sluice-plugin-enrich >&2
plugin="$WASM_TARGET_DIR/wasm32-wasip2/release/sluice_plugin_enrich.wasm"
# Its second version (`v2` feature: adds `risk_level`) for the hot-swap phase: same file name,
# so its own target dir (the one tests/build.rs uses too, so the two builds share it).
say "building the plugin's v2 (--features v2) for the hot-swap phase"
CARGO_TARGET_DIR="$WASM_TARGET_DIR/enrich-v2" cargo build --release --target wasm32-wasip2 \
    -p sluice-plugin-enrich --features v2 >&2
plugin_v2="$WASM_TARGET_DIR/enrich-v2/wasm32-wasip2/release/sluice_plugin_enrich.wasm"

# The same plugin in C, Python, JavaScript and Go for the `wasm` phase's per-language rows
# (each build installs its toolchain on first use); one that fails is reported as not measured.
if [[ " $* " != *" --phases "* || " $* " == *wasm* || " $* " == *all* ]]; then
    say "building the reference plugin in the other languages (plugins/build-all.sh)"
    plugins/build-all.sh >&2 || say "some plugin builds failed: the bench reports them as not measured"
    # The C plugin also built for this machine: the same C code native and in WASM.
    plugins/c-enrich/build-native.sh >&2 || say "the native C build failed: the bench reports it as not measured"
fi

# Hard links to the binaries: other builds sharing the target dir replace those files (new
# inodes), and the bench must run one build from start to end.
bin_dir="$SLUICE_RUN/bench-bin"
mkdir -p "$bin_dir"
for f in "$CARGO_TARGET_DIR/release/sluice" "$CARGO_TARGET_DIR/release/sluice-bench" "$plugin"; do
    ln -f "$f" "$bin_dir/" 2>/dev/null || cp -f "$f" "$bin_dir/"
done
ln -f "$plugin_v2" "$bin_dir/sluice_plugin_enrich_v2.wasm" 2>/dev/null ||
    cp -f "$plugin_v2" "$bin_dir/sluice_plugin_enrich_v2.wasm"

say "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg) (2 cores; other work skews the numbers)"
exec "$bin_dir/sluice-bench" run \
    --sluice "$bin_dir/sluice" \
    --plugin "$bin_dir/$(basename "$plugin")" \
    --plugin-v2 "$bin_dir/sluice_plugin_enrich_v2.wasm" \
    --work-dir "${SLUICE_BENCH_DIR:-$SLUICE_RUN/bench}" \
    --ch-port "${SLUICE_BENCH_CH_PORT:-18323}" \
    --kafka-port "${SLUICE_BENCH_KAFKA_PORT:-19292}" \
    "$@"
