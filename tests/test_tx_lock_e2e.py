"""A vault lock (and unlock) while a transaction's commit is in flight, attacked against a real
broker process. The run that holds the claim (`committing`) either lands completely and is
reported, or stops before its change with VAULT_LOCKED and is released; a lock + unlock never
lets the same transaction run a second time, and the landed change has one receipt and one
`tx.commit` audit record.

The interleavings are forced, not timed:
- `client` policy: the lock and the unlock happen inside the MCP elicitation callback, i.e.
  while the broker's run of the commit waits for the person's answer;
- `owner` policy (`apm tx approve` of a held change): the test holds the vault database's write
  lock (an external SQLite `BEGIN IMMEDIATE`) so an owner write holds the broker's write lock;
  `vault.lock` is queued on it first (sent on one connection ahead of a ping: wire requests
  start in arrival order, and the lock handler waits for the write lock before its first
  other await), then the approval's run queues behind the lock (seen by its `tx.commit` record).
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from mcp import types as mt
from pydantic import SecretStr

from broker.cli.client import BrokerClient, request_frame
from broker.wire.errors import ApmError

from .conftest import PASSWORD, Apm, Broker, register_secret
from .mcp_client import error_body, shim_client
from .test_tx_race_e2e import _commits, vault_write_held

pytestmark = pytest.mark.slow
TIMEOUT = 60.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _delegate(apm: Apm, *args: str) -> str:
    out = json.loads(apm.ok("delegate", "--ttl", "1h", "--json", *args).stdout)
    register_secret(out["token"])
    return str(out["token"])


def _audit(home: Path) -> list[dict[str, Any]]:
    lines = (home / "state" / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _names(apm: Apm) -> list[str]:
    return [e["name"] for e in json.loads(apm.ok("ls", "--json").stdout)]


def _owner(addr: str, method: str, params: dict[str, Any]) -> str:
    """One owner call (master password) on its own connection: "OK" or the error's code."""
    with BrokerClient(addr, client_name="owner") as c:
        try:
            c.call_raw(method, params, password=SecretStr(PASSWORD))
        except ApmError as exc:
            return exc.code
    return "OK"


def _attempts(home: Path, method: str) -> int:
    """How many calls of `method` have started: their `attempt` records (written before the
    call's change waits for the write lock)."""
    return sum(
        1
        for r in _audit(home)
        if r.get("event") == "request"
        and r.get("method") == method
        and r.get("outcome") == "attempt"
    )


async def _until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # a hang guard, not a timed assertion
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)  # polling a file, not ordering the calls


