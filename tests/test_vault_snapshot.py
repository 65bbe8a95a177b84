"""The sealed metadata snapshot row (vault v2): unlock takes an entry's metadata from it only
while the entry's record on disk is the very one it saw; anything else is read record by
record, and a snapshot that is stale, moved, from the future or from a fork changes nothing
but speed."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core import vault as vault_mod
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import Change, StoredEntry, Vault
from broker.core.vault_db import VaultDb
from broker.wire.errors import ApmError

FAST = KdfParams("test", 8 * 1024, 1, 1)
PASSWORD = "snapshot test password, not a real one"


def pw() -> bytearray:
    return normalize_password(PASSWORD)


def add(vault: Vault, name: str, user: str = "alice") -> StoredEntry:
    return vault.add(
        "login",
        name,
        "default",
        ["t1"],
        f"https://{name}.example",
        None,
        Change(fields={"username": user}, secrets={"password": f"pw-{name}"}, remove_fields=[]),
    )


def rename(vault: Vault, e: StoredEntry, name: str) -> None:
    vault.edit(
        e,
        new_name=name,
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={}, secrets={"password": f"pw-{name}"}, remove_fields=[]),
    )


def view(vault: Vault) -> dict[str, Any]:
    return {
        e.id: (e.name, e.space, e.tags, e.url, e.fields["username"].value, vault.reveal(e, None))
        for e in vault.entries.values()
    }


def sql(path: Path, query: str, *args: object) -> list[Any]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def snapshot_row(path: Path, i: int = 0) -> tuple[int, bytes]:
    (got,) = sql(path, "SELECT version, ct FROM snapshot WHERE id = ?", f"entries.{i}")
    return got[0], bytes(got[1])


def put_snapshot(path: Path, row: tuple[int, bytes], i: int = 0) -> None:
    sql(
        path,
        "INSERT OR REPLACE INTO snapshot (id, version, updated_at, ct) VALUES (?, ?, 0, ?)",
        f"entries.{i}",
        *row,
    )


def reference(path: Path, tmp_path: Path) -> dict[str, Any]:
    """What the vault holds when opened without any snapshot row."""
    ref = tmp_path / "reference.apm"
    shutil.copy(path, ref)
    sql(ref, "DELETE FROM snapshot")
    v = Vault.open(ref, pw())
    try:
        assert v._snapshot_at == -1
        return view(v)
    finally:
        v._db.close()  # type: ignore[union-attr]  # no snapshot written


def crash(vault: Vault) -> None:
    """Stop using the vault as a killed broker would: no close, so no new snapshot."""
    vault._db.close()  # type: ignore[union-attr]


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "vault.apm"
    v = Vault.create(p, pw(), FAST)
    for i in range(40):
        add(v, f"site{i}", user=f"user{i}")
    v.close()
    yield p


def test_closing_writes_a_snapshot_that_unlock_uses_instead_of_each_record(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen, ct = snapshot_row(path)
    assert b"site1" not in ct and b"user1" not in ct  # sealed
    # not among the WITHOUT ROWID records, whose key lookups read a neighbour row whole
    assert sql(path, "SELECT count(*) FROM records WHERE kind = 'snapshot'") == [(0,)]
    want = reference(path, tmp_path)

    def no_row_scan(*_: Any) -> Any:
        raise AssertionError("unlock read every metadata record despite the snapshot")

    monkeypatch.setattr(VaultDb, "iter_rows", no_row_scan)
    v = Vault.open(path, pw())
    assert v._snapshot_at == gen == v.generation
    assert view(v) == want
    v.close()


def test_records_changed_after_the_snapshot_are_read_one_by_one(path: Path, tmp_path: Path) -> None:
    v = Vault.open(path, pw())
    at = v._snapshot_at
    es = sorted(v.entries.values(), key=lambda e: e.name)
    rename(v, es[0], "renamed")
    v.remove(es[1])
    add(v, "newcomer")
    crash(v)
    assert snapshot_row(path)[0] == at  # the snapshot is stale now
    want = reference(path, tmp_path)
    v = Vault.open(path, pw())
    assert v._snapshot_at == at
    got = view(v)
    assert got == want
    names = {x[0] for x in got.values()}
    assert "renamed" in names and "newcomer" in names and es[1].name not in names
    assert len(got) == 40
    v.close()
    assert snapshot_row(path)[0] == v.generation  # the close brought it up to date


def test_a_snapshot_from_another_vault_is_not_used(path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.apm"
    o = Vault.create(other, pw(), FAST)
    add(o, "intruder")
    o.close()
    gen = sql(path, "SELECT version FROM records WHERE kind = 'state'")[0][0]
    _, foreign_ct = snapshot_row(other)
    put_snapshot(path, (gen, foreign_ct))  # moved and relabelled: the AD no longer matches
    want = reference(path, tmp_path)
    v = Vault.open(path, pw())
    assert v._snapshot_at == -1
    assert view(v) == want and "intruder" not in {e.name for e in v.entries.values()}
    crash(v)


def test_a_snapshot_newer_than_the_vault_is_not_used(path: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.apm"
    shutil.copy(path, old)  # the vault as it was, with its own snapshot
    v = Vault.open(path, pw())
    rename(v, next(iter(v.entries.values())), "later")
    v.close()
    put_snapshot(old, snapshot_row(path))  # the file rolled back, a newer snapshot kept
    want = reference(old, tmp_path)
    v = Vault.open(old, pw())
    assert v._snapshot_at == -1
    assert view(v) == want and "later" not in {e.name for e in v.entries.values()}
    crash(v)


def test_a_snapshot_from_a_fork_is_used_only_for_the_records_it_saw(
    path: Path, tmp_path: Path
) -> None:
    """Two copies of one vault commit the same generation differently: the same entry id and
    version, other content. Only the record's nonce tells them apart, and unlock checks it."""
    fork = tmp_path / "fork.apm"
    shutil.copy(path, fork)
    target = sorted(sql(path, "SELECT id FROM records WHERE kind = 'entry'"))[0][0]
    for p, name in ((path, "branch-one"), (fork, "branch-two")):
        v = Vault.open(p, pw())
        rename(v, v.entries[target], name)
        v.close()
    one, two = snapshot_row(path), snapshot_row(fork)
    assert one[0] == two[0]
    put_snapshot(fork, one)
    want = reference(fork, tmp_path)
    v = Vault.open(fork, pw())
    assert v._snapshot_at == one[0]  # used, for the other 39 entries
    assert v.entries[target].name == "branch-two"
    assert view(v) == want
    crash(v)


