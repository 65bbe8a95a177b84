"""Grant kinds (#17.3) end to end: a real broker, the real shim under the SDK's stdio client, and
the real `apm` CLI for approving and for `apm run`.

A `use` grant (the default) resolves the entry's reference for `apm run` while `decrypt_entry`
and `get_totp` stay refused for that entry; a `reveal` grant lets both through; the approver
can turn a `reveal` request down to `use` with `apm request approve REQ --use`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from . import test_jit_e2e as jit
from .conftest import register_secret
from .mcp_client import ok_of, tool_names, whole
from .test_jit_e2e import STRIPE, World, ask, code_of, mcp_client, wire

world = jit.world  # the same module-scoped broker fixture, one per module

pytestmark = pytest.mark.slow

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits
register_secret(SEED)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _with_totp(world: World) -> None:
    found = wire(world.home, "entry.list", {})["entries"]
    if not any(e["name"] == "gh-2fa" for e in found):
        secrets = {"secret": {"value": SEED}}
        wire(world.home, "entry.add", {"type": "totp", "name": "gh-2fa", "secrets": secrets})


def _run(world: World, token: str, ref: str, out: Path) -> int:
    script = f"import os; open({str(out)!r}, 'w').write(os.environ['V'])"
    run = world.apm("run", "--env", f"V={ref}", "--", sys.executable, "-c", script,
                    env=world.as_session(token))  # fmt: skip
    return run.returncode


@pytest.mark.anyio
async def test_a_use_grant_resolves_apm_run_but_decrypt_entry_and_get_totp_stay_refused(
    world: World, tmp_path: Path
) -> None:
    _with_totp(world)
    token = world.delegate("read", "agent-use")
    async with mcp_client(world.home, token, "legacy") as client:
        rid = await ask(client)  # the default kind
        rid_totp = await ask(client, entry="gh-2fa")
        listed = json.loads(world.apm.ok("request", "ls", "--pending", "--json").stdout)
        assert {r["id"]: r["access"] for r in listed if r["id"] in (rid, rid_totp)} == {
            rid: "use",
            rid_totp: "use",
        }
        world.apm.ok("request", "approve", rid)
        world.apm.ok("request", "approve", rid_totp)

        details = ok_of(await client.call_tool("get_access_details", {"request_id": rid}))
        assert (details["access"], details["decrypt_entry_available"]) == ("use", False)
        assert "decrypt_entry" not in await tool_names(client)
        # the attack: the model calls the value-returning tools anyway
        for name, args in (
            ("decrypt_entry", {"entry": "stripe"}),
            ("decrypt_entry", {"entry": "stripe", "field": "key"}),
            ("get_entry", {"entry": "stripe", "include_secret": True}),
            ("get_totp", {"entry": "gh-2fa"}),
            ("decrypt_entry", {"entry": "gh-2fa"}),
        ):
            refused = await client.call_tool(name, args)
            assert code_of(refused) == "PERMISSION_DENIED", name
            assert STRIPE not in whole(refused) and SEED not in whole(refused)

    out = tmp_path / "got"
    assert _run(world, token, "apm://default/stripe/key", out) == 0
    assert out.read_text() == STRIPE
    # the wire path the shell would take is refused too (`apm get` with the session)
    got = world.apm("get", "stripe", env=world.as_session(token))
    assert got.returncode == 5 and STRIPE not in got.stdout + got.stderr


@pytest.mark.anyio
async def test_a_reveal_grant_opens_decrypt_entry_and_get_totp_and_apm_run(
    world: World, tmp_path: Path
) -> None:
    _with_totp(world)
    token = world.delegate("read", "agent-reveal")
    async with mcp_client(world.home, token, "legacy") as client:
        rid = await ask(client, access="reveal")
        rid_totp = await ask(client, entry="gh-2fa", access="reveal")
        world.apm.ok("request", "approve", rid)
        world.apm.ok("request", "approve", rid_totp)
        assert "decrypt_entry" in await tool_names(client)
        got = ok_of(await client.call_tool("decrypt_entry", {"entry": "stripe"}))
        assert got["value"] == STRIPE
        code = ok_of(await client.call_tool("get_totp", {"entry": "gh-2fa"}))["code"]
        assert code.isdigit()
    out = tmp_path / "got"
    assert _run(world, token, "apm://default/stripe/key", out) == 0
    assert out.read_text() == STRIPE


@pytest.mark.anyio
async def test_the_approver_turns_a_reveal_request_down_to_use(
    world: World, tmp_path: Path
) -> None:
    token = world.delegate("read", "agent-down")
    async with mcp_client(world.home, token, "legacy") as client:
        rid = await ask(client, access="reveal")
        world.apm.ok("request", "approve", rid, "--use")
        status = ok_of(await client.call_tool("get_request_status", {"request_id": rid}))
        assert (status["state"], status["access"]) == ("approved", "use")
        refused = await client.call_tool("decrypt_entry", {"entry": "stripe"})
        assert code_of(refused) == "PERMISSION_DENIED"
    out = tmp_path / "got"
    assert _run(world, token, "apm://default/stripe/key", out) == 0
    assert out.read_text() == STRIPE
