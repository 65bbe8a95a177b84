"""One model per domain object (#12.5): where the stored record and its wire view differ, one
derives from the other, and these tests fail when a field is added to one and not the other."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from broker.core.requests import AccessRequest
from broker.core.sessions import Bindings, EntryFilter, SessionRecord
from broker.core.transactions import Transaction
from broker.core.vault import StoredEntry
from broker.server.tool_operations import RequestInfo
from broker.wire.entries import EntryMeta
from broker.wire.protocol import (
    AccessRequestFields,
    AccessRequestInfo,
    SessionFields,
    SessionInfo,
    TxInfo,
    TxSummary,
)

from .conftest import PASSWORD
from .twin import Twin, twin_of

# the record's own fields: stored, never shown as they are (the token's hash) or shown in a
# display form the view declares itself (filter, bindings)
RECORD_ONLY = {"token_hash", "filter", "bindings"}
# what the view derives for display
VIEW_ONLY = {"scopes", "state", "filter", "bindings"}


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_session_record_and_view_share_one_declaration() -> None:
    assert issubclass(SessionRecord, SessionFields)
    assert issubclass(SessionInfo, SessionFields)
    shared = _fields(SessionFields)
    assert _fields(SessionRecord) - shared == RECORD_ONLY, (
        "a field added to SessionRecord only: declare it in protocol.SessionFields (shown) or "
        "list it in RECORD_ONLY with the reason it is never shown"
    )
    assert _fields(SessionInfo) - shared == VIEW_ONLY, (
        "a field added to SessionInfo only: declare it in protocol.SessionFields, or derive it "
        "in session_handlers.session_info and list it in VIEW_ONLY"
    )


def test_session_info_carries_every_shared_value() -> None:
    """A set value on every shared field reaches the view unchanged (no field-by-field copy
    to forget)."""
    from broker.server.session_handlers import session_info

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rec = SessionRecord(
        accessor="ses_abcd",
        token_hash="0" * 64,
        label="lbl",
        scope="write",
        created_at=now,
        expires_at=now + timedelta(hours=1),
        idle_seconds=60,
        max_uses=7,
        last_used_at=now + timedelta(seconds=1),
        use_count=3,
        revoked_at=now + timedelta(seconds=2),
        declared_agent="claude",
        approve="owner",
        tool_names="apono",
        filter=EntryFilter(spaces=["s"], globs=["g*"]),
        bindings=Bindings(host="h", agent="claude"),
    )
    unset = {n for n in _fields(SessionFields) if n not in rec.model_fields_set}
    assert not unset, f"give these fields a value in this test: {sorted(unset)}"

    class _State:
        clock = staticmethod(lambda: now)

    info = session_info(rec, _State())  # type: ignore[arg-type]
    for name in _fields(SessionFields):
        assert getattr(info, name) == getattr(rec, name), name
    assert info.filter == {"spaces": ["s"], "entries": ["g*"]}
    assert info.bindings["agent"] == "claude"
    assert info.state == "revoked" and info.scopes == ["read", "secrets", "write"]
    assert "token_hash" not in info.model_dump()


def test_tx_summary_derives_from_tx_info_and_the_view_covers_it() -> None:
    assert issubclass(TxSummary, TxInfo)
    now = datetime.now(UTC)
    tx = Transaction(
        tx_id="tx_1",
        accessor="ses_a",
        label="l",
        tool="add_entry",
        method="entry.add",
        params=TxInfo.model_construct(),
        raw_args={},
        hash="h",
        preview="p",
        created_at=now,
        expires_at=now + timedelta(minutes=1),
        policy="agent",
    )
    # every TxInfo field comes from the transaction, except the shown arguments, which the
    # server layer renders (tx_handlers: secrets as length + fingerprint)
    assert set(tx._view(now)) == _fields(TxInfo) - {"args"}
    assert set(tx.summary(now).model_dump()) == _fields(TxSummary)


# EntryMeta's fields that meta() reshapes rather than passes on: `fields` (secret values and
# history never leave: `secret`, `value` for plain fields only, the history's length) and
# `tags` (a copy, so the view never aliases the stored list)
ENTRY_RESHAPED = {"fields", "tags"}


def test_entry_meta_mirrors_stored_entry() -> None:
    """StoredEntry (a slotted dataclass, for the hot path) and its wire view EntryMeta have the
    same fields: meta() reads each EntryMeta field from the entry under its own name."""
    stored = {f.name for f in dataclasses.fields(StoredEntry)}
    assert stored - _fields(EntryMeta) == set(), "a stored field the wire view never shows"
    assert _fields(EntryMeta) - stored == set(), "a wire field meta() cannot read by name"
    assert stored >= ENTRY_RESHAPED


def test_an_entrys_meta_is_derived_field_by_name_in_the_wire_models_order() -> None:
    from broker.core.vault import HistoryItem, StoredField

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    entry = StoredEntry(
        id="e_1",
        name="github",
        type="login",
        space="work",
        tags=["a", "b"],
        url="https://github.com",
        notes="n",
        fields={
            "username": StoredField(secret=False, value="me"),
            "password": StoredField(
                secret=True, sealed="x", history=[HistoryItem(sealed="y", replaced_at=now)]
            ),
        },
        created_at=now,
        updated_at=now + timedelta(seconds=1),
    )
    meta = entry.meta()
    for name in _fields(EntryMeta) - ENTRY_RESHAPED:
        assert getattr(meta, name) == getattr(entry, name), name
    assert meta.tags == entry.tags and meta.tags is not entry.tags
    assert {k: f.model_dump() for k, f in meta.fields.items()} == {
        "username": {"secret": False, "value": "me", "history": 0},
        "password": {"secret": True, "value": None, "history": 1},
    }
    # the JSON keys follow EntryMeta's declaration, as a validated model's would
    assert list(meta.model_dump()) == list(EntryMeta.model_fields)
    assert meta.model_dump_json() == EntryMeta.model_validate(meta.model_dump()).model_dump_json()


# ---------------------------------------------------------------------- access requests

# what the wire view adds for the person (whose it is, how to decide) and the tool view for the
# agent (what to do next); everything else is protocol.AccessRequestFields
REQUEST_WIRE_ONLY = {"session", "label", "totp_seed", "reference", "approve_command", "page_url"}
REQUEST_TOOL_ONLY = {"next_step"}
# the MCP tools' published field names (tool contract since 0.1.0), in outputSchema order
REQUEST_TOOL_NAMES = [
    "request_id",
    "state",
    "entry",
    "entry_id",
    "space",
    "field",
    "duration_minutes",
    "justification",
    "access",
    "created_at",
    "decided_at",
    "expires_at",
    "reason",
    "next_step",
]


def test_the_wire_and_tool_views_of_an_access_request_share_one_declaration() -> None:
    assert issubclass(AccessRequestInfo, AccessRequestFields)
    assert issubclass(RequestInfo, AccessRequestFields)
    shared = _fields(AccessRequestFields)
    assert _fields(AccessRequestInfo) - shared == REQUEST_WIRE_ONLY, (
        "a field added to AccessRequestInfo only: declare it in protocol.AccessRequestFields "
        "(both views show it) or list it in REQUEST_WIRE_ONLY"
    )
    assert _fields(RequestInfo) - shared == REQUEST_TOOL_ONLY, (
        "a field added to the tool's RequestInfo only: declare it in "
        "protocol.AccessRequestFields or list it in REQUEST_TOOL_ONLY"
    )


def test_the_request_tools_publish_their_contracts_field_names() -> None:
    """The shared declaration uses the wire's names; the tools keep `request_id` and
    `duration_minutes` in both their outputSchema and their structured content."""
    schema = RequestInfo.model_json_schema()
    assert list(schema["properties"]) == REQUEST_TOOL_NAMES
    assert schema["required"] == REQUEST_TOOL_NAMES
    assert "description" not in schema  # a docstring would become the published description
    from broker.server import mcp_tools

    for name in ("request_access", "get_request_status"):
        out = mcp_tools.TOOLS_BY_NAME[name].to_mcp().output_schema
        assert out == schema, name
    listed = mcp_tools.TOOLS_BY_NAME["list_my_requests"].to_mcp().output_schema
    assert listed is not None and listed["$defs"]["RequestInfo"] == schema


def _request(now: datetime) -> AccessRequest:
    """A decided request with every field set to a value no default gives."""
    return AccessRequest(
        id="req_0123456789abcdef",
        accessor="ses_abcd",
        label="lbl",
        entry_id="ent_1",
        entry_name="db",
        space="ops",
        field="password",
        main_field="password",
        minutes=17,
        justification="to run the nightly migration",
        access="reveal",
        state="approved",
        created_at=now - timedelta(minutes=5),
        decided_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(minutes=16),
        reason="ok for tonight",
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the broker's io pool runs on asyncio


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    with twin_of(tmp_path, PASSWORD) as t:
        yield t


def test_both_request_views_carry_every_shared_value(twin: Twin) -> None:
    """A set value on every shared field reaches both views unchanged, under each view's
    names (no field-by-field copy to forget)."""
    from broker.server.context import Context
    from broker.server.request_handlers import request_info
    from broker.server.tool_operations import info

    now = twin.clock()
    req = _request(now)
    unset = {
        n for n in AccessRequest.model_fields if n not in req.model_fields_set | {"main_field"}
    }
    assert not unset, f"give these fields a value in this test: {sorted(unset)}"
    shown = req.shown(now)
    assert set(shown) == _fields(AccessRequestFields)
    assert shown["entry"] == "db" and shown["state"] == "approved"
    ctx = Context(state=twin.state, peer=twin.peer, auth=None, request_id="", session=None)
    wire = request_info(req, ctx)
    tool = info(req, now)
    for name in _fields(AccessRequestFields):
        assert getattr(wire, name) == shown[name], name
        assert getattr(tool, name) == shown[name], name
    assert (wire.session, wire.label, wire.reference) == (
        "ses_abcd",
        "lbl",
        "apm://ops/db/password",
    )
    dumped = tool.model_dump(mode="json")
    assert list(dumped) == REQUEST_TOOL_NAMES
    assert (dumped["request_id"], dumped["duration_minutes"]) == (req.id, 17)
    # the state shown is the request's status now: a grant past its end shows expired
    later = now + timedelta(minutes=30)
    assert request_info(req, ctx).state == "approved"
    assert info(req, later).state == "expired" and req.shown(later)["state"] == "expired"


@pytest.mark.anyio
async def test_a_request_reads_the_same_on_the_wire_and_through_the_tools(twin: Twin) -> None:
    twin.add("db", "s3cret-value")
    _, rec = twin.session("read")
    asked = await twin.ok(
        rec,
        "request_access",
        {"entry": "db", "duration_minutes": 20, "justification": "run the nightly migration"},
    )
    resp = await twin.wire("request.list", {}, password=PASSWORD)
    assert resp.ok and resp.result is not None
    [listed] = resp.result["requests"]
    status = await twin.ok(rec, "get_request_status", {"request_id": asked["request_id"]})
    mine = await twin.ok(rec, "list_my_requests", {})
    for tool_view in (asked, status, mine["requests"][0]):
        assert set(tool_view) == set(REQUEST_TOOL_NAMES)
        for name in _fields(AccessRequestFields):
            tool_name = {"id": "request_id", "minutes": "duration_minutes"}.get(name, name)
            assert tool_view[tool_name] == listed[name], name
    assert set(listed) == _fields(AccessRequestInfo)


# ---------------------------------------------------------------------- tool views of wire results

# a tool output model showing the same fields as a wire model, yet not derived from it, and why
TOOL_VIEW_DIFFERS = {
    # the tool hands the model the value itself (str); the wire keeps it a SecretStr, masked
    # everywhere but the frame it is encoded into
    "DecryptEntryOut": "EntryGetResult",
}


def _models_in(tp: object, seen: set[type[BaseModel]]) -> set[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp in seen:
            return seen
        seen.add(tp)
        for f in tp.model_fields.values():
            _models_in(f.annotation, seen)
    for arg in typing.get_args(tp):
        _models_in(arg, seen)
    return seen


def test_a_tool_output_that_shows_a_wire_result_derives_from_it() -> None:
    """One model per domain object: a tool's output (or a model inside it) with a wire model's
    fields is that model or a subclass, so the published outputSchema keeps its own title while
    its fields cannot drift from the wire's."""
    from broker.server import mcp_tools, sync_tools, tool_operations
    from broker.wire import entries, protocol

    wire = {
        c
        for module in (protocol, entries)
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, BaseModel) and c.__module__ == module.__name__
    }
    shown: set[type[BaseModel]] = set()
    for spec in mcp_tools.TOOLS:
        _models_in(spec.out, shown)
    hand_copies = []
    for model in shown - wire:
        for w in wire:
            same = len(w.model_fields) >= 2 and set(w.model_fields) == set(model.model_fields)
            if (
                same
                and not issubclass(model, w)
                and TOOL_VIEW_DIFFERS.get(model.__name__) != w.__name__
            ):
                hand_copies.append(f"{model.__module__}.{model.__name__} copies {w.__name__}")
    assert not hand_copies, hand_copies
    # the derivations this relies on (a rename of either side fails here, not silently above)
    assert issubclass(mcp_tools.TotpOut, protocol.TotpResult)
    assert issubclass(mcp_tools.SpaceCount, protocol.SpaceInfo)
    assert issubclass(sync_tools.CloudSyncOut, protocol.SyncStatusResult)
    assert issubclass(tool_operations.ProfilesOut, protocol.ProfileInfo)
    assert set(tool_operations.ProfilesOut.model_fields) - set(
        protocol.ProfileInfo.model_fields
    ) == {"available"}
