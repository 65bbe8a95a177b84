"""Two-phase writes below the MCP boundary: the transaction store with an injected clock, and
the write tools run in-process (real handlers, a real vault file, fake time) through the same
`mcp_tools.run` the broker's MCP host uses (as `mcp_tools.call`, its SDK-model form), plus
the owner's side through the dispatcher.

The end-to-end versions, through the real shim and broker, are in test_writes_e2e.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.transactions import DEFAULT_TTL, TxStore, args_hash
from broker.core.vault import Change
from broker.server.context import Context
from broker.server.write_tools import WRITE_TOOLS
from broker.wire.errors import (
    ApprovalDenied,
    TransactionClosed,
    TransactionConflict,
    TransactionExpired,
    TransactionNotFound,
)
from broker.wire.protocol import EntryAddParams, SecretValue

from .mcp_client import error_body
from .twin import T0, Clock, Twin, twin_of

PASSWORD = "correct horse battery staple"
SECRET = "s3cret-Previewed-4417"
OTHER_SECRET = "s3cret-Smuggled-9902"
OLD_SECRET = "old-value-1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------- the store alone


def add_params(name: str = "aws", secret: str = SECRET) -> EntryAddParams:
    return EntryAddParams(
        type="login",
        name=name,
        fields={"username": "root"},
        secrets={"password": SecretValue(value=SecretStr(secret))},
    )


def new_tx(store: TxStore, accessor: str = "ses_a", tool: str = "add_entry", **kw: Any) -> Any:
    kw.setdefault("params", add_params())
    return store.create(
        accessor=accessor,
        label="t",
        tool=tool,
        method="entry.add",
        raw_args={"name": "aws"},
        preview="+ add",
        policy="agent",
        **kw,
    )


def test_a_pending_transaction_can_be_committed_until_its_ttl_and_is_expired_from_then_on() -> None:
    clock = Clock()
    store = TxStore(clock)
    tx = new_tx(store)
    assert tx.tx_id.startswith("tx_")
    assert tx.expires_at == T0 + DEFAULT_TTL == T0 + timedelta(minutes=15)
    clock.advance(minutes=14, seconds=59)
    assert store.for_commit(tx.tx_id, "ses_a", "add_entry") is tx
    clock.advance(seconds=1)
    with pytest.raises(TransactionExpired):
        store.for_commit(tx.tx_id, "ses_a", "add_entry")
    assert tx.status(clock()) == "expired"


def test_a_store_with_a_shorter_ttl_expires_its_transactions_sooner() -> None:
    clock = Clock()
    store = TxStore(clock, ttl=timedelta(seconds=30))
    tx = new_tx(store)
    clock.advance(seconds=30)
    with pytest.raises(TransactionExpired):
        store.for_commit(tx.tx_id, "ses_a", "add_entry")


def test_another_sessions_tx_id_is_refused_exactly_like_an_unknown_one() -> None:
    store = TxStore(Clock())
    tx = new_tx(store, accessor="ses_a")
    with pytest.raises(TransactionNotFound) as foreign:
        store.for_commit(tx.tx_id, "ses_b", "add_entry")
    with pytest.raises(TransactionNotFound) as unknown:
        store.for_commit("tx_0000000000000000", "ses_b", "add_entry")
    assert foreign.value.code == unknown.value.code == "TRANSACTION_NOT_FOUND"
    assert foreign.value.message == unknown.value.message
    with pytest.raises(TransactionNotFound):
        store.get(tx.tx_id, "ses_b")
    with pytest.raises(TransactionNotFound):
        store.abort(tx.tx_id, "ses_b")
    assert tx.state == "pending"
    assert store.get(tx.tx_id, None) is tx  # the owner sees every session's transactions


def test_a_transaction_can_only_be_committed_by_the_tool_that_previewed_it() -> None:
    store = TxStore(Clock())
    tx = new_tx(store, tool="add_entry")
    with pytest.raises(TransactionNotFound):
        store.for_commit(tx.tx_id, "ses_a", "delete_entry")


@pytest.mark.parametrize("close", ["commit", "abort"])
def test_a_committed_or_aborted_transaction_can_never_be_used_again(close: str) -> None:
    clock = Clock()
    store = TxStore(clock)
    tx = new_tx(store)
    if close == "commit":
        store.committed(tx, store.new_receipt())
        assert tx.receipt is not None and tx.receipt.startswith("rcpt_")
        assert tx.committed_at == clock()
    else:
        store.abort(tx.tx_id, "ses_a")
    with pytest.raises(TransactionClosed):
        store.for_commit(tx.tx_id, "ses_a", "add_entry")
    with pytest.raises(TransactionClosed):
        store.abort(tx.tx_id, "ses_a")
    with pytest.raises(TransactionClosed):
        store.owner_decide(tx.tx_id, True, None)
    clock.advance(hours=1)  # closed stays closed, it does not turn into "expired"
    assert tx.status(clock()) == ("committed" if close == "commit" else "aborted")


def test_a_denied_transaction_answers_every_commit_with_approval_denied() -> None:
    store = TxStore(Clock())
    tx = new_tx(store)
    store.owner_decide(tx.tx_id, False, "not today")
    for _ in range(2):
        with pytest.raises(ApprovalDenied) as err:
            store.for_commit(tx.tx_id, "ses_a", "add_entry")
        assert err.value.data["reason"] == "not today"


def test_the_owner_cannot_approve_an_expired_transaction() -> None:
    clock = Clock()
    store = TxStore(clock)
    tx = new_tx(store)
    clock.advance(minutes=15)
    with pytest.raises(TransactionExpired):
        store.owner_decide(tx.tx_id, True, None)
    assert tx.state == "pending"


def test_an_approval_does_not_outlive_the_transactions_ttl() -> None:
    clock = Clock()
    store = TxStore(clock)
    tx = new_tx(store)
    store.owner_decide(tx.tx_id, True, None)
    clock.advance(minutes=15)
    with pytest.raises(TransactionExpired):
        store.for_commit(tx.tx_id, "ses_a", "add_entry")


def test_the_arguments_hash_is_canonical_and_covers_secret_values_without_holding_them() -> None:
    a = add_params()
    b = EntryAddParams.model_validate(
        {
            "secrets": {"password": {"value": SECRET}},
            "fields": {"username": "root"},
            "name": "aws",
            "type": "login",
        }
    )
    assert args_hash(a) == args_hash(b)
    assert args_hash(add_params(secret=OTHER_SECRET)) != args_hash(a)
    assert args_hash(add_params(name="gcp")) != args_hash(a)
    assert SECRET not in args_hash(a)


def test_listing_filters_by_session_and_reports_expired_ones_as_expired() -> None:
    clock = Clock()
    store = TxStore(clock)
    old = new_tx(store, accessor="ses_a")
    clock.advance(minutes=10)
    fresh = new_tx(store, accessor="ses_a")
    other = new_tx(store, accessor="ses_b")
    clock.advance(minutes=6)
    assert [t.tx_id for t in store.listing("ses_a")] == [old.tx_id, fresh.tx_id]
    assert [t.tx_id for t in store.listing("ses_a", {"expired"})] == [old.tx_id]
    assert [t.tx_id for t in store.listing("ses_a", {"pending"})] == [fresh.tx_id]
    assert {t.tx_id for t in store.listing(None)} == {old.tx_id, fresh.tx_id, other.tx_id}


# ---------------------------------------------------------------------- the tool layer


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD) as t:
        yield t


ADD = {
    "type": "login",
    "name": "aws",
    "fields": {"username": "root"},
    "secrets": {"password": SECRET},
    "tags": ["prod"],
}


@pytest.mark.anyio
async def test_a_preview_changes_nothing_and_masks_the_secret_value(twin: Twin) -> None:
    _, rec = twin.session()
    before = twin.state.paths.vault.read_bytes()
    result = await twin.tool(rec, "add_entry", ADD)
    body = result.structured_content
    assert not result.is_error and body is not None
    assert body["status"] == "pending" and body["tx_id"].startswith("tx_")
    assert body["receipt"] is None
    assert "aws" in body["preview"] and "password" in body["preview"]
    assert SECRET not in result.model_dump_json()
    assert twin.names() == set()
    assert twin.state.paths.vault.read_bytes() == before


@pytest.mark.anyio
async def test_a_commit_with_differing_arguments_is_refused_and_the_plain_commit_runs_the_preview(
    twin: Twin,
) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    for smuggled in (
        {"name": "evil"},
        {"secrets": {"password": OTHER_SECRET}},
        {"tags": ["prod", "extra"]},
        {"space": "default"},  # not in the preview call, even though it is the default
    ):
        result = await twin.tool(rec, "add_entry", {"tx_id": tx, "approve": True, **smuggled})
        assert error_body(result)["code"] == "INVALID_PARAMETERS"
        assert OTHER_SECRET not in result.model_dump_json()
        assert twin.names() == set()
    done = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    entry = twin.vault.resolve("aws")
    assert entry.fields["username"].value == "root" and entry.tags == ["prod"]
    assert twin.secret_of("aws") == SECRET
    assert done["entry"]["id"] == entry.id


@pytest.mark.anyio
async def test_a_commit_repeating_exactly_the_previewed_arguments_is_accepted(twin: Twin) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    done = await twin.ok(rec, "add_entry", {**ADD, "tx_id": tx, "approve": True})
    assert done["status"] == "committed"
    assert twin.secret_of("aws") == SECRET


@pytest.mark.anyio
async def test_a_commit_without_approve_true_changes_nothing(twin: Twin) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    assert await twin.code(rec, "add_entry", {"tx_id": tx}) == "INVALID_PARAMETERS"
    assert await twin.code(rec, "add_entry", {"approve": True}) == "INVALID_PARAMETERS"
    assert twin.names() == set()
    assert (await twin.ok(rec, "tx_status", {"tx_id": tx}))["status"] == "pending"


@pytest.mark.anyio
async def test_committing_twice_is_transaction_closed_and_adds_nothing_more(twin: Twin) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    first = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_CLOSED"
    )
    assert len(twin.vault.entries) == 1
    status = await twin.ok(rec, "tx_status", {"tx_id": tx})
    assert status["status"] == "committed" and status["receipt"] == first["receipt"]


@pytest.mark.anyio
async def test_a_commit_after_the_ttl_on_the_injected_clock_is_expired_and_changes_nothing(
    twin: Twin,
) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    twin.clock.advance(minutes=15)
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_EXPIRED"
    )
    assert twin.names() == set()
    assert (await twin.ok(rec, "tx_status", {"tx_id": tx}))["status"] == "expired"


@pytest.mark.anyio
async def test_a_commit_just_before_the_ttl_still_lands(twin: Twin) -> None:
    _, rec = twin.session()
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    twin.clock.advance(minutes=14, seconds=59)
    assert (await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True}))["receipt"]


@pytest.mark.anyio
async def test_another_sessions_tx_id_is_not_found_for_commit_status_and_abort(twin: Twin) -> None:
    _, alice = twin.session(label="alice")
    _, mallory = twin.session(scope="admin", label="mallory")
    tx = (await twin.ok(alice, "add_entry", ADD))["tx_id"]
    assert await twin.code(mallory, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_NOT_FOUND"
    )
    assert await twin.code(mallory, "tx_status", {"tx_id": tx}) == "TRANSACTION_NOT_FOUND"
    assert await twin.code(mallory, "tx_abort", {"tx_id": tx}) == "TRANSACTION_NOT_FOUND"
    assert (await twin.ok(mallory, "tx_list", {}))["transactions"] == []
    assert twin.names() == set()
    assert (await twin.ok(alice, "add_entry", {"tx_id": tx, "approve": True}))["receipt"]


@pytest.mark.anyio
async def test_a_transaction_cannot_be_committed_through_another_write_tool(twin: Twin) -> None:
    _, rec = twin.session()
    twin.add("victim", OLD_SECRET)
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    assert await twin.code(rec, "delete_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_NOT_FOUND"
    )
    assert twin.names() == {"victim"}


@pytest.mark.anyio
async def test_an_edit_of_the_entry_after_the_preview_is_a_conflict_with_a_fresh_preview(
    twin: Twin,
) -> None:
    twin.add("db", secret=OLD_SECRET)
    _, rec = twin.session()
    edit = {"entry": "db", "fields": {"username": "agent"}, "secrets": {"password": SECRET}}
    tx = (await twin.ok(rec, "edit_entry", edit))["tx_id"]
    entry = twin.vault.resolve("db")
    twin.vault.edit(  # the owner edits it in between
        entry,
        new_name=None,
        move_to=None,
        add_tags=["owner"],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={"username": "owner"}, secrets={}, remove_fields=[]),
    )
    spec = next(t for t in WRITE_TOOLS if t.name == "edit_entry")
    ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="", session=rec)
    with pytest.raises(TransactionConflict) as err:
        await spec.run(ctx, spec.args.model_validate({"tx_id": tx, "approve": True}))
    assert err.value.code == "TRANSACTION_CONFLICT"
    fresh = err.value.data["tx_id"]
    assert fresh and fresh != tx
    assert "owner -> agent" in err.value.data["preview"]
    assert SECRET not in err.value.data["preview"]
    # the owner's edit stands; the stale transaction is closed
    assert twin.vault.resolve("db").fields["username"].value == "owner"
    assert twin.secret_of("db") == OLD_SECRET
    assert await twin.code(rec, "edit_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_CLOSED"
    )
    # the fresh preview commits on top of the owner's version
    await twin.ok(rec, "edit_entry", {"tx_id": fresh, "approve": True})
    after = twin.vault.resolve("db")
    assert after.fields["username"].value == "agent" and after.tags == ["owner"]
    assert twin.secret_of("db") == SECRET


@pytest.mark.anyio
async def test_an_owner_edit_landing_while_the_commit_waits_for_the_write_lock_is_a_conflict(
    twin: Twin,
) -> None:
    twin.add("db", OLD_SECRET)
    _, rec = twin.session()
    tx = (await twin.ok(rec, "edit_entry", {"entry": "db", "fields": {"username": "agent"}}))[
        "tx_id"
    ]
    lock = twin.state.write_lock
    await lock.acquire()  # the owner's entry.edit is in the middle of its save
    commit = asyncio.ensure_future(twin.tool(rec, "edit_entry", {"tx_id": tx, "approve": True}))
    deadline = time.monotonic() + 10
    while not lock._waiters and not commit.done():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the commit never queued on the write lock"
        await asyncio.sleep(0)  # yield to the commit task; no wall-clock wait
    twin.vault.edit(
        twin.vault.resolve("db"),
        new_name=None,
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={"username": "owner"}, secrets={}, remove_fields=[]),
    )
    lock.release()
    result = await asyncio.wait_for(commit, 10)
    assert error_body(result)["code"] == "TRANSACTION_CONFLICT"
    assert twin.vault.resolve("db").fields["username"].value == "owner"


@pytest.mark.anyio
async def test_deleting_the_entry_after_an_edit_preview_is_a_conflict_without_a_fresh_tx(
    twin: Twin,
) -> None:
    twin.add("db", OLD_SECRET)
    _, rec = twin.session()
    tx = (await twin.ok(rec, "edit_entry", {"entry": "db", "url": "https://x"}))["tx_id"]
    twin.vault.remove(twin.vault.resolve("db"))
    assert await twin.code(rec, "edit_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_CONFLICT"
    )
    assert twin.names() == set()


@pytest.mark.anyio
async def test_the_client_policy_without_a_client_that_can_be_asked_fails_closed(
    twin: Twin,
) -> None:
    _, rec = twin.session(approve="client")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "PERMISSION_DENIED"
    )
    assert twin.names() == set()


@pytest.mark.anyio
async def test_a_generated_password_goes_into_the_entry_and_never_into_the_preview(
    twin: Twin,
) -> None:
    twin.add("svc", OLD_SECRET)
    _, rec = twin.session(scope="write")  # write includes secrets: the value comes back
    preview = await twin.ok(rec, "generate_password", {"entry": "svc", "length": 32})
    assert twin.secret_of("svc") == OLD_SECRET
    done = await twin.ok(rec, "generate_password", {"tx_id": preview["tx_id"], "approve": True})
    value = twin.secret_of("svc")
    assert len(value) == 32 and value != OLD_SECRET
    assert value not in preview["preview"]
    assert done["generated"] == value
    assert len(twin.vault.resolve("svc").fields["password"].history) == 1


@pytest.mark.anyio
async def test_generate_password_creates_a_new_entry_when_given_a_type(twin: Twin) -> None:
    _, rec = twin.session(scope="admin")
    preview = await twin.ok(
        rec,
        "generate_password",
        {"entry": "fresh", "type": "api_key", "length": 20, "symbols": False},
    )
    done = await twin.ok(rec, "generate_password", {"tx_id": preview["tx_id"], "approve": True})
    value = twin.secret_of("fresh")
    assert done["generated"] == value and len(value) == 20 and value.isalnum()


@pytest.mark.anyio
async def test_manage_spaces_and_delete_entry_commit_what_they_previewed(twin: Twin) -> None:
    _, rec = twin.session()

    async def two_phase(tool: str, args: dict[str, Any]) -> dict[str, Any]:
        tx = (await twin.ok(rec, tool, args))["tx_id"]
        return await twin.ok(rec, tool, {"tx_id": tx, "approve": True})

    await two_phase("manage_spaces", {"action": "create", "name": "work"})
    assert "work" in twin.vault.spaces
    await two_phase("manage_spaces", {"action": "rename", "name": "work", "new_name": "job"})
    assert "job" in twin.vault.spaces and "work" not in twin.vault.spaces
    twin.add("gone", OLD_SECRET)
    await two_phase("delete_entry", {"entry": "gone"})
    assert twin.names() == set()
    await two_phase("manage_spaces", {"action": "remove", "name": "job"})
    assert "job" not in twin.vault.spaces


@pytest.mark.anyio
async def test_an_aborted_transaction_cannot_be_committed(twin: Twin) -> None:
    _, rec = twin.session(scope="admin")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    assert (await twin.ok(rec, "tx_abort", {"tx_id": tx}))["status"] == "aborted"
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == (
        "TRANSACTION_CLOSED"
    )
    assert twin.names() == set()


# ---------------------------------------------------------------------- owner policy, wire side


@pytest.mark.anyio
async def test_the_owner_policy_waits_for_the_master_password_then_commits(twin: Twin) -> None:
    token, rec = twin.session(approve="owner")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    pending = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert pending["status"] == "pending_owner_approval" and pending["receipt"] is None
    assert twin.names() == set()
    listed = await twin.wire("tx.list", {"pending": True}, password=PASSWORD)
    assert listed.ok and listed.result is not None
    assert [t["tx_id"] for t in listed.result["transactions"]] == [tx]
    # the agent's own token is never enough, nor a wrong password
    by_agent = await twin.wire("tx.approve", {"tx_id": tx}, token=token)
    assert by_agent.error is not None and by_agent.error.code == "PERMISSION_DENIED"
    wrong = await twin.wire("tx.approve", {"tx_id": tx}, password="not the password")
    assert wrong.error is not None and wrong.error.code == "BAD_PASSWORD"
    assert (await twin.ok(rec, "tx_status", {"tx_id": tx}))["status"] == "awaiting_owner"
    approved = await twin.wire("tx.approve", {"tx_id": tx}, password=PASSWORD)
    assert approved.ok and approved.result is not None
    assert approved.result["status"] == "approved"
    done = await twin.ok(rec, "add_entry", {"tx_id": tx, "approve": True})
    assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    assert twin.secret_of("aws") == SECRET


@pytest.mark.anyio
async def test_the_owner_denying_a_transaction_refuses_its_commit(twin: Twin) -> None:
    _, rec = twin.session(approve="owner")
    tx = (await twin.ok(rec, "add_entry", ADD))["tx_id"]
    denied = await twin.wire("tx.deny", {"tx_id": tx, "reason": "no"}, password=PASSWORD)
    assert denied.ok and denied.result is not None and denied.result["status"] == "denied"
    assert await twin.code(rec, "add_entry", {"tx_id": tx, "approve": True}) == "APPROVAL_DENIED"
    assert twin.names() == set()
    again = await twin.wire("tx.approve", {"tx_id": tx}, password=PASSWORD)
    assert again.error is not None and again.error.code == "TRANSACTION_CLOSED"


@pytest.mark.anyio
async def test_a_write_scope_session_cannot_use_admin_tools_and_a_read_session_no_writes(
    twin: Twin,
) -> None:
    _, writer = twin.session(scope="write")
    _, secrets_only = twin.session(scope="secrets")
    assert await twin.code(writer, "tx_list", {}) == "PERMISSION_DENIED"
    assert await twin.code(writer, "get_audit_logs", {}) == "PERMISSION_DENIED"
    assert await twin.code(secrets_only, "add_entry", ADD) == "PERMISSION_DENIED"
    assert await twin.code(secrets_only, "tx_status", {"tx_id": "tx_1"}) == "PERMISSION_DENIED"
    assert twin.names() == set()


@pytest.mark.anyio
async def test_removing_a_space_with_force_deletes_only_what_the_preview_named(twin: Twin) -> None:
    twin.vault.space_add("work")

    def change() -> Change:
        return Change(fields={}, secrets={"key": "v"}, remove_fields=[])

    twin.vault.add("api_key", "k1", "work", [], None, None, change())
    _, rec = twin.session()
    p = await twin.ok(rec, "manage_spaces", {"action": "remove", "name": "work", "force": True})
    twin.vault.add("api_key", "k2-added-later", "work", [], None, None, change())
    result = await twin.tool(rec, "manage_spaces", {"tx_id": p["tx_id"], "approve": True})
    body = error_body(result)
    assert body["code"] == "TRANSACTION_CONFLICT"
    assert body["data"]["tx_id"] and "2 entries" in body["data"]["preview"]  # a fresh preview
    assert "k2-added-later" in twin.names()
