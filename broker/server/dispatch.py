"""Turns one request frame into one response frame: envelope, version, lock gate, auth, handler.

Rules:
- `handle` never raises and never puts a traceback on the wire: `to_wire_error` is the one
  function that maps exceptions to wire errors; unexpected ones are logged here with their
  traceback and leave as INTERNAL_ERROR.
- Validation errors name field paths only, never the input (it may be a secret).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from broker import __version__
from broker.core.audit import AuditLog
from broker.core.bindings import AncestryCache, host_fingerprint
from broker.core.crypto import normalize_password, zero
from broker.core.key_cache import KeyCache
from broker.core.requests import RequestStore
from broker.core.rollback import RollbackGuard
from broker.core.sessions import PendingRevocations, SessionRecord, SessionStore, scope_rank
from broker.core.transactions import TxStore
from broker.core.vault import StoredEntry, Vault, utcnow
from broker.paths import Paths
from broker.wire.errors import (
    ApmError,
    BadPassword,
    InternalError,
    InvalidParameters,
    PermissionDenied,
    RequestTooLarge,
    SessionRequired,
    StorageError,
    UnsupportedVersion,
)
from broker.wire.protocol import (
    MAX_FRAME_BYTES,
    METHODS,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Auth,
    ErrorBody,
    Request,
    Response,
    encode_result,
)

from .notify import Notifier
from .transport import Peer

log = logging.getLogger("apm.broker")
T = TypeVar("T")


@dataclass(frozen=True)
class Access:
    """What a method needs before its handler runs.

    `scope` set: the master password, or a session holding at least that scope.
    `owner_only`: the master password, verified now; a session is never enough.
    """

    unlocked: bool = False  # the lock gate: refuse with VAULT_LOCKED first
    scope: str | None = None
    owner_only: bool = False
    grantable: bool = False  # a session lacking `scope` may still pass with a per-entry grant


class Throttle:
    """A growing delay for repeated failed token attempts from one peer (its Unix session)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._fails: dict[int, tuple[int, float]] = {}

    @staticmethod
    def key(peer: Peer) -> int:
        if peer.pid is None:
            return -1
        try:
            return os.getsid(peer.pid)
        except OSError:
            return peer.pid

    def failed(self, peer: Peer) -> float:
        """Record a failure; returns the delay to apply before answering."""
        k = self.key(peer)
        count, last = self._fails.get(k, (0, 0.0))
        now = self.clock()
        if now - last > 600:
            count = 0
        count += 1
        self._fails[k] = (count, now)
        if len(self._fails) > 10_000:
            self._fails.clear()
        return 0.0 if count <= 2 else min(0.05 * 2 ** (count - 3), 5.0)

    def succeeded(self, peer: Peer) -> None:
        if self._fails:
            self._fails.pop(self.key(peer), None)


