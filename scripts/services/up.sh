#!/usr/bin/env bash
# Starts the local ClickHouse and a Kafka-protocol broker and prints the environment the test
# suite and the demo read:
#
#   eval "$(scripts/services/up.sh)"      # then: cargo test --release --workspace
#   scripts/services/down.sh
#
# Honours SLUICE_KAFKA_BROKER (noida|tansu), SLUICE_KAFKA_PORT, SLUICE_CH_PORT and the data-dir
# variables of clickhouse.sh and kafka.sh. Progress goes to stderr, only the exports to stdout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

broker="${SLUICE_KAFKA_BROKER:-noida}"
case "$broker" in
noida) kafka_port="${SLUICE_KAFKA_PORT:-19092}" ;;
tansu) kafka_port="${SLUICE_KAFKA_PORT:-19093}" ;;
*) die "SLUICE_KAFKA_BROKER must be noida or tansu, not '$broker'" ;;
esac
ch_port="${SLUICE_CH_PORT:-18123}"

"$here/clickhouse.sh" start >&2
SLUICE_KAFKA_BROKER="$broker" SLUICE_KAFKA_PORT="$kafka_port" "$here/kafka.sh" start >&2

echo "export SLUICE_TEST_CLICKHOUSE_URL=http://127.0.0.1:$ch_port"
echo "export SLUICE_TEST_KAFKA_BROKERS=127.0.0.1:$kafka_port"
echo "export SLUICE_TEST_KAFKA_BROKER=$broker"
