"""`apm-mcp`: the stdio relay between an MCP client and the broker.

It authenticates with APM_EPHEMERAL_ID, attaches to the broker, then copies newline-delimited
JSON-RPC messages between stdio and the broker in both directions (server-to-client requests
such as elicitation included). When the broker is unreachable, the vault locked or the session
invalid, it answers `initialize`, `server/discover`, `tools/list` and `tools/call` itself with
one `apm_status` tool that names the fix, and it re-attaches on its own when things recover.

Rules:
- Imports only the standard library and pyzmq (and the stdlib-only `broker`, `broker.paths`
  and `broker.wire.relay`), and only what a start needs: cold start is part of the contract
  (<= 0.25x an SDK server's), so `logging` loads only with --debug. On the default `ipc://`
  address the broker link is ZMTP over a plain Unix socket (shim.zmtp) and zmq is not imported
  at all; pyzmq serves other addresses (shim.zmq_link).
- Stdout carries protocol bytes only; diagnostics go to stderr and the optional debug log.
- The debug log never holds a token or a message payload (payloads may carry secrets).
- The token leaves the environment block before anything else runs, and the process is
  non-dumpable (broker.exposure): a sibling of the same user can't read it from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from broker import __version__, exposure, paths
from broker.wire.relay import (
    APM_STATUS_TOOL,
    MCP_DETACHED,
    MCP_FRAME,
    PROTOCOL_VERSION,
    status_result,
)

MAX_LINE = 1 << 20
LEGACY_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
MODERN_VERSION = "2026-07-28"
PV_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
REINIT_PREFIX = "apm-shim-reinit-"
ATTACH_TIMEOUT = 3.0

_TOKEN_RE = re.compile(r"eps_[A-Za-z0-9_-]+")


class BrokerLink(Protocol):
    """The connection to the broker (shim.zmtp.Link for ipc://, shim.zmq_link.ZmqLink else)."""

    def send(self, frames: list[bytes] | tuple[bytes, ...]) -> bool: ...
    def reset(self) -> None: ...
    def wait(self, fd: int | None, timeout: float) -> bool: ...
    def close(self, sent_last: bool = False) -> None: ...


def open_link(shim: Shim) -> BrokerLink:
    """ZMTP over a plain Unix socket for ipc:// (no libzmq thread hop per message, no zmq
    import); pyzmq for any other address."""
    from shim import zmtp

    path = zmtp.ipc_path(shim.addr)
    if path is not None:
        return zmtp.Link(path, shim.on_broker, shim.on_up, shim.on_down)
    from shim.zmq_link import ZmqLink

    return ZmqLink(shim.addr, shim.on_broker, shim.on_up, shim.on_down)


class _QuietLog:
    """The log without --debug: every call is a no-op, and `logging` is never imported."""

    def debug(self, *args: Any) -> None: ...
    def info(self, *args: Any) -> None: ...
    def warning(self, *args: Any) -> None: ...


log: Any = _QuietLog()


class Problem:
    __slots__ = ("code", "hint", "message")

    def __init__(self, code: str, message: str, hint: str) -> None:
        self.code, self.message, self.hint = code, message, hint


def _redact(value: Any) -> Any:
    return _TOKEN_RE.sub("eps_<redacted>", value) if isinstance(value, str) else value


def setup_debug_log() -> Path:
    import logging

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = _redact(str(record.msg))
            if record.args:
                args = record.args if isinstance(record.args, tuple) else (record.args,)
                record.args = tuple(_redact(a) for a in args)
            return True

    global log
    p = paths.resolve()
    p.config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = p.config_dir / "mcp_logging.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s pid=%(process)d %(message)s"))
    handler.addFilter(Redact())
    logger = logging.getLogger("apm.mcp")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    log = logger
    return path


def _new_id() -> str:
    return os.urandom(16).hex()


def _stderr(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"apm-mcp: {_TOKEN_RE.sub('eps_<redacted>', message)}\n")
        sys.stderr.flush()


