"""`apm add --batch`, `apm vault backup` and `apm vault migrate` against a real broker."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from broker.core.crypto import normalize_password
from broker.core.vault import Vault
from broker.wire.errors import InvalidParameters

from .conftest import PASSWORD, Apm, Broker, register_secret

VECTORS = Path(__file__).parent / "vectors" / "v1"

pytestmark = pytest.mark.slow


def line(name: str, secret: str, **kw: Any) -> str:
    register_secret(secret)
    doc = {
        "type": "login",
        "name": name,
        "fields": {"username": f"{name}-user"},
        "secrets": {"password": secret},
        "tags": ["batch"],
        **kw,
    }
    return json.dumps(doc)


def names(apm: Apm) -> set[str]:
    return {e["name"] for e in json.loads(apm.ok("ls", "--json").stdout)}


def generation(apm: Apm) -> int:
    return int(json.loads(apm.ok("vault", "migrate", "--json").stdout)["generation"])


def test_add_batch_from_stdin_adds_every_line_in_one_commit(vault: Broker, apm: Apm) -> None:
    before = generation(apm)
    lines = [line(f"svc-{i:03d}", f"batch-secret-{i:03d}-xyz") for i in range(60)]
    res = apm.ok("add", "--batch", "-", "--json", stdin="\n".join(lines) + "\n\n")
    assert json.loads(res.stdout)["added"] == 60
    assert names(apm) >= {f"svc-{i:03d}" for i in range(60)}
    assert generation(apm) == before + 1
    got = apm.ok("get", "svc-042").stdout.strip()
    assert got == "batch-secret-042-xyz"


def test_add_batch_from_a_file_names_refused_lines_and_adds_the_rest(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    apm.ok("add", "login", "taken", "--from-stdin", stdin="taken-secret-1\n")
    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        "\n".join(
            [
                line("fresh-1", "fresh-secret-1"),
                line("taken", "dup-secret-2"),
                line("fresh-3", "fresh-secret-3", space="no-such-space"),
                line("fresh-4", "fresh-secret-4"),
            ]
        )
    )
    res = apm("add", "--batch", str(batch), "--json", password=PASSWORD)
    assert res.returncode == InvalidParameters.exit_code
    out = json.loads(res.stdout)
    assert out["added"] == 2
    assert [(r["line"], r["code"]) for r in out["refused"]] == [
        (2, "ALREADY_EXISTS"),
        (3, "SPACE_NOT_FOUND"),
    ]
    assert {"fresh-1", "fresh-4"} <= names(apm)


def test_an_atomic_batch_with_a_refused_line_adds_nothing_and_names_the_line(
    vault: Broker, apm: Apm
) -> None:
    apm.ok("add", "login", "taken", "--from-stdin", stdin="taken-secret-2\n")
    before = names(apm)
    lines = [
        line("a-1", "atomic-secret-1"),
        line("a-2", "atomic-secret-2"),
        line("taken", "x-y-z-1"),
    ]
    res = apm("add", "--batch", "-", "--atomic", stdin="\n".join(lines), password=PASSWORD)
    assert res.returncode != 0
    assert "line 3" in res.stderr
    assert "ALREADY" in res.stderr or "already exists" in res.stderr
    assert names(apm) == before


def test_a_malformed_line_is_named_and_never_echoed(vault: Broker, apm: Apm) -> None:
    register_secret("leaky-secret-value-77")
    lines = [
        line("ok-1", "ok-secret-1"),
        '{"type": "login", "name": "broken", "secrets": {"password": "leaky-secret-value-77"',
    ]
    res = apm("add", "--batch", "-", stdin="\n".join(lines), password=PASSWORD)
    assert res.returncode == InvalidParameters.exit_code
    assert "line 2" in res.stderr
    assert "leaky-secret-value-77" not in res.stderr + res.stdout
    bad_field = [line("ok-2", "ok-secret-2", tags="not-a-list")]
    res = apm("add", "--batch", "-", stdin="\n".join(bad_field), password=PASSWORD)
    assert res.returncode == InvalidParameters.exit_code
    assert "line 1" in res.stderr and "tags" in res.stderr
    assert "ok-1" not in names(apm)  # nothing is sent before every line parsed


def test_vault_backup_writes_a_private_copy_that_opens_with_the_password(
    vault: Broker, apm: Apm, tmp_path: Path
) -> None:
    apm.ok("add", "login", "kept", "--from-stdin", stdin="backup-secret-1\n")
    dest = tmp_path / "vault-backup.apm"
    apm.ok("vault", "backup", str(dest))
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    copy = Vault.open(dest, normalize_password(PASSWORD))
    try:
        assert copy.reveal(copy.resolve("kept"), None)[1] == "backup-secret-1"
    finally:
        copy.close()
    again = apm("vault", "backup", str(dest), password=PASSWORD)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert list((vault.home / "backups").iterdir()) == []  # the broker's copy was moved out


def test_a_v1_vault_migrates_at_unlock_and_migrate_finish_deletes_the_v1_file(
    home: Path, apm: Apm
) -> None:
    expected = json.loads((VECTORS / "expected.json").read_text())
    shutil.copy2(VECTORS / "vault.apm", home / "vault.apm")
    register_secret(expected["password"])
    broker = Broker(home).start()
    try:
        apm.ok("unlock", password=expected["password"])
        shown = json.loads(
            apm.ok("vault", "migrate", "--json", password=expected["password"]).stdout
        )
        assert shown["format"] == 2
        assert shown["v1_backups"] == [str(home / "vault.apm.v1")]
        value = apm.ok("get", "GitHub", password=expected["password"]).stdout.strip()
        assert value == "gh-vector-password-2"
        done = apm.ok("vault", "migrate", "--finish", "--json", password=expected["password"])
        assert json.loads(done.stdout)["removed"] == [str(home / "vault.apm.v1")]
        assert not (home / "vault.apm.v1").exists()
    finally:
        broker.stop()
