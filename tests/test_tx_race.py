"""An approved transaction executes at most once: concurrent commits and approvals of one
transaction, with the interleaving forced (no timing): the first call is held inside its
vault write until every other call has either answered or queued behind it.

In-process (real gate, handlers, vault file and audit log; a fake clock). The same attack
against a real broker process, through the wire and real shims, is in test_tx_race_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.transactions import Transaction
from broker.server.state import State
from broker.wire.errors import StorageError

from .twin import Twin, twin_of

PASSWORD = "correct horse battery staple"
OLD_SECRET = "race-Old-Secret-0001"
N = 6  # concurrent calls per attack


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD) as t:
        yield t


class HeldWrite:
    """The first vault write (`State.io`) after `arm()` waits until `release` is set."""

    def __init__(self, state: State, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = state
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.armed = False
        real = state.io

        async def io(fn: Any, *args: Any) -> Any:
            if self.armed:
                self.armed = False
                self.entered.set()
                await self.release.wait()
            return await real(fn, *args)

        monkeypatch.setattr(state, "io", io)

    async def race(self, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
        """Start the calls in order; the first is held in its write until each other call has
        answered or waits for the write lock; then all finish."""
        self.armed = True
        tasks = [asyncio.ensure_future(c()) for c in calls]
        lock = self.state.write_lock
        deadline = time.monotonic() + 30  # a hang guard, not a timed assertion

        def settled() -> bool:
            others = sum(t.done() for t in tasks[1:])
            return self.entered.is_set() and others + len(lock._waiters or ()) >= len(tasks) - 1  # type: ignore[attr-defined]

        while not settled():
            assert time.monotonic() < deadline, "the calls never reached the write"
            assert not tasks[0].done() or self.entered.is_set(), tasks[0].result()
            await asyncio.sleep(0)
        self.release.set()
        return list(await asyncio.gather(*tasks))


def audit_events(twin: Twin, event: str, tx_id: str) -> list[dict[str, Any]]:
    path = twin.state.paths.state_dir / "audit.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == event and r.get("tx") == tx_id]


def tx_of(twin: Twin, tx_id: str) -> Transaction:
    return twin.state.txs.get(tx_id, None)


def outcomes(bodies: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    done = [b for b in bodies if not b["error"] and b.get("status") == "committed"]
    codes = sorted(str(b["code"]) for b in bodies if b["error"])
    return done, codes


# ---------------------------------------------------------------------- the tool commit


TOOL_CASES: dict[str, tuple[dict[str, Any], Callable[[Twin], object]]] = {
    "generate_password": ({"entry": "db", "length": 24}, lambda t: t.secret_of("db")),
    "edit_entry": ({"entry": "db", "url": "https://race.example"}, lambda t: None),
    "delete_entry": ({"entry": "db"}, lambda t: t.names()),
    "add_entry": (
        {"type": "login", "name": "new", "secrets": {"password": "race-New-Secret-0002"}},
        lambda t: t.names(),
    ),
    "manage_spaces": ({"action": "create", "name": "racing"}, lambda t: set(t.vault.spaces)),
}


@pytest.mark.anyio
@pytest.mark.parametrize("tool", sorted(TOOL_CASES))
async def test_concurrent_commits_of_one_agent_transaction_land_it_once(
    twin: Twin, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    twin.add("db", OLD_SECRET)
    # admin: manage_spaces needs it; generate_password returns the value only with `secrets`
    _, rec = twin.session(
        scope="admin" if tool in ("manage_spaces", "generate_password") else "write"
    )
    args, _ = TOOL_CASES[tool]
    tx_id = (await twin.ok(rec, tool, args))["tx_id"]
    held = HeldWrite(twin.state, monkeypatch)
    commit = {"tx_id": tx_id, "approve": True}
    bodies = await held.race([lambda: twin.body(rec, tool, commit) for _ in range(N)])
    done, codes = outcomes(bodies)
    assert len(done) == 1, bodies
    assert codes == ["TRANSACTION_CLOSED"] * (N - 1), bodies
    tx = tx_of(twin, tx_id)
    assert tx.state == "committed" and tx.receipt == done[0]["receipt"]
    assert [r["receipt"] for r in audit_events(twin, "tx.commit", tx_id)] == [tx.receipt]
    assert audit_events(twin, "tx.conflict", tx_id) == []
    # no fresh preview was handed out to invite a second run
    assert len(twin.state.txs.listing(rec.accessor)) == 1
    if tool == "generate_password":
        assert done[0]["generated"] and twin.secret_of("db") == done[0]["generated"]


@pytest.mark.anyio
async def test_a_generated_password_rotates_once_and_history_holds_one_version(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin.add("db", OLD_SECRET)
    token, rec = twin.session(scope="admin")
    tx_id = (await twin.ok(rec, "generate_password", {"entry": "db", "length": 24}))["tx_id"]
    held = HeldWrite(twin.state, monkeypatch)
    commit = {"tx_id": tx_id, "approve": True}
    bodies = await held.race(
        [lambda: twin.body(rec, "generate_password", commit) for _ in range(N)]
    )
    done, _ = outcomes(bodies)
    assert len(done) == 1
    hist = await twin.wire("entry.history", {"ref": "db"}, token=token)
    assert hist.ok and hist.result is not None, hist.error
    old = [v for v in hist.result["versions"] if v["version"] >= 1]
    assert len(old) == 1, hist.result  # the value before the rotation, once


# ---------------------------------------------------------------------- the owner's approval


@pytest.mark.anyio
@pytest.mark.parametrize(
    "method,params",
    [
        ("entry.edit", {"ref": "db", "url": "https://held.example"}),
        ("space.add", {"name": "held"}),
        ("entry.remove", {"ref": "db"}),
    ],
)
async def test_concurrent_approvals_of_one_held_change_run_it_once(
    twin: Twin, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
) -> None:
    twin.add("db", OLD_SECRET)
    token, _ = twin.session(scope="admin", approve="owner")
    await twin.state.persist_sessions()
    resp = await twin.wire(method, params, token=token)
    assert resp.error is not None and resp.error.code == "APPROVAL_PENDING"
    tx_id = resp.error.data["tx_id"]
    held = HeldWrite(twin.state, monkeypatch)
    answers = await held.race(
        [lambda: twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD) for _ in range(N)]
    )
    assert sum(a.ok for a in answers) == 1, [a.error for a in answers]
    codes = sorted(a.error.code for a in answers if a.error is not None)
    assert codes == ["TRANSACTION_CLOSED"] * (N - 1), answers
    tx = tx_of(twin, tx_id)
    assert tx.state == "committed"
    assert [r["receipt"] for r in audit_events(twin, "tx.commit", tx_id)] == [tx.receipt]
    assert len(audit_events(twin, "tx.approved", tx_id)) == 1
    stored = Transaction.from_doc(twin.vault.tx_docs[tx_id])
    assert stored.state == "committed" and stored.receipt == tx.receipt


@pytest.mark.anyio
async def test_a_commit_racing_the_owners_approval_and_abort_runs_once_and_stays_committed(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner-policy tool transaction, approved: the agent's commit is held in its write
    while a second commit, the owner's deny and the agent's abort arrive."""
    twin.add("db", OLD_SECRET)
    _, rec = twin.session(scope="admin", approve="owner")
    await twin.state.persist_sessions()
    tx_id = (await twin.ok(rec, "edit_entry", {"entry": "db", "url": "https://x.example"}))["tx_id"]
    assert (await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)).ok
    held = HeldWrite(twin.state, monkeypatch)
    commit = {"tx_id": tx_id, "approve": True}

    async def commit_call() -> tuple[bool, str]:
        b = await twin.body(rec, "edit_entry", commit)
        return (not b["error"], str(b.get("code", b.get("status"))))

    async def deny() -> tuple[bool, str]:
        r = await twin.wire("tx.deny", {"tx_id": tx_id}, password=PASSWORD)
        return (r.ok, r.error.code if r.error else "OK")

    async def abort() -> tuple[bool, str]:
        b = await twin.body(rec, "tx_abort", {"tx_id": tx_id})
        return (not b["error"], str(b.get("code", "OK")))

    got = await held.race([commit_call, commit_call, deny, abort])
    assert got[0] == (True, "committed"), got
    assert [c for _, c in got[1:]] == ["TRANSACTION_CLOSED"] * 3, got
    tx = tx_of(twin, tx_id)
    assert tx.state == "committed"
    assert twin.vault.resolve("db").url == "https://x.example"
    assert Transaction.from_doc(twin.vault.tx_docs[tx_id]).state == "committed"


