#!/usr/bin/env bash
# Builds the reference plugin in every non-Rust language (plugins/<lang>-enrich/build.sh);
# each installs its toolchain on first use (cached under ${SLUICE_HOME:-~/.cache/sluice}) and
# does nothing when its component is up to date. The Rust plugin is built by cargo
# (tests/build.rs). Prints each build's time; exits non-zero if any build failed, after trying
# them all.
#
#   plugins/build-all.sh [LANG...]     default: c python js go
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
langs=("$@")
((${#langs[@]})) || langs=(c python js go)
failed=()
for lang in "${langs[@]}"; do
    start=$SECONDS
    printf '==> [%s] plugins/%s-enrich/build.sh\n' "$lang" "$lang"
    if bash "$here/$lang-enrich/build.sh"; then
        printf '==> [%s] ok in %ds\n' "$lang" $((SECONDS - start))
    else
        printf '==> [%s] FAILED in %ds\n' "$lang" $((SECONDS - start))
        failed+=("$lang")
    fi
done
if ((${#failed[@]})); then
    echo "==> plugin builds failed: ${failed[*]}"
    exit 1
fi
