"""The approval bypass, attacked against a real broker: a session whose writes the person must
approve (`--approve owner` or `client`) tries every mutation by `apm` command and by raw wire
frame. Nothing lands; each becomes a pending transaction that only `apm tx approve` with the
master password executes, and then exactly as previewed.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.wire.errors import ApmError, ApprovalPending

from .conftest import PASSWORD, Apm, Broker, clean_env, register_secret

pytestmark = pytest.mark.slow


def _delegate(apm: Apm, policy: str) -> str:
    out = json.loads(
        apm.ok("delegate", "--ttl", "1h", "--scope", "admin", "--approve", policy, "--json").stdout
    )
    token: str = out["token"]
    return token


def _state(apm: Apm) -> tuple[dict[str, Any], set[str]]:
    rows = json.loads(apm.ok("ls", "--json").stdout)
    spaces = {s["name"] for s in json.loads(apm.ok("space", "ls", "--json").stdout)}
    return {f"{r['space']}/{r['name']}": r for r in rows}, spaces


def _pending(apm: Apm) -> list[dict[str, Any]]:
    return list(json.loads(apm.ok("tx", "ls", "--pending", "--json").stdout))


# the CLI's mutating commands, as an agent's shell tool would run them
CLI_MUTATIONS: list[tuple[tuple[str, ...], str | None]] = [
    (("add", "login", "planted", "--from-stdin", "--field", "username=eve"), "secret"),
    (("edit", "seed", "--url", "https://evil.example"), None),
    (("edit", "seed", "--from-stdin"), "secret"),
    (("rm", "seed"), None),
    (("space", "add", "eve"), None),
    (("space", "rename", "ops", "eve"), None),
    (("space", "rm", "ops", "--force"), None),
]


def _setup(apm: Apm) -> None:
    apm.ok("space", "add", "ops")
    apm.ok("add", "login", "seed", "--from-stdin", stdin="seed-pw-0001\n")
    apm.ok("add", "login", "inops", "--space", "ops", "--from-stdin", stdin="ops-pw-0001\n")


@pytest.mark.parametrize("policy", ["owner", "client"])
def test_cli_mutations_of_a_human_approved_session_wait_for_the_owner(
    vault: Broker, apm: Apm, home: Path, policy: str
) -> None:
    _setup(apm)
    token = _delegate(apm, policy)
    before = _state(apm)
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    held: list[str] = []
    for argv, stdin in CLI_MUTATIONS:
        value = f"{stdin}-{secrets.token_hex(6)}" if stdin else None
        if value:
            register_secret(value)
        proc = apm(*argv, stdin=(value + "\n") if value else None, env=env)
        assert proc.returncode == ApprovalPending.exit_code, (argv, proc.stderr)
        assert "apm tx approve tx_" in proc.stderr, proc.stderr
        held.append(proc.stderr.split("apm tx approve ")[1].split('"')[0].split()[0])
    assert _state(apm) == before  # nothing landed
    pending = {t["tx_id"]: t for t in _pending(apm)}
    assert set(held) <= set(pending)
    assert all(pending[t]["policy"] == policy for t in held)


@pytest.mark.parametrize("policy", ["owner", "client"])
def test_raw_wire_mutations_of_a_human_approved_session_wait_for_the_owner(
    vault: Broker, apm: Apm, policy: str
) -> None:
    _setup(apm)
    token = SecretStr(_delegate(apm, policy))
    before = _state(apm)
    value = "wire-secret-" + secrets.token_hex(6)
    register_secret(value)
    frames: list[tuple[str, dict[str, Any]]] = [
        ("entry.add", {"type": "login", "name": "w", "secrets": {"password": {"value": value}}}),
        ("entry.edit", {"ref": "seed", "secrets": {"password": {"value": value}}}),
        ("entry.remove", {"ref": "seed"}),
        ("space.add", {"name": "wire"}),
        ("space.rename", {"name": "ops", "new_name": "wire"}),
        ("space.remove", {"name": "ops", "force": True}),
    ]
    with BrokerClient(f"ipc://{vault.socket}", client_name="attacker") as c:
        for method, params in frames:
            with pytest.raises(ApmError) as err:
                c.call_raw(method, params, token=token)
            assert err.value.code == "APPROVAL_PENDING", (method, err.value.code)
            assert err.value.data["tx_id"].startswith("tx_")
    assert _state(apm) == before


def test_the_owner_approves_a_held_cli_edit_and_exactly_the_previewed_change_lands(
    vault: Broker, apm: Apm, home: Path
) -> None:
    _setup(apm)
    token = _delegate(apm, "owner")
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    new = "approved-pw-" + secrets.token_hex(6)
    register_secret(new)
    proc = apm(
        "edit", "seed", "--from-stdin", "--url", "https://ok.example", stdin=new + "\n", env=env
    )
    assert proc.returncode == ApprovalPending.exit_code, proc.stderr
    tx = _pending(apm)[-1]
    assert "https://ok.example" in tx["preview"] and new not in tx["preview"]
    # a session can never approve, even its own transaction
    refused = apm("tx", "approve", tx["tx_id"], env=env)
    assert refused.returncode != 0
    assert apm.ok("get", "seed", "--no-newline").stdout == "seed-pw-0001"
    apm.ok("tx", "approve", tx["tx_id"])
    assert apm.ok("get", "seed", "--no-newline").stdout == new
    assert apm.ok("show", "seed", "--json").stdout.count("https://ok.example") == 1
    done = json.loads(apm.ok("tx", "ls", "--json").stdout)
    assert [t["status"] for t in done if t["tx_id"] == tx["tx_id"]] == ["committed"]
    # committed once: approving again changes nothing
    assert apm("tx", "approve", tx["tx_id"], password=PASSWORD).returncode == 7


def test_the_agent_policy_lets_a_cli_write_land_at_once(
    vault: Broker, apm: Apm, home: Path
) -> None:
    _setup(apm)
    token = _delegate(apm, "agent")
    env = clean_env(home, APM_EPHEMERAL_ID=token)
    proc = apm("space", "add", "agentspace", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "agentspace" in _state(apm)[1]


def test_an_admin_session_limited_to_a_space_cannot_be_delegated(vault: Broker, apm: Apm) -> None:
    _setup(apm)
    proc = apm("delegate", "--scope", "admin", "--space", "ops", "--json", password=PASSWORD)
    assert proc.returncode == 10, proc.stderr
    assert "eps_" not in proc.stdout
    ok = apm("delegate", "--scope", "write", "--space", "ops", "--json", password=PASSWORD)
    assert ok.returncode == 0, ok.stderr