@dataclass
class State:
    paths: Paths
    cache: KeyCache
    clock: Callable[[], datetime] = utcnow
    ancestry: AncestryCache = field(default_factory=AncestryCache)
    host: str = field(default_factory=host_fingerprint)
    throttle: Throttle = field(default_factory=Throttle)
    audit: AuditLog | None = None
    notifier: Notifier | None = None
    request_max_minutes: int = 60
    txs: TxStore = field(init=False)
    rollback: RollbackGuard = field(init=False)  # rollback defences (core/rollback.py)
    max_ttl: timedelta = timedelta(days=90)
    started_at: float = field(default_factory=time.time)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sync: Any = None  # server/sync_service.SyncService once a sync method or unlock needs it
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    kdf_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kdf")
    )
    io_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="io")
    )

    async def kdf(self, fn: Callable[..., T], *args: Any) -> T:
        """Key derivations run one at a time, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.kdf_pool, fn, *args)

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Durable writes run one at a time, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    def __post_init__(self) -> None:
        self.txs = TxStore(self.clock)
        pending = PendingRevocations(self.paths.state_dir / "pending-revocations.json")
        self.rollback = RollbackGuard(pending)

    _store: SessionStore | None = None
    _store_vault: Vault | None = None
    _mcp_host: asyncio.Future[Any] | None = None

    async def mcp_host(self) -> Any:
        """The McpHost, once its background import finished (None if it failed)."""
        if self._mcp_host is None:
            return None
        if self._mcp_host.done():  # the hot path: no new future per frame
            return self._mcp_host.result()
        return await asyncio.shield(self._mcp_host)

    def sessions(self) -> SessionStore:
        """The session store of the unlocked vault (rebuilt after each unlock)."""
        vault = self.cache.get()
        if self._store is None or self._store_vault is not vault:
            self._store = SessionStore(
                vault.extra.get("sessions", []),
                clock=self.clock,
                ancestry=self.ancestry,
                host=self.host,
            )
            self._store_vault = vault
        return self._store

    _reqs: RequestStore | None = None
    _reqs_vault: Vault | None = None

    def requests(self) -> RequestStore:
        """The access requests of the unlocked vault (rebuilt after each unlock)."""
        vault = self.cache.get()
        if self._reqs is None or self._reqs_vault is not vault:
            self._reqs = RequestStore(vault.extra.get("requests", []), self.clock)
            self._reqs_vault = vault
        return self._reqs

    async def persist_sessions(self, *, locked: bool = False) -> None:
        """Write sessions and access requests into the vault, durably (no secrets in either).

        `locked`: the caller already holds write_lock.
        """
        vault = self.cache.get()
        store = self.sessions()
        reqs = self.requests()

        def work() -> None:
            with vault.mutation():
                vault.extra["sessions"] = store.dump()
                vault.extra["requests"] = reqs.dump()

        if locked:
            await self.io(work)
        else:
            async with self.write_lock:
                await self.io(work)
        store.dirty = False

    def peer_exe(self, peer: Peer) -> str | None:
        if peer.pid is None:
            return None
        chain = self.ancestry.get(peer.pid)
        return chain[0].exe if chain else None

    def record(self, event: str, ctx: Context | None = None, **fields: Any) -> None:
        """Append an audit record; raises StorageError so the caller refuses the operation."""
        if self.audit is None:
            return
        if ctx is not None:
            fields.setdefault("pid", ctx.peer.pid)
            fields.setdefault("exe", ctx.exe if ctx.exe is not None else self.peer_exe(ctx.peer))
            if ctx.session is not None:
                fields.setdefault("session", ctx.session.accessor)
                fields.setdefault("label", ctx.session.label or None)
            else:
                fields.setdefault("actor", "owner" if ctx.owner_proven else None)
        self.audit.append(event, **fields)

    async def flush_and_lock(self) -> bool:
        """Lock the vault, first saving session usage counters (best effort). Hold write_lock."""
        vault = self.cache.peek()
        store = self._store
        if vault is not None and store is not None and self._store_vault is vault and store.dirty:
            try:
                await self.persist_sessions(locked=True)
            except Exception:  # locking must never fail
                log.warning("could not save session usage before locking", exc_info=True)
        self._store = self._store_vault = None
        self._reqs = self._reqs_vault = None
        if self.sync is not None:  # replication stops and its keys are zeroed with the vault's
            self.sync.stop(wait=False)
        return self.cache.lock()


@dataclass
class Context:
    state: State
    peer: Peer
    auth: Auth | None
    request_id: str
    session: SessionRecord | None = None
    identity: bytes = b""
    owner_proven: bool = False
    mcp: Any = None  # the MCP request context, for elicitation (tool calls only)
    grant_needed: bool = False  # the session lacks `secrets`: each entry needs a live grant
    exe: str | None = None  # the peer's executable, when already known (MCP connections)

    def check_grant(self, entry: StoredEntry, field: str) -> None:
        """For a session reading a secret on a grant: refuse unless one covers this field."""
        if not self.grant_needed or self.session is None:
            return
        grant = self.state.requests().grant(self.session.accessor, entry.id, field)
        if grant is None:
            raise PermissionDenied(
                f"this session has scope {self.session.scope!r} and no live grant for this "
                "entry's field",
                hint="ask for it with request_access; the person approves with "
                '"apm request approve REQ"',
                data={"needed": "secrets", "scope": self.session.scope},
            )

    def allows(self, space: str, tags: list[str], name: str) -> bool:
        f = self.session.filter if self.session is not None else None
        return f is None or f.empty or f.allows(space, tags, name)

    def visible(self, entry: StoredEntry) -> bool:
        """Entries outside the session's filter behave as not found."""
        return self.allows(entry.space, entry.tags, entry.name)

    def require_unfiltered(self) -> None:
        if self.session is not None and not self.session.filter.empty:
            raise PermissionDenied(
                "this session is limited to some entries and cannot change spaces",
                hint="ask the owner for a session without an entry filter",
            )

    def password(self) -> bytearray:
        if self.auth is None or self.auth.password is None:
            raise SessionRequired(
                "the master password is required", hint="run the command from a terminal"
            )
        return normalize_password(self.auth.password.get_secret_value())

    async def vault(self) -> Vault:
        return self.state.cache.get()