@pytest.mark.anyio
async def test_lock_and_unlock_while_the_person_is_asked_never_runs_the_commit_twice(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """Policy `client`: the vault is locked and unlocked while the commit's run waits for the
    person's yes. The unlock's restore must not hand out a second, unclaimed copy of the
    transaction: the change lands at most once, the transaction reads as what happened to it,
    and a second commit call changes nothing."""
    secret = f"txlock-Secret-{secrets.token_hex(6)}"
    register_secret(secret)
    token = _delegate(apm, "--scope", "write", "--approve", "client")
    asked: list[str] = []

    async def respond(ctx: Any, params: Any) -> mt.ElicitResult:
        asked.append(params.message)
        if len(asked) == 1:  # the first ask: lock and unlock the vault while the run waits
            await asyncio.to_thread(apm, "lock", check=True)
            await asyncio.to_thread(apm.ok, "unlock")
        return mt.ElicitResult(action="accept", content={"approve": True})

    args = {"type": "api_key", "name": "locked-mid", "secrets": {"key": secret}}
    async with shim_client(home, token, "legacy", TIMEOUT, elicitation_callback=respond) as c:
        shown = await c.call_tool("add_entry", args)
        assert not shown.is_error, shown
        tx_id = str((shown.structured_content or {})["tx_id"])
        first = await c.call_tool("add_entry", {"tx_id": tx_id, "approve": True})
        status = (await c.call_tool("tx_status", {"tx_id": tx_id})).structured_content or {}
        between = await asyncio.to_thread(_names, apm)
        second = await c.call_tool("add_entry", {"tx_id": tx_id, "approve": True})
        after = (await c.call_tool("tx_status", {"tx_id": tx_id})).structured_content or {}
    commits = _commits(home, tx_id)
    names = _names(apm)
    if first.is_error:  # stopped by the lock: released, nothing changed, clearly refused
        assert error_body(first)["code"] == "VAULT_LOCKED", error_body(first)
        assert "locked-mid" not in between
        assert status["status"] in ("pending", "approved"), status
        assert not second.is_error, error_body(second)  # the retry runs it, once
        done = second.structured_content or {}
    else:  # landed: reported, closed, and never run again
        done = first.structured_content or {}
        assert status["status"] == "committed", status
        assert status["receipt"] == done["receipt"], (status, done)
        assert second.is_error and error_body(second)["code"] == "TRANSACTION_CLOSED", (
            second.structured_content or error_body(second)
        )
    assert len(asked) == 1  # the person was asked once: their yes stays with the transaction
    assert names.count("locked-mid") == 1
    assert apm.ok("get", "locked-mid", "--no-newline").stdout == secret
    assert after["status"] == "committed" and after["receipt"] == done["receipt"], after
    landed = [r for r in commits if r["receipt"] == done["receipt"]]
    assert len(landed) == 1 and len(commits) == 1, commits  # a stopped run wrote no record
    # the stored record agrees (it is what the next unlock restores)
    apm("lock", check=True)
    apm.ok("unlock")
    listed = {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}
    assert listed[tx_id]["status"] == "committed"
    assert listed[tx_id]["receipt"] == done["receipt"]


def _queue_lock(addr: str) -> Any:
    """Send `vault.lock`, then a ping on the same connection; once the ping is answered the
    lock's handler is waiting for the broker's write lock. Returns the open socket (its
    answer comes once the write lock is free); the caller closes it."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    lock_id, lock = request_frame("vault.lock", {}, client="txlock-test")
    ping_id, ping = request_frame("broker.ping", {}, client="txlock-test")
    sock.send(lock)
    sock.send(ping)
    assert sock.poll(int(TIMEOUT * 1000)), "no answer to the ping"
    answer = json.loads(sock.recv())
    assert answer["id"] == ping_id, answer  # the lock is still waiting for the write lock
    return sock, lock_id


@pytest.mark.anyio
async def test_an_approval_whose_run_waits_behind_a_lock_is_refused_and_released(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """Policy `owner`: `apm tx approve` of a held change whose run reaches the write after a
    lock closed the vault: the approval answers VAULT_LOCKED, nothing changed, the transaction
    is not committed and can be approved again after unlock, which runs it exactly once."""
    token = SecretStr(_delegate(apm, "--scope", "admin", "--approve", "owner"))
    addr = f"ipc://{vault.socket}"
    with BrokerClient(addr, client_name="agent") as c, pytest.raises(ApmError) as held:
        c.call_raw("space.add", {"name": "heldspace"}, token=token)
    assert held.value.code == "APPROVAL_PENDING"
    tx_id = str(held.value.data["tx_id"])

    owner = functools.partial(_owner, addr)

    def attempts() -> int:
        return _attempts(home, "space.add")

    with vault_write_held(home):
        # an owner write takes the broker's write lock and waits in SQLite
        blocker = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "other"}))
        await _until(lambda: attempts() == 1, "the owner's write never started")
        sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
        approve = asyncio.ensure_future(asyncio.to_thread(owner, "tx.approve", {"tx_id": tx_id}))
        # the held change's own `request` attempt: its run is past the gate, in the handler,
        # waiting for the broker's write lock behind the lock
        await _until(lambda: attempts() == 2 or approve.done(), "approve hung")
    try:
        assert await blocker == "OK"
        answer = await approve
        assert await asyncio.to_thread(sock.poll, int(TIMEOUT * 1000))
        locked = json.loads(sock.recv())
        assert locked["id"] == lock_id and locked["ok"], locked
    finally:
        sock.close(linger=0)
    assert answer == "VAULT_LOCKED", answer
    # the audit trail claims no change that did not land: the stopped run wrote no tx.commit
    assert _commits(home, tx_id) == [], _commits(home, tx_id)
    apm.ok("unlock")
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    assert "heldspace" not in spaces and "other" in spaces
    listed = {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}
    assert listed[tx_id]["status"] in ("pending", "approved"), listed[tx_id]
    assert owner("tx.approve", {"tx_id": tx_id}) == "OK"
    assert owner("tx.approve", {"tx_id": tx_id}) == "TRANSACTION_CLOSED"
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    assert "heldspace" in spaces
    listed = {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}
    receipt = listed[tx_id]["receipt"]
    assert listed[tx_id]["status"] == "committed" and receipt
    assert [r["receipt"] for r in _commits(home, tx_id)] == [receipt]  # one per landed tx


@pytest.mark.anyio
async def test_an_approval_that_cannot_be_saved_before_a_lock_is_not_acknowledged(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """Policy `owner`, a tool's preview: `apm tx approve` marks it approved and saves that to
    the vault. When a lock closes the vault before that save, the approval must not answer OK
    (it would be lost: the unlock restores the transaction as still waiting); it answers
    VAULT_LOCKED, and approving again after unlock lets the agent's commit run it once."""
    secret = f"txlock-Secret-{secrets.token_hex(6)}"
    register_secret(secret)
    token = _delegate(apm, "--scope", "write", "--approve", "owner")
    addr = f"ipc://{vault.socket}"
    args = {"type": "api_key", "name": "approved-mid", "secrets": {"key": secret}}
    async with shim_client(home, token, "legacy", TIMEOUT) as c:
        shown = await c.call_tool("add_entry", args)
        assert not shown.is_error, shown
        tx_id = str((shown.structured_content or {})["tx_id"])

    owner = functools.partial(_owner, addr)

    def seen(event: str, **match: Any) -> int:
        return sum(
            1
            for r in _audit(home)
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        )

    with vault_write_held(home):
        blocker = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "other"}))
        await _until(
            lambda: seen("request", method="space.add", outcome="attempt") == 1, "no write"
        )
        sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
        approve = asyncio.ensure_future(asyncio.to_thread(owner, "tx.approve", {"tx_id": tx_id}))
        # decided in memory and recorded; its save now waits behind the lock
        await _until(lambda: seen("tx.approved", tx=tx_id) == 1 or approve.done(), "no decision")
    try:
        assert await blocker == "OK"
        answer = await approve
        assert await asyncio.to_thread(sock.poll, int(TIMEOUT * 1000))
        assert json.loads(sock.recv())["id"] == lock_id
    finally:
        sock.close(linger=0)
    apm.ok("unlock")
    listed = {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}
    if answer == "OK":  # acknowledged: it must be what the vault says after the unlock
        assert listed[tx_id]["status"] == "approved", listed[tx_id]
    else:
        assert answer == "VAULT_LOCKED", answer
        assert listed[tx_id]["status"] in ("pending", "awaiting_owner"), listed[tx_id]
        assert owner("tx.approve", {"tx_id": tx_id}) == "OK"
    async with shim_client(home, token, "legacy", TIMEOUT) as c:
        done = await c.call_tool("add_entry", {"tx_id": tx_id, "approve": True})
        again = await c.call_tool("add_entry", {"tx_id": tx_id, "approve": True})
    assert not done.is_error, error_body(done)
    assert (done.structured_content or {})["status"] == "committed"
    assert again.is_error and error_body(again)["code"] == "TRANSACTION_CLOSED"
    assert _names(apm).count("approved-mid") == 1
    assert apm.ok("get", "approved-mid", "--no-newline").stdout == secret


