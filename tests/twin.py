"""What the in-process broker tests share: a `State` with a real vault file and audit log on a
temporary directory (no socket, no process), a settable clock, wire requests sent straight to
`dispatch.handle`, and `Twin`: the broker in-process (real handlers, tools and gate) with
sessions, tool calls and wire requests one line each. Modules whose subject is a fake (a
process table, a notifier, the MCP host) add it around these.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mcp.types as mt
from pydantic import SecretStr

from broker.core.audit import AuditLog
from broker.core.crypto import KdfParams, normalize_password
from broker.core.key_cache import LockPolicy, OpenVault
from broker.core.sessions import CreateSpec, SessionRecord
from broker.core.vault import Change, Vault
from broker.paths import Paths
from broker.server import dispatch, mcp_tools
from broker.server.context import Context
from broker.server.peer import Peer
from broker.server.state import State
from broker.wire.protocol import Auth, Request, Response

from .mcp_client import error_body

FAST_KDF = KdfParams("test", 8 * 1024, 1, 1)  # the smallest a header accepts
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


class Clock:
    """A clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def twin_paths(root: Path) -> Paths:
    paths = Paths(
        vault=root / "vault.apm",
        config_dir=root / "config",
        state_dir=root / "state",
        runtime_dir=root / "run",
        broker_addr=f"ipc://{root}/run/broker.sock",
    )
    paths.state_dir.mkdir(parents=True)
    return paths


@contextlib.contextmanager
def broker_state(
    root: Path,
    password: str,
    *,
    audit_clock: Callable[[], datetime] | None = None,
    sign_audit: bool = True,
    seed: Callable[[Vault], object] | None = None,
    **state_kw: Any,
) -> Iterator[State]:
    """An unlocked State over a fresh vault under `root`; locked and closed on exit.

    `seed` fills the vault before the audit log opens; `sign_audit` gives the log its key now
    (as an unlock would); the other keywords go to `State` (clock, ancestry, host, throttle)."""
    paths = twin_paths(root)
    state = State(paths=paths, cache=OpenVault(LockPolicy()), **state_kw)
    vault = Vault.create(paths.vault, normalize_password(password), FAST_KDF)
    state.cache.put(vault)
    if seed is not None:
        seed(vault)
    audit_kw: dict[str, Any] = {"clock": audit_clock} if audit_clock is not None else {}
    state.audit = AuditLog(paths.state_dir / "audit.jsonl", **audit_kw)
    state.audit.open()
    if sign_audit:
        state.audit.key = vault.audit_key()
    try:
        yield state
    finally:
        state.cache.lock()
        state.kdf_pool.shutdown(wait=True)
        state.io_pool.shutdown(wait=True)
        state.audit.close()


def request_frame(
    method: str,
    params: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    password: str | None = None,
    agent: str | None = None,
) -> bytes:
    auth = None
    if token is not None or password is not None:
        auth = Auth(
            token=SecretStr(token) if token is not None else None,
            password=SecretStr(password) if password is not None else None,
            agent=agent,
        )
    return Request(v=1, method=method, params=params or {}, auth=auth).encode()


async def wire(
    state: State,
    peer: Peer,
    method: str,
    params: dict[str, Any] | None = None,
    **auth: Any,
) -> Response:
    """One wire request through the real dispatcher, as the transport would hand it over."""
    answer = await dispatch.handle(state, request_frame(method, params, **auth), peer)
    return Response.model_validate_json(answer)


