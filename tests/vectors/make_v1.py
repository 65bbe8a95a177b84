"""Writes the v1 test vectors: a vault file, an audit log and its checkpoint from apm 0.1.0.

The committed files under tests/vectors/v1/ were made by running this script once, at commit
90a0f10 (release 0.1.0, vault format 1), with

    .venv/bin/python -m tests.vectors.make_v1

It is kept to document how they were made, not to be rerun: every later apm must open, verify
and migrate the files exactly as committed (tests/test_vault_vectors.py), and a rerun with a
newer apm would only prove that apm reads what it writes today. Salts and nonces are random, so
a rerun gives different bytes with the same contents.

Known inputs: the master password below, a fixed clock, and the entries in `CONTENTS`, whose
expected plaintext (every field, every secret and one secret's previous value) is written to
`expected.json` beside the files. Nothing here is a real credential.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.core.audit import AuditLog
from broker.core.crypto import PROFILES, normalize_password
from broker.core.requests import AccessRequest
from broker.core.sessions import EntryFilter, SessionRecord, hash_token
from broker.core.vault import Change, Vault

PASSWORD = "vector password: correct horse battery staple"
OUT = Path(__file__).parent / "v1"
T0 = datetime(2026, 11, 20, 9, 30, 0, tzinfo=UTC)
TOKEN = "eps_vector-token-not-a-real-one-0123456789abcdefghijk"

# (type, name, space, tags, url, notes, plain fields, secret fields)
CONTENTS: list[
    tuple[str, str, str, list[str], str | None, str | None, dict[str, str], dict[str, str]]
] = [
    (
        "login",
        "GitHub",
        "default",
        ["dev", "vcs"],
        "https://github.com",
        None,
        {"username": "octo-vector"},
        {"password": "gh-vector-password-1"},
    ),
    (
        "api_key",
        "OpenAI",
        "default",
        ["ai"],
        None,
        "billing: team card",
        {},
        {"key": "sk-vector-key-0000000000000000"},
    ),
    (
        "login",
        "Bank",
        "personal",
        [],
        "https://bank.example",
        None,
        {"username": "ünïcödé-user"},
        {"password": "päss wörd with spaces ✓"},
    ),
    (
        "totp",
        "GitHub 2FA",
        "default",
        ["2fa"],
        None,
        None,
        {},
        {"secret": "otpauth://totp/GitHub:octo?secret=JBSWY3DPEHPK3PXPJBSWY3DPEH&issuer=GitHub"},
    ),
    (
        "note",
        "Recovery codes",
        "personal",
        ["paper"],
        None,
        None,
        {},
        {"content": "line one\nline two\n\ttabbed"},
    ),
]


class Clock:
    """Advances one second per reading, so every timestamp is known."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    clock = Clock()
    password = normalize_password(PASSWORD)
    vault = Vault.create(OUT / "vault.apm", password, PROFILES["interactive"], clock=clock)
    vault.space_add("personal")
    ids: dict[str, str] = {}
    for type_, name, space, tags, url, notes, plain, secret in CONTENTS:
        e = vault.add(
            type_,
            name,
            space,
            tags,
            url,
            notes,  # type: ignore[arg-type]
            Change(fields=plain, secrets=secret, remove_fields=[]),
        )
        ids[name] = e.id
    # an edit, so one secret has a previous value in its history
    vault.edit(
        vault.entries[ids["GitHub"]],
        new_name=None,
        move_to=None,
        add_tags=[],
        remove_tags=[],
        url=None,
        notes=None,
        change=Change(fields={}, secrets={"password": "gh-vector-password-2"}, remove_fields=[]),
    )
    session = SessionRecord(
        accessor="acc_0123456789abcdef",
        token_hash=hash_token(TOKEN),
        label="vector session",
        scope="secrets",
        created_at=T0,
        expires_at=T0 + timedelta(days=3650),
        filter=EntryFilter(spaces=["default"]),
    )
    request = AccessRequest(
        id="req_0123456789abcdef",
        accessor=session.accessor,
        label="vector session",
        entry_id=ids["Bank"],
        entry_name="Bank",
        space="personal",
        field="password",
        main_field="password",
        minutes=15,
        justification="vector",
        state="approved",
        created_at=T0,
        decided_at=T0,
        expires_at=T0 + timedelta(days=3650),
    )
    with vault.mutation():
        vault.extra["sessions"] = [session.model_dump(mode="json")]
        vault.extra["requests"] = [request.model_dump(mode="json")]

    audit = AuditLog(OUT / "audit.jsonl", clock=clock)
    audit.open()
    audit.append("broker.start", pid=1)  # before the first unlock: unsigned, as 0.1.0 does
    audit.key = vault.audit_key()
    audit.append("vault.unlock", pid=2, exe="/usr/bin/apm", actor="owner")
    audit.append("entry.add", pid=2, entry=ids["GitHub"], name="GitHub")
    audit.append("entry.get", session=session.accessor, entry=ids["OpenAI"], field="key")
    audit.close()

    expected: dict[str, Any] = {
        "password": PASSWORD,
        "profile": "interactive",
        "spaces": vault.spaces,
        "entries": [],
        "sessions": [session.accessor],
        "requests": [request.id],
        "audit_records": 4,
        "audit_events": ["broker.start", "vault.unlock", "entry.add", "entry.get"],
    }
    for e in sorted(vault.entries.values(), key=lambda e: e.name):
        fields: dict[str, Any] = {}
        for fname, f in e.fields.items():
            fields[fname] = {
                "secret": f.secret,
                "value": vault.reveal(e, fname)[1],
                "history": len(f.history),
            }
        expected["entries"].append(
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
    expected["history"] = {"GitHub": {"password": "gh-vector-password-1"}}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    (OUT / "vault.apm.bak").unlink(missing_ok=True)
    vault.close()


if __name__ == "__main__":
    main()
