"""Transactions that wait for a person survive a broker restart (#15.2), in-process: a real
vault file and audit log, the real unlock path (`vault.unlock` through the dispatcher) in a
fresh `State` for each "restart", and an injected clock.

Each surviving transaction is a sealed vault record of kind `tx`; these tests restart, crash
in the middle of a commit, roll the vault file back, splice an older record in, and read the
file's bytes. The real-process versions (kill -9, the `apm` CLI) are in
test_tx_persist_e2e.py.
"""

from __future__ import annotations

import base64
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.audit import AuditLog
from broker.core.crypto import normalize_password
from broker.core.key_cache import LockPolicy, OpenVault
from broker.core.transactions import RETAIN, Transaction
from broker.core.vault import Vault
from broker.core.vault_db import VaultDb
from broker.server.state import State
from broker.wire.errors import ApmError, StorageError

from .twin import Twin, twin_of, wire

PASSWORD = "correct horse battery staple"
SECRET = "kept-Secret-Value-5521"
HELD_SECRET = "held-Secret-Value-7730"
ADD = {
    "type": "login",
    "name": "aws-held-Entry",
    "fields": {"username": "root-Operator-7"},
    "secrets": {"password": SECRET},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Restarts:
    """Broker lifetimes over one APM_HOME: `restart` ends the current one (cleanly, or as a
    crash: nothing flushed or locked) and unlocks the vault in a new `State`."""

    def __init__(self, first: Twin) -> None:
        self.twin = first
        self.states: list[State] = []

    async def restart(self, *, crash: bool = False) -> Twin:
        old = self.twin
        if not crash:
            old.state.cache.lock()
        old.state.audit.close()  # type: ignore[union-attr]
        state = State(paths=old.state.paths, cache=OpenVault(LockPolicy()), clock=old.clock)
        state.audit = AuditLog(old.state.paths.state_dir / "audit.jsonl", clock=old.clock)
        state.audit.open()
        self.states.append(state)
        got = await wire(state, old.peer, "vault.unlock", password=PASSWORD)
        assert got.ok, got.error
        self.twin = Twin(state, old.clock, old.peer, PASSWORD)
        return self.twin

    def close(self) -> None:
        for state in self.states:
            state.cache.lock()
            state.io_pool.shutdown(wait=True)
            state.kdf_pool.shutdown(wait=True)
            if state.audit is not None:
                state.audit.close()


@pytest.fixture
def life(tmp_path: Path) -> Iterator[Restarts]:
    with twin_of(tmp_path, PASSWORD) as first:
        lives = Restarts(first)
        try:
            yield lives
        finally:
            lives.close()


@pytest.fixture
async def booted(life: Restarts) -> AsyncIterator[Restarts]:
    """One restart done, so the broker runs as after a real unlock (rollback guard on)."""
    await life.restart()
    yield life


async def owner_session(twin: Twin, approve: str = "owner") -> tuple[str, Any]:
    token, rec = twin.session(approve=approve)
    await twin.state.persist_sessions()  # sessions are kept in the vault already
    return token, rec


async def owner(twin: Twin, method: str, params: dict[str, Any]) -> Any:
    return await twin.wire(method, params, password=PASSWORD)


async def tx_list(twin: Twin) -> dict[str, dict[str, Any]]:
    got = await owner(twin, "tx.list", {})
    assert got.ok and got.result is not None
    return {t["tx_id"]: t for t in got.result["transactions"]}


def stored(twin: Twin) -> dict[str, Transaction]:
    return {k: Transaction.from_doc(v) for k, v in twin.vault.tx_docs.items()}


# ---------------------------------------------------------------------- restart keeps them


@pytest.mark.anyio
async def test_an_owner_policy_transaction_survives_a_restart_and_lands_once(
    booted: Restarts,
) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    waiting = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert waiting["status"] == "pending_owner_approval"
    before = (await tx_list(twin))[tx]

    twin = await booted.restart(crash=True)
    after = (await tx_list(twin))[tx]
    assert after == before  # same arguments, preview, policy, expiry, session, status
    assert after["status"] == "awaiting_owner" and after["session"] == rec.accessor
    assert after["args"] == before["args"] and after["expires_at"] == before["expires_at"]
    restored = twin.state.txs.get(tx, None)
    assert restored.params.secrets["password"].value.get_secret_value() == SECRET  # type: ignore[attr-defined]

    approved = await owner(twin, "tx.approve", {"tx_id": tx})
    assert approved.ok and approved.result["status"] == "approved"
    twin = await booted.restart(crash=True)  # the approval is kept too
    assert (await tx_list(twin))[tx]["status"] == "approved"
    rec = twin.state.sessions().records[rec.accessor]
    done = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    assert twin.secret_of("aws-held-Entry") == SECRET
    # the committed mark was written with the entry: after another crash it is still closed
    twin = await booted.restart(crash=True)
    rec = twin.state.sessions().records[rec.accessor]
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_CLOSED"
    )
    assert [e.name for e in twin.vault.entries.values()] == ["aws-held-Entry"]
    assert (await tx_list(twin))[tx]["receipt"] == done["receipt"]


