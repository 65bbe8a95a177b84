"""The broker's side of synced spaces: starts replication at unlock, stops it at lock, sends a
synced space's commits through etcd before the vault saves them, and applies other devices'
changes to the vault. Also the `sync.*` wire methods.

Rules:
- The sync configuration, the device's private keys and the space ids live in the vault
  (`extra["sync"]`, sealed like everything else); the replicas under APM_HOME/sync hold etcd's
  ciphertext only.
- A synced write commits in etcd first; etcd refusing it (conflict, no quorum, not a member)
  undoes the local change, so the vault never holds a write the others will not see.
- Changing the configuration or membership is an owner operation (the master password).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
from typing import Any

from broker.core import crypto
from broker.core.sync import Device, JoinCode, SyncedSpace
from broker.core.sync_etcd import EtcdClient, TlsFiles
from broker.core.vault import StoredEntry, Vault
from broker.wire.errors import (
    AlreadyExists,
    InvalidParameters,
    SpaceNotFound,
    TransactionConflict,
)
from broker.wire.protocol import (
    Empty,
    SyncDeviceParams,
    SyncDeviceResult,
    SyncInitParams,
    SyncInitResult,
    SyncInviteResult,
    SyncJoinParams,
    SyncJoinResult,
    SyncSpaceParams,
    SyncStatusResult,
)

from .context import Context
from .operations import ANYONE_UNLOCKED, OWNER_CHANGE, Rule, operation
from .state import State

log = logging.getLogger("apm.broker")

# `sync.now` asks for replication; it changes no entry itself, so it is not `mutating`
SYNC_NOW = Rule(unlocked=True, scope="write")
EXTRA_KEY = "sync"


def _b(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ub(text: str) -> bytes:
    return base64.b64decode(text)


class SyncService:
    """One per broker; running while the vault is unlocked and has a sync configuration."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.client: EtcdClient | None = None
        self.device: Device | None = None
        self.spaces: dict[str, SyncedSpace] = {}  # by local space name
        self.loop: asyncio.AbstractEventLoop | None = None
        # (generation in the cluster, generation of the open vault) when the cluster's is newer
        self.rollback: tuple[int, int] | None = None

    # -- life cycle -----------------------------------------------------------------------

    def config(self, vault: Vault) -> dict[str, Any] | None:
        cfg = vault.extra.get(EXTRA_KEY)
        return cfg if isinstance(cfg, dict) else None

    def start(self, vault: Vault, at_unlock: bool = False) -> None:
        """Open every configured space (at unlock, and after a configuration change)."""
        cfg = self.config(vault)
        if cfg is None or self.client is not None:
            return
        dev = cfg["device"]
        self.device = Device(dev["id"], bytearray(_ub(dev["x"])), bytearray(_ub(dev["ed"])))
        self.client = EtcdClient(cfg["endpoints"], TlsFiles(**cfg.get("tls", {})))
        for name, sc in cfg.get("spaces", {}).items():
            self._open(vault, name, sc)
        vault.sync_hook = self._outbound
        self.publish_heads(vault, at_open=at_unlock)

    def _open(self, vault: Vault, name: str, sc: dict[str, Any]) -> SyncedSpace:
        if self.client is None or self.device is None:
            raise RuntimeError("sync service not started")
        sp = SyncedSpace(
            self.client,
            self.device,
            sc["id"],
            _ub(sc["admin_ed"]),
            self.state.paths.state_dir / "sync" / f"{sc['id']}.db",
            on_revocation=self._revocation,
        )
        sp.on_change = lambda items, name=name: self._inbound(name, items)
        self.spaces[name] = sp
        vault.synced_spaces.add(name)
        # a change the replica took while the vault was not told (a crash in between)
        self._reconcile(vault, name, sp)
        sp.start()
        return sp

    def _reconcile(self, vault: Vault, name: str, sp: SyncedSpace) -> None:
        todo: list[tuple[str, dict[str, Any] | None]] = []
        for eid, doc in sp.entries():
            have = vault.entries.get(eid)
            if doc is None:
                if have is not None:
                    todo.append((eid, None))
            elif have is None or have.updated_at.isoformat() != doc["updated_at"]:
                todo.append((eid, doc))
        if todo:
            vault.apply_remote(name, todo)

    def stop(self, wait: bool = True) -> None:
        """End replication and zero the device keys. `wait=False` (the lock path, on the event
        loop): the watchers are told now and joined, closed and zeroed in a thread."""
        spaces, client, device = list(self.spaces.values()), self.client, self.device
        self.spaces.clear()
        self.client = None
        self.device = None
        for sp in spaces:
            sp._stop.set()
        if client is not None:
            client.cancel_watches()

        def finish() -> None:
            for sp in spaces:
                sp.stop()
            if client is not None:
                client.close()
            if device is not None:
                crypto.zero(device.x_priv)
                crypto.zero(device.sign_priv)

        if wait:
            finish()
        else:
            threading.Thread(target=finish, name="sync-stop", daemon=True).start()

    def publish_heads(self, vault: Vault, at_open: bool = False) -> None:
        """This device's vault generation and audit head, signed, in every synced space: the
        outside anchor a rolled-back vault cannot rewrite. Best effort, off the write path.
        `at_open`: compare the announced generation with the one the file had when opened
        (an unlock commits on its own before this runs)."""
        spaces = list(self.spaces.values())
        head = json.dumps(vault.audit_head, sort_keys=True, default=str)
        current = vault.generation
        generation = vault.opened_generation if at_open and vault.opened_generation else current

        def run() -> None:
            for sp in spaces:
                with contextlib.suppress(Exception):
                    seen = sp.published_generation()
                    if seen is not None and seen > generation:
                        # this vault is older than one this device already announced: keep
                        # the anchor, say so (status, log, audit)
                        self.rollback = (seen, generation)
                        log.warning(
                            "sync: this vault is at generation %d but the cluster holds "
                            "generation %d from this device: a rolled-back vault?",
                            generation,
                            seen,
                        )
                        continue
                    sp.publish_audit_head(head, current)

        threading.Thread(target=run, name="sync-anchor", daemon=True).start()

    # -- vault <-> etcd -------------------------------------------------------------------

    def _outbound(
        self, vault: Vault, changes: list[tuple[str, StoredEntry | None, StoredEntry | None]]
    ) -> None:
        """Commit a synced space's changes in etcd (before the vault saves them)."""
        by_space: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for eid, before, after in changes:
            if after is not None and after.space in self.spaces:
                by_space.setdefault(after.space, []).append((eid, vault.export_entry(after)))
            moved_out = after is None or (before is not None and after.space != before.space)
            if before is not None and before.space in self.spaces and moved_out:
                by_space.setdefault(before.space, []).append((eid, {"deleted": True}))
        for name, items in by_space.items():
            sp = self.spaces[name]
            try:
                sp.commit(sp.prepare(items))
            except TransactionConflict as exc:
                fresh = getattr(exc, "fresh", [])
                if fresh:
                    vault.defer_remote(name, fresh)
                raise
        self._publish_after_save(vault)

    def _publish_after_save(self, vault: Vault) -> None:
        """Announce the generation once the save running now is done: the io pool has one
        thread, so a job queued from the loop runs after it."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        pool = self.state.io_pool
        loop.call_soon_threadsafe(pool.submit, self.publish_heads, vault)

    def _inbound(self, name: str, items: list[tuple[str, dict[str, Any] | None]]) -> None:
        """From a watch thread: apply another device's changes under the write lock."""
        if self.loop is None or self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._apply(name, items), self.loop)

    async def _apply(self, name: str, items: list[tuple[str, dict[str, Any] | None]]) -> None:
        async with self.state.write_lock:
            vault = self.state.cache.peek()
            if vault is None or name not in self.spaces:
                return
            await self.state.io(vault.apply_remote, name, items)
            await self.state.io(self.publish_heads, vault)
        log.info("sync: applied %d change(s) to space %s", len(items), name)

    def _revocation(self, doc: dict[str, Any]) -> None:
        if self.loop is not None and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._revoke_all(doc), self.loop)

    async def _revoke_all(self, doc: dict[str, Any]) -> None:
        state = self.state
        if state.cache.peek() is None:
            return
        done = state.sessions().revoke_all()
        await state.persist_sessions()
        log.info("sync: revoked %d session(s) on a revocation record", len(done))
        state.record("session.revoked", target="all", how="sync", record=str(doc.get("id")))

    # -- configuration (owner) ------------------------------------------------------------

    def _save_config(self, vault: Vault, cfg: dict[str, Any]) -> None:
        with vault.mutation():
            vault.extra[EXTRA_KEY] = cfg

    def _base_config(
        self, vault: Vault, endpoints: list[str], tls: dict[str, Any]
    ) -> dict[str, Any]:
        for ep in endpoints:
            if not ep.startswith(("https://", "http://")):
                raise InvalidParameters(
                    "an etcd endpoint must be an http(s) URL", hint="e.g. https://10.0.0.5:2379"
                )
        cfg = self.config(vault)
        if cfg is not None:
            cfg = dict(cfg)
            cfg["endpoints"], cfg["tls"] = endpoints, tls
            return cfg
        device = Device.new()
        return {
            "device": {
                "id": device.id,
                "x": _b(bytes(device.x_priv)),
                "ed": _b(bytes(device.sign_priv)),
            },
            "endpoints": endpoints,
            "tls": tls,
            "spaces": {},
        }

    def init(self, vault: Vault, p: SyncInitParams) -> SyncInitResult:
        if p.space not in vault.spaces:
            raise SpaceNotFound(data={"space": p.space})
        cfg = self._base_config(vault, p.endpoints, p.tls.model_dump())
        if p.space in cfg["spaces"]:
            raise AlreadyExists("this space is already synced")
        self.stop()
        dev = cfg["device"]
        device = Device(dev["id"], bytearray(_ub(dev["x"])), bytearray(_ub(dev["ed"])))
        client = EtcdClient(cfg["endpoints"], TlsFiles(**cfg["tls"]))
        space_id = "sp-" + crypto.random_bytes(8).hex()
        try:
            sp = SyncedSpace.create(
                client, device, space_id, self.state.paths.state_dir / "sync" / f"{space_id}.db"
            )
            sp.replica.close()
        finally:
            client.close()
        cfg["spaces"] = {
            **cfg["spaces"],
            p.space: {"id": space_id, "admin_ed": _b(device.sign_pub)},
        }
        self._save_config(vault, cfg)
        self.start(vault)
        # upload what the space already holds
        local = [e for e in vault.entries.values() if e.space == p.space]
        sp = self.spaces[p.space]
        for i in range(0, len(local), 100):
            chunk = [(e.id, vault.export_entry(e)) for e in local[i : i + 100]]
            sp.commit(sp.prepare(chunk))
        return SyncInitResult(
            space=p.space, space_id=space_id, device=device.id, uploaded=len(local)
        )

    def join(self, vault: Vault, p: SyncJoinParams) -> SyncJoinResult:
        jc = JoinCode.decode(p.code.get_secret_value())
        cfg = self._base_config(vault, p.endpoints, p.tls.model_dump())
        name = jc.name or jc.space
        if name in cfg["spaces"]:
            raise AlreadyExists("a space of that name is already synced here")
        self.stop()
        dev = cfg["device"]
        device = Device(dev["id"], bytearray(_ub(dev["x"])), bytearray(_ub(dev["ed"])))
        client = EtcdClient(cfg["endpoints"], TlsFiles(**cfg["tls"]))
        try:
            SyncedSpace.request_join(client, device, p.code.get_secret_value())
        finally:
            client.close()
        if any(e.space == name for e in vault.entries.values()):
            raise AlreadyExists(
                "a space of that name already holds entries here",
                hint="rename the local space first, or join from a vault without it",
            )
        cfg["spaces"] = {**cfg["spaces"], name: {"id": jc.space, "admin_ed": _b(jc.admin_ed)}}
        if name not in vault.spaces:
            with vault.mutation():
                vault.spaces.append(name)
        self._save_config(vault, cfg)
        self.start(vault)
        return SyncJoinResult(space=name, device=device.id)

    def find(
        self, device: str, space: str | None, pending: bool = False
    ) -> tuple[str, SyncedSpace]:
        if space is not None:
            if space not in self.spaces:
                raise SpaceNotFound("this space is not synced", data={"space": space})
            return space, self.spaces[space]
        for name, sp in self.spaces.items():
            if (device in sp.pending_joins()) if pending else (device in sp.members()):
                return name, sp
        raise InvalidParameters("no synced space knows that device", hint='see "apm sync status"')

    def status(self, health: bool = True) -> SyncStatusResult:
        if self.client is None:
            return SyncStatusResult(configured=False)
        spaces = []
        for name, sp in self.spaces.items():
            doc = sp.status(health=health)
            doc.pop("endpoints", None)  # once for all spaces, below
            doc["name"] = name
            anchor = sp.audit_head(sp.device.id)
            if anchor is not None:
                doc["anchor_generation"] = anchor.get("generation")
            spaces.append(doc)
        return SyncStatusResult(
            configured=True,
            device=self.device.id if self.device else None,
            rollback_suspected=self.rollback is not None,
            endpoints=self.client.health() if health else [],
            spaces=spaces,
        )


