"""The one gate: `invoke` runs every operation (wire request or MCP tool) through lock gate,
session, scope/filter/grants, approval policy, handler and audit record; `handle` turns one
wire request frame into one response frame through it.

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
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from broker import __version__
from broker.core.crypto import zero
from broker.core.sessions import SessionRecord, scope_rank
from broker.core.transactions import Transaction, state_allows
from broker.wire.errors import (
    ApmError,
    BadPassword,
    InternalError,
    InvalidParameters,
    PermissionDenied,
    RequestTooLarge,
    SessionRequired,
    StorageError,
    TransactionConflict,
    UnsupportedVersion,
)
from broker.wire.protocol import (
    MAX_FRAME_BYTES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    ErrorBody,
    Request,
    Response,
    encode_result,
)

from .context import Context, totp_seed_field
from .operations import OPERATIONS, Operation, Rule, filtered_admin, find
from .peer import Peer
from .state import State, Throttle

if TYPE_CHECKING:
    from .planners import Proposal

log = logging.getLogger("apm.broker")
# State, Throttle (.state) and Context (.context) moved out of this module; the names stay
# importable from here for code written before the move
__all__ = [
    "Context",
    "State",
    "Throttle",
    "execute",
    "handle",
    "invoke",
    "to_wire_error",
    "totp_seed_field",
]


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
    ctx: Context,
    op: Operation,
    params: BaseModel,
    *,
    tx: Transaction | None = None,
    proposal: Proposal | None = None,
) -> BaseModel:
    """The one gate every path runs an operation through, in this order: lock gate → session
    and bindings → scope, entry filter, grants → approval policy → handler → audit record.

    `ctx.session` already set (an MCP connection re-checked it for this message): the session
    step only checks its scope. Neither a session nor the owner's password: refused, never
    treated as the owner. `tx`: the approved transaction this call executes (its commit).
    `proposal`: a tool's preview of this change; it becomes a pending transaction
    (APPROVAL_PENDING naming it) and nothing runs.
    """
    rule = op.rule
    state = ctx.state
    audited = rule.audit != "none" and ctx.via == "wire"  # tool calls have their own record
    try:
        if rule.unlocked:
            state.cache.get()  # lock gate: VAULT_LOCKED before anything costly
        if ctx.session is not None:  # (no coroutine: a session's check never waits)
            _authorize_session(ctx, rule, ctx.session)
        else:
            await _authorize(ctx, rule)
        if rule.mutating:
            await _approval_gate(ctx, op, params, tx, proposal)
        elif tx is not None or proposal is not None:
            raise InternalError(f"{op.name} changes nothing to approve")
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
    ctx: Context,
    op: Operation,
    params: BaseModel,
    tx: Transaction | None,
    proposal: Proposal | None,
) -> None:
    """A session's change runs only as its approval policy allows: `agent` at once (or its
    own two-phase commit), `owner`/`client` only as a transaction the person approved —
    anything else, and every tool's preview, becomes a pending transaction and the call
    answers APPROVAL_PENDING. An MCP tool's change never runs at once, whatever the policy:
    it is previewed (`proposal`) or committed (`tx`)."""
    rec = ctx.session
    if rec is None:
        if proposal is not None:
            raise SessionRequired("only a session's changes are previewed")
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
    if proposal is None and ctx.via != "wire":  # an MCP tool's change is always previewed
        raise PermissionDenied(
            "a tool's change runs only as a previewed transaction",
            hint="call the tool without tx_id for a preview, then commit it",
        )
    if proposal is None and rec.approve == "agent":
        return
    from .approval import hold  # the previews load only when a change is held

    if proposal is not None and (
        proposal.plan.params is not params or proposal.plan.method != op.name
    ):
        raise InternalError("a preview must name the change it previews")
    await hold(ctx, op, params, proposal)


async def execute(ctx: Context, tx: Transaction) -> tuple[BaseModel, str] | None:
    """Run a pending transaction through the gate, at most once: the run first claims it
    (`TxStore.claim`, before its first await: a concurrent commit or approval of the same
    transaction gets TRANSACTION_CLOSED), then the approval its policy names (approval.settle;
    None while it awaits the owner, unclaimed), a conflict check against the entry it was
    previewed from, and the operation it names with exactly the stored params; the audit record
    naming it and its receipt is written under the write lock once no lock came since the claim,
    right before the change (`State.io`: if it cannot be written nothing runs).
    Returns (result, receipt). A conflict closes it (TRANSACTION_CONFLICT); a run that stops
    before its change releases it as it was; one whose change landed leaves it committed."""
    from .approval import settle

    state = ctx.state
    op = find(tx.method)
    if op is None:  # a transaction is only ever created by a planner naming an operation
        raise InternalError(f"no operation {tx.method[:64]!r}")
    if not state.txs.claim(tx):  # awaits the owner: offered, never claimed while it waits
        await settle(ctx, tx)
        return None
    # claimed: the run goes to its end even if this call is cancelled (a client gone or a
    # cancel notification), so the transaction is never released while its write may land
    run = asyncio.ensure_future(_run_claimed(ctx, tx, op))
    run.add_done_callback(_retrieved)
    return await asyncio.shield(run)


def _retrieved(run: asyncio.Future[Any]) -> None:
    """A run whose caller was cancelled: its outcome is in the transaction; only log it."""
    exc = None if run.cancelled() else run.exception()
    if exc is not None:
        log.debug("a transaction run ended with %s", _code_of(exc))


async def _run_claimed(ctx: Context, tx: Transaction, op: Operation) -> tuple[BaseModel, str]:
    """`execute` for a transaction this run claimed: it ends committed, closed or released."""
    from .approval import settle

    state = ctx.state
    receipt = state.txs.new_receipt()
    landed: datetime | None = None
    try:
        if not await settle(ctx, tx):  # never for a claimed transaction
            raise InternalError("a claimed transaction was not settled")
        if tx.entry_id is not None:
            current = state.cache.get().entries.get(tx.entry_id)
            if current is None or current.updated_at != tx.base_updated_at:
                await _conflicted(ctx, tx)
                raise TransactionConflict(data={"tx_id": tx.tx_id, "entry": tx.entry_id})
        state.check_run(tx)  # a lock since the claim (the person was asked meanwhile) ends it

        def announce() -> None:  # `io` writes it under the write lock, right before the change
            state.record("tx.commit", ctx, tx=tx.tx_id, receipt=receipt, tool=tx.tool, hash=tx.hash)

        try:
            # the handler re-checks `expect_updated_at` under the write lock: nothing slips
            # between; its `committed` record lands with the change
            with state.landing(tx, receipt, announce) as at:
                landed = at
                result = await invoke(ctx, op, tx.params, tx=tx)
        except TransactionConflict:
            await _conflicted(ctx, tx)
            raise
    except BaseException:
        if tx.state == "committing" and landed is not None and state.has_landed(tx, receipt):
            state.txs.committed(tx, receipt, landed)  # it failed after its change landed
        else:
            state.txs.release(tx)
        raise
    state.txs.committed(tx, receipt, landed)
    await state.save_tx(tx)  # unless it landed with the change
    return result, receipt


async def _conflicted(ctx: Context, tx: Transaction) -> None:
    """Close `tx`: the entry or space changed since its preview; it can never run."""
    ctx.state.txs.conflicted(tx, "conflict: the entry changed since the preview")
    ctx.state.record("tx.conflict", ctx, tx=tx.tx_id, tool=tx.tool)
    await ctx.state.save_tx(tx)


def _authorize_session(ctx: Context, rule: Rule, rec: SessionRecord) -> None:
    """A context whose session `rec` is already set (authenticated by its connection): only
    its scope is checked."""
    if rule.scope is None and not rule.owner_only:
        return
    ctx.grant_kind = rule.grant_kind  # what a grant must allow, checked by ctx.check_grant
    if rule.owner_only:
        raise _owner_only()
    _check_scope(ctx, rec, rule.scope or "admin", rule.grantable)


async def _authorize(ctx: Context, rule: Rule) -> None:
    """A context without a session yet: its token (a session), its password (the owner) or
    nothing, as the rule asks."""
    if rule.scope is None and not rule.owner_only:
        return
    ctx.grant_kind = rule.grant_kind  # what a grant must allow, checked by ctx.check_grant
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
    if ctx.presence is not None:  # a user-verifying passkey assertion (the approval page)
        try:
            await ctx.presence()
        except ApmError as exc:
            log.warning("owner check failed: passkey assertion refused (%s)", exc.code)
            ctx.state.record("owner.denied", ctx, reason="passkey assertion refused")
            raise
        ctx.owner_proven = True
        return
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