Handler = Callable[[Context, Any], Awaitable[BaseModel]]


@dataclass(frozen=True)
class Route:
    handler: Handler
    params: type[BaseModel]
    access: Access


ROUTES: dict[str, Route] = {}


H = TypeVar("H", bound=Handler)


def route(method: str, access: Access = Access()) -> Callable[[H], H]:
    def register(fn: H) -> H:
        ROUTES[method] = Route(fn, METHODS[method][0], access)
        return fn

    return register


def to_wire_error(exc: BaseException) -> ErrorBody:
    """The one function that maps an exception to the wire."""
    if isinstance(exc, ApmError):
        return ErrorBody(code=exc.code, message=exc.message, hint=exc.hint, data=exc.data)
    if isinstance(exc, ValidationError):
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(root)" for e in exc.errors()})
        return ErrorBody(
            code=InvalidParameters.code,
            message="invalid parameters: " + ", ".join(fields),
            hint="check the named fields",
            data={
                "fields": fields,
                "errors": [{"loc": e["loc"], "type": e["type"]} for e in exc.errors()],
            },
        )
    log.error("unexpected error", exc_info=exc)
    err = InternalError()
    return ErrorBody(code=err.code, message=err.message, hint=err.hint)


def _printable(text: str, limit: int = 64) -> str:
    """A short, encodable rendering of a caller-supplied label (never more than `limit`)."""
    cleaned = text[:limit].encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in cleaned)


def _envelope(raw: bytes) -> tuple[str, Request]:
    if len(raw) > MAX_FRAME_BYTES:
        raise RequestTooLarge(data={"limit": MAX_FRAME_BYTES})
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidParameters("request is not valid JSON (or nested too deeply)") from exc
    if not isinstance(doc, dict):
        raise InvalidParameters("request must be a JSON object")
    rid = doc.get("id") if isinstance(doc.get("id"), str) else ""
    v = doc.get("v")
    if (
        not isinstance(v, int)
        or isinstance(v, bool)
        or not MIN_PROTOCOL_VERSION <= v <= PROTOCOL_VERSION
    ):
        raw_client = doc.get("client")
        client = _printable(raw_client) if isinstance(raw_client, str) else "unknown client"
        shown = v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 10**6 else "?"
        raise UnsupportedVersion(
            f"{client} speaks protocol {shown}; broker {__version__} speaks "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
            data={
                "client_protocol": v if isinstance(v, int) and not isinstance(v, bool) else None,
                "broker_version": __version__,
                "min_protocol": MIN_PROTOCOL_VERSION,
                "max_protocol": PROTOCOL_VERSION,
            },
        )
    return str(rid)[:64], Request.model_validate(doc)


_READS = frozenset({"broker.ping", "broker.status", "entry.list", "entry.search", "entry.show"})
# audited separately (unlock/lock/sessions/tools) or carrying nothing worth recording
_UNAUDITED = frozenset(
    {
        "broker.ping",
        "broker.status",
        "vault.unlock",
        "vault.lock",
        "mcp.attach",
        "mcp.detach",
        "audit.list",
        "audit.verify",
        "session.whoami",
    }
)
_MUTATIONS = frozenset(
    {
        "entry.add",
        "entry.add_batch",
        "vault.migrate",
        "entry.edit",
        "entry.remove",
        "space.add",
        "space.rename",
        "space.remove",
        "vault.passwd",
        "profile.set",
        "session.create",
        "session.revoke",
        "vault.init",
        "tx.approve",
        "tx.deny",
    }
)


def _ref(params: BaseModel | None) -> dict[str, Any]:
    """What a request was about (ids and names, never values), for its audit record."""
    if params is None:
        return {}
    out: dict[str, Any] = {}
    for attr, key in (
        ("ref", "entry"),
        ("name", "name"),
        ("accessor", "target"),
        ("space", "space"),
        ("tx_id", "tx"),
    ):
        value = getattr(params, attr, None)
        if isinstance(value, str):
            out[key] = value[:200]
    return out


