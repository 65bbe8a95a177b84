"""A stdlib-only MCP-over-HTTP client for attack tests: one TCP connection, chosen source port.

Run as a script by any Python 3 (it must run as another user, whose interpreter cannot import
the venv): `python http_raw_client.py --port PORT [--src-port P] [--rst] [--hold]
[--tool NAME --args JSON]`, with the bearer token on stdin (never in argv). On one keep-alive
connection it sends initialize, notifications/initialized, tools/list and optionally one
tools/call, and prints one JSON line: {"pid", "src_port", "steps": [...], "error"?}. Each step
is {"status", "body"}; "error" names how the connection failed (e.g. reset before any answer).
With --rst the connection is closed with a reset (no TIME_WAIT, so the port is free at once);
with --hold the process then waits for stdin to close before exiting.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import struct
import sys

INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "raw-attack-client", "version": "1"},
}


def _body(resp: http.client.HTTPResponse) -> object:
    raw = resp.read().decode("utf-8", "replace")
    if "text/event-stream" in (resp.getheader("Content-Type") or ""):
        for line in raw.splitlines():
            if line.startswith("data:"):
                return json.loads(line[5:])
        return None
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--src-port", type=int, default=0)
    ap.add_argument("--rst", action="store_true")
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--tool")
    ap.add_argument("--args", default="{}")
    opts = ap.parse_args()
    token = sys.stdin.readline().strip()
    out: dict[str, object] = {"pid": os.getpid(), "steps": []}
    steps: list[dict[str, object]] = out["steps"]  # type: ignore[assignment]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", opts.src_port))
    out["src_port"] = sock.getsockname()[1]
    conn = http.client.HTTPConnection("127.0.0.1", opts.port, timeout=20)
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    messages: list[dict[str, object]] = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}},
    ]
    if opts.tool:
        params = {"name": opts.tool, "arguments": json.loads(opts.args)}
        messages.append({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params})
    try:
        sock.connect(("127.0.0.1", opts.port))
        conn.sock = sock
        for message in messages:
            conn.request("POST", "/mcp", body=json.dumps(message), headers=headers)
            resp = conn.getresponse()
            session = resp.getheader("mcp-session-id")
            if session:
                headers["mcp-session-id"] = session
            steps.append({"status": resp.status, "body": _body(resp)})
            if resp.status >= 400:
                break
    except (OSError, http.client.HTTPException) as exc:
        out["error"] = type(exc).__name__
    if opts.rst:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    if opts.hold:
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
