"""What a vault lock leaves of transactions in broker memory, in-process (real gate, handlers,
vault file and audit log; a fake clock). A transaction's arguments hold secret values in
plaintext (SecretStr, and the preview call's raw arguments), so a lock drops every transaction
from memory: those a person decides come back from the vault at unlock, an `agent`-policy
preview is gone (the agent previews again, as after a restart). A run in flight at the lock
keeps its transaction until it ends (VAULT_LOCKED before its change), then drops it.

The same races against a real broker process are in test_tx_lock_e2e.py.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.transactions import Transaction
from broker.core.vault import Vault

from .twin import Twin, twin_of

PASSWORD = "correct horse battery staple"
AGENT_SECRET = "lock-Agent-Secret-4410"
OWNER_SECRET = "lock-Owner-Secret-8812"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD) as t:
        yield t


def _plaintext_in_memory(twin: Twin, secret: str) -> list[str]:
    """The transactions the broker holds whose arguments carry `secret`."""
    return [tx_id for tx_id, tx in twin.state.txs.txs.items() if secret.encode() in tx.to_doc()]


def _add(name: str, secret: str) -> dict[str, Any]:
    return {"type": "api_key", "name": name, "secrets": {"key": secret}}


@pytest.mark.anyio
async def test_a_lock_drops_every_transactions_plaintext_and_unlock_brings_back_the_kept_ones(
    twin: Twin,
) -> None:
    _, agent = twin.session(approve="agent", label="agent")
    _, person = twin.session(approve="owner", label="person")
    await twin.state.persist_sessions()
    mine = (await twin.ok(agent, "add_entry", _add("agent-entry", AGENT_SECRET)))["tx_id"]
    held = (await twin.ok(person, "add_entry", _add("owner-entry", OWNER_SECRET)))["tx_id"]
    assert _plaintext_in_memory(twin, AGENT_SECRET) == [mine]
    assert _plaintext_in_memory(twin, OWNER_SECRET) == [held]

    locked = await twin.wire("vault.lock")
    assert locked.ok
    assert _plaintext_in_memory(twin, AGENT_SECRET) == []
    assert _plaintext_in_memory(twin, OWNER_SECRET) == []
    assert twin.state.txs.txs == {}

    assert (await twin.wire("vault.unlock", password=PASSWORD)).ok
    agent = twin.state.sessions().records[agent.accessor]
    person = twin.state.sessions().records[person.accessor]
    # the owner's is kept in the vault: back, and it runs once approved
    approved = await twin.wire("tx.approve", {"tx_id": held}, password=PASSWORD)
    assert approved.ok and approved.result is not None, approved.error
    done = await twin.ok(person, "add_entry", {"tx_id": held, "approve": True})
    assert done["status"] == "committed"
    # the agent's preview lived in memory only: it previews again, as after a restart
    gone = await twin.body(agent, "add_entry", {"tx_id": mine, "approve": True})
    assert gone["error"] and gone["code"] == "TRANSACTION_NOT_FOUND", gone
    again = (await twin.ok(agent, "add_entry", _add("agent-entry", AGENT_SECRET)))["tx_id"]
    assert (await twin.ok(agent, "add_entry", {"tx_id": again, "approve": True}))["receipt"]
    assert twin.secret_of("agent-entry") == AGENT_SECRET
    assert twin.secret_of("owner-entry") == OWNER_SECRET


class HeldAsk:
    """A client with elicitation support whose person answers yes once `answer` is set."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.request_id = 1
        self.session = self

    def check_client_capability(self, _: Any) -> bool:
        return True

    async def elicit_form(self, message: str, schema: Any, rid: Any) -> Any:
        self.asked.set()
        await self.answer.wait()

        @dataclass
        class Answer:
            action: str
            content: dict[str, Any]

        return Answer("accept", {"approve": True})


