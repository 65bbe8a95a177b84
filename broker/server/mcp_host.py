"""One MCP server session per attached shim, built on the `mcp` SDK's low-level Server.

Frames arriving as [MCP_FRAME, conn, payload] are parsed into SDK session messages and fed
to that connection's Server through anyio memory streams; what the Server writes goes back to
the shim the same way. The SDK serves both protocol eras (2025-11-25 with `initialize`, and
2026-07-28) on the same streams.

Rules:
- A connection belongs to the ZeroMQ identity that attached it; frames from any other
  identity are treated as unknown.
- Every tools/list and tools/call re-checks the session by accessor against the peer pid of
  the frame that carried it: revocation and expiry take effect at the very next message.
- Nothing raised in a handler leaves as a protocol error: see `mcp_tools.run`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp.types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

from broker import __version__
from broker.core.bindings import create_time
from broker.core.sessions import SessionRecord, scope_rank, scopes_up_to
from broker.wire.errors import ApmError, InternalError, SessionRequired, VaultLocked
from broker.wire.protocol import McpAttachParams, McpAttachResult
from broker.wire.relay import APM_STATUS_TOOL, MCP_DETACHED, MCP_FRAME, status_result

from . import eager, mcp_tools
from .context import Context
from .peer import Peer
from .state import State
from .transport import Transport

log = logging.getLogger("apm.broker.mcp")

MAX_CONNECTIONS = 512
MAX_BACKLOG = 1024  # messages one connection may have waiting for its SDK server
IDLE_CONNECTION_SECONDS = 6 * 3600
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
MODERN_VERSION = "2026-07-28"
_PING_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
# what a 2026-07-28 result carries besides the 2025-11-25 fields
SERVER_TITLE = "apm password manager"
MODERN_EXTRA = ',"resultType":"complete","_meta":' + json.dumps(
    {SERVER_INFO_META: {"name": "apm", "title": SERVER_TITLE, "version": __version__}},
    separators=(",", ":"),
)


def _text(payload: bytes) -> str | bytes:
    """What json.loads(payload) decodes, decoded here when it is UTF-8 (the usual case):
    json.loads of bytes first runs its encoding detection, which costs more than the parse of a
    small request. The same choice json.detect_encoding makes for a payload opening with "{"
    (no BOM, second byte not NUL), with the same error handler."""
    if payload[:1] == b"{" and payload[1:2] != b"\x00":
        return payload.decode("utf-8", "surrogatepass")
    return payload


def instructions(rec: SessionRecord, naming: str = "apm") -> str:
    return mcp_tools.rename_text(_instructions(rec), naming)


def _instructions(rec: SessionRecord) -> str:
    scopes = ", ".join(scopes_up_to(rec.scope))
    more = (
        " Secret values need the secrets scope: ask the person to run "
        '"apm delegate --scope secrets" rather than asking for any password.'
        if scope_rank(rec.scope) < scope_rank("secrets")
        else ""
    )
    return (
        f"apm is the person's password manager. This session ({rec.label or rec.accessor}) "
        f"has the scopes {scopes} and expires at {rec.expires_at.isoformat(timespec='minutes')}."
        " Call assist to see what it can reach, search_entries or list_entries to find a "
        f"credential, get_entry for its metadata.{more}"
    )


@dataclass
class Connection:
    conn: str
    identity: bytes
    accessor: str
    peer: Peer
    client_name: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    peer_started: float | None = None  # the shim process's create_time, against pid reuse
    exe: str | None = None  # looked up once at attach, for audit records
    inbound: Any = None  # MemoryObjectSendStream[SessionMessage | Exception]
    task: asyncio.Task[None] | None = None
    initialized: bool = False  # legacy era: the client sent notifications/initialized
    fast: set[asyncio.Task[None]] = field(default_factory=set)
    backlog: collections.deque[SessionMessage] | None = None  # waiting for the SDK's stream


class McpHost:
    def __init__(self, state: State, transport: Transport) -> None:
        self.state = state
        self.transport = transport
        self.conns: dict[str, Connection] = {}

    # ------------------------------------------------------------------ attach / detach

    async def attach(
        self, ctx: Context, identity: bytes, params: McpAttachParams
    ) -> McpAttachResult:
        rec = ctx.session
        if rec is None:
            raise SessionRequired(
                "MCP clients attach with a session token", hint='run "apm delegate"'
            )
        # the session was accepted for this process (a refusal is `session.denied`): what
        # `apm doctor` and the owner read to tell a working client from a refused one
        self.state.record("session.attached", ctx, client=params.client_name)
        for old in [c for c in self.conns.values() if c.identity == identity]:
            await self.detach(old.conn)
        if len(self.conns) >= MAX_CONNECTIONS:
            oldest = min(self.conns.values(), key=lambda c: c.last_seen)
            await self.detach(oldest.conn)
        conn = Connection(
            conn=secrets.token_hex(8),
            identity=identity,
            accessor=rec.accessor,
            peer=ctx.peer,
            client_name=params.client_name,
            peer_started=create_time(ctx.peer.pid) if ctx.peer.pid else None,
            exe=self.state.peer_exe(ctx.peer),
        )
        server = self._server(conn, rec)
        in_send, in_recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
        out_send, out_recv = anyio.create_memory_object_stream[SessionMessage](64)
        conn.inbound = in_send
        conn.task = asyncio.create_task(self._run(conn, server, in_recv, out_send, out_recv))
        self.conns[conn.conn] = conn
        log.info(
            "mcp attach conn=%s session=%s pid=%s client=%s",
            conn.conn,
            rec.accessor,
            ctx.peer.pid,
            params.client_name,
        )
        return McpAttachResult(
            conn=conn.conn, accessor=rec.accessor, scope=rec.scope, expires_at=rec.expires_at
        )

    async def detach(self, conn_id: str) -> None:
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        if conn.inbound is not None:
            await conn.inbound.aclose()
        if conn.task is not None:
            conn.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await conn.task
        log.info("mcp detach conn=%s session=%s", conn_id, conn.accessor)

    async def close_all(self) -> None:
        for conn_id in list(self.conns):
            await self.detach(conn_id)

    async def reap(self) -> int:
        """Free connections whose shim process is gone (killed mid-call: ZeroMQ does not tell
        a ROUTER, but the kernel-reported pid and its create_time do) or idle for hours."""
        cutoff = time.monotonic() - IDLE_CONNECTION_SECONDS
        gone = [
            c
            for c in self.conns.values()
            if c.last_seen < cutoff
            or (
                c.peer.pid is not None
                and c.peer_started is not None
                and create_time(c.peer.pid) != c.peer_started
            )
        ]
        for conn in gone:
            log.info("freeing mcp connection %s: its process %s is gone", conn.conn, conn.peer.pid)
            await self.detach(conn.conn)
        return len(gone)

    # ------------------------------------------------------------------ frames

    def on_frame(self, identity: bytes, conn_id: bytes, payload: bytes, peer: Peer) -> None:
        """One MCP message from a shim. Synchronous: called in order for each frame received."""
        conn = self.conns.get(conn_id.decode(errors="replace"))
        if conn is None or conn.identity != identity:
            self.transport.send_frames(identity, MCP_DETACHED, conn_id, b"UNKNOWN_CONNECTION")
            return
        conn.peer = peer
        conn.last_seen = time.monotonic()
        if self._fast_call(conn, payload):
            return
        try:
            message = types.jsonrpc_message_adapter.validate_json(payload, by_name=False)
        except ValidationError:
            self._invalid(conn, payload)
            return
        self._note_client(conn, message)
        root = getattr(message, "root", message)  # a RootModel or the concrete message
        if getattr(root, "id", None) is None and b'"id"' in payload and self._has_id(payload):
            # the SDK reads a request with an id that is not a string or an integer (1.5,
            # true, {}) as a notification and never answers it: refuse it instead
            self._invalid(conn, payload)
            return
        if getattr(root, "method", None) == "notifications/initialized":
            conn.initialized = True
        self._deliver(conn, SessionMessage(message=message), getattr(root, "id", None))

    def _deliver(self, conn: Connection, msg: SessionMessage, rid: Any) -> None:
        """Hand a message to the connection's SDK server, in order, without blocking the
        broker: what its stream cannot take now waits in a bounded backlog."""
        if conn.backlog is not None:
            if len(conn.backlog) >= MAX_BACKLOG:
                log.warning("mcp connection %s: %d messages waiting", conn.conn, MAX_BACKLOG)
                if isinstance(rid, str | int) and not isinstance(rid, bool):
                    self._send_error(conn, rid, -32000, "too many requests in flight; retry later")
                return
            conn.backlog.append(msg)
            return
        try:
            conn.inbound.send_nowait(msg)
        except anyio.WouldBlock:
            conn.backlog = collections.deque([msg])
            task = asyncio.create_task(self._drain_backlog(conn))
            conn.fast.add(task)
            task.add_done_callback(conn.fast.discard)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.transport.send_frames(conn.identity, MCP_DETACHED, conn.conn.encode(), b"CLOSED")

    async def _drain_backlog(self, conn: Connection) -> None:
        try:
            while conn.backlog:
                await conn.inbound.send(conn.backlog[0])
                conn.backlog.popleft()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.transport.send_frames(conn.identity, MCP_DETACHED, conn.conn.encode(), b"CLOSED")
        finally:
            conn.backlog = None

    # ------------------------------------------------------------------ the hot path

    def _fast_call(self, conn: Connection, payload: bytes) -> bool:
        """`tools/call` of a non-interactive tool on a connection the SDK already initialized:
        parsed and answered with stdlib json instead of the SDK's per-request machinery (which
        costs more than the tool itself). The tool runs through the same `serve_call`: the
        same validation, session check, scope rules and audit record. Anything else — other
        methods, write tools (they may need elicitation), unexpected shapes — returns False
        and goes through the SDK server as before.
        """
        if b'"tools/call"' not in payload:
            return b'"ping"' in payload and self._fast_ping(conn, payload)
        try:
            doc = json.loads(_text(payload))
        except ValueError:
            return False
        if not isinstance(doc, dict) or doc.get("method") != "tools/call":
            return False
        rid, params = doc.get("id"), doc.get("params")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or not isinstance(params, dict):
            return False
        name, args, meta = params.get("name"), params.get("arguments"), params.get("_meta")
        if not isinstance(name, str) or name not in mcp_tools.FAST_TOOLS:
            return False
        if args is not None and not isinstance(args, dict):
            return False
        modern = False
        if isinstance(meta, dict) and PROTOCOL_VERSION_META in meta:
            if (
                meta[PROTOCOL_VERSION_META] != MODERN_VERSION
                or conn.initialized
                or not isinstance(meta.get(CLIENT_CAPABILITIES_META), dict)
            ):
                return False  # the SDK answers what this connection does not serve
            modern = True
            info = meta.get(CLIENT_INFO_META)
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                conn.client_name = info["name"][:128]
        elif not conn.initialized:
            return False
        # run inline: a read-only tool finishes without suspending, so no task and no extra
        # event-loop turn; one that must wait (a session use to persist) becomes a task
        task = eager.start(self._answer_fast(conn, rid, name, args, modern))
        if task is not None:
            conn.fast.add(task)
            task.add_done_callback(conn.fast.discard)
        return True

    def _fast_ping(self, conn: Connection, payload: bytes) -> bool:
        """`ping` on an initialized legacy-era connection: answered `{}` here, as the SDK
        answers it (no session check there either), without its per-request machinery (a
        ping cost more broker CPU than a tool call). A modern-era ping (its `_meta` names a
        protocol version), an odd id or odd params go to the SDK as before."""
        if not conn.initialized:
            return False
        try:
            doc = json.loads(_text(payload))
        except ValueError:
            return False
        if not isinstance(doc, dict) or doc.get("method") != "ping" or doc.keys() - _PING_KEYS:
            return False
        rid, params = doc.get("id"), doc.get("params")
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            return False
        if params is not None:
            if not isinstance(params, dict):
                return False
            meta = params.get("_meta")
            if meta is not None and (not isinstance(meta, dict) or PROTOCOL_VERSION_META in meta):
                return False
        rid_json = str(rid) if isinstance(rid, int) else json.dumps(rid)
        answer = b'{"jsonrpc":"2.0","id":' + rid_json.encode() + b',"result":{}}'
        self.transport.send_frames(conn.identity, MCP_FRAME, conn.conn.encode(), answer)
        return True

    async def _answer_fast(
        self, conn: Connection, rid: str | int, name: str, args: Any, modern: bool
    ) -> None:
        # (a partial, not a closure coroutine: one coroutine layer fewer per call)
        authorize = functools.partial(self._authorize, conn)
        caller = Caller(conn.accessor, conn.peer, conn.client_name)
        try:
            outcome = await serve_outcome(self.state, authorize, caller, None, name, args)
            body = outcome.json_body(MODERN_EXTRA if modern else "")
        except Exception:  # serve_outcome turns failures into results; this is a last resort
            log.error("fast tools/call failed", exc_info=True)
            body = mcp_tools.error_outcome(InternalError()).json_body(
                MODERN_EXTRA if modern else ""
            )
        rid_json = str(rid) if isinstance(rid, int) else json.dumps(rid)  # (never a bool here)
        head = b'{"jsonrpc":"2.0","id":' + rid_json.encode() + b',"result":'
        self.transport.send_frames(conn.identity, MCP_FRAME, conn.conn.encode(), head + body + b"}")

    def _send_error(self, conn: Connection, rid: Any, code: int, message: str) -> None:
        err = {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
        self.transport.send_frames(
            conn.identity, MCP_FRAME, conn.conn.encode(), json.dumps(err).encode()
        )

    def _invalid(self, conn: Connection, payload: bytes) -> None:
        rid: Any = None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            doc = json.loads(payload)
            rid = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            rid = None
        self._send_error(conn, rid, -32600, "invalid JSON-RPC message")

    @staticmethod
    def _has_id(payload: bytes) -> bool:
        with contextlib.suppress(ValueError):
            doc = json.loads(payload)
            return isinstance(doc, dict) and doc.get("id") is not None and "method" in doc
        return False

    @staticmethod
    def _note_client(conn: Connection, message: Any) -> None:
        root = getattr(message, "root", message)  # a RootModel or the concrete message
        params = getattr(root, "params", None)
        if not isinstance(params, dict):
            return
        info = params.get("clientInfo")
        meta = params.get("_meta")
        if info is None and isinstance(meta, dict):
            info = meta.get(CLIENT_INFO_META)
        if isinstance(info, dict) and isinstance(info.get("name"), str):
            conn.client_name = info["name"][:128]

    async def _run(
        self,
        conn: Connection,
        server: Server[Any],
        in_recv: Any,
        out_send: Any,
        out_recv: Any,
    ) -> None:
        async def pump() -> None:
            async with out_recv:
                async for msg in out_recv:
                    raw = msg.message.model_dump_json(by_alias=True, exclude_unset=True)
                    self.transport.send_frames(
                        conn.identity, MCP_FRAME, conn.conn.encode(), raw.encode()
                    )

        pump_task = asyncio.create_task(pump())
        try:
            opts = server.create_initialization_options(NotificationOptions(tools_changed=True))
            await server.run(in_recv, out_send, opts)
        except Exception:
            log.error("mcp connection %s failed", conn.conn, exc_info=True)
        finally:
            await pump_task
            self.conns.pop(conn.conn, None)

    # ------------------------------------------------------------------ the SDK server

    async def _authorize(self, conn: Connection) -> tuple[Context, SessionRecord]:
        """Re-check the session for this message; raises VAULT_LOCKED / SESSION_REQUIRED."""
        store = self.state.sessions()
        result = store.check_accessor(conn.accessor, conn.peer.pid, conn.client_name)
        if result.must_persist:  # a pin taken or a counted use: durable before answering
            await self.state.persist_sessions()
        ctx = Context(
            state=self.state,
            peer=conn.peer,
            auth=None,
            request_id="",
            session=result.record,
            exe=conn.exe,
        )
        return ctx, result.record

    def _server(self, conn: Connection, rec: SessionRecord) -> Server[Any]:
        async def authorize() -> tuple[Context, SessionRecord]:
            return await self._authorize(conn)

        async def list_tools(
            ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            return await serve_list(self.state, authorize)

        async def call_tool(
            ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
        ) -> types.CallToolResult:
            caller = Caller(conn.accessor, conn.peer, conn.client_name)
            return await serve_call(self.state, authorize, caller, ctx, params)

        return Server(
            "apm",
            version=__version__,
            title=SERVER_TITLE,
            instructions=instructions(rec, self.state.tool_naming(rec)),
            on_list_tools=list_tools,
            on_call_tool=call_tool,
        )


Authorize = Callable[[], Awaitable[tuple[Context, SessionRecord]]]


@dataclass
class Caller:
    """Who is calling, for audit records of calls refused before a session was established."""

    accessor: str | None
    peer: Peer
    client_name: str | None


async def serve_list(state: State, authorize: Authorize) -> types.ListToolsResult:
    """tools/list: the session's tools, or only apm_status when it cannot be served."""
    try:
        _, rec = await authorize()
    except ApmError:
        return types.ListToolsResult(tools=[types.Tool.model_validate(APM_STATUS_TOOL)])
    now = state.clock()
    # only a reveal grant lists decrypt_entry/get_totp: a use grant never opens them
    has_grant = any(
        r.status(now) == "approved" and r.access == "reveal"
        for r in state.requests().listing(rec.accessor)
    )
    tools = mcp_tools.tools_for(rec.scope, has_grant, state.tool_naming(rec))
    return types.ListToolsResult(tools=tools)


