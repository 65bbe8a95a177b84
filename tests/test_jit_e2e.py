"""Just-in-time access end to end: a real broker (configured with a webhook to a local HTTP
server), the real `apm-mcp` shim driven by the SDK's stdio client in both protocol eras, and
the real `apm` CLI for the person's side and for `apm run`.

Expiry with an injected clock lives in test_requests.py (the in-process twin); here every wait
polls with a deadline.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp import types as mt

from broker.cli.masking import MARK

from .conftest import PASSWORD, Apm, Broker, clean_env, register_secret
from .hook_server import Hook
from .mcp_client import error_body, ok_of, request_access, shim_client, tool_names, whole
from .mcp_world import add_api_key, mcp_broker, wire

pytestmark = pytest.mark.slow

STRIPE = "sk_live_Stripe-7719-unique"
OTHER = "other-Key-2203-unique"
WHY = "run the billing migration script"
CALL_TIMEOUT = 20.0
CONCEALED = MARK.decode()
register_secret(STRIPE)
register_secret(OTHER)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class World:
    home: Path
    apm: Apm
    broker: Broker
    hook: Hook

    def delegate(self, scope: str = "read", label: str = "agent-x") -> str:
        res = wire(
            self.home, "session.create", {"scope": scope, "ttl_seconds": 3600, "label": label}
        )
        register_secret(res["token"])
        return str(res["token"])

    def as_session(self, token: str) -> dict[str, str]:
        return clean_env(self.home, APM_EPHEMERAL_ID=token)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    hook = Hook()
    try:
        with mcp_broker(f'[notify]\nwebhook_url = "{hook.url}"\ndesktop = false\n') as (apm, b):
            for name, value in (("stripe", STRIPE), ("other", OTHER)):
                add_api_key(b.home, name, value)
            yield World(b.home, apm, b, hook)
    finally:
        hook.close()


def mcp_client(home: Path, token: str, mode: str) -> Any:
    return shim_client(home, token, mode, CALL_TIMEOUT)


def code_of(result: mt.CallToolResult) -> str:
    return str(error_body(result)["code"])


async def ask(client: Client, entry: str = "stripe", minutes: int = 5, access: str = "use") -> str:
    return await request_access(client, entry, WHY, minutes, access=access)


def child(out: Path, name: str, code: int = 7, one_char: bool = False) -> list[str]:
    """A python child that records what it received and prints the value in pieces."""
    pieces = "list(v)" if one_char else "[v[:3], v[3:9], v[9:]]"
    script = (
        "import os, sys\n"
        f"v = os.environ[{name!r}]\n"
        f"open({str(out)!r}, 'w').write(v)\n"
        f"open({str(out)!r} + '.env', 'w').write(str('APM_EPHEMERAL_ID' in os.environ))\n"
        "for stream in (sys.stdout, sys.stderr):\n"
        "    stream.write('value=')\n"
        f"    for p in {pieces}:\n"
        "        stream.write(p)\n"
        "        stream.flush()\n"
        "    stream.write(' done\\n')\n"
        "    stream.flush()\n"
        f"sys.exit({code})\n"
    )
    return [sys.executable, "-c", script]


def run_with_stripe(
    world: World, token: str, out: Path, name: str, **child_kw: Any
) -> subprocess.CompletedProcess[str]:
    """`apm run --env NAME=apm://default/stripe/key -- <child>` in session `token`."""
    return world.apm(
        *("run", "--env", f"{name}=apm://default/stripe/key", "--"),
        *child(out, name, **child_kw),
        env=world.as_session(token),
    )


# ---------------------------------------------------------------------- the approved path


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_approved_request_gives_a_run_command_that_hands_the_child_the_secret_concealed(
    world: World, mode: str, tmp_path: Path
) -> None:
    token = world.delegate("read", f"agent-{mode}")
    env = world.as_session(token)
    async with mcp_client(world.home, token, mode) as client:
        assert "decrypt_entry" not in await tool_names(client)
        rid = await ask(client, access="reveal")
        assert code_of(await client.call_tool("get_access_details", {"request_id": rid})) == (
            "REQUEST_CLOSED"
        )

        pending = json.loads(world.apm.ok("request", "ls", "--pending", "--json").stdout)
        mine = [r for r in pending if r["id"] == rid]
        assert len(mine) == 1
        assert (mine[0]["state"], mine[0]["entry"], mine[0]["justification"]) == (
            "pending",
            "stripe",
            WHY,
        )
        world.apm.ok("request", "approve", rid)

        status = ok_of(await client.call_tool("get_request_status", {"request_id": rid}))
        assert status["state"] == "approved"
        res = await client.call_tool("get_access_details", {"request_id": rid})
        details = ok_of(res)
        assert STRIPE not in whole(res)
        ref, name = details["reference"], details["env_name"]
        assert ref == "apm://default/stripe/key"
        argv = shlex.split(details["run_command"])
        assert STRIPE not in details["run_command"]
        cut = argv.index("--")
        assert argv[: cut + 1] == ["apm", "run", "--env", f"{name}={ref}", "--"]

        # a reveal grant opens decrypt_entry for that entry, and for no other
        assert "decrypt_entry" in await tool_names(client)
        got = ok_of(await client.call_tool("decrypt_entry", {"entry": "stripe"}))
        assert got["value"] == STRIPE
        other = await client.call_tool("decrypt_entry", {"entry": "other"})
        assert code_of(other) == "PERMISSION_DENIED"
        assert OTHER not in whole(other)

        # run the command it gave, with a real child in place of the placeholder
        out = tmp_path / "received"
        run = world.apm(*argv[1 : cut + 1], *child(out, name), env=env)
        assert run.returncode == 7, run.stderr
        assert out.read_text() == STRIPE
        assert (tmp_path / "received.env").read_text() == "False"
        for stream in (run.stdout, run.stderr):
            assert f"value={CONCEALED} done" in stream
            assert STRIPE not in stream
            for part in (STRIPE[:3], STRIPE[3:9], STRIPE[9:]):
                assert part not in stream

        world.apm("request", "revoke", rid, check=True)
        refused = await client.call_tool("decrypt_entry", {"entry": "stripe"})
        assert code_of(refused) == "PERMISSION_DENIED"
        status = ok_of(await client.call_tool("get_request_status", {"request_id": rid}))
        assert status["state"] == "revoked"
    out.unlink()
    again = world.apm(*argv[1 : cut + 1], *child(out, name), env=env)
    assert again.returncode == 5, again.stderr  # PERMISSION_DENIED
    assert not out.exists()


# ---------------------------------------------------------------------- deny


@pytest.mark.anyio
async def test_a_denied_request_reports_the_reason_and_apm_run_is_refused(
    world: World, tmp_path: Path
) -> None:
    token = world.delegate("read")
    async with mcp_client(world.home, token, "legacy") as client:
        rid = await ask(client)
        world.apm("request", "deny", rid, "--reason", "not on a Friday", check=True)
        status = ok_of(await client.call_tool("get_request_status", {"request_id": rid}))
        assert (status["state"], status["reason"]) == ("denied", "not on a Friday")
        closed = await client.call_tool("get_access_details", {"request_id": rid})
        assert code_of(closed) == "REQUEST_CLOSED"
        assert "decrypt_entry" not in await tool_names(client)
    out = tmp_path / "received"
    run = run_with_stripe(world, token, out, "STRIPE_KEY")
    assert run.returncode == 5, run.stderr
    assert not out.exists()
    # a denied request cannot be approved afterwards
    assert world.apm("request", "approve", rid, password=PASSWORD).returncode == 7


# ---------------------------------------------------------------------- isolation and limits


@pytest.mark.anyio
async def test_another_session_can_neither_see_nor_use_a_request(
    world: World, tmp_path: Path
) -> None:
    token_a = world.delegate("read", "agent-a")
    token_b = world.delegate("read", "agent-b")
    async with mcp_client(world.home, token_a, "auto") as a:
        rid = await ask(a)
        world.apm.ok("request", "approve", rid)
        assert ok_of(await a.call_tool("get_request_status", {"request_id": rid}))
    async with mcp_client(world.home, token_b, "auto") as b:
        for tool in ("get_request_status", "get_access_details"):
            res = await b.call_tool(tool, {"request_id": rid})
            assert code_of(res) == "REQUEST_NOT_FOUND"
        assert ok_of(await b.call_tool("list_my_requests", {}))["requests"] == []
        assert "decrypt_entry" not in await tool_names(b)
        res = await b.call_tool("decrypt_entry", {"entry": "stripe"})
        assert code_of(res) == "PERMISSION_DENIED"
        assert STRIPE not in whole(res)
    out = tmp_path / "received"
    run = run_with_stripe(world, token_b, out, "K")
    assert run.returncode == 5, run.stderr
    assert not out.exists()
    # ...while A, whose grant it is, can
    run = run_with_stripe(world, token_a, out, "K", code=0)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == STRIPE


@pytest.mark.anyio
async def test_request_access_refuses_too_long_durations_and_missing_justifications(
    world: World,
) -> None:
    token = world.delegate("read")
    async with mcp_client(world.home, token, "legacy") as client:
        bad = [
            {"entry": "stripe", "duration_minutes": 61, "justification": WHY},
            {"entry": "stripe", "duration_minutes": 5},
            {"entry": "stripe", "duration_minutes": 5, "justification": "short"},
        ]
        for args in bad:
            assert code_of(await client.call_tool("request_access", args)) == (
                "INVALID_PARAMETERS"
            ), args
        assert ok_of(await client.call_tool("list_my_requests", {}))["requests"] == []
        ok = {"entry": "stripe", "duration_minutes": 60, "justification": WHY}
        assert ok_of(await client.call_tool("request_access", ok))["state"] == "pending"


# ---------------------------------------------------------------------- webhook


@pytest.mark.anyio
async def test_the_webhook_receives_the_request_and_the_decision_without_any_secret(
    world: World,
) -> None:
    token = world.delegate("read", "hook-agent")
    async with mcp_client(world.home, token, "legacy") as client:
        rid = await ask(client, minutes=9)
        world.apm.ok("request", "approve", rid)
    deadline = time.monotonic() + 20
    while len(world.hook.payloads(rid)) < 2:
        assert time.monotonic() < deadline, f"webhook got {world.hook.payloads(rid)}"
        time.sleep(0.05)
    docs = world.hook.payloads(rid)
    assert [d["apm"]["event"] for d in docs] == ["request", "decision"]
    for doc in docs:
        assert isinstance(doc["text"], str) and doc["text"]
        fields = doc["apm"]
        assert fields["request_id"] == rid
        assert fields["entry"] == "stripe"
        assert fields["session_label"] == "hook-agent"
        assert fields["justification"] == WHY
        assert fields["duration_minutes"] == 9
        assert fields["approve_command"] == f"apm request approve {rid}"
    assert rid in docs[0]["text"]
    raw = b"".join(world.hook.bodies).decode()
    for secret in (STRIPE, OTHER, token, PASSWORD):
        assert secret not in raw


# ---------------------------------------------------------------------- masking


def test_apm_run_conceals_a_secret_the_child_writes_one_character_at_a_time(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "received"
    token = world.delegate("secrets")
    run = run_with_stripe(world, token, out, "KEY", code=3, one_char=True)
    assert run.returncode == 3, run.stderr
    assert out.read_text() == STRIPE
    for stream in (run.stdout, run.stderr):
        assert f"value={CONCEALED} done" in stream
        assert STRIPE not in stream
        assert STRIPE[:6] not in stream