@dataclass
class Twin:
    """The broker in-process: real handlers, tools, gate, vault file and audit log; a fake clock.

    Async: use it from `@pytest.mark.anyio` tests (fixture `twin_of`)."""

    state: State
    clock: Clock
    peer: Peer
    password: str

    @property
    def vault(self) -> Vault:
        return self.state.cache.get()

    def session(
        self, scope: str = "write", approve: str = "agent", label: str = "agent-a", **kw: Any
    ) -> tuple[str, SessionRecord]:
        """A session made straight in the store (no owner request): (token, record)."""
        spec = CreateSpec(
            label=label,
            scope=scope,  # type: ignore[arg-type]
            ttl=timedelta(hours=2),
            approve=approve,  # type: ignore[arg-type]
            **kw,
        )
        return self.state.sessions().create(spec)

    async def tool(
        self, rec: SessionRecord, name: str, args: dict[str, Any], mcp: Any = None
    ) -> mt.CallToolResult:
        """A tool call as the MCP host makes it for a connection of session `rec`."""
        ctx = Context(
            state=self.state, peer=self.peer, auth=None, request_id="", session=rec, mcp=mcp
        )
        return await mcp_tools.call(ctx, name, args)

    async def body(
        self, rec: SessionRecord, name: str, args: dict[str, Any], mcp: Any = None
    ) -> dict[str, Any]:
        """A tool call's structured content, with `error` saying whether it failed."""
        result = await self.tool(rec, name, args, mcp)
        if result.is_error:  # errors carry {code, message, hint, data} in _meta only
            return {"error": True, **error_body(result)}
        return {"error": False, **(result.structured_content or {})}

    async def ok(self, rec: SessionRecord, name: str, args: dict[str, Any]) -> dict[str, Any]:
        body = await self.body(rec, name, args)
        assert not body.pop("error"), body
        return body

    async def code(self, rec: SessionRecord, name: str, args: dict[str, Any]) -> str:
        body = await self.body(rec, name, args)
        assert body["error"], body
        return str(body["code"])

    async def wire(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        password: str | None = None,
    ) -> Response:
        return await wire(self.state, self.peer, method, params, token=token, password=password)

    def add(self, name: str, secret: str, space: str = "default", kind: str = "login") -> str:
        field = "password" if kind == "login" else "secret" if kind == "totp" else "key"
        change = Change(fields={}, secrets={field: secret}, remove_fields=[])
        return self.vault.add(kind, name, space, [], None, None, change).id

    def secret_of(self, name: str, field: str | None = None) -> str:
        return self.vault.reveal(self.vault.resolve(name), field)[1]

    def names(self) -> set[str]:
        return {e.name for e in self.vault.entries.values()}


@contextlib.contextmanager
def twin_of(
    root: Path, password: str, seed: Callable[[Vault], object] | None = None
) -> Iterator[Twin]:
    """A Twin over a fresh vault under `root` (the clock drives sessions, txs and audit)."""
    clock = Clock()
    with broker_state(root, password, seed=seed, clock=clock, audit_clock=clock) as state:
        yield Twin(state, clock, Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid()), password)


@dataclass
class SyncTwin:
    """The broker's dispatcher in-process, driven from plain (non-async) tests: its own event
    loop, wire requests as the transport hands them over, and tool calls as the MCP host makes
    them. Modules add their fakes (process table, notifier, MCP host) in a subclass."""

    state: State
    loop: Any  # asyncio.AbstractEventLoop
    clock: Clock
    password: str

    def peer_for(self, pid: int | None) -> Peer:
        return Peer(uid=os.getuid(), gid=os.getgid(), pid=pid)

    @property
    def default_pid(self) -> int | None:
        return os.getpid()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        password: str | None = None,
        agent: str | None = None,
        pid: int | str | None = "default",
    ) -> Response:
        frame = request_frame(method, params, token=token, password=password, agent=agent)
        who = self.peer_for(self.default_pid if pid == "default" else pid)  # type: ignore[arg-type]
        answer = self.loop.run_until_complete(dispatch.handle(self.state, frame, who))
        return Response.model_validate_json(answer)

    def ok(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        resp = self.call(method, params, **kw)
        assert resp.ok, (method, resp.error)
        return resp.result or {}

    def owner(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.ok(method, params, password=self.password)

    def tool(self, rec: SessionRecord, name: str, args: dict[str, Any]) -> mt.CallToolResult:
        ctx = Context(
            state=self.state,
            peer=self.peer_for(self.default_pid),
            auth=None,
            request_id="",
            session=rec,
        )
        result: mt.CallToolResult = self.loop.run_until_complete(mcp_tools.call(ctx, name, args))
        return result

    @property
    def vault(self) -> Vault:
        return self.state.cache.get()