async def serve_call(
    state: State,
    authorize: Authorize,
    caller: Caller,
    mcp_ctx: Any,
    params: types.CallToolRequestParams,
) -> types.CallToolResult:
    """tools/call: re-check the session, run the tool, record it (fail closed)."""
    outcome = await serve_outcome(state, authorize, caller, mcp_ctx, params.name, params.arguments)
    return outcome.to_mcp()


async def serve_outcome(
    state: State,
    authorize: Authorize,
    caller: Caller,
    mcp_ctx: Any,
    name: str,
    arguments: dict[str, Any] | None,
) -> mcp_tools.Outcome:
    """`serve_call` short of the SDK model (the relay's fast path serializes it itself)."""
    if name == "apm_status":
        return await serve_status(authorize)
    try:
        c, _ = await authorize()
    except ApmError as exc:
        why = "vault locked"
        if isinstance(exc, SessionRequired) and caller.accessor is not None:
            reason = state.sessions().denials.get(caller.accessor)
            why = reason[-1].reason if reason else "unknown"
            log.warning("mcp call refused: session=%s reason=%s", caller.accessor, why)
        with contextlib.suppress(ApmError):
            state.record(
                "session.denied",
                session=caller.accessor,
                pid=caller.peer.pid,
                tool=name[:64],
                reason=why,
                client=caller.client_name,
            )
        return mcp_tools.error_outcome(exc)
    c.mcp = mcp_ctx  # for the client approval policy (elicitation)
    result = await mcp_tools.run(c, name, arguments)
    try:  # fail closed: no record, no result
        state.record(
            "tool",
            c,
            tool=name[:64],
            code=mcp_tools.result_code(result),
            client=caller.client_name,
            **mcp_tools.result_refs(arguments, result),
        )
    except ApmError as exc:
        return mcp_tools.error_outcome(exc)
    return result


async def serve_status(authorize: Authorize) -> mcp_tools.Outcome:
    try:
        _, rec = await authorize()
    except VaultLocked as exc:
        return _status(exc.code, exc.message, exc.hint or 'run "apm unlock"')
    except ApmError as exc:
        return _status(exc.code, exc.message, 'ask the person to run "apm delegate"')
    message = f"ready: scopes {', '.join(scopes_up_to(rec.scope))}"
    body = {"ready": True, "code": "OK", "message": message, "hint": ""}
    return mcp_tools.Outcome(body, message, is_error=False)


def _status(code: str, message: str, hint: str) -> mcp_tools.Outcome:
    doc = status_result(code, message, hint, is_error=False)
    return mcp_tools.Outcome(doc["structuredContent"], str(doc["content"][0]["text"]), False)