@pytest.mark.anyio
async def test_a_commit_writing_when_the_lock_comes_lands_completely_and_is_reported(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """Policy `agent`: the commit's write is in progress (held in SQLite) when `vault.lock`
    arrives. The lock waits for it: the change lands completely, once, and the commit call gets
    its receipt; then the vault is locked. (The agent's transaction, kept in memory only, is
    dropped by the lock: tx_status no longer knows it, as after a restart.)"""
    old = f"txlock-Old-{secrets.token_hex(6)}"
    register_secret(old)
    apm.ok("add", "login", "rotated", "--from-stdin", stdin=old + "\n")
    token = _delegate(apm, "--scope", "admin")
    addr = f"ipc://{vault.socket}"
    async with shim_client(home, token, "legacy", TIMEOUT) as c:
        shown = await c.call_tool("generate_password", {"entry": "rotated", "length": 32})
        assert not shown.is_error, shown
        tx_id = str((shown.structured_content or {})["tx_id"])
        with vault_write_held(home):
            commit = asyncio.ensure_future(
                c.call_tool("generate_password", {"tx_id": tx_id, "approve": True})
            )
            await _until(lambda: len(_commits(home, tx_id)) == 1 or commit.done(), "no commit")
            assert not commit.done()  # its write waits in SQLite, holding the write lock
            sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
        try:
            done = await commit
            assert await asyncio.to_thread(sock.poll, int(TIMEOUT * 1000))
            locked = json.loads(sock.recv())
            assert locked["id"] == lock_id and locked["ok"] and locked["result"]["was_unlocked"]
        finally:
            sock.close(linger=0)
        assert not done.is_error, error_body(done)
        body = done.structured_content or {}
        assert body["status"] == "committed" and body["receipt"].startswith("rcpt_")
        generated = str(body["generated"])
        register_secret(generated)
        apm.ok("unlock")
        gone = await c.call_tool("tx_status", {"tx_id": tx_id})
    assert gone.is_error and error_body(gone)["code"] == "TRANSACTION_NOT_FOUND"
    assert apm.ok("get", "rotated", "--no-newline").stdout == generated
    assert [r["receipt"] for r in _commits(home, tx_id)] == [body["receipt"]]
    versions = json.loads(apm.ok("history", "rotated", "--json").stdout)
    rows = versions["versions"] if isinstance(versions, dict) else versions
    assert sorted(v["version"] for v in rows) == [0, 1]  # the old value, once


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("space.add", {"name": "late"}),
        (
            "entry.add",
            {"type": "api_key", "name": "late", "secrets": {"key": {"value": "late-Key-0001"}}},
        ),
    ],
    ids=["space.add", "entry.add"],
)
async def test_an_owner_write_queued_behind_a_lock_answers_vault_locked(
    vault: Broker, apm: Apm, home: Path, method: str, params: dict[str, Any]
) -> None:
    """Not a transaction: the owner's own write reaches the write lock after `vault.lock`
    closed the vault it had taken. It answers VAULT_LOCKED and changes nothing."""
    register_secret("late-Key-0001")
    addr = f"ipc://{vault.socket}"

    owner = functools.partial(_owner, addr)

    attempts = functools.partial(_attempts, home)

    with vault_write_held(home):
        blocker = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "other"}))
        await _until(lambda: attempts("space.add") == 1, "the owner's write never started")
        sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
        late = asyncio.ensure_future(asyncio.to_thread(owner, method, params))
        # its attempt record: it has taken the vault and waits for the write lock
        want = 2 if method == "space.add" else 1
        await _until(lambda: attempts(method) == want or late.done(), "no call")
    try:
        assert await blocker == "OK"
        answer = await late
        assert await asyncio.to_thread(sock.poll, int(TIMEOUT * 1000))
        assert json.loads(sock.recv())["id"] == lock_id
    finally:
        sock.close(linger=0)
    assert answer == "VAULT_LOCKED", answer
    apm.ok("unlock")
    assert "late" not in _names(apm)
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    assert "late" not in spaces and "other" in spaces


