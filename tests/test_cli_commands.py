"""The `apm` commands beyond the daily round trip: spaces, passwd, profiles, status, version,
totp, refusals, a stopped broker, and every subcommand's --help.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pyotp
import pytest

from broker import __version__
from broker.cli.main import build_parser, main
from broker.wire import errors
from broker.wire.protocol import PROTOCOL_VERSION

from .conftest import PASSWORD, Apm, Broker, register_secret
from .test_broker_process import wait_for

pytestmark = pytest.mark.slow

NEW_PASSWORD = "a brand new master password 4711"
TOTP_SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits


def hint_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("apm: hint:")]


def spaces(apm: Apm) -> dict[str, int]:
    doc = json.loads(apm.ok("space", "ls", "--json").stdout)
    return {s["name"]: s["entries"] for s in doc}


# ---------------------------------------------------------------------- spaces


def test_space_add_rename_and_remove_with_entries_moving_along(vault: Broker, apm: Apm) -> None:
    apm.ok("space", "add", "work")
    assert spaces(apm)["work"] == 0

    apm.ok("add", "api_key", "ci", "--space", "work", "--from-stdin", stdin="ci-key\n")
    assert spaces(apm)["work"] == 1

    apm.ok("space", "rename", "work", "job")
    after = spaces(apm)
    assert "work" not in after
    assert after["job"] == 1
    moved = json.loads(apm.ok("ls", "--space", "job", "--json").stdout)
    assert [e["name"] for e in moved] == ["ci"]

    refused = apm("space", "rm", "job", password=PASSWORD)
    assert refused.returncode == errors.SpaceNotEmpty.exit_code == 7
    assert any("--force" in line for line in hint_lines(refused.stderr))
    assert spaces(apm)["job"] == 1  # nothing removed

    apm.ok("space", "rm", "job", "--force")
    assert "job" not in spaces(apm)
    gone = apm("get", "ci", password=PASSWORD)
    assert gone.returncode == errors.EntryNotFound.exit_code


def test_space_add_twice_and_unknown_space_are_refused(vault: Broker, apm: Apm) -> None:
    apm.ok("space", "add", "dup")
    again = apm("space", "add", "dup", password=PASSWORD)
    assert again.returncode == errors.AlreadyExists.exit_code
    missing = apm("space", "rename", "nope", "other", password=PASSWORD)
    assert missing.returncode == errors.SpaceNotFound.exit_code
    assert hint_lines(missing.stderr)


def test_empty_space_is_removed_without_force(vault: Broker, apm: Apm) -> None:
    apm.ok("space", "add", "tmp")
    apm.ok("space", "rm", "tmp")
    assert "tmp" not in spaces(apm)


# ---------------------------------------------------------------------- passwd and profiles


def test_passwd_keeps_every_entry_and_retires_the_old_password(
    vault: Broker, apm: Apm, home: Path
) -> None:
    apm.ok("add", "login", "mail", "--field", "username=bob", "--from-stdin", stdin="mail-pw\n")
    apm.ok("add", "note", "memo", "--from-stdin", stdin="line one\nline two\n")

    changed = apm("passwd", "--password-stdin", stdin=f"{PASSWORD}\n{NEW_PASSWORD}\n")
    assert changed.returncode == 0, changed.stderr

    listed = json.loads(apm.ok("ls", "--json", password=NEW_PASSWORD).stdout)
    assert sorted(e["name"] for e in listed) == ["mail", "memo"]
    assert apm.ok("get", "mail", password=NEW_PASSWORD).stdout == "mail-pw\n"
    assert apm.ok("get", "memo", password=NEW_PASSWORD).stdout == "line one\nline two\n"

    old = apm("ls", password=PASSWORD)
    assert old.returncode == errors.BadPassword.exit_code == 4

    # the new password also opens the vault from disk, not only the one in memory
    apm.ok("lock", password=None)
    assert apm("unlock", password=PASSWORD).returncode == errors.BadPassword.exit_code
    apm.ok("unlock", password=NEW_PASSWORD)
    assert apm.ok("get", "mail", password=NEW_PASSWORD).stdout == "mail-pw\n"


def test_passwd_with_a_wrong_current_password_changes_nothing(
    vault: Broker, apm: Apm, home: Path
) -> None:
    before = (home / "vault.apm").read_bytes()
    bad = apm("passwd", "--password-stdin", stdin=f"wrong\n{NEW_PASSWORD}\n")
    assert bad.returncode == errors.BadPassword.exit_code
    assert (home / "vault.apm").read_bytes() == before
    apm.ok("ls")


def test_profile_set_standard_is_shown_by_profile_show(vault: Broker, apm: Apm) -> None:
    shown = json.loads(apm.ok("profile", "show", "--json").stdout)
    assert shown["profile"] == "interactive"

    apm.ok("add", "api_key", "kept", "--from-stdin", stdin="kept-value\n")
    apm.ok("profile", "set", "standard")
    shown = json.loads(apm.ok("profile", "show", "--json").stdout)
    assert shown == {"profile": "standard", "memory_kib": 65536, "time_cost": 3, "parallelism": 2}
    assert json.loads(apm("status", "--json").stdout)["profile"] == "standard"

    apm.ok("lock", password=None)
    apm.ok("unlock")
    assert apm.ok("get", "kept").stdout == "kept-value\n"


# ---------------------------------------------------------------------- status and version


def test_status_json_reports_broker_vault_and_hardening(
    vault: Broker, apm: Apm, home: Path
) -> None:
    doc = json.loads(apm.ok("status", "--json", password=None).stdout)
    expected = {
        "version",
        "protocol",
        "pid",
        "uid",
        "socket",
        "vault_path",
        "vault_exists",
        "locked",
        "profile",
        "entries",
        "unlocked_at",
        "idle_lock_at",
        "hard_lock_at",
        "log_path",
        "hardening",
    }
    assert expected <= set(doc)
    assert {"dumpable", "core_limit", "mlocked"} <= set(doc["hardening"])
    assert doc["pid"] == vault.pid
    assert doc["version"] == __version__
    assert doc["protocol"] == PROTOCOL_VERSION
    assert doc["vault_path"] == str(home / "vault.apm")
    assert doc["vault_exists"] is True
    assert doc["locked"] is False
    assert doc["entries"] == 0
    assert doc["profile"] == "interactive"
    assert doc["log_path"] == str(home / "state" / "broker.log")

    apm.ok("lock", password=None)
    locked = json.loads(apm.ok("status", "--json", password=None).stdout)
    assert locked["locked"] is True
    assert locked["entries"] is None
    assert locked["idle_lock_at"] is None


def test_version_json_names_cli_protocol_and_broker(broker: Broker, apm: Apm) -> None:
    def version() -> dict[str, Any] | None:
        doc: dict[str, Any] = json.loads(apm.ok("version", "--json", password=None).stdout)
        return doc if doc["broker"] is not None else None

    # `version` gives the broker 2 s to answer; on a loaded machine the first try may miss
    doc = wait_for(version, timeout=20, what="version to reach the broker")
    assert set(doc) == {"cli", "protocol", "broker"}
    assert doc["cli"] == __version__
    assert doc["protocol"] == PROTOCOL_VERSION
    assert doc["broker"] == {"version": __version__, "protocol": PROTOCOL_VERSION}


# ---------------------------------------------------------------------- entries


def test_totp_prints_the_current_six_digit_code(vault: Broker, apm: Apm) -> None:
    apm.ok("add", "totp", "mfa", "--from-stdin", stdin=TOTP_SEED + "\n")
    before = pyotp.TOTP(TOTP_SEED).now()
    out = apm.ok("totp", "mfa")
    after = pyotp.TOTP(TOTP_SEED).now()
    code = out.stdout.splitlines()[0]
    assert re.fullmatch(r"\d{6}", code)
    assert code in {before, after}
    assert TOTP_SEED not in out.stdout + out.stderr


def test_secret_field_given_as_plain_field_is_refused_without_echo(vault: Broker, apm: Apm) -> None:
    value = "argv-leak-0a9b8c7d"
    refused = apm("add", "login", "site", "--field", f"password={value}", password=PASSWORD)
    assert refused.returncode == errors.InvalidParameters.exit_code == 10
    assert value not in refused.stdout
    assert value not in refused.stderr
    assert hint_lines(refused.stderr)
    assert json.loads(apm.ok("ls", "--json").stdout) == []


def test_get_of_a_missing_entry_exits_6_with_a_hint(vault: Broker, apm: Apm) -> None:
    missing = apm("get", "no-such-entry", password=PASSWORD)
    assert missing.returncode == errors.EntryNotFound.exit_code == 6
    assert missing.stdout == ""
    assert len(hint_lines(missing.stderr)) == 1


def test_init_when_a_vault_exists_exits_7(vault: Broker, apm: Apm, home: Path) -> None:
    before = (home / "vault.apm").read_bytes()
    again = apm("init", "--profile", "interactive", password="another password")
    assert again.returncode == errors.AlreadyExists.exit_code == 7
    assert hint_lines(again.stderr)
    assert (home / "vault.apm").read_bytes() == before


# ---------------------------------------------------------------------- a stopped broker


STOPPED_BROKER_COMMANDS = [
    ("status",),
    ("ls", "--password-stdin"),
    ("get", "x", "--password-stdin"),
    ("add", "api_key", "k", "--password-stdin", "--from-stdin"),
    ("space", "ls", "--password-stdin"),
    ("profile", "show", "--password-stdin"),
    ("passwd", "--password-stdin"),
    ("totp", "x", "--password-stdin"),
]


def test_commands_after_broker_stop_exit_9_with_start_hint(vault: Broker, apm: Apm) -> None:
    apm.ok("broker", "stop", password=None)
    assert vault.proc is not None
    assert vault.proc.wait(timeout=15) == 0
    assert not vault.socket.exists()

    for argv in STOPPED_BROKER_COMMANDS:
        proc = apm(*argv, stdin=f"{PASSWORD}\n{PASSWORD}\nvalue\n")
        assert proc.returncode == errors.BrokerUnavailable.exit_code == 9, (argv, proc.stderr)
        assert any("apm broker start" in line for line in hint_lines(proc.stderr)), argv


def test_version_without_a_broker_reports_none(home: Path, apm: Apm) -> None:
    doc = json.loads(apm.ok("version", "--json", password=None).stdout)
    assert doc["broker"] is None
    assert doc["cli"] == __version__


# ---------------------------------------------------------------------- help


def _command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMANDS = _command_paths(build_parser())


def test_the_command_tree_is_found() -> None:
    assert ("space", "rm") in COMMANDS
    assert ("broker", "stop") in COMMANDS
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "apm")
def test_every_subcommand_help_exits_0(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: apm")
    assert " ".join(("apm", *path)) in out.splitlines()[0]


def test_help_of_the_real_executable_exits_0(apm: Apm) -> None:
    proc = apm("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: apm")


def test_ls_lists_every_entry_however_many_pages_the_broker_returns(
    vault: Broker, apm: Apm, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """`apm ls` once showed only the broker's first page (1,000 entries), silently."""
    from broker.cli import entry_cmd

    names = {f"k{i}" for i in range(5)}
    for name in names:
        apm.ok("add", "api_key", name, "--from-stdin", stdin="v-ls-page\n")
    out = apm.ok("delegate", "--scope", "read", "--ttl", "10m", "--json").stdout
    token = json.loads(out)["token"]
    register_secret(token)
    monkeypatch.setattr(entry_cmd, "LS_PAGE", 2)  # 5 entries: three pages
    monkeypatch.setenv("APM_HOME", str(home))
    monkeypatch.setenv("APM_EPHEMERAL_ID", token)
    assert main(["ls", "--json"]) == 0
    listed = [e["name"] for e in json.loads(capsys.readouterr().out)]
    assert sorted(listed) == sorted(names)
