"""Turns one request frame into one response frame: envelope, version, lock gate, auth, handler.

Rules:
- `handle` never raises and never puts a traceback on the wire: `to_wire_error` is the one
  function that maps exceptions to wire errors; unexpected ones are logged here with their
  traceback and leave as INTERNAL_ERROR.
- Validation errors name field paths only, never the input (it may be a secret).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
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
from broker.core.transactions import Transaction, TxStore, state_allows
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
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Auth,
    ErrorBody,
    Request,
    Response,
    encode_result,
)

from .notify import Notifier
from .operations import OPERATIONS, Operation, Rule
from .peer import Peer

log = logging.getLogger("apm.broker")
T = TypeVar("T")


class Throttle:
    """A growing delay for failed token attempts, keyed by the peer's uid, plus a global budget.

    Rules:
    - The key is what the kernel reports (uid): a new Unix session, process or connection
      does not start a fresh count.
    - A valid call does not reset the count; only a quiet period (QUIET seconds) does.
    - Beyond GLOBAL_FREE failures a minute from everyone together, every failure pays the
      full delay.
    - Penalties are served one at a time (`penalize`): parallel attempts queue up instead of
      sleeping side by side, so the delay bounds the rate, not only the latency.
    """

    FREE = 2  # failures per key before any delay
    MAX_DELAY = 5.0
    QUIET = 600.0
    GLOBAL_FREE = 30

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._fails: dict[int, tuple[int, float]] = {}
        self._recent: collections.deque[float] = collections.deque()
        self._serving: asyncio.Lock | None = None

    @staticmethod
    def key(peer: Peer) -> int:
        return peer.uid if peer.uid is not None else -1

    def failed(self, peer: Peer) -> float:
        """Record a failure; returns the delay to apply before answering."""
        k = self.key(peer)
        count, last = self._fails.get(k, (0, 0.0))
        now = self.clock()
        if now - last > self.QUIET:
            count = 0
        count += 1
        self._fails[k] = (count, now)
        if len(self._fails) > 10_000:
            self._fails.clear()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > 60.0:
            self._recent.popleft()
        if len(self._recent) > self.GLOBAL_FREE:
            return self.MAX_DELAY
        return (
            0.0 if count <= self.FREE else min(0.05 * 2 ** (count - self.FREE - 1), self.MAX_DELAY)
        )

    async def penalize(self, peer: Peer) -> None:
        """Record a failure and serve its delay, one penalty at a time."""
        delay = self.failed(peer)
        if not delay:
            return
        if self._serving is None:
            self._serving = asyncio.Lock()
        async with self._serving:
            await asyncio.sleep(delay)


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
        return self.cache.lock()


def totp_seed_field(entry: StoredEntry) -> str | None:
    """The field holding an entry's TOTP seed (as `Vault.totp` reads it), if it has one."""
    if entry.type == "totp":
        return "secret"
    return "totp" if "totp" in entry.fields else None


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
    via: str = "wire"  # "wire": invoke records the request; "mcp": the tool call is recorded

    def check_grant(self, entry: StoredEntry, field: str, *, codes: bool = False) -> None:
        """For a session reading a secret on a grant: refuse unless one covers this field.

        A TOTP seed is opened only by a grant whose request named the seed field (the person
        saw that); any grant on the entry gives its codes (`codes`)."""
        if not self.grant_needed or self.session is None:
            return
        seed = field == totp_seed_field(entry) and not codes
        grant = self.state.requests().grant(self.session.accessor, entry.id, field, named_only=seed)
        if grant is None and seed:
            raise PermissionDenied(
                "a grant on a TOTP entry gives its codes; the seed needs a request that names "
                f"the {field!r} field",
                hint=f'use get_totp for codes, or request_access with field "{field}"',
                data={"needed": "secrets", "scope": self.session.scope, "field": field},
            )
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
    """The wire's way in: one request frame to one response frame, through `invoke`."""
    started = time.perf_counter()
    rid, method = "", "?"
    quiet = False
    try:
        rid, req = _envelope(raw)
        method = req.method
        op = OPERATIONS.get(req.method)
        if op is None:
            raise InvalidParameters(
                "unknown method", data={"method": req.method[:64]}, hint="upgrade apm?"
            )
        quiet = op.rule.quiet
        params = op.params.model_validate(req.params)
        ctx = Context(state=state, peer=peer, auth=req.auth, request_id=rid, identity=identity)
        result = await invoke(ctx, op, params)
        resp = Response(id=rid, ok=True, result=encode_result(result))
        code = "OK"
    except Exception as exc:
        body = to_wire_error(exc)
        resp = Response(id=rid, ok=False, error=body)
        code = body.code
    ms = (time.perf_counter() - started) * 1000
    level = logging.DEBUG if quiet and code == "OK" else logging.INFO
    log.log(level, "%s pid=%s -> %s (%.1f ms)", _printable(method), peer.pid, code, ms)
    try:
        return resp.encode()
    except Exception as exc:  # an unencodable answer still gets a stable one, never a crash
        body = to_wire_error(exc)
        return Response(id=_printable(rid), ok=False, error=body).encode()


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, ApmError):
        return exc.code
    return InvalidParameters.code if isinstance(exc, ValidationError) else InternalError.code


