"""#14.5 seed-compatible tool names, end to end: a real broker, the real `apm-mcp` shim driven
by the SDK's stdio client, the real `apm` CLI on the person's side.

`[mcp] tool_names = "apono"` in config.toml (or `apm delegate --tool-names apono` for one
session) exposes the just-in-time tools under Apono Assist's names; one set at a time, and
every hint names the active set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.server.daemon import load_config
from broker.server.mcp_tools import APONO_NAMES
from broker.wire.errors import InvalidParameters

from .conftest import PASSWORD, Apm, register_secret
from .mcp_client import error_of, ok_of, shim_client, tool_names, whole
from .mcp_world import add_api_key, mcp_broker

pytestmark = pytest.mark.slow

DB = "pg-Staging-4411-unique"
register_secret(DB)
WHY = "run the staging database migration"
APM_SET = set(APONO_NAMES)
APONO_SET = set(APONO_NAMES.values())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class World:
    home: Path
    apm: Apm
    default: str  # the broker's [mcp] tool_names

    def delegate(self, tool_names: str | None = None, label: str = "agent") -> str:
        args = ["delegate", "--json", "--ttl", "1h", "--label", label]
        if tool_names is not None:
            args += ["--tool-names", tool_names]
        made = json.loads(self.apm.ok(*args).stdout)
        assert made["session"]["tool_names"] == tool_names  # stored on the session
        token = str(made["token"])
        register_secret(token)
        return token


@pytest.fixture(scope="module", params=["apm", "apono"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    config = f'[notify]\ndesktop = false\n\n[mcp]\ntool_names = "{request.param}"\n'
    with mcp_broker(config) as (apm, broker):
        for name, value in (("staging-db", DB), ("github", "gh-Token-5522-unique")):
            add_api_key(broker.home, name, value)
        yield World(broker.home, apm, request.param)


def hint_names(text: str, active: set[str], other: set[str]) -> None:
    """`text` names a tool of the active set and none of the other set's."""
    assert any(n in text for n in active), text
    for n in other:
        assert f'"{n}"' not in text and f"call {n}" not in text and f" {n} " not in text, (n, text)


# ------------------------------------------------------------------ which set is listed


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("override", [None, "apm", "apono"])
async def test_tools_list_shows_exactly_one_set_and_the_other_set_is_unknown(
    world: World, mode: str, override: str | None
) -> None:
    naming = override or world.default
    active, other = (APONO_SET, APM_SET) if naming == "apono" else (APM_SET, APONO_SET)
    token = world.delegate(override, f"list-{mode}-{override}")
    async with shim_client(world.home, token, mode, 20.0) as client:
        listed = await tool_names(client)
        assert active <= listed
        assert not (other & listed)
        assert "list_my_requests" in listed and "search_entries" in listed
        tools = (await client.list_tools()).tools
        for t in tools:  # descriptions name the active set only
            for n in other:
                assert f" {n}" not in (t.description or ""), (t.name, t.description)
        for name in sorted(other):
            res = await client.call_tool(name, {})
            err = error_of(res)
            assert err["code"] == "INVALID_PARAMETERS"
            assert "unknown tool" in err["message"]
        assistant = "user_apono_assist" if naming == "apono" else "assist"
        body = ok_of(await client.call_tool(assistant, {}))
        assert active <= set(body["tools_available"]) | set(body["needs_more_access"])
        assert not (other & (set(body["tools_available"]) | set(body["needs_more_access"])))


# ------------------------------------------------------------------ the whole flow


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_request_approve_status_details_under_apono_names(world: World, mode: str) -> None:
    override = None if world.default == "apono" else "apono"
    token = world.delegate(override, f"flow-{mode}")
    async with shim_client(world.home, token, mode, 20.0) as client:
        # assist with a question: ranked candidates, the access each needs, the exact request
        got = ok_of(
            await client.call_tool(
                "user_apono_assist", {"question": "I need to migrate the staging database"}
            )
        )
        assert got["question"] == "I need to migrate the staging database"
        first = got["candidates"][0]
        assert first["entry"]["name"] == "staging-db"
        assert first["access"] == "request"
        assert "grant" in first["access_needed"]
        call = first["request"]
        assert call["tool"] == "user_create_request"
        assert call["arguments"]["entry"] == first["entry"]["id"]
        assert DB not in json.dumps(got)
        hint_names(got["how_to_get_more_access"], APONO_SET, APM_SET)

        # make exactly the request it gave
        made = ok_of(await client.call_tool(call["tool"], call["arguments"]))
        rid = made["request_id"]
        assert made["state"] == "pending"
        hint_names(made["next_step"], {"apm request approve"}, APM_SET)

        early = error_of(await client.call_tool("user_get_access_details", {"request_id": rid}))
        assert early["code"] == "REQUEST_CLOSED"
        hint_names(early["hint"], APONO_SET, APM_SET)
        assert "user_get_request_status" in early["hint"]

        # the assist now says a request is pending, and how to follow it
        again = ok_of(await client.call_tool("user_apono_assist", {"question": "staging database"}))
        pending = next(c for c in again["candidates"] if c["entry"]["name"] == "staging-db")
        assert pending["access"] == "pending"
        assert pending["request"] == {
            "tool": "user_get_request_status",
            "arguments": {"request_id": rid},
        }

        world.apm.ok("request", "approve", rid)

        status = ok_of(await client.call_tool("user_get_request_status", {"request_id": rid}))
        assert status["state"] == "approved"
        hint_names(status["next_step"], APONO_SET, APM_SET)
        assert "call user_get_access_details" in status["next_step"]
        res = await client.call_tool("user_get_access_details", {"request_id": rid})
        details = ok_of(res)
        assert details["reference"] == "apm://default/staging-db/key"
        assert DB not in whole(res)

        # and the old names stay unknown after the flow, the grant notwithstanding
        refused = error_of(await client.call_tool("get_request_status", {"request_id": rid}))
        assert refused["code"] == "INVALID_PARAMETERS"
        world.apm("request", "revoke", rid, check=True)


