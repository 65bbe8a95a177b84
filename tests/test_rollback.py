"""Rollback and deletion attacks on the broker's files, run as the agent's shell tool would
(same uid: it can read, replace and delete the user's files, stop the broker with
`broker.shutdown` and lock the vault, none of which needs the master password).

Each test runs the attack against a real broker process and asserts the defence:
- #13.5 an older audit log put back while the broker was stopped is reported at unlock, by
  `apm audit verify` and by `apm doctor`; a log deleted or replaced under a running broker is
  noticed, restarted with a gap record, and reported by `apm status` and `apm doctor`;
- #13.6 a vault rolled back to an older copy does not revive a revoked session, and the
  rollback is reported at unlock, by `apm status` and by `apm doctor`;
- #13.7 a revocation made while locked survives the deletion of its pending file.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker.wire.protocol import PROTOCOL_VERSION, Auth, Request

from .conftest import Apm, Broker, register_secret

pytestmark = pytest.mark.slow

SECRET = "rollback-Secret-Value-5517"
register_secret(SECRET)


# ---------------------------------------------------------------------- helpers


def wire(
    home: Path, method: str, params: dict[str, Any] | None = None, **auth: str
) -> dict[str, Any]:
    """One request straight on the broker socket, as any same-user process can send it."""
    req = Request(
        v=PROTOCOL_VERSION,
        method=method,
        params=params or {},
        auth=Auth(**auth) if auth else None,  # type: ignore[arg-type]
        client="attacker",
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{home / 'run' / 'broker.sock'}")
        sock.send(req.encode())
        assert sock.poll(20_000), f"no answer to {method}"
        doc: dict[str, Any] = json.loads(sock.recv())
        return doc
    finally:
        sock.close(linger=0)
        ctx.term()


def code_of(resp: dict[str, Any]) -> str:
    return "OK" if resp.get("ok") else str(resp["error"]["code"])


def read_secret(home: Path, token: str) -> dict[str, Any]:
    return wire(home, "entry.get", {"ref": "k"}, token=token)


def delegate(apm: Apm, scope: str = "secrets") -> tuple[str, str]:
    made = json.loads(apm.ok("delegate", "--scope", scope, "--ttl", "1h", "--json").stdout)
    return str(made["token"]), str(made["accessor"])


def shutdown(home: Path, broker: Broker) -> None:
    """Stop the broker the way any same-user process can: `broker.shutdown`, no auth."""
    assert code_of(wire(home, "broker.shutdown")) == "OK"
    assert broker.proc is not None
    broker.proc.wait(timeout=20)
    broker.proc = None


def verify(apm: Apm) -> tuple[int, dict[str, Any]]:
    proc = apm("audit", "verify", "--json")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def doctor(apm: Apm) -> dict[str, dict[str, Any]]:
    proc = apm("doctor", "--json")
    doc = json.loads(proc.stdout)
    return {c["name"]: c for c in doc["checks"]}


def status(apm: Apm) -> dict[str, Any]:
    proc = apm("status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def audit_file(home: Path) -> Path:
    return home / "state" / "audit.jsonl"


def events(home: Path) -> list[dict[str, Any]]:
    return [json.loads(r) for r in audit_file(home).read_text().splitlines() if r.strip()]


@pytest.fixture
def seeded(vault: Broker, apm: Apm) -> Iterator[Broker]:
    apm.ok("add", "api_key", "k", "--from-stdin", stdin=f"{SECRET}\n")
    yield vault


# ---------------------------------------------------------------------- #13.5 audit log


def test_an_older_audit_log_put_back_while_the_broker_was_stopped_is_reported(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    token, _ = delegate(apm)
    old_log = audit_file(home).read_bytes()
    old_head = audit_file(home).with_name("audit.jsonl.head").read_bytes()
    for _ in range(3):  # the reads the attacker wants gone
        assert code_of(read_secret(home, token)) == "OK"
    apm.ok("add", "api_key", "later", "--from-stdin", stdin="value-later\n")  # a vault save
    shutdown(home, seeded)
    audit_file(home).write_bytes(old_log)
    audit_file(home).with_name("audit.jsonl.head").write_bytes(old_head)
    seeded.start()

    unlocked = apm.ok("unlock")
    assert "audit log" in unlocked.stderr and "warning" in unlocked.stderr, unlocked.stderr
    code, res = verify(apm)
    assert code != 0 and res["ok"] is False
    assert any("vault recorded record" in f for f in res["findings"]), res
    checks = doctor(apm)
    assert checks["audit"]["status"] == "fail", checks["audit"]
    assert any("audit" in note for note in status(apm)["integrity"])
    apm.ok("add", "api_key", "after", "--from-stdin", stdin="value-after\n")
    code, res = verify(apm)  # a later save records the new head; the loss stays on record
    assert code != 0 and any("vault recorded record" in f for f in res["findings"]), res


def test_deleting_the_audit_log_under_a_running_broker_is_noticed_and_nothing_is_lost(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    token, _ = delegate(apm)
    assert code_of(read_secret(home, token)) == "OK"
    before = len(events(home))
    audit_file(home).unlink()
    audit_file(home).with_name("audit.jsonl.head").unlink()
    for _ in range(3):  # reads after the deletion must still reach the log on disk
        assert code_of(read_secret(home, token)) == "OK"

    notes = status(apm).get("integrity", [])
    recs = events(home) if audit_file(home).exists() else []
    reads = [r for r in recs if r.get("method") == "entry.get" and r.get("code") == "OK"]
    assert len(reads) == 4  # the one before and the three after: all on disk
    assert any("audit log" in n and "deleted" in n for n in notes), notes
    gaps = [r for r in recs if r["event"] == "audit.gap"]
    assert len(gaps) == 1 and gaps[0]["reason"] == "deleted", gaps
    assert len(recs) > before
    code, res = verify(apm)
    assert code == 0 and res["findings"] == [], res
    assert any("deleted" in w for w in res["warnings"]), res
    checks = doctor(apm)
    assert checks["audit"]["status"] in ("warn", "fail"), checks["audit"]
    assert "deleted" in checks["audit"]["detail"]
    assert "audit log" in (home / "state" / "broker.log").read_text()


def test_an_idle_broker_puts_a_deleted_audit_log_back_on_its_own(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    kept = audit_file(home).read_bytes()
    audit_file(home).unlink()
    deadline = time.monotonic() + 30  # a wait, not a timing assertion: the reaper's next turn
    while not audit_file(home).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert audit_file(home).read_bytes().startswith(kept)
    assert events(home)[-1]["event"] == "audit.gap"
    assert "audit log deleted" in (home / "state" / "broker.log").read_text()


def test_replacing_the_audit_log_under_a_running_broker_keeps_both_copies(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    token, _ = delegate(apm)
    old = audit_file(home).read_bytes()
    assert code_of(read_secret(home, token)) == "OK"
    fake = audit_file(home).with_name("fake.jsonl")
    fake.write_bytes(old)
    fake.replace(audit_file(home))  # rename over it: a new inode with the older records
    assert code_of(read_secret(home, token)) == "OK"

    notes = status(apm)["integrity"]
    assert any("replaced" in n for n in notes), notes
    kept = list(audit_file(home).parent.glob("audit.jsonl.replaced-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == old
    reads = [r for r in events(home) if r.get("method") == "entry.get" and r.get("code") == "OK"]
    assert len(reads) == 2
    code, res = verify(apm)
    assert code == 0 and any("replaced" in w for w in res["warnings"]), res


# ---------------------------------------------------------------------- #13.6 vault rollback


@pytest.mark.parametrize("restart", [False, True], ids=["same-broker", "restarted-broker"])
def test_a_vault_rolled_back_to_its_backup_does_not_revive_a_revoked_session(
    seeded: Broker, apm: Apm, home: Path, restart: bool
) -> None:
    token, accessor = delegate(apm)
    assert code_of(read_secret(home, token)) == "OK"
    vault_path = home / "vault.apm"
    backup = home / "older.apm"
    apm.ok("vault", "backup", str(backup))  # a copy from before the revocation
    apm.ok("session", "revoke", accessor, password=None)
    assert code_of(read_secret(home, token)) == "SESSION_REQUIRED"
    apm.ok("lock", password=None)
    if restart:
        shutdown(home, seeded)
    for sidecar in ("vault.apm-wal", "vault.apm-shm"):
        (home / sidecar).unlink(missing_ok=True)
    shutil.copyfile(backup, vault_path)  # the copy from before the revocation
    if restart:
        seeded.start()

    unlocked = apm.ok("unlock")
    refused = read_secret(home, token)
    assert code_of(refused) == "SESSION_REQUIRED", refused
    assert SECRET not in json.dumps(refused)
    assert "rolled back" in unlocked.stderr, unlocked.stderr
    shown = json.loads(apm.ok("session", "ls", "--json").stdout)
    mine = [s for s in shown if s["accessor"] == accessor]
    assert mine and mine[0]["state"] == "revoked"
    assert any("rolled back" in n for n in status(apm)["integrity"])
    checks = doctor(apm)
    assert checks["vault integrity"]["status"] == "fail", checks
    assert "rolled back" in checks["vault integrity"]["detail"]
    reapplied = [r for r in events(home) if r["event"] == "session.revocations_reapplied"]
    assert reapplied and accessor in reapplied[-1]["target"]


def test_the_vault_records_its_generation_and_the_audit_head_at_every_save(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    apm.ok("add", "api_key", "g1", "--from-stdin", stdin="value-g1\n")
    apm.ok("add", "api_key", "g2", "--from-stdin", stdin="value-g2\n")
    saved = [r for r in events(home) if r["event"] == "vault.saved"]
    gens = [r["generation"] for r in saved]
    assert len(gens) >= 2 and gens == sorted(gens) and len(set(gens)) == len(gens)
    assert status(apm)["integrity"] == []
    code, res = verify(apm)
    assert code == 0 and res["findings"] == [] and res["warnings"] == [], res


# ---------------------------------------------------------------------- #13.7 pending revocations


@pytest.mark.parametrize("restart", [False, True], ids=["same-broker", "restarted-broker"])
def test_a_revocation_made_while_locked_survives_deleting_its_pending_file(
    seeded: Broker, apm: Apm, home: Path, restart: bool
) -> None:
    token, accessor = delegate(apm)
    assert code_of(read_secret(home, token)) == "OK"
    apm.ok("lock", password=None)
    revoked = wire(home, "session.revoke", {"accessor": accessor})
    assert code_of(revoked) == "OK" and revoked["result"]["pending"] is True
    pending = home / "state" / "pending-revocations.json"
    assert pending.exists()
    pending.unlink()
    if restart:
        shutdown(home, seeded)
        seeded.start()

    unlocked = apm.ok("unlock")
    refused = read_secret(home, token)
    assert code_of(refused) == "SESSION_REQUIRED", refused
    assert SECRET not in json.dumps(refused)
    log = (home / "state" / "broker.log").read_text()
    if not restart:  # the broker noticed the file lost a revocation it still remembers
        assert "pending-revocations.json" in log and accessor in log
        mismatch = [r for r in events(home) if r["event"] == "session.pending_mismatch"]
        assert mismatch and accessor in mismatch[-1]["target"]
        assert "pending" in unlocked.stderr
    else:  # a new broker has no memory of it; the audit journal has
        reapplied = [r for r in events(home) if r["event"] == "session.revocations_reapplied"]
        assert reapplied and accessor in reapplied[-1]["target"]


def test_a_new_vault_made_where_an_old_one_was_deleted_is_not_called_rolled_back(
    seeded: Broker, apm: Apm, home: Path
) -> None:
    apm.ok("add", "api_key", "old", "--from-stdin", stdin="value-old\n")  # generations 1, 2, …
    shutdown(home, seeded)
    (home / "vault.apm").unlink()
    for name in ("vault.apm.bak", "vault.apm-wal", "vault.apm-shm"):  # v1 backup, v2 WAL
        (home / name).unlink(missing_ok=True)
    seeded.start()
    apm.ok("init", "--profile", "interactive")
    shutdown(home, seeded)  # the new vault is not saved again before the next unlock
    seeded.start()
    unlocked = apm.ok("unlock")
    assert "rolled back" not in unlocked.stderr, unlocked.stderr
    assert status(apm)["integrity"] == []