@pytest.mark.parametrize("kind", ["entry", "secret"])
def test_a_record_put_back_to_an_older_copy_is_still_detected_with_a_snapshot(
    path: Path, kind: str
) -> None:
    """The snapshot shortens the digest check (it sums the hashes of the records it lists);
    a record on disk that is not the one the state record counts is still refused."""
    (rid,) = sql(path, "SELECT id FROM records WHERE kind = 'entry' LIMIT 1")[0]
    (old,) = sql(path, "SELECT version, ct FROM records WHERE kind = ? AND id = ?", kind, rid)
    v = Vault.open(path, pw())
    rename(v, v.entries[rid], "edited")
    v.close()
    assert snapshot_row(path)[0] == v.generation
    sql(
        path,
        "UPDATE records SET version = ?, ct = ? WHERE kind = ? AND id = ?",
        old[0],
        old[1],
        kind,
        rid,
    )
    with pytest.raises(ApmError) as err:
        Vault.open(path, pw())
    assert err.value.code == "VAULT_CORRUPT"


def test_a_record_deleted_behind_the_snapshot_is_detected(path: Path) -> None:
    (rid,) = sql(path, "SELECT id FROM records WHERE kind = 'entry' LIMIT 1")[0]
    sql(path, "DELETE FROM records WHERE id = ?", rid)
    with pytest.raises(ApmError) as err:
        Vault.open(path, pw())
    assert err.value.code == "VAULT_CORRUPT"


