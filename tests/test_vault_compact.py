"""The in-memory form of an unlocked v2 vault (slotted entries built at unlock without
validation, lazy secret stubs shared between entries, records opened and parsed a chunk at a
time) must say exactly what the records say. Property-tested: for random vaults, what listing,
show, search and get return after an unlock equals a straightforward decode of the rows (each
record opened on its own and validated by pydantic)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from broker.core import vault as vault_mod
from broker.core import vault_db
from broker.core.crypto import Cipher, KdfParams, normalize_password
from broker.core.vault import Change, StoredEntry, Vault

FAST = KdfParams("test", 8 * 1024, 1, 1)
PASSWORD = "compact test password, not a real one"

_text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="*?[\\"),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip() == s and s)
_entry = st.fixed_dictionaries(
    {
        "name": _text,
        "space": st.sampled_from(["default", "work"]),
        "tags": st.lists(st.sampled_from(["prod", "ci", "Ünï", "x"]), max_size=3),
        "url": st.none() | _text,
        "notes": st.none() | _text,
        "user": st.none() | _text,
        "secret": _text,
        "rotations": st.integers(0, 2),
    }
)


def _build(path: Path, specs: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """A v2 vault of `specs` (duplicate names skipped); returns id -> (secret, history)."""
    vault = Vault.create(path, normalize_password(PASSWORD), FAST)
    vault.space_add("work")
    want: dict[str, tuple[str, int]] = {}
    seen: set[tuple[str, str]] = set()
    try:
        for s in specs:
            if (s["space"], s["name"].casefold()) in seen:
                continue
            seen.add((s["space"], s["name"].casefold()))
            fields = {"username": s["user"]} if s["user"] is not None else {}
            e = vault.add(
                "login",
                s["name"],
                s["space"],
                s["tags"],
                s["url"],
                s["notes"],
                Change(fields=fields, secrets={"password": s["secret"]}, remove_fields=[]),
            )
            secret = s["secret"]
            for r in range(s["rotations"]):
                secret = f"{s['secret']}-{r}"
                e = vault.edit(
                    e,
                    new_name=None,
                    move_to=None,
                    add_tags=[],
                    remove_tags=[],
                    url=None,
                    notes=None,
                    change=Change(fields={}, secrets={"password": secret}, remove_fields=[]),
                )
            want[e.id] = (secret, s["rotations"])
    finally:
        vault.close()
    return want


def _decode(path: Path, vault: Vault) -> dict[str, StoredEntry]:
    """Every entry straight from its rows: each record opened on its own, its JSON validated
    into a StoredEntry by pydantic (secret fields without their sealed values)."""
    cipher = Cipher(vault._dek)
    db = vault_db.VaultDb.open(path)
    vid = db.vault_id
    db.close()
    conn = sqlite3.connect(path)
    try:
        got = conn.execute("SELECT id, version, ct FROM records WHERE kind = 'entry'").fetchall()
    finally:
        conn.close()
    adapter = TypeAdapter(StoredEntry)
    out: dict[str, StoredEntry] = {}
    for rid, version, ct in got:
        meta = json.loads(cipher.open(ct, vault_db.record_ad(vid, "entry", rid, version)))
        fields = {
            name: (
                {
                    "secret": True,
                    "history": [{"sealed": "", "replaced_at": d} for d in f["history"]],
                }
                if f["secret"]
                else {"secret": False, "value": f["value"]}
            )
            for name, f in meta["fields"].items()
        }
        out[rid] = adapter.validate_python({**meta, "id": rid, "fields": fields})
    return out


def _ranked(entries: list[StoredEntry], q: str) -> set[tuple[str, float]]:
    qf = q.casefold().strip()
    return {(e.id, s) for e in entries if (s := vault_mod._score(e, qf)) > 0}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(specs=st.lists(_entry, min_size=1, max_size=12), probe=_text)
def test_an_unlocked_vault_lists_shows_searches_and_gets_exactly_what_its_rows_hold(
    specs: list[dict[str, Any]], probe: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vault.db"
        want = _build(path, specs)
        vault = Vault.open(path, normalize_password(PASSWORD))
        try:
            ref = _decode(path, vault)
            assert set(ref) == set(want) == set(vault.entries)
            # listing and show: the metadata each entry's row holds, field by field
            listed = {e.id: e.meta().model_dump() for e in vault.iter_entries()}
            assert listed == {i: e.meta().model_dump() for i, e in ref.items()}
            for rid, e in ref.items():
                assert vault.resolve(rid).meta() == e.meta()
                assert vault.resolve(e.name, e.space).id == rid
            # search: exactly the entries and scores a full scan of the decoded rows gives
            queries = {probe, *(e.name[: max(1, len(e.name) // 2)] for e in ref.values())}
            for q in queries:
                got = vault.search(q, limit=10_000)
                assert {(e.id, s) for e, s in got} == _ranked(list(ref.values()), q)
                assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
            # get: each secret, and the number of older values kept, from the secrets rows
            for rid, (secret, history) in want.items():
                e = vault.resolve(rid)
                assert vault.reveal(e, None) == ("password", secret)
                assert e.meta().fields["password"].history == history
        finally:
            vault.close()


def test_entries_loaded_at_unlock_do_not_share_state_a_change_could_leak_through(
    tmp_path: Path,
) -> None:
    """Loaded entries share one stub for secret fields without history: a change to one entry
    builds new objects and leaves every other entry as its rows say."""
    path = tmp_path / "vault.db"
    specs = [
        {
            "name": f"e{i}",
            "space": "default",
            "tags": [],
            "url": None,
            "notes": None,
            "user": None,
            "secret": f"s{i}",
            "rotations": 0,
        }
        for i in range(3)
    ]
    want = _build(path, specs)
    vault = Vault.open(path, normalize_password(PASSWORD))
    try:
        a, b = vault.resolve("e0"), vault.resolve("e1")
        vault.edit(
            a,
            new_name=None,
            move_to=None,
            add_tags=["t"],
            remove_tags=[],
            url=None,
            notes=None,
            change=Change(fields={}, secrets={"password": "new"}, remove_fields=[]),
        )
        assert vault.reveal(vault.resolve("e0"), None)[1] == "new"
        assert vault.resolve("e0").meta().fields["password"].history == 1
        assert vault.reveal(b, None)[1] == want[b.id][0]
        assert b.meta().fields["password"].history == 0 and b.tags == []
    finally:
        vault.close()


@pytest.mark.parametrize("damage", ["truncate", "not-json"])
def test_a_metadata_record_that_does_not_parse_is_vault_corrupt(
    tmp_path: Path, damage: str
) -> None:
    """The records of a chunk are parsed together: one bad record is still VAULT_CORRUPT (the
    record is re-sealed with the right key, so only the parse can catch it)."""
    path = tmp_path / "vault.db"
    specs = [
        {
            "name": f"e{i}",
            "space": "default",
            "tags": [],
            "url": None,
            "notes": None,
            "user": None,
            "secret": "s",
            "rotations": 0,
        }
        for i in range(3)
    ]
    _build(path, specs)
    vault = Vault.open(path, normalize_password(PASSWORD))
    cipher = Cipher(vault._dek)
    vid = vault._v2.vault_id
    vault.close()
    conn = sqlite3.connect(path)
    try:
        rid, version, ct = conn.execute(
            "SELECT id, version, ct FROM records WHERE kind = 'entry' LIMIT 1"
        ).fetchone()
        ad = vault_db.record_ad(vid, "entry", rid, version)
        doc = cipher.open(ct, ad)
        bad = doc[:-1] if damage == "truncate" else b'1,{"x":1}'
        conn.execute(
            "UPDATE records SET ct = ? WHERE kind = 'entry' AND id = ?", (cipher.seal(bad, ad), rid)
        )
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(vault_mod.VaultCorrupt) as info:
        Vault.open(path, normalize_password(PASSWORD))
    assert info.value.code == "VAULT_CORRUPT"
