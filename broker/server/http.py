"""MCP over streamable HTTP at /mcp, for clients that cannot launch a stdio process.

Authentication is `Authorization: Bearer eps_…` with the same session checks as the socket:
every tools/list and tools/call re-checks the session. The peer pid for pid/agent/pin bindings
is the process that owns the client end of the loopback TCP connection, looked up in the
kernel's socket tables (psutil); where it cannot be found, a session with such bindings is
refused with that reason, and a connection owned by another uid is refused outright.

Rules:
- Loopback only, unless --allow-remote with a TLS certificate and key.
- DNS-rebinding protection: the Host and Origin headers must name this listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mcp.types as types
import psutil
import uvicorn
from mcp.server import Server, ServerRequestContext
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.transport_security import TransportSecuritySettings

from broker import __version__
from broker.core.sessions import SessionRecord, scopes_up_to
from broker.wire.errors import InvalidParameters, SessionRequired, VaultLocked

from .dispatch import Context, State
from .mcp_host import Caller, serve_call, serve_list
from .transport import Peer

log = logging.getLogger("apm.broker.http")
PEER_CACHE_SECONDS = 30.0


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


class PeerFinder:
    """The local process owning the client end of a TCP connection to us (cached briefly)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[int | None, float]] = {}

    def find(self, client: tuple[str, int], server: tuple[str, int]) -> int | None:
        now = time.monotonic()
        hit = self._cache.get(client)
        if hit is not None and now - hit[1] < PEER_CACHE_SECONDS:
            return hit[0]
        pid: int | None = None
        with contextlib.suppress(psutil.Error, OSError):
            for c in psutil.net_connections(kind="tcp"):
                mine = c.laddr and tuple(c.laddr)[:2] == client
                if mine and c.raddr and tuple(c.raddr)[1] == server[1] and c.pid:
                    pid = c.pid
                    break
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[client] = (pid, now)
        return pid


class SessionVerifier:
    """Bearer tokens are session tokens. Locked: accepted provisionally, tools say VAULT_LOCKED."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def verify_token(self, token: str) -> AccessToken | None:
        if self.state.cache.peek() is None:
            return AccessToken(token=token, client_id="locked", scopes=[])
        try:
            rec = self.state.sessions().lookup(token)
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


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the broker owns SIGINT/SIGTERM
        yield


class HttpFrontend:
    def __init__(self, state: State, listen: Listen, tls: tuple[str, str] | None = None) -> None:
        self.state = state
        self.listen = listen
        self.tls = tls
        self.peers = PeerFinder()
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def _peer(self, ctx: ServerRequestContext[Any, Any]) -> Peer:
        request = ctx.request
        client = getattr(request, "client", None)
        pid: int | None = None
        if client is not None:
            pid = await asyncio.to_thread(
                self.peers.find, (client.host, client.port), (self.listen.host, self.listen.port)
            )
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).uids().real != os.getuid():
                    raise SessionRequired("connections from another user are refused")
        return Peer(uid=os.getuid(), gid=os.getgid(), pid=pid)

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
            caller = Caller(
                tok.client_id if tok else None,
                Peer(os.getuid(), os.getgid(), None),
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
        return server.streamable_http_app(
            host=self.listen.host,
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                allowed_hosts=self.listen.hosts,
                allowed_origins=self.listen.origins,
            ),
            token_verifier=SessionVerifier(state),
            auth=AuthSettings(
                issuer_url=base,
                resource_server_url=f"{base}/mcp",
                validate_token_resource=False,
            ),
        )

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
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise InvalidParameters(
                    f"cannot serve HTTP on {self.listen.host}:{self.listen.port}"
                )
            await asyncio.sleep(0.02)
        log.info("MCP over HTTP at http://%s:%d/mcp", self.listen.host, self.listen.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=5)


def _client_name(ctx: ServerRequestContext[Any, Any]) -> str | None:
    with contextlib.suppress(AttributeError):
        params = ctx.session.client_params
        if params is not None:
            return str(params.client_info.name)[:128]
    return None
