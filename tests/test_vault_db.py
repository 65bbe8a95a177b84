"""Vault storage v2 (SQLite): sealed rows, what a commit writes, tampering, migration from the
v1 test vectors, backup, a full disk and a torn WAL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core import vault as vault_module
from broker.core import vault_db
from broker.core.crypto import KdfParams, normalize_password
from broker.core.vault import Change, StoredEntry, Vault
from broker.wire.errors import ApmError

FAST = KdfParams("test", 8 * 1024, 1, 1)
PASSWORD = "v2 test password, not a real one"
VECTORS = Path(__file__).parent / "vectors" / "v1"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())


def pw(password: str = PASSWORD) -> bytearray:
    return normalize_password(password)


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(ApmError) as info:
        fn()
    return info.value.code


SECRET = "pw-value"


def add(vault: Vault, name: str, secret: str = SECRET, **kw: Any) -> StoredEntry:
    return vault.add(
        "login",
        name,
        kw.get("space", "default"),
        kw.get("tags", []),
        kw.get("url"),
        kw.get("notes"),
        Change(
            fields={"username": kw.get("user", "alice")},
            secrets={"password": secret},
            remove_fields=[],
        ),
    )


def rows(path: Path) -> dict[tuple[str, str], tuple[int, bytes]]:
    conn = sqlite3.connect(path)
    try:
        got = conn.execute("SELECT kind, id, version, ct FROM records").fetchall()
    finally:
        conn.close()
    return {(k, i): (v, bytes(ct)) for k, i, v, ct in got}


def execute(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql, args)
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "vault.apm"


@pytest.fixture
def vault(path: Path) -> Iterator[Vault]:
    v = Vault.create(path, pw(), FAST)
    yield v
    v.close()


def entry_set(vault: Vault) -> dict[str, tuple[str, str, str]]:
    return {
        e.name: (e.space, e.fields["username"].value or "", vault.reveal(e, None)[1])
        for e in vault.entries.values()
    }


# ---------------------------------------------------------------------- the file


def test_a_new_vault_is_one_sqlite_file_in_wal_mode_and_private(vault: Vault, path: Path) -> None:
    add(vault, "github")
    assert path.read_bytes()[:16] == vault_db.SQLITE_MAGIC
    assert vault.format == 2
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        assert p.exists(), p
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_unlock_reads_no_secret_record_and_a_reveal_reads_only_its_own(
    vault: Vault, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        add(vault, f"e{i}", f"secret-{i}")
    vault.close()
    reopened = Vault.open(path, pw())
    try:
        assert all(f.sealed is None for e in reopened.entries.values() for f in e.fields.values())
        read: list[tuple[str, str]] = []
        real_row = vault_db.VaultDb.row

        def spy(db: vault_db.VaultDb, kind: str, rid: str) -> object:
            read.append((kind, rid))
            return real_row(db, kind, rid)

        monkeypatch.setattr(vault_db.VaultDb, "row", spy)
        listed = [e.meta() for e in reopened.iter_entries()]
        hits = reopened.search("e")
        assert len(listed) == 5 and len(hits) == 5 and read == []
        e3 = reopened.resolve("e3")
        assert reopened.reveal(e3, None)[1] == "secret-3"
        assert read == [("secret", e3.id)]
    finally:
        reopened.close()


def test_nothing_but_ids_versions_and_timestamps_is_in_the_clear(vault: Vault, path: Path) -> None:
    vault.space_add("space-name-marker")
    add(
        vault,
        "entry-name-marker",
        "secret-value-marker",
        space="space-name-marker",
        user="username-marker",
        tags=["tag-marker"],
        url="https://url-marker.example",
        notes="notes-marker",
    )
    vault.extra["sessions"] = [{"label": "session-label-marker"}]
    vault.save()
    data = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))
    for marker in (
        "entry-name",
        "secret-value",
        "space-name",
        "username",
        "tag",
        "url",
        "notes",
        "session-label",
    ):
        assert f"{marker}-marker".encode() not in data, marker
    assert b"login" not in data  # not even the entry type
    kinds = {k for k, _ in rows(path)}
    assert kinds == {"entry", "secret", "state", "extra"}


def test_every_commit_advances_the_generation(vault: Vault, path: Path) -> None:
    g0 = vault.generation
    add(vault, "a")
    vault.space_add("work")
    add(vault, "b")
    assert vault.generation == g0 + 3
    assert rows(path)[("state", "vault")][0] == vault.generation
    vault.close()
    assert Vault.open(path, pw()).generation == g0 + 3


def test_a_commit_writes_only_the_rows_that_changed(vault: Vault, path: Path) -> None:
    for i in range(30):
        add(vault, f"entry-{i}", f"secret-{i}")
    before = rows(path)
    target = vault.resolve("entry-7")
    vault.edit(
        target,
        new_name=None,
        move_to=None,
        add_tags=["moved"],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={}, secrets={}, remove_fields=[]),
    )
    after = rows(path)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {("entry", target.id), ("state", "vault")}  # the secret row is untouched

    vault.extra["sessions"] = [{"accessor": "acc_x", "use_count": 1}]
    vault.save()
    again = rows(path)
    assert {k for k in again if again[k] != after.get(k)} == {
        ("extra", "sessions"),
        ("state", "vault"),
    }
    new = add(vault, "one-more")
    last = rows(path)
    assert {k for k in last if last[k] != again.get(k)} == {
        ("entry", new.id),
        ("secret", new.id),
        ("state", "vault"),
    }


def test_changes_survive_reopening_exactly(vault: Vault, path: Path) -> None:
    vault.space_add("work")
    a = add(vault, "github", "first")
    add(vault, "db", "db-secret", space="work")
    vault.edit(
        a,
        new_name="GitHub",
        move_to="work",
        add_tags=["x"],
        remove_tags=[],
        url="https://github.com",
        notes="n",
        change=Change(fields={}, secrets={"password": "second"}, remove_fields=[]),
    )
    add(vault, "gone")
    vault.remove(vault.resolve("gone"))
    vault.extra["requests"] = [{"id": "req_1"}]
    vault.save()
    want = entry_set(vault)
    spaces = list(vault.spaces)
    vault.close()
    reopened = Vault.open(path, pw())
    try:
        assert entry_set(reopened) == want
        assert reopened.spaces == spaces
        assert reopened.extra == {"requests": [{"id": "req_1"}]}
        history = reopened._hydrate(reopened.resolve("GitHub")).fields["password"].history
        assert [reopened._open(a.id, "password", h.sealed) for h in history] == ["first"]
    finally:
        reopened.close()


# ---------------------------------------------------------------------- attacks on the file


def test_a_record_moved_onto_another_entry_fails_authentication(vault: Vault, path: Path) -> None:
    """Secret records are opened on demand: the vault unlocks, and the moved record is refused
    the moment a request reads it; metadata records are checked at unlock."""
    a, b = add(vault, "a", "secret-a"), add(vault, "b", "secret-b")
    vault.close()
    r = rows(path)
    execute(
        path,
        "UPDATE records SET ct = ? WHERE kind = 'secret' AND id = ?",
        r[("secret", a.id)][1],
        b.id,
    )
    opened = Vault.open(path, pw())
    try:
        assert opened.reveal(opened.resolve("a"), None)[1] == "secret-a"
        assert code_of(lambda: opened.reveal(opened.resolve("b"), None)) == "VAULT_CORRUPT"
    finally:
        opened.close()
    execute(
        path,
        "UPDATE records SET ct = ? WHERE kind = 'entry' AND id = ?",
        r[("entry", a.id)][1],
        b.id,
    )
    assert code_of(lambda: Vault.open(path, pw())) == "VAULT_CORRUPT"


def test_a_record_given_another_version_fails_authentication(vault: Vault, path: Path) -> None:
    a = add(vault, "a")
    vault.close()
    execute(path, "UPDATE records SET version = version + 1 WHERE kind = 'entry' AND id = ?", a.id)
    assert code_of(lambda: Vault.open(path, pw())) == "VAULT_CORRUPT"


def test_a_deleted_entry_is_detected(vault: Vault, path: Path) -> None:
    add(vault, "keep")
    gone = add(vault, "gone")
    vault.close()
    execute(path, "DELETE FROM records WHERE id = ?", gone.id)
    assert code_of(lambda: Vault.open(path, pw())) == "VAULT_CORRUPT"


def test_an_entry_rolled_back_to_an_older_copy_is_detected(vault: Vault, path: Path) -> None:
    a = add(vault, "a", "old-secret")
    old = rows(path)[("secret", a.id)]
    vault.edit(
        a,
        new_name=None,
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={}, secrets={"password": "new"}, remove_fields=[]),
    )
    vault.close()
    execute(
        path,
        "UPDATE records SET version = ?, ct = ? WHERE kind = 'secret' AND id = ?",
        old[0],
        old[1],
        a.id,
    )
    assert code_of(lambda: Vault.open(path, pw())) == "VAULT_CORRUPT"


def test_a_record_from_another_vault_fails_authentication(tmp_path: Path) -> None:
    """Same password, same entry id: the vault id in the AD still tells them apart."""
    one, two = tmp_path / "one.apm", tmp_path / "two.apm"
    v1, v2 = Vault.create(one, pw(), FAST), Vault.create(two, pw(), FAST)
    e = add(v1, "a", "one-secret")
    add(v2, "a", "two-secret")
    v1.close()
    v2.close()
    other = rows(one)[("state", "vault")]
    execute(two, "UPDATE records SET version = ?, ct = ? WHERE kind = 'state'", *other)
    assert e.id  # ids differ, so only the state row can be moved as is
    assert code_of(lambda: Vault.open(two, pw())) == "VAULT_CORRUPT"


def test_a_wrong_password_is_refused_and_writes_nothing(vault: Vault, path: Path) -> None:
    add(vault, "a")
    vault.close()
    before = rows(path)
    assert code_of(lambda: Vault.open(path, pw("not it"))) == "BAD_PASSWORD"
    assert rows(path) == before


def test_a_damaged_database_file_is_vault_corrupt(vault: Vault, path: Path) -> None:
    for i in range(20):
        add(vault, f"e{i}")
    vault.close()
    data = bytearray(path.read_bytes())
    for i in range(4096, min(len(data), 8192)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    assert code_of(lambda: Vault.open(path, pw())) == "VAULT_CORRUPT"


# ---------------------------------------------------------------------- migration from v1


@pytest.fixture
def v1_copy(tmp_path: Path) -> Path:
    shutil.copy2(VECTORS / "vault.apm", tmp_path / "vault.apm")
    return tmp_path / "vault.apm"


def expected_view(vault: Vault) -> list[dict[str, Any]]:
    out = []
    for e in sorted(vault.entries.values(), key=lambda e: e.name):
        out.append(
            {
                "id": e.id,
                "name": e.name,
                "type": e.type,
                "space": e.space,
                "tags": e.tags,
                "url": e.url,
                "notes": e.notes,
                "fields": {
                    n: {
                        "secret": f.secret,
                        "value": vault.reveal(e, n)[1],
                        "history": len(f.history),
                    }
                    for n, f in e.fields.items()
                },
                "created_at": e.created_at.isoformat(),
                "updated_at": e.updated_at.isoformat(),
            }
        )
    return out


def test_the_v1_vectors_migrate_to_v2_at_unlock_keeping_the_v1_file(v1_copy: Path) -> None:
    original = v1_copy.read_bytes()
    vault = Vault.open(v1_copy, pw(EXPECTED["password"]))
    try:
        assert vault.format == 2
        assert expected_view(vault) == EXPECTED["entries"]
        assert vault.header.kdf.profile == EXPECTED["profile"]
        audit_key = vault.audit_key()
    finally:
        vault.close()
    assert vault_db.is_v2(v1_copy)
    assert v1_copy.with_name("vault.apm.v1").read_bytes() == original
    reopened = Vault.open(v1_copy, pw(EXPECTED["password"]))
    try:
        assert expected_view(reopened) == EXPECTED["entries"]
        assert reopened.spaces == EXPECTED["spaces"]
        assert [s["accessor"] for s in reopened.extra["sessions"]] == EXPECTED["sessions"]
        assert [r["id"] for r in reopened.extra["requests"]] == EXPECTED["requests"]
        assert reopened.audit_key() == audit_key  # the v1 audit log still verifies
        assert reopened.finish_migration() == [v1_copy.with_name("vault.apm.v1")]
    finally:
        reopened.close()
    assert not v1_copy.with_name("vault.apm.v1").exists()


def test_the_v1_backup_is_deleted_after_30_days(v1_copy: Path) -> None:
    Vault.open(v1_copy, pw(EXPECTED["password"])).close()
    backup = v1_copy.with_name("vault.apm.v1")
    Vault.open(v1_copy, pw(EXPECTED["password"])).close()
    assert backup.exists()
    old = time.time() - 31 * 86400
    os.utime(backup, (old, old))
    Vault.open(v1_copy, pw(EXPECTED["password"])).close()
    assert not backup.exists()


def test_a_migration_that_fails_leaves_the_v1_vault_as_it_was(
    v1_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = v1_copy.read_bytes()
    real_replace = os.replace

    def fail_on_the_final_rename(src: Any, dst: Any) -> None:
        if Path(dst) == v1_copy:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_final_rename)
    assert code_of(lambda: Vault.open(v1_copy, pw(EXPECTED["password"]))) == "STORAGE_ERROR"
    monkeypatch.undo()
    assert v1_copy.read_bytes() == original
    assert [p.name for p in v1_copy.parent.iterdir() if ".tmp" in p.name] == []
    vault = Vault.open(v1_copy, pw(EXPECTED["password"]))  # and the next unlock migrates
    try:
        assert vault.format == 2
        assert expected_view(vault) == EXPECTED["entries"]
    finally:
        vault.close()


def test_a_v1_vault_opened_without_migrating_stays_v1(v1_copy: Path) -> None:
    original = v1_copy.read_bytes()
    vault = Vault.open(v1_copy, pw(EXPECTED["password"]), migrate=False)
    try:
        assert vault.format == 1
        assert expected_view(vault) == EXPECTED["entries"]
    finally:
        vault.close()
    assert v1_copy.read_bytes() == original


# ---------------------------------------------------------------------- backup


def test_a_backup_is_a_private_standalone_copy_that_opens(
    vault: Vault, path: Path, tmp_path: Path
) -> None:
    for i in range(10):
        add(vault, f"e{i}", f"s{i}")
    dest = tmp_path / "backups" / "copy.apm"
    dest.parent.mkdir()
    vault.backup(dest)
    add(vault, "after-the-backup")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.apm"]  # no -wal beside it
    copy = Vault.open(dest, pw())
    try:
        assert set(entry_set(copy)) == {f"e{i}" for i in range(10)}
        assert copy.reveal(copy.resolve("e3"), None)[1] == "s3"
    finally:
        copy.close()
    assert code_of(lambda: vault.backup(dest)) == "ALREADY_EXISTS"


# ---------------------------------------------------------------------- storage failures


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real full disk (tests run as root, CI too)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_says_storage_error_and_the_vault_stays_readable(tiny_disk: Path) -> None:
    path = tiny_disk / "vault.apm"
    vault = Vault.create(path, pw(), FAST)
    acked: list[str] = []
    code = None
    try:
        for i in range(2000):
            try:
                add(vault, f"entry-{i:04d}", "x" * 200, notes="n" * 400)
            except ApmError as exc:
                code = exc.code
                break
            acked.append(f"entry-{i:04d}")
        assert code == "STORAGE_ERROR"
        assert set(entry_set(vault)) == set(acked)  # memory rolled back to what is on disk
    finally:
        with contextlib.suppress(ApmError):
            vault.close()
    reopened = Vault.open(path, pw())
    try:
        assert set(entry_set(reopened)) == set(acked)
    finally:
        reopened.close()


def test_a_torn_wal_leaves_a_vault_that_opens_with_a_prefix_of_its_commits(
    vault: Vault, path: Path, tmp_path: Path
) -> None:
    """Commits land in the WAL; a crash may leave its tail torn. Each cut of a copy taken
    mid-life opens, and holds the first k commits for some k."""
    names = [f"entry-{i:02d}" for i in range(12)]
    for name in names:
        add(vault, name)
    wal = path.with_name(path.name + "-wal")
    wal_data, db_data = wal.read_bytes(), path.read_bytes()
    assert len(wal_data) > 4096
    seen: set[int] = set()
    for cut in sorted({32, 100, 4096, *range(0, len(wal_data), len(wal_data) // 23)}):
        case = tmp_path / f"cut-{cut}"
        case.mkdir()
        (case / "vault.apm").write_bytes(db_data)
        (case / "vault.apm-wal").write_bytes(wal_data[:cut])
        opened = Vault.open(case / "vault.apm", pw())
        try:
            got = sorted(e.name for e in opened.entries.values())
        finally:
            opened.close()
        assert got == names[: len(got)], cut
        seen.add(len(got))
    assert len(seen) > 2  # the cuts really landed between commits


def test_a_password_change_rewraps_the_key_and_leaves_no_old_wrap_in_any_file(
    vault: Vault, path: Path
) -> None:
    add(vault, "kept", "kept-secret")
    old_wrap = vault._keyblock
    vault.rewrap(pw("a brand new password"), FAST)
    data = b"".join(p.read_bytes() for p in path.parent.iterdir() if p.is_file())
    assert old_wrap not in data
    vault.close()
    assert code_of(lambda: Vault.open(path, pw())) == "BAD_PASSWORD"
    reopened = Vault.open(path, pw("a brand new password"))
    try:
        assert reopened.reveal(reopened.resolve("kept"), None)[1] == "kept-secret"
    finally:
        reopened.close()


def test_a_search_index_built_before_many_commits_still_finds_exactly_the_current_entries(
    vault: Vault,
) -> None:
    for i in range(40):
        add(vault, f"alpha-{i:03d}")
    vault.build_search_index()
    for i in range(0, 40, 2):
        vault.remove(vault.resolve(f"alpha-{i:03d}"))
    for i in range(600):  # past the point where the index is rebuilt
        add(vault, f"beta-{i:03d}")
    e = vault.resolve("alpha-001")
    vault.edit(
        e,
        new_name="gamma-001",
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={}, secrets={}, remove_fields=[]),
    )
    assert {e.name for e, _ in vault.search("alpha", limit=1000)} == {
        f"alpha-{i:03d}" for i in range(3, 40, 2)
    }
    assert [e.name for e, _ in vault.search("gamma")] == ["gamma-001"]
    assert len(vault.search("beta", limit=1000)) == 600


def test_the_audit_head_and_generation_live_in_the_sealed_state_row(
    vault: Vault, path: Path
) -> None:
    add(vault, "a")
    before = rows(path)
    vault.record_audit_head({"seq": 7, "hash": "ab" * 32})
    after = rows(path)
    assert {k for k in after if after[k] != before.get(k)} == {("state", "vault")}
    assert b"ab" * 32 not in b"".join(ct for _, ct in after.values())
    generation = vault.generation
    vault.close()
    reopened = Vault.open(path, pw())
    try:
        assert reopened.audit_head == {"seq": 7, "hash": "ab" * 32}
        assert reopened.generation == generation
    finally:
        reopened.close()


def test_a_second_writer_on_the_same_file_is_refused_and_the_vault_stays_whole(
    vault: Vault, path: Path
) -> None:
    add(vault, "first")
    other = Vault.open(path, pw())  # e.g. a second process that opened the same file
    try:
        add(other, "from-the-other")
        assert code_of(lambda: add(vault, "stale-writer")) == "STORAGE_ERROR"
        assert code_of(lambda: vault.resolve("stale-writer")) == "ENTRY_NOT_FOUND"
    finally:
        other.close()
    reopened = Vault.open(path, pw())
    try:
        assert {e.name for e in reopened.entries.values()} == {"first", "from-the-other"}
    finally:
        reopened.close()


def test_unlock_reads_the_record_versions_beside_the_key_derivation(
    vault: Vault, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The (id, version) reads need no key: they run in a thread while the password's key is
    derived. The derivation here waits for the versions read to start; read after it, as
    before, the wait would run out and the unlock fail."""
    add(vault, "one")
    vault.close()
    reading = threading.Event()
    real_versions, real_unwrap = vault_db.VaultDb.versions, vault_module._unwrap

    def versions(self: vault_db.VaultDb, kind: str) -> Any:
        reading.set()
        return real_versions(self, kind)

    def unwrap(*args: Any) -> Any:
        assert reading.wait(30), "the record versions were not read beside the derivation"
        return real_unwrap(*args)

    monkeypatch.setattr(vault_db.VaultDb, "versions", versions)
    monkeypatch.setattr(vault_module, "_unwrap", unwrap)
    v = Vault.open(path, pw())
    assert [e.name for e in v.entries.values()] == ["one"]
    v.close()


def test_a_wrong_password_leaves_no_reader_thread_behind(vault: Vault, path: Path) -> None:
    add(vault, "one")
    vault.close()
    for _ in range(3):
        assert code_of(lambda: Vault.open(path, pw("not it"))) == "BAD_PASSWORD"
    assert not [t for t in threading.enumerate() if t.name == "vault-heads"]
    v = Vault.open(path, pw())  # and the file still opens
    assert len(v.entries) == 1
    v.close()
