"""MCP over streamable HTTP at /mcp, for clients that cannot launch a stdio process.

Authentication is `Authorization: Bearer eps_…` with the same session checks as the socket:
every tools/list and tools/call re-checks the session.

Who is calling is settled once per TCP connection, when it is accepted: the kernel's socket
table (/proc/net/tcp, tcp6) names the uid and inode of the socket at the client end of exactly
that 4-tuple. A connection owned by another uid, or whose owner cannot be found, is reset
before any byte is read. The pid for pid/agent/pin bindings is the process holding that inode,
looked up when a session needs it and kept on the connection (never cached by address).

Rules:
- Loopback only, unless --allow-remote with a TLS certificate and key.
- DNS-rebinding protection: the Host and Origin headers must name this listener.
- Caps (limits.HttpLimits) on connections and MCP sessions, per uid and in total; beyond them
  503 with Retry-After. MCP session state is allocated only for a verified token; a locked
  vault answers 503 naming `apm unlock`. Idle sessions expire.
- No OAuth: the 401 challenge and /.well-known/oauth-protected-resource say bearer tokens
  only, with no authorization server.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mcp.types as types
import uvicorn
from mcp.server import Server, ServerRequestContext
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from broker import __version__
from broker.core.sessions import SessionRecord, scopes_up_to
from broker.wire.errors import InvalidParameters, SessionRequired, VaultLocked

from .context import Context
from .limits import (
    ACCEPT_BATCH,
    FIRST_REQUEST_SECONDS,
    OVERFLOW,
    RETRY_AFTER_SECONDS,
    HttpLimits,
    current_nofile,
)
from .mcp_host import Caller, serve_call, serve_list
from .peer import Peer
from .state import State
from .tcp_peers import SocketOwner, find_owner, pids_holding

log = logging.getLogger("apm.broker.http")
CONNECTION_KEY = "apm.connection"  # the ASGI scope key holding the request's Connection


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, allow_remote: bool) -> Listen:
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidParameters("--http takes HOST:PORT, e.g. 127.0.0.1:8765")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError as exc:
            raise InvalidParameters("--http needs an IP address or localhost") from exc
        if not loopback and not allow_remote:
            raise InvalidParameters(
                f"{host} is not a loopback address",
                hint="serve on 127.0.0.1, or pass --allow-remote with --tls-cert and --tls-key",
            )
        return cls(host, int(port))

    @property
    def hosts(self) -> list[str]:
        names = {self.host, "127.0.0.1", "localhost", "[::1]"}
        return [f"{n}:{self.port}" for n in sorted(names)]

    @property
    def origins(self) -> list[str]:
        return [f"{scheme}://{h}" for h in self.hosts for scheme in ("http", "https")]


@dataclass
class Connection:
    """One accepted TCP connection and who the kernel says owns its client end.

    Identified once, at accept, from the socket tables; kept for the connection's life, so a
    later connection from the same address learns nothing from this one."""

    owner: SocketOwner | None  # None only for a remote peer (--allow-remote)
    over_cap: bool = False
    _pid: asyncio.Future[list[int]] | None = None

    @property
    def key(self) -> int | None:
        """What caps count per: the owning uid; None for remote peers."""
        return self.owner.uid if self.owner is not None else None

    async def pid(self) -> int | None:
        """The process holding the client end (looked up once; None if not exactly one)."""
        if self.owner is None:
            return None
        if self._pid is None:
            self._pid = asyncio.ensure_future(asyncio.to_thread(pids_holding, self.owner.inode))
        pids = await asyncio.shield(self._pid)
        return pids[0] if len(pids) == 1 else None

    def known_pid(self) -> int | None:
        """The pid if it was already looked up (for audit records; never triggers a lookup)."""
        if self._pid is None or not self._pid.done() or self._pid.exception() is not None:
            return None
        pids = self._pid.result()
        return pids[0] if len(pids) == 1 else None


class ConnectionGate:
    """Admission of TCP connections: identity at accept, and the connection caps."""

    def __init__(self, limits: HttpLimits, allow_remote: bool) -> None:
        self.limits = limits
        self.allow_remote = allow_remote
        self.uid = os.getuid()
        self.total = 0
        self.overflow = 0
        self.per_key: Counter[int | None] = Counter()
        self._last_warned: dict[object, float] = {}

    def _warn(self, what: object, message: str, *args: object) -> None:
        """Log a refusal, at most once per 10 s per kind (a flood must not flood the log)."""
        now = time.monotonic()
        if now - self._last_warned.get(what, -1e9) >= 10.0:
            self._last_warned[what] = now
            log.warning(message, *args)

    def admit(
        self, client: tuple[str, int] | None, server: tuple[str, int] | None
    ) -> Connection | None:
        """The connection's identity and standing, or None: reset it now, unanswered."""
        if client is None or server is None:
            return None
        owner = find_owner(client, server)
        if owner is None:
            if not (self.allow_remote and _is_remote(client[0])):
                self._warn(
                    "unknown",
                    "refused an HTTP connection whose owner the kernel does not list (fail closed)",
                )
                return None
        elif owner.uid != self.uid:
            self._warn(
                ("uid", owner.uid),
                "refused HTTP connections from uid %d (not our uid %d)",
                owner.uid,
                self.uid,
            )
            return None
        conn = Connection(owner)
        lim = self.limits
        if self.total >= lim.max_connections or (
            self.per_key[conn.key] >= lim.max_connections_per_uid
        ):
            if self.overflow >= OVERFLOW:
                self._warn("reset", "HTTP connection cap reached: resetting new connections")
                return None
            self._warn("busy", "HTTP connection cap reached (%d open): answering 503", self.total)
            conn.over_cap = True
            self.overflow += 1
            return conn
        self.total += 1
        self.per_key[conn.key] += 1
        return conn

    def release(self, conn: Connection) -> None:
        if conn.over_cap:
            self.overflow -= 1
            return
        self.total -= 1
        self.per_key[conn.key] -= 1
        if self.per_key[conn.key] <= 0:
            del self.per_key[conn.key]


