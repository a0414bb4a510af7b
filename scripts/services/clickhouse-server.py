#!/usr/bin/env python3
"""Serve ClickHouse's real HTTP interface on loopback from chdb-core's embedded engine.

Debian's clickhouse-server is far too old and there is no Docker engine here, so the test suite
and the local demo use the ClickHouse 26.9 engine embedded in the chdb-core wheel. How it works
(see shared/notes/clickhouse.md):

* the embedded engine reads ./config.xml from the *current directory* only, so we write one into
  the data dir (listen on 127.0.0.1:PORT, warnings to the console) and chdir there after importing
  chdb (the import opens a throwaway session in the package dir);
* only the module-level ``chdb._chdb.query`` can start the HTTP listener; one call runs
  ``SYSTEM START LISTEN HTTP;`` followed by a never-ending, near-idle query (~1 % CPU) that keeps
  the call, and therefore the server, alive. It runs in a thread so the main thread can handle
  signals;
* the output format passed to ``query`` becomes the HTTP default format: TSV, like a real server;
* on SIGTERM/SIGINT we kill the keepalive query over HTTP, join the thread and ``os._exit(0)``
  (skipping the engine's static teardown, which is slow and pointless here).

Usage: clickhouse-server.py --port PORT --data-dir DIR
"""

import argparse
import os
import signal
import sys
import threading
import urllib.parse
import urllib.request

KEEPALIVE_TAG = "sluice-keepalive"

# `max(sleepEachRow(..))` over system.numbers with one row per block idles at ~1 % CPU; a
# `count()` over a sleeping subquery gets optimised away and spins instead.
KEEPALIVE_SQL = (
    f"SELECT /* {KEEPALIVE_TAG} */ max(sleepEachRow(0.2)) FROM system.numbers "
    "SETTINGS max_block_size = 1, function_sleep_max_microseconds_per_block = 0"
)

CONFIG_XML = """<?xml version="1.0"?>
<!-- Written by scripts/services/clickhouse-server.py; rewritten on every start. -->
<clickhouse>
    <logger>
        <level>warning</level>
        <console>1</console>
    </logger>
    <!-- File access is not restricted for HTTP clients of the embedded engine: loopback only. -->
    <listen_host>127.0.0.1</listen_host>
    <http_port>{port}</http_port>
    <!-- No system.query_log / part_log: nothing in the test suite needs them. -->
</clickhouse>
"""


def http_post(port: int, sql: str, timeout: float = 10.0) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=sql.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read().decode(errors="replace")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()

    data_dir = os.path.abspath(args.data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "config.xml"), "w") as f:
        f.write(CONFIG_XML.format(port=args.port))

    # Import before chdir: importing chdb changes directory to the package dir and back.
    import chdb._chdb as engine  # noqa: E402

    os.chdir(data_dir)

    failure: list[BaseException] = []

    def serve() -> None:
        try:
            engine.query(
                f"SYSTEM START LISTEN HTTP; {KEEPALIVE_SQL};", "TSV", path=data_dir
            )
        except BaseException as e:  # reported by the main thread
            failure.append(e)

    server = threading.Thread(target=serve, name="chdb-http", daemon=True)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    print(
        f"clickhouse-server.py: pid {os.getpid()} starting HTTP on 127.0.0.1:{args.port}, "
        f"data in {data_dir}",
        flush=True,
    )

    # Short waits keep the main thread responsive to signals.
    while not stop.is_set() and server.is_alive():
        stop.wait(0.5)

    if not stop.is_set():
        # The serving query ended by itself: the listener failed (port taken, bad config, data
        # dir locked by another server...).
        err = failure[0] if failure else "keepalive query returned"
        print(f"clickhouse-server.py: server stopped: {err}", file=sys.stderr, flush=True)
        os._exit(1)

    try:
        http_post(
            args.port,
            f"KILL QUERY WHERE query LIKE '%{KEEPALIVE_TAG}%' "
            "AND query NOT LIKE '%KILL QUERY%' SYNC",
        )
    except Exception as e:  # still exit: the caller falls back to SIGKILL if we hang
        print(f"clickhouse-server.py: KILL QUERY failed: {e}", file=sys.stderr, flush=True)
    server.join(timeout=10)
    print("clickhouse-server.py: stopped", flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
