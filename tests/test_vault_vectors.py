"""The v1 test vectors: files written by apm 0.1.0 open, verify and read exactly, forever.

tests/vectors/v1/ holds a vault file, an audit log and its checkpoint made by release 0.1.0
(tests/vectors/make_v1.py says how). Every other test builds its vault with the code under
test, so a format break would pass them all; these files never change, so it cannot pass here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from broker.core.audit import AuditLog
from broker.core.crypto import normalize_password
from broker.core.requests import RequestStore
from broker.core.sessions import SessionRecord, hash_token
from broker.core.vault import Vault
from broker.wire.errors import ApmError

VECTORS = Path(__file__).parent / "vectors" / "v1"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())
TOKEN = "eps_vector-token-not-a-real-one-0123456789abcdefghijk"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the vectors, so no test can change the committed files."""
    for name in ("vault.apm", "audit.jsonl", "audit.jsonl.head"):
        shutil.copy2(VECTORS / name, tmp_path / name)
    return tmp_path


def test_the_committed_vectors_are_the_files_0_1_0_wrote() -> None:
    for line in (VECTORS / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == digest, name


def test_a_0_1_0_vault_opens_with_its_password_and_reads_exactly(v1: Path) -> None:
    vault = Vault.open(v1 / "vault.apm", normalize_password(EXPECTED["password"]))
    try:
        assert vault.header.kdf.profile == EXPECTED["profile"]
        assert vault.spaces == EXPECTED["spaces"]
        got = []
        for e in sorted(vault.entries.values(), key=lambda e: e.name):
            fields = {
                name: {
                    "secret": f.secret,
                    "value": vault.reveal(e, name)[1],
                    "history": len(f.history),
                }
                for name, f in e.fields.items()
            }
            got.append(
                {
                    "id": e.id,
                    "name": e.name,
                    "type": e.type,
                    "space": e.space,
                    "tags": e.tags,
                    "url": e.url,
                    "notes": e.notes,
                    "fields": fields,
                    "created_at": e.created_at.isoformat(),
                    "updated_at": e.updated_at.isoformat(),
                }
            )
        assert got == EXPECTED["entries"]
    finally:
        vault.close()


def test_a_0_1_0_vault_keeps_a_replaced_secret_in_its_history(v1: Path) -> None:
    vault = Vault.open(v1 / "vault.apm", normalize_password(EXPECTED["password"]))
    try:
        for name, fields in EXPECTED["history"].items():
            entry = vault.resolve(name)
            for field, previous in fields.items():
                history = entry.fields[field].history
                assert [vault._open(entry.id, field, h.sealed) for h in history] == [previous]
    finally:
        vault.close()


def test_a_0_1_0_vault_holds_its_sessions_and_requests(v1: Path) -> None:
    vault = Vault.open(v1 / "vault.apm", normalize_password(EXPECTED["password"]))
    try:
        sessions = [SessionRecord.model_validate(r) for r in vault.extra["sessions"]]
        assert [s.accessor for s in sessions] == EXPECTED["sessions"]
        assert sessions[0].token_hash == hash_token(TOKEN)
        reqs = RequestStore(vault.extra["requests"], clock=lambda: sessions[0].created_at)
        assert list(reqs.records) == EXPECTED["requests"]
    finally:
        vault.close()


def test_a_0_1_0_vault_refuses_a_wrong_password(v1: Path) -> None:
    with pytest.raises(ApmError) as info:
        Vault.open(v1 / "vault.apm", normalize_password("not the vector password"))
    assert info.value.code == "BAD_PASSWORD"


def test_a_0_1_0_audit_log_and_checkpoint_verify_under_the_vault_key(v1: Path) -> None:
    vault = Vault.open(v1 / "vault.apm", normalize_password(EXPECTED["password"]))
    try:
        log = AuditLog(v1 / "audit.jsonl", key=vault.audit_key())
        assert log.verify() == []
        records = list(log.records())
        assert [r["event"] for r in records] == EXPECTED["audit_events"]
        head = json.loads((v1 / "audit.jsonl.head").read_bytes())
        assert head["seq"] == EXPECTED["audit_records"]
    finally:
        vault.close()


def test_a_0_1_0_audit_log_flags_an_edit_of_the_vectors(v1: Path) -> None:
    """The verification above can fail: the same check on an edited copy finds it."""
    vault = Vault.open(v1 / "vault.apm", normalize_password(EXPECTED["password"]))
    try:
        path = v1 / "audit.jsonl"
        path.write_bytes(path.read_bytes().replace(b'"field":"key"', b'"field":"kez"'))
        findings = AuditLog(path, key=vault.audit_key()).verify()
        assert any(f.seq == 4 and "edited" in f.problem for f in findings)
    finally:
        vault.close()
