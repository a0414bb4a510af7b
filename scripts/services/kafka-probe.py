#!/usr/bin/env python3
"""Readiness probe for a Kafka-protocol broker: ApiVersions v0 then Metadata v0 over one socket.

An open port is not enough (a broker may accept connections before it can serve metadata), and a
broker that advertises another address would send clients elsewhere, so this checks that the
broker answers both requests and advertises exactly --host:--port. Standard library only, so it
works on a fresh machine without kcat or a Kafka client.

Exit 0 when ready; 1 (with the reason on stderr) otherwise.
Usage: kafka-probe.py --port PORT [--host 127.0.0.1] [--timeout 2]
"""

import argparse
import socket
import struct
import sys

API_METADATA = 3
API_VERSIONS = 18


class ProbeError(Exception):
    pass


def kstring(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def request(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    # Request header v1: api_key, api_version (0), correlation_id, client_id.
    msg = struct.pack(">hhi", api_key, 0, correlation_id) + kstring("sluice-probe") + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    resp = recv_exact(sock, size)
    got = struct.unpack(">i", resp[:4])[0]
    if got != correlation_id:
        raise ProbeError(f"correlation id {got} != {correlation_id}")
    return resp[4:]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProbeError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def probe(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        body = request(sock, API_VERSIONS, 1, b"")
        (error_code,) = struct.unpack(">h", body[:2])
        if error_code != 0:
            raise ProbeError(f"ApiVersions error code {error_code}")

        # Metadata v0 with an empty topic list means "all topics".
        body = request(sock, API_METADATA, 2, struct.pack(">i", 0))
        (n_brokers,) = struct.unpack(">i", body[:4])
        off = 4
        brokers = []
        for _ in range(n_brokers):
            (node_id,) = struct.unpack(">i", body[off : off + 4])
            off += 4
            (hlen,) = struct.unpack(">h", body[off : off + 2])
            off += 2
            bhost = body[off : off + hlen].decode()
            off += hlen
            (bport,) = struct.unpack(">i", body[off : off + 4])
            off += 4
            brokers.append((node_id, bhost, bport))
        if not brokers:
            raise ProbeError("metadata lists no brokers")
        if not any(bport == port and bhost in (host, "localhost") for _, bhost, bport in brokers):
            raise ProbeError(f"broker advertises {brokers}, not {host}:{port}")
        return f"{brokers}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args()
    try:
        brokers = probe(args.host, args.port, args.timeout)
    except (OSError, ProbeError, struct.error, UnicodeDecodeError) as e:
        print(f"kafka-probe: {args.host}:{args.port} not ready: {e}", file=sys.stderr)
        return 1
    print(f"kafka-probe: {args.host}:{args.port} ready, brokers {brokers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
