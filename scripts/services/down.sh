#!/usr/bin/env bash
# Stops what up.sh started (same environment variables select the same instances).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

rc=0
"$here/kafka.sh" stop || rc=1
"$here/clickhouse.sh" stop || rc=1
exit "$rc"
