"""`session.*` methods: delegate (owner only), list/show/why (owner or admin), revoke (anyone).

Rules:
- A session can never create, extend or widen a session: `session.create` is owner-only.
- Revoking needs no password: making things safer is always one step, even when locked.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

from pydantic import SecretStr

from broker.core.sessions import (
    CreateSpec,
    EntryFilter,
    PendingRevocations,
    SessionRecord,
    scopes_up_to,
)
from broker.wire.errors import ApmError, EntryNotFound, InvalidParameters, SessionRequired
from broker.wire.protocol import (
    DenialInfo,
    Empty,
    SessionCreateParams,
    SessionCreateResult,
    SessionDiagnoseResult,
    SessionFields,
    SessionInfo,
    SessionListResult,
    SessionRef,
    SessionRevokeParams,
    SessionRevokeResult,
    SessionWhyResult,
    WhoAmIResult,
)

from .context import Context
from .dispatch import log
from .operations import ADMIN, ANYONE_UNLOCKED, OWNER_CHANGE, Rule, operation
from .state import State


def session_info(rec: SessionRecord, state: State) -> SessionInfo:
    b = rec.bindings
    bindings: dict[str, object] = {"host": b.host is not None}
    if b.pid is not None:
        bindings["pid"] = {"pid": b.pid, "create_time": b.pid_create_time, "name": b.pid_name}
    if b.agent:
        bindings["agent"] = b.agent
    if b.agent_exe:
        bindings["agent_exe"] = b.agent_exe
    if b.agent_exe_pin:
        bindings["agent_exe_pin"] = b.agent_exe_pin
    if b.pin:
        bindings["pin"] = (
            {"pid": b.pinned_pid, "create_time": b.pinned_create_time, "name": b.pinned_name}
            if b.pinned_pid is not None
            else "first use"
        )
    f = rec.filter
    shared = {name: getattr(rec, name) for name in SessionFields.model_fields}
    return SessionInfo(
        **shared,
        scopes=scopes_up_to(rec.scope),
        state=rec.state(state.clock()),
        filter={
            k: v for k, v in (("spaces", f.spaces), ("tags", f.tags), ("entries", f.globs)) if v
        },
        bindings=bindings,
    )


def _pending(state: State) -> PendingRevocations:
    return state.rollback.pending  # the file, and the broker's memory of it


FORGET_ENDED_AFTER = timedelta(days=7)


async def forget_ended_sessions(state: State) -> int:
    """Called right after an unlock: sessions that expired or were revoked more than a week ago
    leave the vault (and `apm session ls`); their audit records stay."""
    store = state.sessions()
    gone = store.prune(FORGET_ENDED_AFTER)
    if gone:
        await state.persist_sessions()
        log.info("forgot %d session(s) that ended more than %s ago", gone, FORGET_ENDED_AFTER)
        with contextlib.suppress(ApmError):
            state.record("session.pruned", count=gone)
    return gone


async def check_at_unlock(state: State) -> list[str]:
    """Called right after an unlock: compare the vault with the audit log and apply every
    revocation the vault file lost (core/rollback.py). Returns the warnings for the owner.
    Fails closed: if this cannot finish, the vault is locked again."""
    vault = state.cache.get()
    try:
        state.rollback.attach(vault, state.audit)
        check = state.rollback.at_unlock(vault, state.audit, state.sessions())
        if check.must_save:
            await state.persist_sessions()
        state.rollback.pending.clear()
    except Exception:
        async with state.write_lock:
            await state.flush_and_lock()
        raise
    return check.warnings


@operation("session.create", OWNER_CHANGE)
async def process_session_create(ctx: Context, p: SessionCreateParams) -> SessionCreateResult:
    state = ctx.state
    ttl = timedelta(seconds=p.ttl_seconds)
    if ttl > state.max_ttl:
        raise InvalidParameters(
            f"ttl exceeds the configured maximum of {int(state.max_ttl.total_seconds())} s",
            hint="use a shorter --ttl, or raise sessions.max_ttl_days in config.toml",
            data={"field": "ttl_seconds"},
        )
    if p.agent and p.agent_exe:
        raise InvalidParameters("use --agent or --agent-exe, not both")
    if p.scope == "admin" and (p.spaces or p.tags or p.entries):
        # admin reads the audit log, every session and every transaction: no entry filter
        # can be kept there, so a filtered admin session would be a promise not kept
        raise InvalidParameters(
            "an admin session cannot be limited to some entries",
            hint="use --scope write (or lower) with --space/--tag/--entry, or drop the filter",
            data={"fields": ["scope", "spaces", "tags", "entries"]},
        )
    store = state.sessions()
    spec = CreateSpec(
        label=p.label,
        scope=p.scope,
        ttl=ttl,
        idle_seconds=p.idle_seconds,
        max_uses=p.max_uses,
        bind_host=p.bind_host,
        pid=p.pid,
        agent=p.agent,
        agent_exe=p.agent_exe,
        agent_exe_pin=p.agent_exe_pin,
        pin=p.pin,
        filter=EntryFilter(spaces=p.spaces, tags=p.tags, globs=p.entries),
        approve=p.approve,
        tool_names=p.tool_names,
    )
    token, rec = store.create(spec)
    try:
        await state.persist_sessions()
    except Exception:
        store.discard(rec.accessor)
        raise
    state.record(
        "session.created",
        ctx,
        target=rec.accessor,
        scope=rec.scope,
        expires_at=rec.expires_at.isoformat(),
        label=rec.label or None,
    )
    log.info(
        "session %s created: scope=%s label=%r expires=%s by pid=%s",
        rec.accessor,
        rec.scope,
        rec.label,
        rec.expires_at.isoformat(timespec="seconds"),
        ctx.peer.pid,
    )
    return SessionCreateResult(token=SecretStr(token), session=session_info(rec, state))


@operation("session.list", ADMIN)
async def process_session_list(ctx: Context, p: Empty) -> SessionListResult:
    store = ctx.state.sessions()
    recs = sorted(store.records.values(), key=lambda r: r.created_at)
    return SessionListResult(sessions=[session_info(r, ctx.state) for r in recs])


def _find(ctx: Context, accessor: str) -> SessionRecord:
    rec = ctx.state.sessions().records.get(accessor)
    if rec is None:
        raise EntryNotFound("no session with this accessor", hint='run "apm session ls"')
    return rec


@operation("session.show", ADMIN)
async def process_session_show(ctx: Context, p: SessionRef) -> SessionInfo:
    return session_info(_find(ctx, p.accessor), ctx.state)


@operation("session.why", ADMIN)
async def process_session_why(ctx: Context, p: SessionRef) -> SessionWhyResult:
    rec = _find(ctx, p.accessor)
    denials = list(ctx.state.sessions().denials.get(rec.accessor, ()))
    return SessionWhyResult(
        session=session_info(rec, ctx.state),
        denials=[DenialInfo(**d.model_dump()) for d in denials],
    )


@operation("session.revoke", Rule(audit="change"))
async def process_session_revoke(ctx: Context, p: SessionRevokeParams) -> SessionRevokeResult:
    if sum((p.accessor is not None, p.token is not None, p.all)) != 1:
        raise InvalidParameters("name one accessor (or token), or pass --all")
    state = ctx.state
    if p.token is not None:
        # never recorded while locked: not even a token's hash is written outside the vault
        store = state.sessions()
        try:
            rec = store.lookup(p.token.get_secret_value())
        except SessionRequired:
            return SessionRevokeResult(revoked=[])
        done = [rec.accessor] if store.revoke(rec.accessor) else []
        await state.persist_sessions()
        log.info("revoked %s (by token) by pid=%s", ",".join(done) or "nothing", ctx.peer.pid)
        state.record("session.revoked", ctx, target=",".join(done) or None, how="token")
        return SessionRevokeResult(revoked=done)
    if state.cache.peek() is None:
        item = (
            {"all_before": state.clock().isoformat()} if p.all else {"accessor": p.accessor or ""}
        )
        await state.io(_pending(state).add, item)
        log.info("revocation recorded while locked (%s), by pid=%s", item, ctx.peer.pid)
        state.record(
            "session.revoked",
            ctx,
            target=p.accessor or "all",
            pending=True,
            all_before=item.get("all_before"),
        )
        return SessionRevokeResult(revoked=[p.accessor] if p.accessor else [], pending=True)
    store = state.sessions()
    if p.all:
        done = store.revoke_all()
    else:
        if (p.accessor or "") not in store.records:
            raise EntryNotFound("no session with this accessor", hint='run "apm session ls"')
        accessor = p.accessor or ""
        done = [accessor] if store.revoke(accessor) else []
    await state.persist_sessions()
    log.info("revoked %s by pid=%s", ",".join(done) or "nothing", ctx.peer.pid)
    state.record("session.revoked", ctx, target=",".join(done) or None)
    return SessionRevokeResult(revoked=done)


@operation("session.diagnose", ANYONE_UNLOCKED)
async def process_session_diagnose(ctx: Context, p: Empty) -> SessionDiagnoseResult:
    """For `apm doctor`: would this token work for this process? The kind of rule only.

    It answers only about the token it is given, so a caller learns nothing about a session
    whose token it does not hold; an unknown token counts as a failed attempt (throttled).
    """
    token = ctx.auth.token if ctx.auth is not None else None
    if token is None:
        return SessionDiagnoseResult(known=False, problem="no token given")
    store = ctx.state.sessions()
    try:
        rec = store.lookup(token.get_secret_value())
    except SessionRequired:
        await ctx.state.throttle.penalize(ctx.peer)
        return SessionDiagnoseResult(
            known=False,
            problem="unknown token (revoked and pruned, from another vault, or mistyped)",
        )
    declared = ctx.auth.agent if ctx.auth is not None else None
    reason, _ = store.verdict(rec, ctx.peer.pid, declared)
    return SessionDiagnoseResult(
        known=True,
        accessor=rec.accessor,
        state=rec.state(ctx.state.clock()),
        scope=rec.scope,
        expires_at=rec.expires_at,
        problem=reason.split(":")[0] if reason else None,
    )


@operation("session.whoami", Rule(unlocked=True, scope="read", audit="none"))
async def process_session_whoami(ctx: Context, p: Empty) -> WhoAmIResult:
    if ctx.session is None:
        return WhoAmIResult(owner=True)
    return WhoAmIResult(owner=False, session=session_info(ctx.session, ctx.state))
