"""Pending approvals survive a broker restart (#15.2), against a real broker process and the
real `apm` CLI: a change held for a `--approve owner` session is still pending after the broker
is killed with SIGKILL (or stopped) and the vault unlocked again; `apm tx approve` then lands
exactly the previewed change, once; a denied one stays denied; and the vault file holds the
held secret value only sealed (the home fixture's sweep checks every file too).

Expiry across a restart needs a clock the test can move: test_tx_persist.py covers it.
"""

from __future__ import annotations

import json
import secrets
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from broker.wire.errors import ApprovalPending

from .conftest import PASSWORD, Apm, Broker, clean_env, register_secret

pytestmark = pytest.mark.slow


def _held_edit(apm: Apm, home: Path) -> tuple[str, str]:
    """A session with `--approve owner` edits `seed`'s password: (tx id, the new value)."""
    apm.ok("add", "login", "seed", "--from-stdin", stdin="seed-pw-0001\n")
    out = apm.ok("delegate", "--ttl", "1h", "--scope", "write", "--approve", "owner", "--json")
    env = clean_env(home, APM_EPHEMERAL_ID=json.loads(out.stdout)["token"])
    new = "held-across-restart-" + secrets.token_hex(6)
    register_secret(new)
    proc = apm(
        "edit", "seed", "--from-stdin", "--url", "https://ok.example", stdin=new + "\n", env=env
    )
    assert proc.returncode == ApprovalPending.exit_code, proc.stderr
    tx = proc.stderr.split("apm tx approve ")[1].split('"')[0].split()[0]
    return tx, new


def _txs(apm: Apm) -> dict[str, dict[str, Any]]:
    return {t["tx_id"]: t for t in json.loads(apm.ok("tx", "ls", "--json").stdout)}


def _stable(tx: dict[str, Any]) -> dict[str, Any]:
    args = {**tx["args"], "secrets": sorted(tx["args"]["secrets"])}
    return {**tx, "args": args, "page_url": bool(tx["page_url"])}


def _restart(broker: Broker, apm: Apm, sig: int) -> None:
    broker.stop(sig)
    broker.start()
    apm.ok("unlock")


def _file_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.rglob("vault*")) if p.is_file())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_held_change_survives_a_broker_restart_and_approving_it_lands_it_once(
    vault: Broker, apm: Apm, home: Path, sig: int
) -> None:
    tx, new = _held_edit(apm, home)
    before = _txs(apm)[tx]
    assert before["status"] == "pending" and before["policy"] == "owner"
    _restart(vault, apm, sig)
    after = _txs(apm)[tx]
    # the same preview, arguments, session, policy and expiry; a secret's shown fingerprint
    # is keyed per broker process, and the page is served on a new port
    assert _stable(after) == _stable(before)
    assert after["args"]["secrets"]["password"].startswith("<secret: 32 chars, fp ")
    pending = json.loads(apm.ok("tx", "ls", "--pending", "--json").stdout)
    assert [t["tx_id"] for t in pending] == [tx]
    assert apm.ok("get", "seed", "--no-newline").stdout == "seed-pw-0001"
    apm.ok("tx", "approve", tx)
    assert apm.ok("get", "seed", "--no-newline").stdout == new
    _restart(vault, apm, signal.SIGKILL)  # the mark landed with the change: still closed
    assert _txs(apm)[tx]["status"] == "committed"
    assert apm("tx", "approve", tx, password=PASSWORD).returncode == 7  # TRANSACTION_CLOSED
    assert apm.ok("get", "seed", "--no-newline").stdout == new
    shown = apm.ok("show", "seed", "--json").stdout
    assert shown.count("https://ok.example") == 1


def test_a_denied_change_stays_denied_across_a_restart(vault: Broker, apm: Apm, home: Path) -> None:
    tx, _ = _held_edit(apm, home)
    apm.ok("tx", "deny", tx, "--reason", "not today")
    _restart(vault, apm, signal.SIGKILL)
    got = _txs(apm)[tx]
    assert got["status"] == "denied" and got["reason"] == "not today"
    assert apm("tx", "approve", tx, password=PASSWORD).returncode == 7
    assert apm.ok("get", "seed", "--no-newline").stdout == "seed-pw-0001"


def test_the_vault_file_holds_a_held_change_only_sealed(
    vault: Broker, apm: Apm, home: Path
) -> None:
    tx, new = _held_edit(apm, home)
    vault.kill9()  # whatever the WAL holds is on disk as it is
    rows = (
        sqlite3.connect(home / "vault.apm")
        .execute("SELECT id FROM records WHERE kind = 'tx'")
        .fetchall()
    )
    assert rows == [(tx,)]
    data = _file_bytes(home)
    assert data and new.encode() not in data and new.encode().hex().encode() not in data
    assert b"https://ok.example" not in data


def test_putting_back_an_older_vault_file_does_not_reopen_decided_changes(
    vault: Broker, apm: Apm, home: Path
) -> None:
    """The attack: keep a copy of the vault while two changes wait, let the owner approve one
    and deny the other, then restore the copy and restart. Neither is pending again."""
    landed, _ = _held_edit(apm, home)
    out = apm.ok("delegate", "--ttl", "1h", "--scope", "write", "--approve", "owner", "--json")
    env = clean_env(home, APM_EPHEMERAL_ID=json.loads(out.stdout)["token"])
    proc = apm("space", "add", "eve", env=env)
    assert proc.returncode == ApprovalPending.exit_code, proc.stderr
    refused = proc.stderr.split("apm tx approve ")[1].split('"')[0].split()[0]
    copy = home / "old-copy.apm"
    apm.ok("vault", "backup", str(copy))
    apm.ok("tx", "approve", landed)
    apm.ok("tx", "deny", refused)
    apm("lock", check=True)
    vault.stop()
    for side in home.glob("vault.apm-*"):
        side.unlink()
    (home / "vault.apm").write_bytes(copy.read_bytes())
    vault.start()
    unlocked = apm.ok("unlock")
    assert "rolled back" in unlocked.stdout + unlocked.stderr
    txs = _txs(apm)
    assert txs[landed]["status"] == "aborted" and "rolled back" in txs[landed]["reason"]
    assert txs[refused]["status"] == "denied"
    assert json.loads(apm.ok("tx", "ls", "--pending", "--json").stdout) == []
    for tx in (landed, refused):
        assert apm("tx", "approve", tx, password=PASSWORD).returncode == 7  # TRANSACTION_CLOSED
    assert apm.ok("get", "seed", "--no-newline").stdout == "seed-pw-0001"  # the copy's value
    assert "eve" not in apm.ok("space", "ls").stdout
