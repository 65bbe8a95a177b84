"""The broker's state: the open vault and the stores built on it, the audit log, the worker
pools, and the throttle for failed token attempts. One `State` per broker process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from broker.core.audit import AuditLog
from broker.core.bindings import AncestryCache, host_fingerprint
from broker.core.key_cache import OpenVault
from broker.core.requests import RequestStore
from broker.core.rollback import Anchor, RollbackGuard
from broker.core.sessions import PendingRevocations, SessionRecord, SessionStore
from broker.core.transactions import Transaction, TxStore
from broker.core.vault import Vault, utcnow
from broker.paths import Paths
from broker.wire.errors import VaultLocked

from .approval_links import ApprovalLinks
from .notify import Notifier
from .peer import Peer

log = logging.getLogger("apm.broker")
T = TypeVar("T")


@dataclass
class _Landing:
    """Set while an approved transaction executes, so its change is made only while the run's
    claim holds (no lock came since, `TxStore.check_run`), its `tx.commit` audit record is
    written right then (under the write lock, just before the change: a run the lock stopped
    never wrote one), and the vault commit that makes the change writes the transaction's
    `committed` record too (`doc`, if it is kept in the vault), in the same SQLite transaction."""

    tx: Transaction
    doc: bytes | None
    announce: Callable[[], None]  # writes the `tx.commit` record; raises StorageError
    announced: bool = False

    def announce_once(self) -> None:
        if not self.announced:
            self.announce()  # if it cannot be written, nothing runs
            self.announced = True


_LANDING: contextvars.ContextVar[_Landing | None] = contextvars.ContextVar(
    "apm_tx_landing", default=None
)


class Caller(Protocol):
    """Who an audit record names: what `record` reads of a request's `context.Context`
    (declared here, so the state does not import the context built on it)."""

    @property
    def peer(self) -> Peer: ...
    @property
    def exe(self) -> str | None: ...
    @property
    def session(self) -> SessionRecord | None: ...
    @property
    def owner_proven(self) -> bool: ...


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

    def failures(self, peer: Peer) -> int:
        """Failed attempts counted against this peer's uid (0 after a quiet period)."""
        count, last = self._fails.get(self.key(peer), (0, 0.0))
        return 0 if self.clock() - last > self.QUIET else count

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
    cache: OpenVault
    clock: Callable[[], datetime] = utcnow
    ancestry: AncestryCache = field(default_factory=AncestryCache)
    host: str = field(default_factory=host_fingerprint)
    throttle: Throttle = field(default_factory=Throttle)
    audit: AuditLog | None = None
    notifier: Notifier | None = None
    request_max_minutes: int = 60
    mcp_tool_names: str = "apm"  # [mcp] tool_names; a session may override it
    links: ApprovalLinks = field(default_factory=ApprovalLinks)  # the approval page's links
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
        """Durable writes run one at a time, off the event loop. A transaction's change (its
        run holds the write lock here) is made only if no lock came since the run's claim,
        else VAULT_LOCKED and nothing is written, not even its `tx.commit` audit record: that
        one is written here, after the check and before the change (no await between)."""
        landing = _LANDING.get()
        if landing is None:
            return await self._io_plain(fn, *args)
        vault = self.check_run(landing.tx)
        landing.announce_once()
        if landing.doc is None:
            return await self._io_plain(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(
            self.io_pool, _landed, vault, (landing.tx.tx_id, landing.doc), fn, *args
        )

    def check_run(self, tx: Transaction) -> Vault:
        """The open vault, if the run holding `tx` may still make its change (no lock since
        its claim); else VAULT_LOCKED (`TxStore.check_run`)."""
        vault = self.cache.peek()  # locked (also by a timer just now): `txs.lock` ran
        self.txs.check_run(tx)
        if vault is None:  # never: check_run raised
            raise VaultLocked()
        return vault

    async def _io_plain(self, fn: Callable[..., T], *args: Any) -> T:
        """`io` that never carries a landing transaction's record: for the broker's own
        bookkeeping saves (sessions, transaction records), which are not the change."""
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    # ------------------------------------------------------------------ transactions kept

    @contextlib.contextmanager
    def landing(
        self, tx: Transaction, receipt: str, announce: Callable[[], None]
    ) -> Iterator[datetime]:
        """Around the execution of an approved transaction: the vault commit that makes its
        change also writes its `committed` record (one SQLite transaction: after a crash the
        change and the mark are both there or both not, never one), and only while the run's
        claim holds (`io`: VAULT_LOCKED if a lock came since). `announce` writes the run's
        `tx.commit` audit record: `io` calls it once, after that check, right before the
        change; a change made without `io` (none today writes the vault so) calls it when the
        block ends without an error. Yields the commit time to pass to `txs.committed`."""
        at = self.clock()
        landing = _Landing(tx, tx.landed(receipt, at) if tx.must_survive else None, announce)
        token = _LANDING.set(landing)
        try:
            yield at
        finally:
            _LANDING.reset(token)
        landing.announce_once()  # reached only without an error: the change was made

    def has_landed(self, tx: Transaction, receipt: str) -> bool:
        """Did the change of a surviving transaction run with `receipt` land (its `committed`
        record is in the vault, written with the change)? Always False for one kept in memory
        only (nothing to tell by)."""
        vault = self.cache.peek()
        doc = vault.tx_docs.get(tx.tx_id) if vault is not None and tx.must_survive else None
        if doc is None:
            return False
        try:
            stored = json.loads(doc)
        except ValueError:
            return False
        return bool(stored.get("state") == "committed" and stored.get("receipt") == receipt)

    async def save_tx(self, tx: Transaction) -> None:
        """Write a surviving transaction's record durably (and drop stale ones in the same
        commit); raises StorageError, the caller's operation then fails, and VAULT_LOCKED if
        the vault was locked before the record could be written (a decision the vault does
        not hold is never acknowledged: the unlock restores what the vault says)."""
        if not tx.must_survive:
            return
        vault = self.cache.peek()
        if vault is not None and vault.format < 2:
            return
        doc = tx.to_doc()
        if (
            vault is not None
            and vault.tx_docs.get(tx.tx_id) == doc
            and not any(t in vault.tx_docs for t in self.txs.stale(self.clock()))
        ):
            return  # already written (e.g. landed with the change)

        def work(vault: Vault, stale: list[str]) -> None:
            with vault.mutation():
                vault.tx_docs[tx.tx_id] = doc
                for t in stale:
                    vault.tx_docs.pop(t, None)

        async with self.write_lock:
            # the vault open now, holding this very transaction: a lock may have come meanwhile
            # (it dropped the transaction; an unlock since restored the vault's record instead)
            vault = self.cache.peek()
            if vault is None or self.txs.txs.get(tx.tx_id) is not tx:
                raise VaultLocked(
                    "the vault was locked before this transaction's change could be saved",
                    hint='unlock it ("apm unlock") and try again: the transaction is as '
                    "the vault holds it",
                    data={"tx_id": tx.tx_id},
                )
            stale = [t for t in self.txs.stale(self.clock()) if t in vault.tx_docs]
            await self._io_plain(work, vault, stale)

    def tx_decisions_lost(self) -> dict[str, str]:
        """Before the unlock's rollback check saves anything: tx id -> decision, for what the
        audit log says was decided after the vault file was saved, if the file was rolled back
        (a save the log recorded is not in it). A crash before a decision's commit is not that
        (no later save): its transaction is as the file says, and the person decides again."""
        vault = self.cache.get()
        anchor = Anchor.of(vault)
        if self.audit is None or anchor.generation >= self.audit.journal.generation:
            return {}
        return self.audit.journal.tx_decisions_after(anchor.audit_seq)

    async def save_new_tx(self, tx: Transaction) -> None:
        """A new transaction a person decides is written to the vault before it is announced;
        if that fails it does not exist (the error is raised)."""
        try:
            await self.save_tx(tx)
        except BaseException:
            self.txs.txs.pop(tx.tx_id, None)
            raise

    async def restore_txs(self, closed: dict[str, str]) -> list[Transaction]:
        """At unlock: the transactions kept in the vault back in memory; those in `closed`
        (`tx_decisions_lost`) that the file holds as open are closed and written so."""
        vault = self.cache.get()
        changed = self.txs.restore(dict(vault.tx_docs), closed)
        for tx in changed:
            await self.save_tx(tx)
        return changed

    def __post_init__(self) -> None:
        self.txs = TxStore(self.clock)
        self.cache.on_lock = self.txs.lock  # every way the vault locks ends the runs in flight
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

        `locked`: the caller already holds write_lock. VAULT_LOCKED if a lock came before the
        write lock was free (the sessions in memory were of the vault it closed, dropped with
        it: the unlock restores what the vault holds, so the caller's change is refused).
        """
        vault = self.cache.get()
        store = self.sessions()
        reqs = self.requests()

        def work() -> None:
            with vault.mutation():
                vault.extra["sessions"] = store.dump()
                vault.extra["requests"] = reqs.dump()

        if locked:
            await self._io_plain(work)
        else:
            async with self.write_lock:
                self.still_open(vault)
                await self._io_plain(work)
        store.dirty = False

    def still_open(self, vault: Vault) -> None:
        """Under the write lock: `vault`, taken before waiting for it, is still the open one
        (no lock, nor lock + unlock, came meanwhile); else VAULT_LOCKED, nothing written."""
        if self.cache.peek() is not vault:
            raise VaultLocked(
                "the vault was locked before this change could be saved; nothing was changed",
                hint='unlock it ("apm unlock") and try again',
            )

    async def vault_write(self, work: Callable[[Vault], None]) -> None:
        """Run `work(vault)` (a vault mutation) under the write lock on the vault open then:
        for a write whose caller took the vault before waiting (VAULT_LOCKED if it was locked
        meanwhile, never a write into a closed or another vault)."""
        async with self.write_lock:
            vault = self.cache.get()
            await self.io(work, vault)

    def peer_exe(self, peer: Peer) -> str | None:
        if peer.pid is None:
            return None
        chain = self.ancestry.get(peer.pid)
        return chain[0].exe if chain else None

    def tool_naming(self, rec: SessionRecord | None) -> str:
        """The MCP tool naming a session sees: its own, chosen at delegation, else the
        broker's [mcp] tool_names (the one place this rule is written)."""
        return (rec.tool_names if rec is not None else None) or self.mcp_tool_names or "apm"

    def record(self, event: str, ctx: Caller | None = None, **fields: Any) -> None:
        """Append an audit record; raises StorageError so the caller refuses the operation."""
        audit = self.audit
        if audit is None:
            return
        if ctx is not None:  # the caller's fields, unless `fields` names them itself
            peer, exe, rec = ctx.peer, ctx.exe, ctx.session
            if exe is None:
                exe = self.peer_exe(peer)
            who: dict[str, Any] = {"pid": peer.pid, "exe": exe}
            if rec is not None:
                who["session"] = rec.accessor
                who["label"] = rec.label or None
            else:
                who["actor"] = "owner" if ctx.owner_proven else None
            who.update(fields)
            fields = who
        audit.append(event, **fields)

    async def flush_and_lock(self) -> bool:
        """Lock the vault, first saving session usage counters (best effort). Hold write_lock."""
        vault = self.cache.peek()
        store = self._store
        if vault is not None and store is not None and self._store_vault is vault and store.dirty:
            try:
                await self.persist_sessions(locked=True)
            except Exception:  # locking must never fail
                log.warning("could not save session usage before locking", exc_info=True)
        if vault is not None:
            # The metadata snapshot (a full pass over the index: ~1 s of CPU at 100k entries
            # after a change) is written on the io thread, so other clients' calls keep being
            # answered; close() then finds it current and only zeroes and closes.
            try:
                await self._io_plain(vault.write_snapshot)
            except Exception:  # a cache: the next unlock reads the records one by one
                log.warning("could not write the metadata snapshot before locking", exc_info=True)
        self._store = self._store_vault = None
        self._reqs = self._reqs_vault = None
        if self.sync is not None:  # replication stops and its keys are zeroed with the vault's
            self.sync.stop(wait=False)
        return self.cache.lock()  # on_lock: `txs.lock` (runs in flight end, plaintext dropped)


def _landed(vault: Vault, landing: tuple[str, bytes], fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` (a vault mutation, on the io thread) with a transaction's `committed` record
    staged: its commit writes it. If `fn` fails, the record is as before."""
    tx_id, doc = landing
    before = vault.tx_docs.get(tx_id)
    vault.tx_docs[tx_id] = doc
    try:
        return fn(*args)
    except BaseException:
        if vault.tx_docs.get(tx_id) is doc:
            if before is None:
                vault.tx_docs.pop(tx_id, None)
            else:
                vault.tx_docs[tx_id] = before
        raise