def service(state: State) -> SyncService:
    svc = state.sync
    if svc is None:
        svc = state.sync = SyncService(state)
    if not isinstance(svc, SyncService):
        raise TypeError("state.sync is not a SyncService")
    return svc


async def on_unlock(state: State) -> None:
    """Start replication for a vault with a sync configuration (after an unlock)."""
    vault = state.cache.peek()
    if vault is None or vault.extra.get(EXTRA_KEY) is None:
        return
    svc = service(state)
    svc.loop = asyncio.get_running_loop()
    async with state.write_lock:
        try:
            await state.io(svc.start, vault, True)
        except Exception:  # replication retries by itself; unlock must not fail on it
            log.warning("sync: could not start replication", exc_info=True)


def on_lock(state: State) -> None:
    if state.sync is not None:
        service(state).stop()


# ---------------------------------------------------------------------- wire methods


async def _owner_io(ctx: Context, fn: Any, *args: Any) -> Any:
    svc = service(ctx.state)
    svc.loop = asyncio.get_running_loop()
    vault = ctx.state.cache.get()
    async with ctx.state.write_lock:
        return await ctx.state.io(fn, vault, *args)


@operation("sync.init", OWNER_CHANGE)
async def process_sync_init(ctx: Context, p: SyncInitParams) -> SyncInitResult:
    res: SyncInitResult = await _owner_io(ctx, service(ctx.state).init, p)
    ctx.state.record("sync.init", ctx, space=p.space, space_id=res.space_id)
    return res