@pytest.mark.anyio
async def test_sigterm_while_writes_are_in_progress_lands_them_and_the_vault_opens_after(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """SIGTERM while one owner write waits in SQLite (holding the broker's write lock) and a
    second waits for that lock: the shutdown takes the write lock before it locks the vault
    (bounded wait), so both land completely, in order, and are answered; the broker exits 0
    without a traceback, and the vault opens again with exactly the writes that answered OK
    and an intact audit chain."""
    addr = f"ipc://{vault.socket}"

    owner = functools.partial(_owner, addr)

    def attempts() -> int:
        return _attempts(home, "space.add")

    def stopping() -> bool:
        path = home / "state" / "broker.log"
        return path.exists() and "stopping: locking the vault" in path.read_text()

    assert vault.proc is not None
    with vault_write_held(home):
        first = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "first"}))
        await _until(lambda: attempts() == 1, "the first write never started")
        second = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "second"}))
        await _until(lambda: attempts() == 2 or second.done(), "the second write never started")
        vault.proc.send_signal(signal.SIGTERM)
        await _until(stopping, "the broker never began to stop")
    answers = {"first": await first, "second": await second}
    code = await asyncio.to_thread(vault.stop, signal.SIGTERM, TIMEOUT)
    assert code == 0, vault.output()
    assert "Traceback" not in vault.output(), vault.output()
    assert set(answers.values()) <= {"OK", "VAULT_LOCKED"}, answers  # each one answered
    # the shutdown queues for the write lock behind both (it is first come, first served): the
    # one writing lands completely, so does the one already waiting, and only then is the vault
    # locked (without the write lock the lock overtook the second, closing the vault while its
    # write could be running on the io thread)
    assert answers == {"first": "OK", "second": "OK"}, answers
    vault.start()
    apm.ok("unlock")
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    assert {n for n in ("first", "second") if n in spaces} == {
        n for n, a in answers.items() if a == "OK"
    }, (spaces, answers)
    assert apm("audit", "verify").returncode == 0


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["session.create", "session.revoke"])
async def test_a_session_change_queued_behind_a_lock_answers_vault_locked_and_loses_nothing(
    vault: Broker, apm: Apm, home: Path, method: str
) -> None:
    """`persist_sessions` takes the vault before it waits for the write lock: a session
    created or revoked by the owner whose save the lock overtook answers VAULT_LOCKED (never
    INTERNAL_ERROR, never OK), and after unlock the sessions are what the answers said: no
    session created, the one not revoked still works (its revocation was refused, not lost)."""
    token = _delegate(apm, "--scope", "read", "--label", "kept")
    before = {s["accessor"] for s in json.loads(apm.ok("session", "ls", "--json").stdout)}
    (accessor,) = before
    addr = f"ipc://{vault.socket}"
    params: dict[str, Any] = (
        {"ttl_seconds": 3600, "scope": "read", "label": "late"}
        if method == "session.create"
        else {"accessor": accessor}
    )

    owner = functools.partial(_owner, addr)

    attempts = functools.partial(_attempts, home)

    with vault_write_held(home):
        blocker = asyncio.ensure_future(asyncio.to_thread(owner, "space.add", {"name": "other"}))
        await _until(lambda: attempts("space.add") == 1, "the owner's write never started")
        sock, lock_id = await asyncio.to_thread(_queue_lock, addr)
        late = asyncio.ensure_future(asyncio.to_thread(owner, method, params))
        # its attempt record: it changed the sessions in memory and waits for the write lock
        await _until(lambda: attempts(method) == 1 or late.done(), "no call")
    try:
        assert await blocker == "OK"
        answer = await late
        assert await asyncio.to_thread(sock.poll, int(TIMEOUT * 1000))
        assert json.loads(sock.recv())["id"] == lock_id
    finally:
        sock.close(linger=0)
    assert answer == "VAULT_LOCKED", answer
    apm.ok("unlock")
    after = json.loads(apm.ok("session", "ls", "--json").stdout)
    assert {s["accessor"] for s in after} == before, after
    assert [s["state"] for s in after] == ["active"], after
    with BrokerClient(addr, client_name="agent") as c:  # the session still works
        c.call_raw("entry.list", {}, token=SecretStr(token))