# ---------------------------------------------------------------------- a run that stops


@pytest.mark.anyio
async def test_the_stored_record_never_says_committing_and_a_crash_mid_run_keeps_it_once(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a run holds it, the vault's record keeps the state before the claim: a crash
    before the change lands leaves it approved (not lost); the change lands with `committed`."""
    twin.add("db", OLD_SECRET)
    _, rec = twin.session(scope="admin", approve="owner")
    await twin.state.persist_sessions()
    tx_id = (await twin.ok(rec, "edit_entry", {"entry": "db", "url": "https://c.example"}))["tx_id"]
    assert (await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)).ok
    held = HeldWrite(twin.state, monkeypatch)
    held.armed = True
    run = asyncio.ensure_future(twin.body(rec, "edit_entry", {"tx_id": tx_id, "approve": True}))
    await held.entered.wait()
    assert tx_of(twin, tx_id).status(twin.clock()) == "committing"
    status = await twin.ok(rec, "tx_status", {"tx_id": tx_id})
    assert status["status"] == "committing"
    on_disk = Transaction.from_doc(twin.vault.tx_docs[tx_id])
    assert on_disk.state == "approved"  # what a restart right now would find: run it once
    held.release.set()
    body = await run
    assert body["status"] == "committed"
    on_disk = Transaction.from_doc(twin.vault.tx_docs[tx_id])
    assert on_disk.state == "committed" and on_disk.receipt == body["receipt"]


@pytest.mark.anyio
async def test_a_run_refused_before_its_change_releases_the_transaction_for_one_later_run(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit record naming the commit cannot be written: nothing ran, the held change is
    approvable again, and then runs once."""
    twin.add("db", OLD_SECRET)
    token, _ = twin.session(scope="admin", approve="owner")
    await twin.state.persist_sessions()
    resp = await twin.wire("space.add", {"name": "later"}, token=token)
    assert resp.error is not None
    tx_id = resp.error.data["tx_id"]
    audit = twin.state.audit
    assert audit is not None
    real = audit.append

    def failing(event: str, **fields: Any) -> Any:
        if event == "tx.commit":
            raise StorageError()
        return real(event, **fields)

    monkeypatch.setattr(audit, "append", failing)
    got = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert got.error is not None and got.error.code == "STORAGE_ERROR"
    assert tx_of(twin, tx_id).state == "approved" and "later" not in twin.vault.spaces
    monkeypatch.setattr(audit, "append", real)
    assert (await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)).ok
    assert "later" in twin.vault.spaces and tx_of(twin, tx_id).state == "committed"
    again = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert again.error is not None and again.error.code == "TRANSACTION_CLOSED"