@pytest.mark.anyio
async def test_a_held_wire_change_survives_a_restart_and_approving_it_lands_it_exactly_once(
    booted: Restarts,
) -> None:
    twin = booted.twin
    token, _ = await owner_session(twin)
    params = {"type": "login", "name": "held", "secrets": {"password": {"value": HELD_SECRET}}}
    held = await twin.wire("entry.add", params, token=token)
    assert held.error is not None and held.error.code == "APPROVAL_PENDING"
    tx = held.error.data["tx_id"]
    twin = await booted.restart(crash=True)
    assert (await tx_list(twin))[tx]["status"] == "pending"
    assert twin.names() == set()
    approved = await owner(twin, "tx.approve", {"tx_id": tx})
    assert approved.ok and approved.result["status"] == "committed"
    assert twin.secret_of("held") == HELD_SECRET
    twin = await booted.restart(crash=True)
    assert stored(twin)[tx].state == "committed"
    again = await owner(twin, "tx.approve", {"tx_id": tx})
    assert again.error is not None and again.error.code == "TRANSACTION_CLOSED"
    assert [e.name for e in twin.vault.entries.values()] == ["held"]


@pytest.mark.anyio
async def test_a_crash_in_the_commit_that_lands_a_transaction_leaves_neither_change_nor_mark(
    booted: Restarts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change and the `committed` record are one SQLite transaction: the write that fails
    (as a kill -9 or a full disk in the middle would) leaves both out; approving again after
    the restart lands it once."""
    twin = booted.twin
    token, _ = await owner_session(twin)
    params = {"type": "login", "name": "held", "secrets": {"password": {"value": HELD_SECRET}}}
    tx = (await twin.wire("entry.add", params, token=token)).error.data["tx_id"]  # type: ignore[union-attr]
    real = VaultDb.commit
    seen: list[list[tuple[str, str]]] = []

    def failing(self: VaultDb, puts: list[Any], deletes: list[Any], **kw: Any) -> None:
        seen.append([(k, i) for k, i, _v, _ct in puts])
        if any(k == "entry" for k, *_ in puts):
            raise StorageError("disk gone")
        real(self, puts, deletes, **kw)

    monkeypatch.setattr(VaultDb, "commit", failing)
    failed = await owner(twin, "tx.approve", {"tx_id": tx})
    assert failed.error is not None and failed.error.code == "STORAGE_ERROR"
    assert ("tx", tx) in seen[-1] and any(k == "entry" for k, _ in seen[-1])
    monkeypatch.setattr(VaultDb, "commit", real)
    twin = await booted.restart(crash=True)
    assert twin.names() == set()
    assert stored(twin)[tx].state == "pending"
    approved = await owner(twin, "tx.approve", {"tx_id": tx})
    assert approved.ok and approved.result["status"] == "committed"
    twin = await booted.restart(crash=True)
    assert [e.name for e in twin.vault.entries.values()] == ["held"]
    assert stored(twin)[tx].state == "committed"


@pytest.mark.anyio
async def test_a_denied_transaction_stays_denied_after_a_restart(booted: Restarts) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    denied = await owner(twin, "tx.deny", {"tx_id": tx, "reason": "not this one"})
    assert denied.ok
    twin = await booted.restart(crash=True)
    assert (await tx_list(twin))[tx]["status"] == "denied"
    assert (await tx_list(twin))[tx]["reason"] == "not this one"
    rec = twin.state.sessions().records[rec.accessor]
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == "APPROVAL_DENIED"
    assert twin.names() == set()


@pytest.mark.anyio
async def test_a_transaction_past_its_expiry_is_expired_after_a_restart_and_removed_later(
    booted: Restarts,
) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    twin.clock.advance(minutes=16)
    twin = await booted.restart()
    assert (await tx_list(twin))[tx]["status"] == "expired"
    late = await owner(twin, "tx.approve", {"tx_id": tx})
    assert late.error is not None and late.error.code == "TRANSACTION_EXPIRED"
    assert twin.names() == set()
    # a day after its expiry its record goes, with the next transaction's write
    twin.clock.advance(seconds=RETAIN.total_seconds())
    other = (await twin.ok(rec, "add_entry", {**ADD, "name": "gcp"}))["tx_id"]
    assert set(twin.vault.tx_docs) == {other}
    twin = await booted.restart()
    assert set(stored(twin)) == {other}


@pytest.mark.anyio
async def test_an_agent_policy_preview_is_not_kept_across_a_restart(booted: Restarts) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin, approve="agent")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    assert tx not in twin.vault.tx_docs
    twin = await booted.restart()
    rec = twin.state.sessions().records[rec.accessor]
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_NOT_FOUND"
    )


@pytest.mark.anyio
async def test_a_client_policy_transaction_is_kept(booted: Restarts) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin, approve="client")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    twin = await booted.restart(crash=True)
    assert (await tx_list(twin))[tx]["policy"] == "client"


# ---------------------------------------------------------------------- attacks on the file


def _vault_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (path, *path.parent.glob(path.name + "-*")))


@pytest.mark.anyio
async def test_the_stored_arguments_are_never_in_the_file_in_plaintext(booted: Restarts) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    path = twin.state.paths.vault
    rows = sqlite3.connect(path).execute("SELECT kind, id FROM records WHERE kind='tx'").fetchall()
    assert rows == [("tx", tx)]
    data = _vault_bytes(path)
    for needle in (SECRET, "aws-held-Entry", "root-Operator-7", rec.accessor):
        raw = needle.encode()
        forms = [raw, raw.hex().encode(), base64.b64encode(raw)[:-2]]
        assert not any(f in data for f in forms), needle


@pytest.mark.anyio
async def test_a_rolled_back_vault_file_does_not_bring_back_a_decided_transaction(
    booted: Restarts,
) -> None:
    """The attack: keep a copy of the vault file while a change waits, let the owner deny one
    and approve another, then put the old copy back and restart. Both stay closed."""
    twin = booted.twin
    token, _ = await owner_session(twin)
    params = {"type": "login", "name": "held", "secrets": {"password": {"value": HELD_SECRET}}}
    landed = (await twin.wire("entry.add", params, token=token)).error.data["tx_id"]  # type: ignore[union-attr]
    refused = (await twin.wire("space.add", {"name": "eve"}, token=token)).error.data["tx_id"]  # type: ignore[union-attr]
    path = twin.state.paths.vault
    old = path.with_name("old-copy.apm")
    twin.vault.backup(old)
    assert (await owner(twin, "tx.approve", {"tx_id": landed})).ok
    assert (await owner(twin, "tx.deny", {"tx_id": refused})).ok
    twin.state.cache.lock()
    for side in path.parent.glob(path.name + "-*"):
        side.unlink()
    shutil.copyfile(old, path)
    twin = await booted.restart()
    assert twin.names() == set()  # the copy is from before the change landed
    listed = await tx_list(twin)
    assert listed[landed]["status"] == "aborted" and "rolled back" in listed[landed]["reason"]
    assert listed[refused]["status"] == "denied"
    for tx in (landed, refused):
        again = await owner(twin, "tx.approve", {"tx_id": tx})
        assert again.error is not None and again.error.code == "TRANSACTION_CLOSED", tx
    assert twin.names() == set() and "eve" not in twin.vault.spaces
    twin = await booted.restart()  # closing them was written: they stay closed
    assert {t: s.state for t, s in stored(twin).items()} == {
        landed: "aborted",
        refused: "denied",
    }


@pytest.mark.anyio
async def test_an_older_copy_of_one_transaction_record_spliced_in_fails_the_unlock(
    booted: Restarts,
) -> None:
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    path = twin.state.paths.vault
    q = "SELECT version, ct FROM records WHERE kind='tx' AND id=?"
    old = sqlite3.connect(path).execute(q, (tx,)).fetchone()
    assert (await owner(twin, "tx.deny", {"tx_id": tx})).ok
    twin.state.cache.lock()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE records SET version=?, ct=? WHERE kind='tx' AND id=?", (*old, tx))
    db.close()
    with pytest.raises(Exception) as err:
        Vault.open(path, normalize_password(PASSWORD))
    assert getattr(err.value, "code", None) == "VAULT_CORRUPT"


@pytest.mark.anyio
async def test_only_the_change_itself_carries_the_committed_mark(booted: Restarts) -> None:
    """While a transaction executes, the broker's own saves (session usage) do not write its
    `committed` record; a change that fails does not either; the change that lands does."""
    twin = booted.twin
    _, rec = await owner_session(twin)
    tx_id = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    tx = twin.state.txs.get(tx_id, None)
    before = twin.vault.tx_docs[tx_id]
    twin.state.txs.owner_decide(tx_id, True, None)  # as a run would hold it: approved, claimed
    assert twin.state.txs.claim(tx)
    announced: list[str] = []
    with pytest.raises(ApmError), twin.state.landing(tx, "rcpt_x", lambda: announced.append("a")):
        await twin.state.io(twin.vault.space_add, "default")  # exists: refused
    assert twin.vault.tx_docs[tx_id] == before
    assert announced == ["a"]  # the change was tried: its tx.commit record precedes it
    with twin.state.landing(tx, "rcpt_x", lambda: announced.append("b")):
        await twin.state.persist_sessions()
        assert twin.vault.tx_docs[tx_id] == before
        assert announced == ["a"]  # the broker's own save is not the change
        await twin.state.io(twin.vault.space_add, "x")
        await twin.state.io(twin.vault.space_add, "y")
    assert announced == ["a", "b"]  # once per run, however many writes it makes
    twin = await booted.restart(crash=True)
    assert stored(twin)[tx_id].state == "committed" and stored(twin)[tx_id].receipt == "rcpt_x"
    assert "x" in twin.vault.spaces


@pytest.mark.anyio
async def test_a_restored_edit_still_matches_the_entry_version_it_was_previewed_from(
    booted: Restarts,
) -> None:
    twin = booted.twin
    twin.add("aws-held-Entry", "old-Value-0001")
    _, rec = await owner_session(twin)
    edit = {"entry": "aws-held-Entry", "secrets": {"password": SECRET}}
    tx = (await twin.ok(rec, "edit_entry", edit))["tx_id"]
    twin = await booted.restart(crash=True)
    assert (await owner(twin, "tx.approve", {"tx_id": tx})).ok
    rec = twin.state.sessions().records[rec.accessor]
    done = await twin.ok(rec, "edit_entry", {"tx_id": tx, "approve": True})
    assert done["status"] == "committed"
    assert twin.secret_of("aws-held-Entry") == SECRET