def test_snapshot_rows_of_two_snapshots_never_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The snapshot is split into rows (one row's plaintext in memory at a time); a row of
    another snapshot of the same generation (a fork) makes unlock drop the whole snapshot."""
    monkeypatch.setattr(vault_mod, "_SNAPSHOT_CHUNK", 16)
    path, fork = tmp_path / "vault.apm", tmp_path / "fork.apm"
    v = Vault.create(path, pw(), FAST)
    for i in range(40):
        add(v, f"site{i}")
    v.close()
    assert len(sql(path, "SELECT id FROM snapshot")) == 3
    shutil.copy(path, fork)
    for p, name in ((path, "one"), (fork, "two")):
        v = Vault.open(p, pw())
        assert v._snapshot_at == v.generation  # all three rows used
        add(v, name)
        v.close()
    put_snapshot(fork, snapshot_row(path, 1), 1)
    want = reference(fork, tmp_path)
    v = Vault.open(fork, pw())
    assert v._snapshot_at == -1
    assert view(v) == want and "two" in {e.name for e in v.entries.values()}
    crash(v)


def test_closing_rewrites_the_snapshot_only_when_an_entry_changed(
    path: Path, tmp_path: Path
) -> None:
    """Sessions and the audit head commit often (their own rows); the snapshot of 100k entries
    is not rewritten for them at every lock, and stays usable for the later generations."""
    first = snapshot_row(path)
    v = Vault.open(path, pw())
    assert v._snapshot_clean
    v.record_audit_head({"seq": 7, "hash": "00"})  # a commit, no entry in it
    gen = v.generation
    v.close()
    assert gen > first[0] and snapshot_row(path) == first
    v = Vault.open(path, pw())
    assert v._snapshot_at == first[0] and v._snapshot_clean
    rename(v, next(iter(v.entries.values())), "changed")
    assert not v._snapshot_clean
    v.close()
    assert snapshot_row(path)[0] == v.generation
    want = reference(path, tmp_path)
    v = Vault.open(path, pw())
    assert v._snapshot_clean and view(v) == want
    crash(v)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the broker's loop


@pytest.mark.anyio
async def test_locking_writes_the_snapshot_off_the_event_loop(tmp_path: Path) -> None:
    # At 100k entries the snapshot is ~1 s of CPU: written on the loop, every other client's
    # call would wait behind a lock. The broker writes it on its io thread before closing.
    import threading

    from .twin import twin_of

    with twin_of(tmp_path, "correct horse battery staple 42") as twin:
        twin.add("snap-me", "s3cret-for-snapshot")
        vault = twin.vault
        loop_thread = threading.get_ident()
        seen: list[tuple[int, bool]] = []
        write = vault.write_snapshot

        def spy() -> bool:
            wrote = write()
            seen.append((threading.get_ident(), wrote))
            return wrote

        vault.write_snapshot = spy  # type: ignore[method-assign]
        assert await twin.state.flush_and_lock()
        assert seen, "the snapshot was not written before locking"
        thread, wrote = seen[0]
        assert wrote, "the first write after a change must write the snapshot"
        assert thread != loop_thread, "the snapshot was written on the event loop"
        # close() ran after it and found it current: only the off-loop call wrote anything
        assert [w for _, w in seen[1:]] == [False] * (len(seen) - 1)


def _without_snapshot(path: Path, tmp_path: Path) -> dict[str, StoredEntry]:
    ref = tmp_path / "no-snapshot.apm"
    shutil.copy(path, ref)
    sql(ref, "DELETE FROM snapshot")
    v = Vault.open(ref, pw())
    try:
        assert v._snapshot_at == -1
        return dict(v.entries)
    finally:
        crash(v)


def test_entries_taken_from_the_snapshot_equal_those_read_from_each_record(
    path: Path, tmp_path: Path
) -> None:
    """Every field of every entry (secret history dates, shared short values, tags, notes,
    no url), not only what a listing shows."""
    v = Vault.open(path, pw())
    es = sorted(v.entries.values(), key=lambda e: e.name)
    for i in range(2):
        rename(v, v.entries[es[0].id], f"rotated-{i}")  # each rotates the password: history
    v.edit(
        es[1],
        new_name=None,
        move_to=None,
        add_tags=["t2", "t3"],
        remove_tags=["t1"],
        url="",
        notes="a note",
        change=Change(fields={"username": "x"}, secrets={}, remove_fields=[]),
    )
    v.close()
    want = _without_snapshot(path, tmp_path)
    v = Vault.open(path, pw())
    assert v._snapshot_at == v.generation and v._snapshot_clean
    assert dict(v.entries) == want
    assert len(v.entries[es[0].id].fields["password"].history) == 2
    crash(v)


def test_snapshot_rows_matching_the_disk_are_taken_whole_and_the_others_entry_by_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row's entries are sorted by id; a row whose (id, version, nonce) list is the disk's
    is taken in one piece, a row holding a changed, removed or added record is checked entry
    by entry, and the vault is the same either way."""
    monkeypatch.setattr(vault_mod, "_SNAPSHOT_CHUNK", 8)
    path = tmp_path / "vault.apm"
    v = Vault.create(path, pw(), FAST)
    for i in range(40):
        add(v, f"site{i}", user=f"user{i}")
    v.close()
    taken: list[int] = []
    real = vault_mod._entries_from_snapshot

    def spy(out: Any, ids: list[str], metas: Any, shared: Any) -> None:
        taken.append(len(ids))
        real(out, ids, metas, shared)

    monkeypatch.setattr(vault_mod, "_entries_from_snapshot", spy)
    v = Vault.open(path, pw())
    assert taken == [8] * 5 and v._snapshot_clean
    ids = sorted(v.entries)
    rename(v, v.entries[ids[3]], "renamed")  # row 0
    v.remove(v.entries[ids[20]])  # row 2
    crash(v)  # the snapshot is stale for those two rows only
    taken.clear()
    want = _without_snapshot(path, tmp_path)
    v = Vault.open(path, pw())
    assert sorted(taken) == [1] * 14 + [8] * 3  # rows 0 and 2 checked one by one
    assert not v._snapshot_clean
    assert dict(v.entries) == want and len(want) == 39
    assert v.entries[ids[3]].name == "renamed" and ids[20] not in v.entries
    crash(v)
