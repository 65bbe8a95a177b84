"""The person's daily round trip through the real CLI and a real broker process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import PASSWORD, Apm, Broker

pytestmark = pytest.mark.slow


def test_init_add_get_edit_rm_lock_round_trip(broker: Broker, apm: Apm, home: Path) -> None:
    apm.ok("init", "--profile", "interactive")
    apm.ok(
        "add",
        "login",
        "github",
        "--field",
        "username=alice",
        "--url",
        "https://github.com",
        "--tag",
        "dev",
        "--from-stdin",
        stdin="gh-s3cret-value\n",
    )
    got = apm.ok("get", "github")
    assert got.stdout == "gh-s3cret-value\n"

    listed = json.loads(apm.ok("ls", "--json").stdout)
    assert [e["name"] for e in listed] == ["github"]
    assert listed[0]["fields"]["password"] == {"secret": True, "value": None, "history": 0}
    assert listed[0]["fields"]["username"]["value"] == "alice"
    assert "gh-s3cret-value" not in apm.ok("show", "github").stdout

    apm.ok("edit", "github", "--secret-field", "password", "--from-stdin", stdin="rotated-value\n")
    assert apm.ok("get", "github").stdout == "rotated-value\n"
    shown = json.loads(apm.ok("show", "github", "--json").stdout)
    assert shown["fields"]["password"]["history"] == 1

    apm.ok("edit", "github", "--rename", "gh", "--tag", "work", "--untag", "dev")
    shown = json.loads(apm.ok("show", "gh", "--json").stdout)
    assert shown["tags"] == ["work"]

    apm.ok("rm", "gh")
    gone = apm("get", "gh", password=PASSWORD)
    assert gone.returncode == 6
    assert "apm: error: entry not found" in gone.stderr
    assert "apm: hint:" in gone.stderr

    apm.ok("lock", password=None)
    locked = apm("ls", password=PASSWORD)
    assert locked.returncode == 3
    assert 'run "apm unlock"' in locked.stderr

    apm.ok("unlock")
    assert json.loads(apm.ok("ls", "--json").stdout) == []


def test_wrong_password_is_refused_and_changes_nothing(vault: Broker, apm: Apm, home: Path) -> None:
    apm.ok("add", "api_key", "openai", "--from-stdin", stdin="sk-test-123\n")
    before = (home / "vault.apm").read_bytes()
    bad = apm("get", "openai", password="not the password")
    assert bad.returncode == 4
    assert "wrong master password" in bad.stderr
    assert (home / "vault.apm").read_bytes() == before

    apm.ok("lock", password=None)
    bad_unlock = apm("unlock", password="nope")
    assert bad_unlock.returncode == 4
    assert json.loads(apm("status", "--json").stdout)["locked"] is True