async def handle(state: State, raw: bytes, peer: Peer, identity: bytes = b"") -> bytes:
    started = time.perf_counter()
    rid, method = "", "?"
    ctx: Context | None = None
    params: BaseModel | None = None
    try:
        rid, req = _envelope(raw)
        method = req.method
        route_ = ROUTES.get(req.method)
        if route_ is None:
            raise InvalidParameters(
                "unknown method", data={"method": req.method[:64]}, hint="upgrade apm?"
            )
        params = route_.params.model_validate(req.params)
        ctx = Context(state=state, peer=peer, auth=req.auth, request_id=rid, identity=identity)
        if route_.access.unlocked:
            state.cache.get()  # lock gate: VAULT_LOCKED before anything costly
        await _authorize(ctx, route_.access)
        audited = method not in _UNAUDITED
        if audited and method in _MUTATIONS:
            state.record("request", ctx, method=method, outcome="attempt")
        result = await route_.handler(ctx, params)
        if audited:
            state.record("request", ctx, method=method, code="OK", **_ref(params))
        resp = Response(id=rid, ok=True, result=encode_result(result))
        code = "OK"
    except Exception as exc:
        body = to_wire_error(exc)
        resp = Response(id=rid, ok=False, error=body)
        code = body.code
        if ctx is not None and method not in _UNAUDITED and not isinstance(exc, StorageError):
            try:
                state.record("request", ctx, method=method, code=code, **_ref(params))
            except StorageError as audit_exc:
                resp = Response(id=rid, ok=False, error=to_wire_error(audit_exc))
    ms = (time.perf_counter() - started) * 1000
    level = logging.DEBUG if method in _READS and code == "OK" else logging.INFO
    log.log(level, "%s pid=%s -> %s (%.1f ms)", _printable(method), peer.pid, code, ms)
    try:
        return resp.encode()
    except Exception as exc:  # an unencodable answer still gets a stable one, never a crash
        body = to_wire_error(exc)
        return Response(id=_printable(rid), ok=False, error=body).encode()


async def _authorize(ctx: Context, access: Access) -> None:
    if access.scope is None and not access.owner_only:
        return
    token = ctx.auth.token if ctx.auth is not None else None
    if token is not None and (ctx.auth is None or ctx.auth.password is None):
        if access.owner_only:
            raise PermissionDenied(
                "this operation needs the owner's master password; a session is never enough",
                hint="the person runs it from their own terminal",
            )
        await _authenticate_session(
            ctx, token.get_secret_value(), access.scope or "admin", access.grantable
        )
        return
    await _verify_owner(ctx)


async def _authenticate_session(
    ctx: Context, token: str, needed: str, grantable: bool = False
) -> None:
    state = ctx.state
    store = state.sessions()
    declared = ctx.auth.agent if ctx.auth is not None else None

    def allowed() -> SessionRecord:
        rec = store.lookup(token)
        reason, chain = store.verdict(rec, ctx.peer.pid, declared)
        if reason is not None:
            raise store.deny(rec, reason, ctx.peer.pid, chain)
        return rec

    try:
        rec = allowed()  # bindings first, without side effects
    except SessionRequired as exc:
        accessor = exc.data.get("accessor", "-")
        reason = store.denials.get(accessor, [None])[-1] if accessor != "-" else None
        log.warning(
            "session denied: accessor=%s pid=%s reason=%s",
            accessor,
            ctx.peer.pid,
            reason.reason if reason is not None else "unknown token",
        )
        state.record(
            "session.denied",
            ctx,
            session=accessor if accessor != "-" else None,
            reason=reason.reason if reason is not None else "unknown token",
        )
        delay = state.throttle.failed(ctx.peer)
        if delay:
            await asyncio.sleep(delay)
        raise
    state.throttle.succeeded(ctx.peer)
    if scope_rank(rec.scope) < scope_rank(needed) and grantable:
        ctx.grant_needed = True  # the handler checks a grant for the entry it reads
    elif scope_rank(rec.scope) < scope_rank(needed):
        store.deny(rec, f"scope {rec.scope} lacks {needed}", ctx.peer.pid)
        state.record("session.denied", ctx, session=rec.accessor, reason=f"scope lacks {needed}")
        raise PermissionDenied(
            f"this session has scope {rec.scope!r}; the operation needs {needed!r}",
            hint=f'ask the owner for a session with "apm delegate --scope {needed}"',
            data={"needed": needed, "scope": rec.scope, "accessor": rec.accessor},
        )
    # only a request that will run counts as a use (and may take the pin)
    result = store.check(rec, ctx.peer.pid, declared)
    if result.must_persist:
        await state.persist_sessions()
    ctx.session = rec


async def _verify_owner(ctx: Context) -> None:
    password = ctx.password()
    vault = ctx.state.cache.get()
    try:
        await ctx.state.kdf(vault.check_password, password)
    except BadPassword:
        log.warning("owner check failed: wrong master password (pid=%s)", ctx.peer.pid)
        ctx.state.record("owner.denied", ctx, reason="wrong master password")
        raise
    finally:
        zero(password)
    ctx.owner_proven = True
