"""One `process_<method>` per wire method, registered with the dispatcher's route table."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import SecretStr

from broker import __version__
from broker.core import crypto
from broker.core.crypto import PROFILES, normalize_password, zero
from broker.core.vault import Change, StoredEntry, Vault, construct, read_header
from broker.plugin_registry import check_type_filter
from broker.wire.entries import ENTRY_TYPES, EntryMeta
from broker.wire.errors import (
    AlreadyExists,
    BadPassword,
    PermissionDenied,
    TransactionConflict,
    VaultLocked,
    VaultNotFound,
)
from broker.wire.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Empty,
    EntryAddParams,
    EntryEditParams,
    EntryGetParams,
    EntryGetResult,
    EntryListParams,
    EntryListResult,
    EntryRef,
    EntryRemoveParams,
    EntryRemoveResult,
    EntryResult,
    EntrySearchParams,
    EntrySearchResult,
    InitParams,
    InitResult,
    LockResult,
    PasswdParams,
    PingResult,
    ProfileInfo,
    ProfileSetParams,
    SearchHit,
    SecretValue,
    ShutdownResult,
    SpaceAddParams,
    SpaceInfo,
    SpaceListResult,
    SpaceRemoveParams,
    SpaceRemoveResult,
    SpaceRenameParams,
    StatusResult,
    TotpResult,
    UnlockResult,
)

from . import hardening, sync_service
from .context import Context
from .dispatch import log
from .operations import (
    ADMIN,
    LISTING,
    OWNER_CHANGE,
    PUBLIC,
    READ,
    SECRETS,
    UNAUDITED,
    WRITE,
    Rule,
    operation,
)
from .session_handlers import check_at_unlock, forget_ended_sessions
from .state import State


def _secrets(values: dict[str, SecretValue]) -> dict[str, str]:
    return {k: v.value.get_secret_value() for k, v in values.items()}


# ---------------------------------------------------------------------- broker


@operation("broker.ping", PUBLIC)
async def process_ping(ctx: Context, p: Empty) -> PingResult:
    return PingResult(
        version=__version__,
        protocol=PROTOCOL_VERSION,
        min_protocol=MIN_PROTOCOL_VERSION,
        pid=os.getpid(),
    )


@operation("broker.status", PUBLIC)
async def process_status(ctx: Context, p: Empty) -> StatusResult:
    st = ctx.state
    vault = st.cache.peek()
    profile: str | None = None
    if vault is not None:
        profile = vault.header.kdf.profile
    elif st.paths.vault.exists():
        try:
            profile = read_header(st.paths.vault).kdf.profile
        except Exception:  # status must answer even for a damaged vault
            profile = None
    times = st.cache.lock_times()
    return StatusResult(
        version=__version__,
        protocol=PROTOCOL_VERSION,
        pid=os.getpid(),
        uid=os.getuid(),
        socket=st.paths.broker_addr,
        vault_path=str(st.paths.vault),
        vault_exists=st.paths.vault.exists(),
        locked=vault is None,
        profile=profile,
        entries=len(vault.entries) if vault is not None else None,
        unlocked_at=st.cache.unlocked_at,
        idle_lock_at=times[0] if times else None,
        hard_lock_at=times[1] if times else None,
        log_path=str(st.paths.log_path),
        hardening=hardening.report(st.cache.mlocked),
        mcp_connections=await _mcp_connections(st),
        integrity=st.rollback.integrity(st.audit),
        throttle_failures=st.throttle.failures(ctx.peer),
    )


async def _mcp_connections(st: State) -> int:
    host = st._mcp_host.result() if st._mcp_host and st._mcp_host.done() else None
    return len(host.conns) if host is not None else 0


@operation("broker.shutdown", Rule())
async def process_shutdown(ctx: Context, p: Empty) -> ShutdownResult:
    log.info("shutdown requested by pid=%s", ctx.peer.pid)
    ctx.state.shutdown.set()
    return ShutdownResult(pid=os.getpid())


# ---------------------------------------------------------------------- vault


@operation("vault.init", Rule(audit="change"))
async def process_vault_init(ctx: Context, p: InitParams) -> InitResult:
    path = ctx.state.paths.vault
    password = ctx.password()
    try:
        async with ctx.state.write_lock:
            if path.exists():
                raise AlreadyExists(
                    f"a vault already exists at {path}",
                    hint='unlock it with "apm unlock", or set APM_VAULT_PATH for another one',
                )
            vault = await ctx.state.kdf(Vault.create, path, password, PROFILES[p.profile])
            ctx.state.cache.put(vault)
            if ctx.state.audit is not None:
                ctx.state.audit.key = vault.audit_key()
            ctx.state.rollback.attach(vault, ctx.state.audit)
            await ctx.state.io(vault.save)  # generation after any the log saw (old vault here)
    finally:
        zero(password)
    log.info("vault created at %s (profile %s)", path, p.profile)
    return InitResult(vault_path=str(path), profile=p.profile)


@operation("vault.unlock", UNAUDITED)
async def process_vault_unlock(ctx: Context, p: Empty) -> UnlockResult:
    password = ctx.password()
    try:
        current = ctx.state.cache.peek()
        if current is not None:
            await ctx.state.kdf(current.check_password, password)
        else:
            if not ctx.state.paths.vault.exists():
                raise VaultNotFound(f"no vault at {ctx.state.paths.vault}")
            vault = await ctx.state.kdf(
                functools.partial(Vault.open, ctx.state.paths.vault, password, index=False)
            )
            async with ctx.state.write_lock:
                ctx.state.cache.put(vault)
    except BadPassword:
        log.warning("unlock failed: wrong master password (pid=%s)", ctx.peer.pid)
        ctx.state.record("vault.unlock_failed", ctx, reason="wrong master password")
        raise
    finally:
        zero(password)
    vault = ctx.state.cache.get()
    if ctx.state.audit is not None:
        ctx.state.audit.key = vault.audit_key()
    try:
        ctx.state.record("vault.unlock", ctx)
    except Exception:
        async with ctx.state.write_lock:
            await ctx.state.flush_and_lock()  # fail closed: no unlock without its record
        raise
    lost = ctx.state.tx_decisions_lost() if current is None else {}
    warnings = await check_at_unlock(ctx.state)
    if current is None:
        await ctx.state.restore_txs(lost)  # pending approvals survive a restart (#15)
    await forget_ended_sessions(ctx.state)
    await sync_service.on_unlock(ctx.state)
    idle_at, hard_at = ctx.state.cache.lock_times() or (None, None)
    if idle_at is None or hard_at is None:
        raise VaultLocked()
    log.info("vault unlocked by pid=%s", ctx.peer.pid)
    if current is None:
        # the search index is built once this reply is sent: the reply goes out in the same
        # loop step as this return (dispatch.handle, then transport.send), before call_soon's
        # callback, so the thread's CPU no longer delays it (~0.4 s of CPU at 100k entries)
        asyncio.get_running_loop().call_soon(vault.build_search_index_in_background)
    return UnlockResult(
        entries=len(vault.entries), idle_lock_at=idle_at, hard_lock_at=hard_at, warnings=warnings
    )


@operation("vault.lock", UNAUDITED)
async def process_vault_lock(ctx: Context, p: Empty) -> LockResult:
    async with ctx.state.write_lock:
        was = await ctx.state.flush_and_lock()
    log.info("vault locked by pid=%s", ctx.peer.pid)
    with contextlib.suppress(Exception):  # locking never fails, even if the log does
        ctx.state.record("vault.lock", ctx, reason="requested", was_unlocked=was)
    return LockResult(was_unlocked=was)


@operation("vault.passwd", OWNER_CHANGE)
async def process_vault_passwd(ctx: Context, p: PasswdParams) -> Empty:
    vault = ctx.state.cache.get()
    new = normalize_password(p.new_password.get_secret_value())
    try:
        async with ctx.state.write_lock:
            await ctx.state.kdf(vault.rewrap, new, vault.header.kdf)
    finally:
        zero(new)
    log.info("master password changed")
    return Empty()


def _profile_info(vault: Vault) -> ProfileInfo:
    k = vault.header.kdf
    return ProfileInfo(
        profile=k.profile, memory_kib=k.memory_kib, time_cost=k.time_cost, parallelism=k.parallelism
    )


@operation("profile.show", ADMIN, tools=("manage_profiles",))
async def process_profile_show(ctx: Context, p: Empty) -> ProfileInfo:
    return _profile_info(ctx.state.cache.get())


@operation("profile.set", OWNER_CHANGE)
async def process_profile_set(ctx: Context, p: ProfileSetParams) -> ProfileInfo:
    vault = ctx.state.cache.get()
    password = ctx.password()
    try:
        async with ctx.state.write_lock:
            await ctx.state.kdf(vault.rewrap, password, PROFILES[p.profile])
    finally:
        crypto.zero(password)
    log.info("kdf profile set to %s", p.profile)
    return _profile_info(vault)


# ---------------------------------------------------------------------- entries


@operation("entry.add", WRITE, tools=("add_entry", "generate_password"))
async def process_entry_add(ctx: Context, p: EntryAddParams) -> EntryResult:
    vault = ctx.state.cache.get()
    change = Change(fields=p.fields, secrets=_secrets(p.secrets), remove_fields=[])
    if not ctx.allows(p.space, p.tags, p.name):
        raise PermissionDenied(
            "this session may not create entries outside its entry filter",
            hint="ask the owner for a session that covers this space, tag or name",
        )
    async with ctx.state.write_lock:
        entry = await ctx.state.io(
            vault.add, p.type, p.name, p.space, p.tags, p.url, p.notes, change
        )
    return EntryResult(entry=entry.meta())


@operation("entry.list", LISTING, tools=("list_entries",))
async def process_entry_list(ctx: Context, p: EntryListParams) -> EntryListResult:
    vault = ctx.state.cache.get()
    if p.type is not None and p.type not in ENTRY_TYPES:  # a plugin's type, or a mistake
        check_type_filter(p.type, (e.type for e in vault.entries.values()))
    matched = sorted(
        vault.iter_entries(p.space, p.type, p.tag, ctx.visible),
        key=lambda e: (e.space, e.name.casefold()),
    )
    page = matched[p.offset : p.offset + p.limit]
    return EntryListResult(entries=[e.meta() for e in page], total=len(matched))


@operation("entry.search", LISTING, tools=("search_entries",))
async def process_entry_search(ctx: Context, p: EntrySearchParams) -> EntrySearchResult:
    if p.type is not None and p.type not in ENTRY_TYPES:  # a plugin's type, or a mistake
        stored = ctx.state.cache.get().entries.values()
        check_type_filter(p.type, (e.type for e in stored))
    snapshot = ctx.state.cache.get().search_snapshot()  # other calls go on while it runs

    def run() -> list[SearchHit]:
        # the hits' models are built in the thread too (entries are immutable): ~0.6 ms for
        # 50 hits that a ping would otherwise wait out on the event loop
        found = snapshot.search(p.query, p.space, p.type, p.tag, p.limit, ctx.visible)
        return [SearchHit(entry=e.meta(), score=s) for e, s in found]

    return EntrySearchResult(hits=await asyncio.to_thread(run))


@operation("entry.show", LISTING, tools=("get_entry",))
async def process_entry_show(ctx: Context, p: EntryRef) -> EntryResult:
    vault = ctx.state.cache.get()
    meta = shown_meta(vault, vault.resolve(p.ref, p.space, ctx.visible))
    return construct(EntryResult, {"entry": meta})  # (meta() is a validated EntryMeta)


# per open vault (gone with it at lock): entry id -> what entry.show answered for the stored
# entry object the vault held. A stored entry is never changed in place (an edit stores a new
# object), so while the vault holds the same object its metadata is the same. Only entry.show
# answers from it: its result is only ever serialized (the wire) or read (get_entry), never
# changed, so its JSON is remembered beside it (`shown_json`).
@dataclass(slots=True)
class _Shown:
    entry: StoredEntry
    meta: EntryMeta
    json: tuple[dict[str, Any], str] | None = None  # meta's JSON shape and its text


_SHOWN: weakref.WeakKeyDictionary[Vault, dict[str, _Shown]] = weakref.WeakKeyDictionary()
_SHOWN_MAX = 1024  # entries remembered per vault (all forgotten when it is full)


def shown_meta(vault: Vault, entry: StoredEntry) -> EntryMeta:
    """`entry.meta()`, built once per stored entry object (get_entry runs this per call)."""
    metas = _SHOWN.get(vault)
    if metas is None:
        metas = _SHOWN[vault] = {}
    hit = metas.get(entry.id)
    if hit is not None and hit.entry is entry:
        return hit.meta
    meta = entry.meta()
    if len(metas) >= _SHOWN_MAX:
        metas.clear()
    metas[entry.id] = _Shown(entry, meta)
    return meta


def shown_json(
    vault: Vault, meta: EntryMeta, text: Callable[[Any], str]
) -> tuple[dict[str, Any], str]:
    """`meta.model_dump(mode="json")` and `text(...)` of it, remembered when `meta` is the very
    object entry.show answered (`shown_meta`): a pure function of an object never changed."""
    metas = _SHOWN.get(vault)
    hit = metas.get(meta.id) if metas is not None else None
    if hit is not None and hit.meta is meta and hit.json is not None:
        return hit.json
    doc = meta.model_dump(mode="json")
    answer = (doc, text(doc))
    if hit is not None and hit.meta is meta:
        hit.json = answer
    return answer


@operation("entry.get", SECRETS, tools=("get_entry", "decrypt_entry"))
async def process_entry_get(ctx: Context, p: EntryGetParams) -> EntryGetResult:
    vault = ctx.state.cache.get()
    entry = vault.resolve(p.ref, p.space, ctx.visible)
    ctx.check_grant(entry, p.field or vault.default_field(entry))
    field, value = vault.reveal(entry, p.field)
    return EntryGetResult(id=entry.id, name=entry.name, field=field, value=SecretStr(value))


@operation("entry.edit", WRITE, tools=("edit_entry", "generate_password"))
async def process_entry_edit(ctx: Context, p: EntryEditParams) -> EntryResult:
    vault = ctx.state.cache.get()
    change = Change(fields=p.fields, secrets=_secrets(p.secrets), remove_fields=p.remove_fields)
    async with ctx.state.write_lock:
        entry = vault.resolve(p.ref, p.space, ctx.visible)
        _unchanged(entry, p.expect_updated_at)
        target = (p.move_to or entry.space, entry.tags, p.new_name or entry.name)
        if not ctx.allows(*target):
            raise PermissionDenied("this session may not move entries outside its filter")
        updated = await ctx.state.io(
            lambda: vault.edit(
                entry,
                new_name=p.new_name,
                move_to=p.move_to,
                add_tags=p.add_tags,
                remove_tags=p.remove_tags,
                url=p.url,
                notes=p.notes,
                change=change,
            )
        )
    return EntryResult(entry=updated.meta())


def _space_unchanged(vault: Vault, space: str, expected: list[str] | None) -> None:
    """Under the write lock: the space still holds exactly the previewed entries."""
    if expected is None:
        return
    current = {e.id for e in vault.iter_entries(space=space)}
    if current != set(expected):
        raise TransactionConflict(
            "the space's entries changed since the preview", data={"space": space}
        )


def _unchanged(entry: StoredEntry, expected: datetime | None) -> None:
    """Checked under the write lock, so nothing can slip in between check and change."""
    if expected is not None and entry.updated_at != expected:
        raise TransactionConflict(data={"entry": entry.id})


@operation("entry.remove", WRITE, tools=("delete_entry",))
async def process_entry_remove(ctx: Context, p: EntryRemoveParams) -> EntryRemoveResult:
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        entry = vault.resolve(p.ref, p.space, ctx.visible)
        _unchanged(entry, p.expect_updated_at)
        await ctx.state.io(vault.remove, entry)
    return EntryRemoveResult(id=entry.id, name=entry.name)


@operation("entry.totp", SECRETS, tools=("get_totp",))
async def process_entry_totp(ctx: Context, p: EntryRef) -> TotpResult:
    vault = ctx.state.cache.get()
    entry = vault.resolve(p.ref, p.space, ctx.visible)
    ctx.check_grant(entry, "secret" if entry.type == "totp" else "totp", codes=True)
    code, remaining, period = vault.totp(entry, time.time())
    return TotpResult(id=entry.id, name=entry.name, code=code, remaining=remaining, period=period)


# ---------------------------------------------------------------------- spaces


@operation("space.list", READ)
async def process_space_list(ctx: Context, p: Empty) -> SpaceListResult:
    vault = ctx.state.cache.get()
    if ctx.session is not None and not ctx.session.filter.empty:
        counts: dict[str, int] = {}
        for e in vault.iter_entries(visible=ctx.visible):
            counts[e.space] = counts.get(e.space, 0) + 1
        if ctx.session.filter.spaces:
            counts = {s: counts.get(s, 0) for s in ctx.session.filter.spaces if s in vault.spaces}
    else:
        counts = vault.space_counts()
    return SpaceListResult(spaces=[SpaceInfo(name=n, entries=c) for n, c in counts.items()])


@operation("space.add", WRITE, tools=("manage_spaces",))
async def process_space_add(ctx: Context, p: SpaceAddParams) -> SpaceInfo:
    ctx.require_unfiltered()
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        await ctx.state.io(vault.space_add, p.name)
    return SpaceInfo(name=p.name, entries=0)


@operation("space.rename", WRITE, tools=("manage_spaces",))
async def process_space_rename(ctx: Context, p: SpaceRenameParams) -> SpaceInfo:
    ctx.require_unfiltered()
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        _space_unchanged(vault, p.name, p.expect_entries)
        moved = await ctx.state.io(vault.space_rename, p.name, p.new_name)
    return SpaceInfo(name=p.new_name, entries=moved)


@operation("space.remove", WRITE, tools=("manage_spaces",))
async def process_space_remove(ctx: Context, p: SpaceRemoveParams) -> SpaceRemoveResult:
    ctx.require_unfiltered()
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        _space_unchanged(vault, p.name, p.expect_entries)
        removed = await ctx.state.io(vault.space_remove, p.name, p.force)
    return SpaceRemoveResult(name=p.name, removed_entries=removed)