@operation("sync.invite", OWNER_CHANGE)
async def process_sync_invite(ctx: Context, p: SyncSpaceParams) -> SyncInviteResult:
    svc = service(ctx.state)
    if p.space not in svc.spaces:
        raise SpaceNotFound("this space is not synced", data={"space": p.space})
    code = await ctx.state.io(svc.spaces[p.space].invite, p.space)
    ctx.state.record("sync.invite", ctx, space=p.space)
    return SyncInviteResult(space=p.space, code=code)


@operation("sync.join", OWNER_CHANGE)
async def process_sync_join(ctx: Context, p: SyncJoinParams) -> SyncJoinResult:
    res: SyncJoinResult = await _owner_io(ctx, service(ctx.state).join, p)
    ctx.state.record("sync.join", ctx, space=res.space, device=res.device)
    return res


@operation("sync.approve", OWNER_CHANGE)
async def process_sync_approve(ctx: Context, p: SyncDeviceParams) -> SyncDeviceResult:
    name, sp = service(ctx.state).find(p.device, p.space, pending=True)
    rev = await ctx.state.io(sp.approve, p.device)
    ctx.state.record("sync.approve", ctx, space=name, device=p.device)
    return SyncDeviceResult(space=name, device=p.device, revision=rev)


@operation("sync.remove", OWNER_CHANGE)
async def process_sync_remove(ctx: Context, p: SyncDeviceParams) -> SyncDeviceResult:
    name, sp = service(ctx.state).find(p.device, p.space)
    if sp.device.id == p.device:
        raise InvalidParameters("a device cannot remove itself", hint="run it on the admin device")
    async with ctx.state.write_lock:
        rev = await ctx.state.io(sp.remove, p.device)
    ctx.state.record("sync.remove", ctx, space=name, device=p.device)
    return SyncDeviceResult(space=name, device=p.device, revision=rev)


@operation("sync.revoke_sessions", OWNER_CHANGE)
async def process_sync_revoke(ctx: Context, p: SyncDeviceParams) -> SyncDeviceResult:
    name, sp = service(ctx.state).find(p.device, p.space)
    rev = await ctx.state.io(sp.revoke_sessions, p.device)
    ctx.state.record("sync.revoke_sessions", ctx, space=name, device=p.device)
    return SyncDeviceResult(space=name, device=p.device, revision=rev)


@operation("sync.status", ANYONE_UNLOCKED)
async def process_sync_status(ctx: Context, p: Empty) -> SyncStatusResult:
    return await ctx.state.io(service(ctx.state).status)


@operation("sync.now", SYNC_NOW)
async def process_sync_now(ctx: Context, p: Empty) -> SyncStatusResult:
    svc = service(ctx.state)
    for sp in list(svc.spaces.values()):
        await ctx.state.io(sp.resync)
    return await ctx.state.io(svc.status)