_RESPONSE_HEAD = re.compile(
    rb'^\{"jsonrpc":"2\.0","id":(-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)"'
)


def _response_id(payload: bytes) -> tuple[bool, Any]:
    """Whether a broker message is a response, and its id, without parsing a large result:
    both the SDK and the broker's fast path write `{"jsonrpc":"2.0","id":…,"result"` first."""
    m = _RESPONSE_HEAD.match(payload)
    if m is not None:
        rid = m.group(1)
        return True, (json.loads(rid) if rid[:1] == b'"' else int(rid))
    try:
        doc = json.loads(payload)
    except ValueError:
        return False, None
    if isinstance(doc, dict) and "method" not in doc:
        return True, doc.get("id")
    return False, None


def _is_request(msg: dict[str, Any]) -> bool:
    return "method" in msg and "id" in msg


def _modern(msg: dict[str, Any]) -> bool:
    params = msg.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and PV_META in meta


class Shim:
    def __init__(self, addr: str, token: str | None, agent: str | None) -> None:
        self.addr = addr
        self.token = token
        self.agent = agent
        self.conn: bytes | None = None
        self.problem: Problem | None = None
        self.attach_id: str | None = None
        self.attach_sent = 0.0
        self.unreachable_since: float | None = None  # sends failing since (no live connection)
        self.answering_locally = False  # re-entrancy guard: answering what a failed attach held
        self.next_attach = 0.0
        self.backoff = 0.5
        self.era: str | None = None
        self.client_name: str | None = None
        self.init_request: dict[str, Any] | None = None
        self.client_initialized = False
        self.reinit_id: str | None = None
        self.pending: dict[Any, bytes] = {}  # client request id -> line sent to the broker
        self.held: list[bytes] = []  # lines waiting for a re-initialize to finish
        self.stdin_buf = b""
        self.discarding = False
        self.running = True
        self.link = open_link(self)
        if not token:
            self.problem = Problem(
                "SESSION_REQUIRED",
                "APM_EPHEMERAL_ID is not set for this MCP server",
                'run "apm mcp install --client <client>" or put the output of '
                '"apm delegate" in the server\'s env',
            )

    # ------------------------------------------------------------------ output

    def emit(self, obj: dict[str, Any] | bytes) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
        try:
            view = memoryview(data + b"\n")
            while view:
                n = os.write(1, view)
                view = view[n:]
        except (BrokenPipeError, OSError):
            self.running = False

    def error(self, rid: Any, code: int, message: str) -> None:
        self.emit({"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}})

    # ------------------------------------------------------------------ broker side

    def _socket_missing(self) -> bool:
        return self.addr.startswith("ipc://") and not Path(self.addr[6:]).exists()

    def attach(self) -> None:
        if not self.token or self.attach_id is not None:
            return
        if self._socket_missing():
            self._set_problem(
                Problem("BROKER_UNAVAILABLE", "the apm broker is not running", "apm broker start")
            )
            self._schedule_retry(cap=5.0)
            self._fail_waiting()
            return
        self.attach_id = _new_id()
        self.attach_sent = time.monotonic()
        req = {
            "v": PROTOCOL_VERSION,
            "id": self.attach_id,
            "method": "mcp.attach",
            "params": {"client_name": self.client_name} if self.client_name else {},
            "auth": {"token": self.token, **({"agent": self.agent} if self.agent else {})},
            "client": f"apm-mcp/{__version__}",
        }
        if not self.link.send((json.dumps(req).encode(),)):
            # no live connection yet: try again shortly
            self.attach_id = None
            now = time.monotonic()
            if self.unreachable_since is None:
                self.unreachable_since = now
            if now - self.unreachable_since > ATTACH_TIMEOUT:
                # a socket file without a broker behind it (one killed with -9): say so and
                # answer what the client is waiting for, instead of holding it indefinitely
                self._set_problem(
                    Problem(
                        "BROKER_UNAVAILABLE", "the apm broker is not running", "apm broker start"
                    )
                )
                self._fail_waiting()
                self._schedule_retry(cap=2.0)
            else:
                self.next_attach = now + 0.1
            return
        self.unreachable_since = None
        log.debug("attach sent")

    def _attach_timed_out(self) -> None:
        self.attach_id = None
        if self._socket_missing():
            self._set_problem(
                Problem("BROKER_UNAVAILABLE", "the apm broker is not running", "apm broker start")
            )
        else:
            self._set_problem(
                Problem(
                    "BROKER_UNAVAILABLE",
                    "the apm broker does not answer",
                    "apm broker stop && apm broker start",
                )
            )
        # a fresh connection drops the queued attach so it is not delivered twice later
        self.link.reset()
        self._schedule_retry(cap=5.0)
        self._fail_waiting()

    def _schedule_retry(self, cap: float = 30.0) -> None:
        self.next_attach = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, cap)

    def _fail_waiting(self) -> None:
        """Attach failed: answer what the client is waiting for locally, so nothing hangs."""
        waiting = list(self.pending.values()) + self.held
        self.pending.clear()
        self.held = []
        self.answering_locally = True
        try:
            for line in waiting:
                self.on_line(line)
        finally:
            self.answering_locally = False

    def _set_problem(self, problem: Problem) -> None:
        if self.problem is None or self.problem.code != problem.code:
            _stderr(f"{problem.message}; fix: {problem.hint}")
            log.warning("not ready: %s %s", problem.code, problem.message)
        self.problem = problem

    def on_envelope(self, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("id") != self.attach_id:
            return
        self.attach_id = None
        if doc.get("ok"):
            self.conn = str(doc["result"]["conn"]).encode()
            self.backoff = 0.5
            was_problem = self.problem is not None
            self.problem = None
            log.info("attached conn=%s scope=%s", self.conn.decode(), doc["result"].get("scope"))
            if was_problem:
                _stderr("connected to the apm broker")
            self._after_attach()
            return
        err = doc.get("error") or {}
        code = str(err.get("code", "INTERNAL_ERROR"))
        hints = {
            "VAULT_LOCKED": "apm unlock",
            "SESSION_REQUIRED": "apm delegate (or apm mcp install) and update the client config",
            "PERMISSION_DENIED": "apm delegate --scope read",
            "UNSUPPORTED_VERSION": "upgrade apm so the shim and broker match",
        }
        self._set_problem(
            Problem(code, str(err.get("message", "attach failed")), hints.get(code, "apm doctor"))
        )
        self._schedule_retry(cap=5.0 if code == "VAULT_LOCKED" else 30.0)
        self._fail_waiting()

    def _after_attach(self) -> None:
        """On a new broker connection: re-initialize for the client if needed, then resend."""
        if self.era == "legacy" and self.init_request is not None:
            self.reinit_id = f"{REINIT_PREFIX}{_new_id()[:8]}"
            replay = dict(self.init_request, id=self.reinit_id)
            self._to_broker(json.dumps(replay).encode())
            return
        self._resume()

    def _resume(self) -> None:
        for line in list(self.pending.values()):
            self._to_broker(line)
        held, self.held = self.held, []
        for line in held:
            self.on_line(line)
        if self.client_initialized and self.era == "legacy":
            self.emit({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})

    def _to_broker(self, line: bytes) -> None:
        if self.conn is None:
            return
        self.link.send((MCP_FRAME, self.conn, line))

    def on_broker(self, frames: list[bytes]) -> None:
        if len(frames) == 1:
            self.on_envelope(frames[0])
            return
        if len(frames) != 3 or frames[1] != self.conn:
            return
        kind, _, payload = frames
        if kind == MCP_DETACHED:
            log.info("broker forgot our connection (%s); attaching again", payload.decode())
            self.conn = None
            self.attach()
            return
        is_response, rid = _response_id(payload)
        if is_response:
            if self.reinit_id is not None and rid == self.reinit_id:
                self.reinit_id = None
                self._to_broker(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
                self._resume()
                return
            self.pending.pop(rid, None)
            log.debug("broker -> response id=%s (%d bytes)", rid, len(payload))
        self.emit(payload)

    def on_up(self) -> None:
        """A connection to the broker is up (its handshake done)."""
        if self.conn is None:
            # a (re)started broker: whatever attach was in flight went to the old connection
            self.attach_id = None
            self.attach()

    def on_down(self) -> None:
        """The broker connection ended."""
        if self.conn is not None:
            log.warning("lost the broker connection")
            _stderr("lost the apm broker; waiting for it to come back")
            self.conn = None
            self.problem = Problem(
                "BROKER_UNAVAILABLE", "the apm broker went away", "apm broker start"
            )
            self.backoff = 0.5
            self.next_attach = time.monotonic() + 0.2

    # ------------------------------------------------------------------ client side

    def on_line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line.decode())  # (from str: no encoding detection per line)
        except ValueError:
            log.debug("client sent a line that is not JSON (%d bytes)", len(line))
            self.error(None, -32700, "parse error: not valid JSON")
            return
        if not isinstance(msg, dict):
            self.error(None, -32600, "invalid request: expected one JSON-RPC object per line")
            return
        method = msg.get("method")
        is_response = "id" in msg and ("result" in msg or "error" in msg) and method is None
        if not is_response and not isinstance(method, str):
            rid = msg.get("id")
            valid_id = isinstance(rid, str | int) and not isinstance(rid, bool)
            self.error(rid if valid_id else None, -32600, "invalid request: no method")
            return
        log.debug("client -> %s id=%s (%d bytes)", method or "response", msg.get("id"), len(line))
        if _is_request(msg) and self.era is None:
            self.era = "modern" if (_modern(msg) and method != "initialize") else "legacy"
        if method == "initialize" and _is_request(msg):
            self.init_request = msg
            params = msg.get("params") or {}
            info = params.get("clientInfo") if isinstance(params, dict) else None
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                self.client_name = info["name"][:128]
        elif method == "notifications/initialized":
            self.client_initialized = True
        if self.attach_id is not None or (self.conn is not None and self.reinit_id is not None):
            self.held.append(line)  # attaching or re-initializing: answered right after
            return
        if self.conn is not None and self.problem is None:
            if _is_request(msg):
                self.pending[msg["id"]] = line
            self._to_broker(line)
            return
        if _is_request(msg) and self._worth_retrying_now():
            self.held.append(line)  # the fix may just have happened: try before answering
            self.attach()
            return
        if _is_request(msg):
            self.answer_locally(msg)

    def _worth_retrying_now(self) -> bool:
        recoverable = self.problem is None or self.problem.code in (
            "BROKER_UNAVAILABLE",
            "VAULT_LOCKED",
        )
        return bool(self.token) and recoverable and self.conn is None and not self.answering_locally

    def answer_locally(self, msg: dict[str, Any]) -> None:
        """The broker cannot serve this client now: answer with apm_status and the fix."""
        problem = self.problem or Problem(
            "BROKER_UNAVAILABLE", "connecting to the apm broker", "apm broker start"
        )
        method, rid = msg.get("method"), msg.get("id")
        modern = _modern(msg)
        server_info = {"name": "apm", "version": __version__}
        extra: dict[str, Any] = (
            {"resultType": "complete", "_meta": {SERVER_INFO_META: server_info}} if modern else {}
        )
        instructions = (
            f"apm is not ready: {problem.message}. Ask the person to run: {problem.hint}. "
            "Call apm_status for details; the tools appear once it is fixed."
        )
        result: dict[str, Any]
        if method == "initialize":
            params = msg.get("params") or {}
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            result = {
                "protocolVersion": asked if asked in LEGACY_VERSIONS else LEGACY_VERSIONS[0],
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": server_info,
                "instructions": instructions,
            }
        elif method == "server/discover":
            result = {
                "supportedVersions": [MODERN_VERSION],
                "capabilities": {"tools": {"listChanged": True}},
                "instructions": instructions,
                "cacheScope": "private",
                "ttlMs": 0,
                **extra,
            }
        elif method == "tools/list":
            result = {"tools": [APM_STATUS_TOOL], **extra}
            if modern:
                result.update(cacheScope="private", ttlMs=0)
        elif method == "tools/call":
            params = msg.get("params") or {}
            name = params.get("name") if isinstance(params, dict) else None
            answer = status_result(
                problem.code, problem.message, problem.hint, is_error=name != "apm_status"
            )
            result = {**answer, **extra}
            if "_meta" in answer and "_meta" in extra:
                result["_meta"] = {**answer["_meta"], **extra["_meta"]}
        elif method == "ping":
            result = {}
        else:
            self.error(rid, -32601, f"apm is not ready: {problem.message}; run: {problem.hint}")
            return
        self.emit({"jsonrpc": "2.0", "id": rid, "result": result})

    def read_stdin(self) -> None:
        try:
            chunk = os.read(0, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self.running = False
            return
        self.stdin_buf += chunk
        while True:
            nl = self.stdin_buf.find(b"\n")
            if nl < 0:
                if len(self.stdin_buf) > MAX_LINE:
                    if not self.discarding:
                        self.error(None, -32600, f"message larger than {MAX_LINE} bytes refused")
                    self.discarding = True
                    self.stdin_buf = b""
                return
            line, self.stdin_buf = self.stdin_buf[:nl], self.stdin_buf[nl + 1 :]
            if self.discarding:
                self.discarding = False
                continue
            if len(line) > MAX_LINE:
                self.error(None, -32600, f"message larger than {MAX_LINE} bytes refused")
                continue
            self.on_line(line)

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        if self.token:
            self.attach()
        while self.running:
            now = time.monotonic()
            timeout = 1.0
            if self.attach_id is not None:
                timeout = max(0.0, self.attach_sent + ATTACH_TIMEOUT - now)
            elif self.conn is None and self.token:
                timeout = max(0.0, self.next_attach - now)
            if self.link.wait(0, min(timeout, 1.0)):
                self.read_stdin()
            now = time.monotonic()
            if self.attach_id is not None and now - self.attach_sent > ATTACH_TIMEOUT:
                self._attach_timed_out()
            elif (
                self.conn is None
                and self.attach_id is None
                and self.token
                and now >= self.next_attach
            ):
                self.attach()
        self.close()
        return 0

    def close(self) -> None:
        sent = False
        if self.conn is not None:
            req = {
                "v": PROTOCOL_VERSION,
                "id": "detach",
                "method": "mcp.detach",
                "params": {"conn": self.conn.decode()},
                "client": f"apm-mcp/{__version__}",
            }
            sent = self.link.send((json.dumps(req).encode(),))
        self.link.close(sent_last=sent)
        log.info("exit")


def main(argv: list[str] | None = None) -> int:
    # first: take the token, then make it unreadable to the AI client's other processes
    # (its shell tool is a sibling): non-dumpable, and gone from /proc/<pid>/environ (#13.9)
    token = os.environ.get("APM_EPHEMERAL_ID", "").strip() or None
    exposure.make_non_dumpable()
    exposure.scrub_environ("APM_EPHEMERAL_ID")
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        sys.stderr.write(
            "usage: apm-mcp [--debug]\n\n"
            "The apm MCP server for AI clients (stdio). Configure your client to launch it with\n"
            "APM_EPHEMERAL_ID in its environment (apm mcp install does this for you).\n"
            "--debug (or APM_DEBUG=1) writes mcp_logging.log in the apm config directory.\n"
        )
        return 0
    if "--version" in args:
        sys.stderr.write(f"apm-mcp {__version__}\n")
        return 0
    if "--debug" in args or os.environ.get("APM_DEBUG") == "1":
        where = setup_debug_log()
        _stderr(f"debug log: {where}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    shim = Shim(paths.resolve().broker_addr, token, os.environ.get("APM_EPHEMERAL_AGENT"))
    try:
        return shim.run()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