def _is_remote(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    return False


def _protocol_class(gate: ConnectionGate) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, with the connection identified and admitted at accept."""

    class Protocol(H11Protocol):
        apm_conn: Connection | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            conn = gate.admit(_addr(transport, "peername"), _addr(transport, "sockname"))
            if conn is None:
                transport.abort()
                return
            self.apm_conn = conn
            self.app = _with_connection(self.app, conn)
            # a connection that never gets a request under way is closed (slow-loris)
            self.loop.call_later(FIRST_REQUEST_SECONDS, self._no_request_yet)

        def _no_request_yet(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.apm_conn is not None:
                gate.release(self.apm_conn)
                self.apm_conn = None
            super().connection_lost(exc)

    return Protocol


def _addr(transport: asyncio.BaseTransport, name: str) -> tuple[str, int] | None:
    value = transport.get_extra_info(name)
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


def _with_connection(app: ASGIApp, conn: Connection) -> ASGIApp:
    async def with_connection(scope: Scope, receive: Receive, send: Send) -> None:
        scope[CONNECTION_KEY] = conn
        await app(scope, receive, send)

    return with_connection


_CURRENT: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "apm_http_connection", default=None
)


class SessionVerifier:
    """Bearer tokens are session tokens: only an active session's token is accepted."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            rec = self.state.sessions().lookup(token)  # VAULT_LOCKED when locked: refused
        except (SessionRequired, VaultLocked):
            return None
        if rec.state(self.state.clock()) != "active":
            return None  # revoked, expired or used up: 401, like an unknown token
        return AccessToken(
            token=token,
            client_id=rec.accessor,
            scopes=scopes_up_to(rec.scope),
            expires_at=int(rec.expires_at.timestamp()),
        )


class SessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, with MCP sessions capped per uid as well as in total.

    Session state is only ever allocated here, behind the bearer check. Overrides two private
    methods of mcp 2.3.0 (pinned); tests/test_http_limits.py fails if they stop being called.
    """

    def __init__(self, *args: Any, per_uid: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.per_uid = per_uid
        self.owner_key: dict[str, int | None] = {}
        self.per_key: Counter[int | None] = Counter()

    def _admit_session(self, requestor: Any) -> Any:
        conn = _CURRENT.get()
        key = conn.key if conn is not None else None
        if self.per_key[key] >= self.per_uid:
            log.warning("refusing a new MCP session: %d open for this uid", self.per_key[key])
            return None  # the SDK answers 503 (our gate adds Retry-After)
        transport = super()._admit_session(requestor)
        if transport is not None and transport.mcp_session_id is not None:
            self.owner_key[transport.mcp_session_id] = key
            self.per_key[key] += 1
            log.debug("MCP session opened for uid %s (%d open for it)", key, self.per_key[key])
        return transport

    async def _discard_session(self, session_id: str, transport: Any) -> None:
        if session_id in self.owner_key:
            key = self.owner_key.pop(session_id)
            self.per_key[key] -= 1
            if self.per_key[key] <= 0:
                del self.per_key[key]
        await super()._discard_session(session_id, transport)


async def _json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


class HttpGate:
    """Outermost ASGI layer: connection standing, the lock gate, and Retry-After on 503s."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = scope.get(CONNECTION_KEY)
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if not isinstance(conn, Connection):  # every accepted connection has one: fail closed
            await _json(send, 403, {"error": "connection not identified"}, {"Connection": "close"})
            return
        if conn.over_cap:
            body = {
                "code": "BUSY",
                "message": "too many HTTP connections to the apm broker",
                "hint": "retry later; the caps are [http] max_connections* in config.toml",
            }
            await _json(send, 503, body, {**retry, "Connection": "close"})
            return
        if scope.get("path", "").startswith("/mcp") and self.state.cache.peek() is None:
            body = {
                "code": "VAULT_LOCKED",
                "message": "the vault is locked",
                "hint": 'ask the owner to run "apm unlock" (or "apm init" if there is no vault '
                "yet), then retry",
            }
            await _json(send, 503, body, retry)
            return

        async def send_with_retry_after(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = _CURRENT.set(conn)
        try:
            await self.app(scope, receive, send_with_retry_after)
        finally:
            _CURRENT.reset(token)


class RequireBearer:
    """401 unless the bearer check passed. The challenge points to metadata that says: bearer
    session tokens only, no authorization server (so OAuth clients do not start a flow)."""

    def __init__(self, app: ASGIApp, metadata_url: str) -> None:
        self.app = app
        self.metadata_url = metadata_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if isinstance(scope.get("user"), AuthenticatedUser):
            await self.app(scope, receive, send)
            return
        presented = any(k.lower() == b"authorization" for k, _ in scope.get("headers", []))
        parts = ['realm="apm"']
        if presented:  # RFC 6750 3.1: no error code when no credentials were sent
            parts.append('error="invalid_token"')
        parts.append(f'error_description="{BEARER_HINT}"')
        parts.append(f'resource_metadata="{self.metadata_url}"')
        body = {"error": "invalid_token" if presented else "unauthorized", "hint": BEARER_HINT}
        await _json(send, 401, body, {"WWW-Authenticate": "Bearer " + ", ".join(parts)})


BEARER_HINT = (
    "send Authorization: Bearer eps_... with a session token from apm delegate; "
    "apm has no OAuth authorization server"
)


def _metadata_route(path: str, resource: str) -> Route:
    """RFC 9728 protected-resource metadata with no authorization_servers: bearer only."""
    doc = {
        "resource": resource,
        "resource_name": "apm",
        "bearer_methods_supported": ["header"],
    }

    async def metadata(request: Request) -> Response:
        return JSONResponse(
            doc,
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
        )

    return Route(path, endpoint=metadata, methods=["GET"])


class _Server(uvicorn.Server):
    """uvicorn's server as the broker runs it: in a task of the broker's loop, which owns the
    signals. Shared by the HTTP listener and the approval page's own port."""

    _serving: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the broker owns SIGINT/SIGTERM
        yield

    async def launch(self, sockets: list[Any] | None = None) -> bool:
        """Serve in a task and wait until it listens. False when it stopped first without an
        error of its own (the caller says what could not start); its startup error is raised."""
        self._serving = asyncio.create_task(self.serve(sockets=sockets))
        while not self.started:
            if self._serving.done():
                self._serving.result()  # raises the startup error
                return False
            await asyncio.sleep(0.02)
        return True

    async def stop_serving(self) -> None:
        self.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, timeout=5)


class HttpFrontend:
    def __init__(
        self,
        state: State,
        listen: Listen,
        tls: tuple[str, str] | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        limits = limits or HttpLimits()
        self.state = state
        self.listen = listen
        self.tls = tls
        self.limits = limits.within(current_nofile())
        self.gate = ConnectionGate(self.limits, allow_remote=tls is not None)
        self._server: _Server | None = None

    @property
    def serves_page(self) -> bool:
        """The approval page rides on this listener when it is loopback-only (no TLS)."""
        return self.tls is None and self.listen.host in ("127.0.0.1", "localhost")

    @staticmethod
    def _connection(ctx: ServerRequestContext[Any, Any]) -> Connection:
        scope = getattr(ctx.request, "scope", None)
        conn = scope.get(CONNECTION_KEY) if isinstance(scope, dict) else None
        if not isinstance(conn, Connection):  # never expected: fail closed
            raise SessionRequired("the HTTP connection was not identified")
        return conn

    async def _peer(self, ctx: ServerRequestContext[Any, Any]) -> Peer:
        """The kernel's view of this request's connection, identified when it was accepted."""
        conn = self._connection(ctx)
        return Peer(uid=os.getuid(), gid=os.getgid(), pid=await conn.pid())

    def _server_app(self) -> Any:
        state = self.state

        async def authorizer(ctx: ServerRequestContext[Any, Any]) -> Any:
            async def authorize() -> tuple[Context, SessionRecord]:
                tok = get_access_token()
                if tok is None:
                    raise SessionRequired("a Bearer session token is required")
                store = state.sessions()  # VAULT_LOCKED when locked
                rec = store.lookup(tok.token)
                peer = await self._peer(ctx)
                result = store.check(rec, peer.pid, _client_name(ctx))
                if result.must_persist:
                    await state.persist_sessions()
                c = Context(state=state, peer=peer, auth=None, request_id="", session=rec)
                return c, rec

            return authorize

        async def list_tools(
            ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            return await serve_list(state, await authorizer(ctx))

        async def call_tool(
            ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
        ) -> types.CallToolResult:
            tok = get_access_token()
            pid = None
            with contextlib.suppress(SessionRequired):
                pid = self._connection(ctx).known_pid()
            caller = Caller(
                tok.client_id if tok else None,
                Peer(os.getuid(), os.getgid(), pid),
                _client_name(ctx),
            )
            return await serve_call(state, await authorizer(ctx), caller, ctx, params)

        server: Server[Any] = Server(
            "apm",
            version=__version__,
            title="apm password manager",
            instructions="apm is the person's password manager. Call assist to see what this "
            "session can reach; search_entries to find a credential.",
            on_list_tools=list_tools,
            on_call_tool=call_tool,
        )
        scheme = "https" if self.tls else "http"
        base = f"{scheme}://{self.listen.host}:{self.listen.port}"
        lim = self.limits
        manager = SessionManager(
            app=server,
            security_settings=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=self.listen.hosts,
                allowed_origins=self.listen.origins,
            ),
            session_idle_timeout=lim.session_idle_minutes * 60,
            max_sessions=lim.max_sessions,
            per_uid=lim.max_sessions_per_uid,
        )
        metadata = "/.well-known/oauth-protected-resource"
        mcp_endpoint = RequireBearer(StreamableHTTPASGIApp(manager), f"{base}{metadata}/mcp")
        routes = [
            Route("/mcp", endpoint=mcp_endpoint),
            _metadata_route(f"{metadata}/mcp", f"{base}/mcp"),
            _metadata_route(metadata, f"{base}/mcp"),
        ]
        if self.serves_page:  # the approval page shares a loopback listener (#17.1)
            from .approval_page import Page, page_origins

            routes += Page(state, page_origins(self.listen.port)).routes()
        app = Starlette(
            routes=routes,
            middleware=[
                Middleware(
                    AuthenticationMiddleware, backend=BearerAuthBackend(SessionVerifier(state))
                ),
                Middleware(AuthContextMiddleware),
            ],
            lifespan=lambda _app: manager.run(),
        )
        return HttpGate(app, state)

    async def start(self) -> None:
        config = uvicorn.Config(
            self._server_app(),
            host=self.listen.host,
            port=self.listen.port,
            log_level="warning",
            lifespan="on",
            access_log=False,
            ssl_certfile=self.tls[0] if self.tls else None,
            ssl_keyfile=self.tls[1] if self.tls else None,
            http=_protocol_class(self.gate),
            backlog=ACCEPT_BATCH,  # also the accept() batch per loop turn: bounds fds in flight
            proxy_headers=False,  # X-Forwarded-For must not rename the peer
        )
        self._server = _Server(config)
        if not await self._server.launch():
            raise InvalidParameters(f"cannot serve HTTP on {self.listen.host}:{self.listen.port}")
        log.info("MCP over HTTP at http://%s:%d/mcp", self.listen.host, self.listen.port)
        if self.serves_page:
            self.state.links.base = f"http://localhost:{self.listen.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop_serving()


def _client_name(ctx: ServerRequestContext[Any, Any]) -> str | None:
    with contextlib.suppress(AttributeError):
        params = ctx.session.client_params
        if params is not None:
            return str(params.client_info.name)[:128]
    return None
