"""CLI polish (#14.7): `apm` alone, "did you mean", a help line for every option, the weak
master-password check, and `apm history` / `apm restore`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.cli.auth import Token
from broker.cli.client import BrokerClient
from broker.cli.main import build_parser, main
from broker.wire import errors

from .conftest import PASSWORD, Apm, Broker, clean_env

pytestmark = pytest.mark.slow

WEAK = "qwerty123"
STRONG_NEW = "a brand new master password 4711"


def test_apm_alone_prints_the_help_and_exits_0(apm: Apm) -> None:
    proc = apm()
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: apm")
    assert "get" in proc.stdout and "history" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["gett", "x"], "'get'"),
        (["histroy", "x"], "'history'"),
        (["broker", "strat"], "'start'"),
        (["sesion", "ls"], "'session'"),
        (["add", "logn", "x"], "'login'"),
        (["pass"], "'passwd'"),
    ],
)
def test_a_mistyped_command_or_choice_gets_did_you_mean(
    argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"did you mean {suggestion}" in err or f"did you mean {suggestion} or" in err


def test_nothing_close_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["zzzzqqq"])
    err = capsys.readouterr().err
    assert "did you mean" not in err and "choose from" in err and "restore" in err


def _actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out.append((" ".join((*path, choice.dest)), choice))
            for name, sub in action.choices.items():
                out += _actions(sub, (*path, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            out.append((" ".join(path) or "apm", action))
    return out


def test_every_option_argument_and_command_has_a_help_line() -> None:
    actions = _actions(build_parser())
    assert len(actions) > 150  # the walk reaches the whole tree
    missing = [
        f"{where}: {'/'.join(a.option_strings) or a.dest}"
        for where, a in actions
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []


# ---------------------------------------------------------------- weak master password


def test_a_weak_master_password_is_refused_at_init_unless_allow_weak(
    broker: Broker, apm: Apm, home: Path
) -> None:
    proc = apm("init", "--profile", "interactive", password=WEAK)
    assert proc.returncode == errors.InvalidParameters.exit_code
    assert "apm: warning: this master password is weak" in proc.stderr
    assert "--allow-weak" in proc.stderr
    assert not (home / "vault.apm").exists()
    proc = apm("init", "--profile", "interactive", "--allow-weak", password=WEAK)
    assert proc.returncode == 0, proc.stderr
    assert "weak" in proc.stderr  # still warned
    assert (home / "vault.apm").exists()


def test_a_weak_new_password_is_refused_at_passwd_and_the_old_one_still_works(
    vault: Broker, apm: Apm
) -> None:
    proc = apm("passwd", "--password-stdin", stdin=f"{PASSWORD}\n{WEAK}\n")
    assert proc.returncode == errors.InvalidParameters.exit_code
    assert "weak" in proc.stderr
    apm.ok("ls")  # the old password still opens it
    proc = apm("passwd", "--allow-weak", "--password-stdin", stdin=f"{PASSWORD}\n{WEAK}\n")
    assert proc.returncode == 0, proc.stderr
    apm.ok("ls", password=WEAK)
    proc = apm("passwd", "--password-stdin", stdin=f"{WEAK}\n{STRONG_NEW}\n")
    assert proc.returncode == 0 and "weak" not in proc.stderr


# ---------------------------------------------------------------- history and restore


@pytest.fixture
def versions(vault: Broker, apm: Apm) -> list[str]:
    values = ["sk-first-value-1a", "sk-second-value-2b", "sk-third-value-3c"]
    apm.ok("add", "api_key", "svc", "--from-stdin", stdin=values[0] + "\n")
    for v in values[1:]:
        apm.ok("edit", "svc", "--secret-field", "key", "--from-stdin", stdin=v + "\n")
    return values


def test_history_lists_previous_values_masked(versions: list[str], apm: Apm) -> None:
    proc = apm.ok("history", "svc")
    assert all(v not in proc.stdout + proc.stderr for v in versions)
    rows = json.loads(apm.ok("history", "svc", "--json").stdout)
    assert [(r["field"], r["version"], r["value"]) for r in rows] == [
        ("key", 0, None),
        ("key", 1, None),
        ("key", 2, None),
    ]
    assert rows[0]["replaced_at"] is None and rows[1]["replaced_at"]


def test_history_reveal_shows_each_version_to_the_owner(versions: list[str], apm: Apm) -> None:
    rows = json.loads(apm.ok("history", "svc", "--reveal", "--json").stdout)
    assert [r["value"] for r in rows] == list(reversed(versions))
    table = apm.ok("history", "svc", "--reveal").stdout
    assert all(v in table for v in versions)


def test_restore_brings_a_version_back_and_keeps_the_replaced_one(
    versions: list[str], apm: Apm
) -> None:
    apm.ok("restore", "svc", "--version", "2")
    assert apm.ok("get", "svc").stdout == versions[0] + "\n"
    rows = json.loads(apm.ok("history", "svc", "--reveal", "--json").stdout)
    assert [r["value"] for r in rows][:2] == [versions[0], versions[2]]
    proc = apm("restore", "svc", "--version", "9", password=PASSWORD)
    assert proc.returncode == errors.EntryNotFound.exit_code
    assert "apm history svc" in proc.stderr  # the hint
    proc = apm("restore", "svc", "--version", "1", "--field", "nofield", password=PASSWORD)
    assert proc.returncode == errors.EntryNotFound.exit_code


def test_a_session_sees_history_masked_but_cannot_reveal_or_restore(
    versions: list[str], apm: Apm, home: Path
) -> None:
    token = json.loads(apm.ok("delegate", "--scope", "admin", "--json").stdout)["token"]
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    rows = json.loads(apm("history", "svc", "--json", env=env).stdout)
    assert len(rows) == 3 and all(r["value"] is None for r in rows)
    # the attack: a session asks the broker directly, skipping the CLI's owner prompt
    with BrokerClient(f"ipc://{home}/run/broker.sock") as c:
        with pytest.raises(errors.PermissionDenied):
            c.call_raw("entry.history", {"ref": "svc", "reveal": True}, token=Token(token))
        with pytest.raises(errors.PermissionDenied):
            c.call_raw("entry.restore", {"ref": "svc", "version": 1}, token=Token(token))
        with pytest.raises(errors.BadPassword):
            c.call_raw(
                "entry.history",
                {"ref": "svc", "reveal": True},
                password=SecretStr("not the password"),
            )
    assert apm.ok("get", "svc").stdout == versions[2] + "\n"  # nothing restored
    read = json.loads(apm.ok("delegate", "--scope", "read", "--json").stdout)["token"]
    proc = apm("history", "svc", env=clean_env(home, APM_EPHEMERAL_ID=read))
    assert proc.returncode == errors.PermissionDenied.exit_code


def test_an_error_message_carrying_terminal_escapes_reaches_stderr_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from broker.cli.main import report
    from broker.wire.errors import EntryNotFound

    code = report(EntryNotFound("no entry \x1b[2J\x1b[1Aprod", hint="call \u202esearch"))
    err = capsys.readouterr().err
    assert code == EntryNotFound.exit_code
    assert "\x1b" not in err and "\u202e" not in err
    assert "\\x1b[2J" in err and "\\u202e" in err


def test_a_passkey_id_that_starts_with_a_dash_is_removable_after_double_dash() -> None:
    # WebAuthn credential ids are random base64url: about one in 64 starts with "-"
    args = build_parser().parse_args(["passkey", "rm", "--", "-lpkc0ZjwBxI"])
    assert args.id == "-lpkc0ZjwBxI"
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        build_parser().parse_args(["passkey", "rm", "--help"])
    assert "apm passkey rm -- -AbC" in out.getvalue()
