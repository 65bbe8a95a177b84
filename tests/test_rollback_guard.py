"""core/rollback.py on real files, without a broker: the anchor the vault saves (generation +
audit head, inside the authenticated payload), the checks at unlock, and revocations applied
again from the audit journal and from memory. The attacks against a real broker are in
tests/test_rollback.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from broker.core.audit import AuditLog
from broker.core.bindings import AncestryCache
from broker.core.crypto import normalize_password
from broker.core.rollback import ANCHOR, Anchor, RollbackGuard
from broker.core.sessions import CreateSpec, PendingRevocations, SessionStore
from broker.core.vault import Vault

from .twin import FAST_KDF, Clock

PASSWORD = "rollback unit password"


class Files:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.vault_path = root / "vault.apm"
        self.clock = Clock()
        self.audit = AuditLog(root / "audit.jsonl")
        self.audit.open()
        self.guard = RollbackGuard(PendingRevocations(root / "pending-revocations.json"))
        self.vault = Vault.create(self.vault_path, normalize_password(PASSWORD), FAST_KDF)
        self.audit.key = self.vault.audit_key()
        self.guard.attach(self.vault, self.audit)

    def store(self, vault: Vault) -> SessionStore:
        return SessionStore(
            vault.extra.get("sessions", []),
            clock=self.clock,
            ancestry=AncestryCache(),
            host="h",
        )

    def save_sessions(self, store: SessionStore) -> None:
        with self.vault.mutation():
            self.vault.extra["sessions"] = store.dump()

    def reopen(self) -> Vault:
        self.vault.close()
        self.vault = Vault.open(self.vault_path, normalize_password(PASSWORD))
        return self.vault


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Files]:
    f = Files(tmp_path)
    yield f
    f.audit.close()
    f.vault.close()


def test_every_save_advances_the_generation_and_records_the_audit_head(files: Files) -> None:
    files.vault.space_add("one")
    first = Anchor.of(files.reopen())
    files.guard.attach(files.vault, files.audit)
    files.audit.append("tool", tool="get_entry", code="OK")
    files.vault.space_add("two")
    second = Anchor.of(files.reopen())
    assert second.generation == first.generation + 1
    # the head before the save; the save's own `vault.saved` record comes after it
    saved = [r for r in files.audit.records() if r["event"] == "vault.saved"]
    assert [r["generation"] for r in saved] == [first.generation, second.generation]
    assert second.audit_seq == saved[-1]["seq"] - 1
    assert files.audit.journal.generation == second.generation


def test_the_anchor_is_inside_the_authenticated_payload(files: Files) -> None:
    files.vault.space_add("one")
    data = files.vault_path.read_bytes()
    assert b"generation" not in data and b"audit_seq" not in data  # sealed, not in the clear
    assert ANCHOR in files.reopen().extra


def test_an_older_vault_file_is_reported_and_its_lost_revocation_applied_again(
    files: Files,
) -> None:
    store = files.store(files.vault)
    _, rec = store.create(CreateSpec(label="x", scope="secrets", ttl=timedelta(hours=1)))
    files.save_sessions(store)
    older = files.root / "older.apm"
    files.vault.backup(older)  # a consistent copy of the file as it is now
    store.revoke(rec.accessor)
    files.save_sessions(store)
    files.audit.append("session.revoked", target=rec.accessor)
    files.vault.close()
    for sidecar in ("vault.apm-wal", "vault.apm-shm"):
        (files.root / sidecar).unlink(missing_ok=True)
    shutil.copyfile(older, files.vault_path)  # the rollback

    vault = files.reopen()
    store = files.store(vault)
    assert store.records[rec.accessor].revoked_at is None  # the attack, on its own, works
    check = files.guard.at_unlock(vault, files.audit, store)
    assert store.records[rec.accessor].revoked_at is not None
    assert check.must_save
    assert any("rolled back" in w for w in check.warnings), check.warnings
    assert any(rec.accessor in w for w in check.warnings)
    assert any("rolled back" in n for n in files.guard.integrity(files.audit))
    events = [r["event"] for r in files.audit.records()]
    assert "vault.rolled_back" in events and "session.revocations_reapplied" in events
    files.guard.attach(vault, files.audit)
    files.save_sessions(store)  # the next save supersedes every generation recorded
    assert Anchor.of(files.reopen()).generation == files.audit.journal.generation == 3
    again = files.guard.at_unlock(files.vault, files.audit, files.store(files.vault))
    assert again.warnings == [] and not again.must_save


def test_a_current_vault_and_log_give_no_warning(files: Files) -> None:
    files.vault.space_add("one")
    vault = files.reopen()
    check = files.guard.at_unlock(vault, files.audit, files.store(vault))
    assert check.warnings == [] and not check.must_save
    assert files.guard.integrity(files.audit) == []


def test_a_log_shorter_than_the_vault_recorded_is_reported_at_unlock(
    files: Files, tmp_path: Path
) -> None:
    files.audit.append("tool", tool="get_entry", code="OK")
    early = files.audit.path.read_bytes()
    for _ in range(3):
        files.audit.append("tool", tool="get_entry", code="OK")
    files.vault.space_add("one")
    files.audit.close()
    files.audit.path.write_bytes(early)  # put back while no broker runs
    files.audit = AuditLog(files.audit.path, key=files.audit.key)
    files.audit.open()
    vault = files.reopen()
    check = files.guard.at_unlock(vault, files.audit, files.store(vault))
    assert any(w.startswith("audit log:") and "truncated" in w for w in check.warnings)
    assert any(r["event"] == "audit.behind_vault" for r in files.audit.records())


def test_pending_revocations_deleted_from_disk_are_applied_from_memory(files: Files) -> None:
    store = files.store(files.vault)
    _, rec = store.create(CreateSpec(label="x", scope="secrets", ttl=timedelta(hours=1)))
    files.save_sessions(store)
    pending = files.guard.pending
    pending.add({"accessor": rec.accessor})
    pending.path.unlink()
    check = files.guard.at_unlock(files.vault, files.audit, store)
    assert store.records[rec.accessor].revoked_at is not None
    assert any("pending-revocations.json" in w and rec.accessor in w for w in check.warnings)
    mismatch = [r for r in files.audit.records() if r["event"] == "session.pending_mismatch"]
    assert mismatch and mismatch[0]["target"] == rec.accessor
    pending.clear()
    assert not pending.waiting


def test_a_revoke_all_made_while_locked_is_applied_from_the_journal_after_a_restart(
    files: Files,
) -> None:
    store = files.store(files.vault)
    _, a = store.create(CreateSpec(label="a", scope="secrets", ttl=timedelta(hours=1)))
    _, b = store.create(CreateSpec(label="b", scope="read", ttl=timedelta(hours=1)))
    files.save_sessions(store)
    before = files.clock().isoformat()
    files.guard.pending.add({"all_before": before})  # `apm session revoke --all`, locked
    files.audit.append("session.revoked", target="all", pending=True, all_before=before)
    files.guard.pending.path.unlink()
    files.audit.close()  # the broker restarts: its memory is gone, the log is not
    files.audit = AuditLog(files.audit.path, key=files.audit.key)
    files.audit.open()
    guard = RollbackGuard(PendingRevocations(files.guard.pending.path))
    vault = files.reopen()
    store = files.store(vault)
    check = guard.at_unlock(vault, files.audit, store)
    assert {r.accessor for r in store.records.values() if r.revoked_at} == {a.accessor, b.accessor}
    assert check.must_save
