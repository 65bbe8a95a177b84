"""A local HTTP server standing in for a webhook (Slack, Teams, a generic one): it records the
bodies POSTed to it, for the tests of what the broker sends there."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any


class Hook:
    """A local HTTP server recording the JSON bodies POSTed to it; it answers with the queued
    `statuses` (a failing webhook), then 200."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.bodies: list[bytes] = []
        self.statuses = list(statuses or [])
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                hook.bodies.append(self.rfile.read(n))
                self.send_response(hook.statuses.pop(0) if hook.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def docs(self) -> list[dict[str, Any]]:
        """The bodies received so far, parsed."""
        return [json.loads(b) for b in list(self.bodies)]

    def payloads(self, request_id: str) -> list[dict[str, Any]]:
        """The bodies about request `request_id` (apm's generic webhook format)."""
        return [d for d in self.docs() if d.get("apm", {}).get("request_id") == request_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