@pytest.mark.anyio
async def test_a_run_that_fails_after_its_change_landed_leaves_it_committed(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held change lands (its `committed` record with it), then the request's own audit
    record fails: the transaction is committed, as the vault says, and never runs again."""
    token, _ = twin.session(scope="admin", approve="owner")
    await twin.state.persist_sessions()
    resp = await twin.wire("space.add", {"name": "landed"}, token=token)
    assert resp.error is not None
    tx_id = resp.error.data["tx_id"]
    audit = twin.state.audit
    assert audit is not None
    real = audit.append

    def failing(event: str, **fields: Any) -> Any:
        if event == "request" and fields.get("method") == "space.add" and "code" in fields:
            raise StorageError()
        return real(event, **fields)

    monkeypatch.setattr(audit, "append", failing)
    got = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert got.error is not None and got.error.code == "STORAGE_ERROR"
    assert "landed" in twin.vault.spaces
    tx = tx_of(twin, tx_id)
    assert tx.state == "committed"
    assert Transaction.from_doc(twin.vault.tx_docs[tx_id]).receipt == tx.receipt
    monkeypatch.setattr(audit, "append", real)
    again = await twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
    assert again.error is not None and again.error.code == "TRANSACTION_CLOSED"


@pytest.mark.anyio
async def test_a_commit_call_cancelled_mid_write_still_ends_its_run_and_runs_once(
    twin: Twin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent cancels its commit call while the change is being written: the run goes on to
    its end (never released while its write may land), and a new commit call is refused."""
    twin.add("db", OLD_SECRET)
    _, rec = twin.session(scope="admin")
    tx_id = (await twin.ok(rec, "generate_password", {"entry": "db", "length": 24}))["tx_id"]
    commit = {"tx_id": tx_id, "approve": True}
    held = HeldWrite(twin.state, monkeypatch)
    held.armed = True
    first = asyncio.ensure_future(twin.body(rec, "generate_password", commit))
    await held.entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await twin.code(rec, "generate_password", commit) == "TRANSACTION_CLOSED"
    held.release.set()
    deadline = time.monotonic() + 30  # a hang guard, not a timed assertion
    while tx_of(twin, tx_id).state == "committing":
        assert time.monotonic() < deadline, "the run never ended"
        await asyncio.sleep(0)
    tx = tx_of(twin, tx_id)
    assert tx.state == "committed"
    assert await twin.code(rec, "generate_password", commit) == "TRANSACTION_CLOSED"
    assert [r["receipt"] for r in audit_events(twin, "tx.commit", tx_id)] == [tx.receipt]
    assert twin.secret_of("db") == tx.extra["generated"]