@pytest.mark.anyio
async def test_a_run_in_flight_at_the_lock_stops_before_its_change_and_leaves_nothing_behind(
    twin: Twin,
) -> None:
    _, rec = twin.session(approve="client", label="asker")
    await twin.state.persist_sessions()
    tx_id = (await twin.ok(rec, "add_entry", _add("mid-lock", AGENT_SECRET)))["tx_id"]
    ask = HeldAsk()
    run = asyncio.ensure_future(
        twin.body(rec, "add_entry", {"tx_id": tx_id, "approve": True}, mcp=ask)
    )
    await ask.asked.wait()  # the run holds the claim and waits for the person
    assert (await twin.wire("vault.lock")).ok
    assert list(twin.state.txs.txs) == [tx_id]  # the run still holds it
    ask.answer.set()
    out = await run
    assert out["error"] and out["code"] == "VAULT_LOCKED", out
    assert _plaintext_in_memory(twin, AGENT_SECRET) == []  # dropped as the run ended
    assert (await twin.wire("vault.unlock", password=PASSWORD)).ok
    assert "mid-lock" not in twin.names()
    rec = twin.state.sessions().records[rec.accessor]
    status = await twin.ok(rec, "tx_status", {"tx_id": tx_id})
    assert status["status"] == "pending"  # as stored: the person is asked again
    yes = HeldAsk()
    yes.answer.set()
    done = await twin.body(rec, "add_entry", {"tx_id": tx_id, "approve": True}, mcp=yes)
    assert not done["error"] and done["status"] == "committed", done
    assert twin.secret_of("mid-lock") == AGENT_SECRET


@pytest.mark.anyio
async def test_a_lock_by_an_expired_timer_drops_the_transactions_too(twin: Twin) -> None:
    """Any call that finds a timer ran out locks the vault on the spot (`OpenVault.get`/`peek`,
    not the reaper's `flush_and_lock`): that lock drops the transactions as well."""
    _, agent = twin.session(approve="agent", label="agent")
    mine = (await twin.ok(agent, "add_entry", _add("timer-entry", AGENT_SECRET)))["tx_id"]
    assert _plaintext_in_memory(twin, AGENT_SECRET) == [mine]
    cache = twin.state.cache
    cache._last_used_mono -= cache.policy.idle.total_seconds() + 1  # the idle timer ran out
    assert cache.peek() is None
    assert _plaintext_in_memory(twin, AGENT_SECRET) == []


@pytest.mark.anyio
async def test_a_decision_whose_save_waits_across_a_lock_and_unlock_is_not_acknowledged(
    twin: Twin,
) -> None:
    """`apm tx approve` decides in memory, then waits for the write lock to save the decision.
    Meanwhile the vault is locked and unlocked (the unlock restores the transaction from the
    vault as still waiting). The old decision must not be written into the new vault as if
    acknowledged while memory says otherwise: the approval answers VAULT_LOCKED."""
    _, person = twin.session(approve="owner", label="person")
    await twin.state.persist_sessions()
    tx_id = (await twin.ok(person, "add_entry", _add("across", OWNER_SECRET)))["tx_id"]
    state = twin.state
    async with state.write_lock:  # the approval's save queues behind this
        approve = asyncio.ensure_future(
            twin.wire("tx.approve", {"tx_id": tx_id}, password=PASSWORD)
        )
        deadline = asyncio.get_running_loop().time() + 30  # a hang guard
        while not state.write_lock._waiters:  # type: ignore[attr-defined]
            assert not approve.done(), approve.result()
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        state.cache.lock()  # as a timer would; then the unlock's steps, under the write lock
        reopened = await state.kdf(
            functools.partial(
                Vault.open, state.paths.vault, bytearray(PASSWORD.encode()), index=False
            )
        )
        state.cache.put(reopened)
        await state.restore_txs({})
    answer = await approve
    listed = await twin.wire("tx.list", {}, password=PASSWORD)
    assert listed.ok and listed.result is not None
    status = {t["tx_id"]: t["status"] for t in listed.result["transactions"]}[tx_id]
    stored = Transaction.from_doc(twin.vault.tx_docs[tx_id]).state
    if answer.ok:  # acknowledged: memory and the vault both hold it
        assert status == stored == "approved", (status, stored)
    else:
        assert answer.error is not None and answer.error.code == "VAULT_LOCKED", answer.error
        assert status == stored == "pending", (status, stored)
