"""One model per domain object (#12.5): where the stored record and its wire view differ, one
derives from the other, and these tests fail when a field is added to one and not the other."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from broker.core.sessions import Bindings, EntryFilter, SessionRecord
from broker.core.transactions import Transaction
from broker.core.vault import StoredEntry
from broker.wire.entries import EntryMeta
from broker.wire.protocol import SessionFields, SessionInfo, TxInfo, TxSummary

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


@pytest.mark.parametrize("name", ["fields"])
def test_entry_meta_mirrors_stored_entry(name: str) -> None:
    """StoredEntry (a slotted dataclass, for the hot path) and its wire view EntryMeta have the
    same fields; `fields` is the one reshaped (secret values and history never leave)."""
    stored = {f.name for f in dataclasses.fields(StoredEntry)}
    assert stored == _fields(EntryMeta)
    assert name in stored