async def invoke(
    ctx: Context, op: Operation, params: BaseModel, *, tx: Transaction | None = None
) -> BaseModel:
    """The one gate every path runs an operation through, in this order: lock gate → session
    and bindings → scope, entry filter, grants → approval policy → handler → audit record.

    `ctx.session` already set (an MCP connection re-checked it for this message): the session
    step only checks its scope. Neither a session nor the owner's password: refused, never
    treated as the owner. `tx`: the approved transaction this call executes (its commit).
    """
    rule = op.rule
    state = ctx.state
    audited = rule.audit != "none" and ctx.via == "wire"  # tool calls have their own record
    try:
        if rule.unlocked:
            state.cache.get()  # lock gate: VAULT_LOCKED before anything costly
        await _authorize(ctx, rule)
        if rule.mutating:
            await _approval_gate(ctx, op, params, tx)
        if audited and rule.audit == "change":
            state.record("request", ctx, method=op.name, outcome="attempt")
        result = await op.handler(ctx, params)
    except Exception as exc:
        if audited and not isinstance(exc, StorageError):
            state.record("request", ctx, method=op.name, code=_code_of(exc), **_ref(params))
        raise
    if audited:
        state.record("request", ctx, method=op.name, code="OK", **_ref(params))
    return result


async def _approval_gate(
    ctx: Context, op: Operation, params: BaseModel, tx: Transaction | None
) -> None:
    """A session's change runs only as its approval policy allows: `agent` at once (or its
    own two-phase commit), `owner`/`client` only as a transaction the person approved —
    anything else becomes a pending transaction and the call answers APPROVAL_PENDING."""
    rec = ctx.session
    if rec is None:
        return  # the owner, who proved the master password just now
    if tx is not None:
        if (
            tx.method != op.name
            or tx.params is not params
            or tx.accessor != rec.accessor
            or not state_allows(tx, ctx.state.clock())
        ):
            raise PermissionDenied(
                "this change was not approved", hint="preview it again and have it approved"
            )
        return
    if rec.approve == "agent":
        return
    from .approval import hold  # the previews load only when a change is held

    await hold(ctx, op, params)


async def _authorize(ctx: Context, rule: Rule) -> None:
    if rule.scope is None and not rule.owner_only:
        return
    if ctx.session is not None:  # already authenticated by its connection
        if rule.owner_only:
            raise _owner_only()
        _check_scope(ctx, ctx.session, rule.scope or "admin", rule.grantable)
        return
    token = ctx.auth.token if ctx.auth is not None else None
    if token is not None and (ctx.auth is None or ctx.auth.password is None):
        if rule.owner_only:
            raise _owner_only()
        await _authenticate_session(
            ctx, token.get_secret_value(), rule.scope or "admin", rule.grantable
        )
        return
    await _verify_owner(ctx)


def _owner_only() -> PermissionDenied:
    return PermissionDenied(
        "this operation needs the owner's master password; a session is never enough",
        hint="the person runs it from their own terminal",
    )


def filtered_admin(rec: SessionRecord, needed: str) -> PermissionDenied | None:
    """Admin operations see the whole vault's audit log, sessions and transactions; a session
    limited to some entries never gets them (delegation refuses the pair; this refuses one
    stored by an older version)."""
    if needed != "admin" or rec.filter.empty:
        return None
    return PermissionDenied(
        "a session limited to some entries cannot use admin operations",
        hint="ask the owner for an admin session without an entry filter",
        data={"needed": needed, "scope": rec.scope},
    )


def _check_scope(ctx: Context, rec: SessionRecord, needed: str, grantable: bool) -> None:
    refused = filtered_admin(rec, needed)
    if refused is not None:
        raise refused
    if scope_rank(rec.scope) >= scope_rank(needed):
        ctx.grant_needed = False
        return
    if grantable:
        ctx.grant_needed = True  # the handler checks a grant for the entry it reads
        return
    ctx.state.sessions().deny(rec, f"scope {rec.scope} lacks {needed}", ctx.peer.pid)
    ctx.state.record("session.denied", ctx, session=rec.accessor, reason=f"scope lacks {needed}")
    raise PermissionDenied(
        f"this session has scope {rec.scope!r}; the operation needs {needed!r}",
        hint=f'ask the owner for a session with "apm delegate --scope {needed}"',
        data={"needed": needed, "scope": rec.scope, "accessor": rec.accessor},
    )


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
        await state.throttle.penalize(ctx.peer)
        raise
    _check_scope(ctx, rec, needed, grantable)
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