@pytest.mark.anyio
async def test_hints_name_the_apm_set_under_apm_names(world: World) -> None:
    override = None if world.default == "apm" else "apm"
    token = world.delegate(override, "apm-hints")
    async with shim_client(world.home, token, "legacy", 20.0) as client:
        got = ok_of(await client.call_tool("assist", {"question": "staging database"}))
        assert got["candidates"][0]["request"]["tool"] == "request_access"
        made = ok_of(
            await client.call_tool("request_access", got["candidates"][0]["request"]["arguments"])
        )
        early = error_of(
            await client.call_tool("get_access_details", {"request_id": made["request_id"]})
        )
        assert "get_request_status" in early["hint"]
        assert "user_" not in early["hint"]
        bad = error_of(
            await client.call_tool(
                "request_access", {"entry": "x", "duration_minutes": 1, "justification": "short"}
            )
        )
        assert bad["code"] == "INVALID_PARAMETERS"
        assert "at least 10 characters" in bad["message"]


# ------------------------------------------------------------------ the setting itself


def test_config_refuses_an_unknown_naming_or_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[mcp]\ntool_names = "apono"\n')
    assert load_config(cfg).mcp_tool_names == "apono"
    cfg.write_text("[notify]\ndesktop = false\n")
    assert load_config(cfg).mcp_tool_names == "apm"
    cfg.write_text('[mcp]\ntool_names = "both"\n')
    with pytest.raises(InvalidParameters) as bad:
        load_config(cfg)
    assert bad.value.code == "INVALID_PARAMETERS"
    assert "apono" in bad.value.message
    cfg.write_text('[mcp]\ntool_name = "apono"\n')
    with pytest.raises(InvalidParameters) as typo:
        load_config(cfg)
    assert "unknown [mcp] key(s): tool_name" in typo.value.message


def test_delegate_refuses_an_unknown_naming(tmp_path: Path) -> None:
    apm = Apm(tmp_path)
    r = apm("delegate", "--tool-names", "seed", password=PASSWORD)
    assert r.returncode != 0
    assert "--tool-names" in r.stderr and "apono" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["delegate", "--tool-names", "apono"],
        ["mcp", "install", "--client", "cursor", "--tool-names", "apono"],
        ["mcp", "config", "--client", "cursor", "--mint", "--tool-names", "apono"],
    ],
)
def test_the_cli_puts_the_naming_into_the_session_it_mints(argv: list[str]) -> None:
    from broker.cli.main import build_parser
    from broker.cli.session_cmd import create_params

    args = build_parser().parse_args(argv)
    assert create_params(args).tool_names == "apono"
    args = build_parser().parse_args([a for a in argv if a not in ("--tool-names", "apono")])
    assert create_params(args).tool_names is None


def test_server_instructions_name_the_active_set() -> None:
    from datetime import UTC, datetime, timedelta

    from broker.core.sessions import SessionRecord
    from broker.server.mcp_host import instructions

    now = datetime.now(UTC)
    rec = SessionRecord(
        accessor="acc_x", token_hash="h", created_at=now, expires_at=now + timedelta(hours=1)
    )
    assert "Call assist " in instructions(rec, "apm")
    text = instructions(rec, "apono")
    assert "Call user_apono_assist " in text and "Call assist " not in text
    assert "search_entries" in text  # the other tools keep their names


def test_the_naming_rule_is_written_once_and_carried_by_the_context(tmp_path: Path) -> None:
    """A session's own naming wins, else the broker's [mcp] tool_names; the context, tools/list
    and the server instructions all read it from State.tool_naming."""
    from datetime import UTC, datetime, timedelta

    from broker.core.key_cache import LockPolicy, OpenVault
    from broker.core.sessions import SessionRecord
    from broker.server.context import Context
    from broker.server.peer import Peer
    from broker.server.state import State

    from .twin import twin_paths

    state = State(paths=twin_paths(tmp_path), cache=OpenVault(LockPolicy()))
    now = datetime.now(UTC)
    rec = SessionRecord(
        accessor="ses_x", token_hash="h", created_at=now, expires_at=now + timedelta(hours=1)
    )
    ctx = Context(state=state, peer=Peer(uid=0, gid=0, pid=None), auth=None, request_id="1")
    try:
        assert state.tool_naming(None) == state.tool_naming(rec) == ctx.naming == "apm"
        state.mcp_tool_names = "apono"
        assert state.tool_naming(rec) == ctx.naming == "apono"
        ctx.session = rec.model_copy(update={"tool_names": "apm"})
        assert ctx.naming == "apm"  # the session's choice beats the broker's
    finally:
        state.kdf_pool.shutdown(wait=True)
        state.io_pool.shutdown(wait=True)
