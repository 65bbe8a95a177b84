"""The MCP path end to end: the SDK's stdio client spawns the real `apm-mcp` shim, which relays
to a real broker process, in both protocol eras (legacy 2025-11-25 with `initialize`, and the
2026-07-28 era the 2.x client negotiates with mode="auto").

Tests that only read share one broker and vault (`world`); the lock test unlocks it again; the
tests that kill or stop a broker share a second one (`spare`) and leave it running and
unlocked. Set-up goes over the wire where the CLI is not the point. Waits poll with a deadline;
none sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pyotp
import pytest
from mcp import Client
from mcp import types as mt
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.core.sessions import scope_rank
from broker.server.mcp_tools import TOOLS, TOOLS_BY_NAME

from .conftest import PASSWORD, Apm, Broker, make_home
from .mcp_client import error_of, ok_of, shim_client, tool_names, whole

pytestmark = pytest.mark.slow

MODES = ("legacy", "auto")
SCOPES = ("read", "secrets", "write", "admin")
GH_SECRET = "gh-Secret-7731-unique"
WORK_SECRET = "work-Key-5591-unique"
TOTP_SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits
FILLERS = ("svc-0", "svc-1", "svc-2", "svc-3")
ALL_NAMES = {"github", "mfa", "ci-key", *FILLERS}
READ_TOOLS = {"list_entries", "search_entries", "get_entry", "assist"}
SECRET_TOOLS = {"decrypt_entry", "get_totp"}
CALL_TIMEOUT = 20.0  # seconds any single MCP request may take before the test fails


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def expected_tools(scope: str) -> set[str]:
    return {t.name for t in TOOLS if scope_rank(t.scope) <= scope_rank(scope)}


@dataclass
class World:
    """One broker with an unlocked vault holding known entries."""

    home: Path
    apm: Apm
    broker: Broker

    def delegate(self, scope: str) -> tuple[str, str]:
        """A fresh session (token, accessor), minted over the wire as `apm delegate` does."""
        res = wire(self.home, "session.create", {"scope": scope, "ttl_seconds": 3600})
        return res["token"], res["session"]["accessor"]


def wire(
    home: Path, method: str, params: dict[str, Any] | None = None, *, owner: bool = True
) -> dict[str, Any]:
    """One request to the broker from this process: quicker than a CLI run for set-up."""
    password = SecretStr(PASSWORD) if owner else None
    with BrokerClient(f"ipc://{home}/run/broker.sock") as client:
        return client.call_raw(method, params or {}, password=password, timeout=30)


def start_broker(broker: Broker, timeout: float = 30.0) -> None:
    """Start the broker and wait until it answers (polling over the wire, not the CLI)."""
    broker.start(wait=False)
    broker.wait_ready(timeout)


def unlock(home: Path) -> None:
    wire(home, "vault.unlock")


def populate(apm: Apm) -> None:
    apm.ok("init", "--profile", "interactive")
    apm.ok(
        "add",
        "login",
        "github",
        "--field",
        "username=octo",
        "--url",
        "https://github.com/login",
        "--tag",
        "dev",
        "--from-stdin",
        stdin=GH_SECRET + "\n",
    )
    # the rest through the wire directly, which is quicker than a CLI run each
    wire(apm.home, "space.add", {"name": "work"})
    add = [
        ("totp", "mfa", "default", {"secret": TOTP_SEED}),
        ("api_key", "ci-key", "work", {"key": WORK_SECRET}),
        *[("api_key", name, "default", {"key": f"filler-{name}"}) for name in FILLERS],
    ]
    for kind, name, space, secrets in add:
        values = {k: {"value": v} for k, v in secrets.items()}
        wire(apm.home, "entry.add", {"type": kind, "name": name, "space": space, "secrets": values})


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = make_home()
    broker = Broker(home)
    start_broker(broker)
    apm = Apm(home)
    try:
        populate(apm)
        yield World(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def spare() -> Iterator[World]:
    """A second broker for the tests that kill or stop it; each leaves it running, unlocked."""
    home = make_home()
    broker = Broker(home)
    start_broker(broker)
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        wire(
            home,
            "entry.add",
            {"type": "api_key", "name": "k1", "secrets": {"key": {"value": "value-one"}}},
        )
        yield World(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def restored(world: World) -> Iterator[None]:
    """Whatever happens inside, leave the broker running with the vault unlocked."""
    try:
        yield
    finally:
        if world.broker.proc is None or world.broker.proc.poll() is not None:
            start_broker(world.broker)
        if wire(world.home, "broker.status", owner=False).get("locked"):
            unlock(world.home)


@pytest.fixture(scope="module")
def tokens(world: World) -> dict[str, str]:
    """One token per scope, shared by the read-only tests."""
    return {scope: world.delegate(scope)[0] for scope in SCOPES}


def mcp_client(home: Path, token: str, mode: str, **kw: Any) -> Any:
    """The SDK's stdio client running the real shim; a failure inside comes out unwrapped."""
    return shim_client(home, token, mode, CALL_TIMEOUT, **kw)


async def entry_id(client: Client, name: str) -> str:
    body = ok_of(await client.call_tool("get_entry", {"entry": name}))
    return str(body["entry"]["id"])


# ---------------------------------------------------------------------- the catalog


@pytest.mark.anyio
@pytest.mark.parametrize("scope", SCOPES)
async def test_each_scope_lists_exactly_the_tools_it_allows(
    world: World, tokens: dict[str, str], mode: str, scope: str
) -> None:
    async with mcp_client(world.home, tokens[scope], mode) as client:
        names = await tool_names(client)
    assert names == expected_tools(scope)
    # the issue's own list, so a catalog that loses a tool cannot pass by shrinking TOOLS
    assert names >= READ_TOOLS
    if scope == "read":
        assert not names & SECRET_TOOLS
    else:
        assert names >= SECRET_TOOLS


@pytest.mark.anyio
async def test_every_tool_has_a_title_description_schemas_and_closed_world_annotations(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["admin"], mode) as client:
        tools = (await client.list_tools()).tools
    assert {t.name for t in tools} == expected_tools("admin")
    for tool in tools:
        spec = TOOLS_BY_NAME[tool.name]
        assert tool.title, tool.name
        assert tool.description and len(tool.description) > 30, tool.name
        assert tool.input_schema.get("type") == "object", tool.name
        assert tool.output_schema is not None, tool.name
        assert tool.output_schema.get("type") == "object", tool.name
        ann = tool.annotations
        assert ann is not None, tool.name
        assert ann.read_only_hint is spec.read_only, tool.name
        assert ann.destructive_hint is spec.destructive, tool.name
        assert ann.idempotent_hint is spec.idempotent, tool.name
        assert ann.open_world_hint is False, tool.name
        wire = tool.model_dump(by_alias=True, exclude_none=True)
        assert {"title", "description", "inputSchema", "outputSchema"} <= set(wire), tool.name
        assert {"readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint"} <= set(
            wire["annotations"]
        ), tool.name


@pytest.mark.anyio
async def test_instructions_state_the_sessions_scope_and_expiry(world: World) -> None:
    doc = json.loads(world.apm.ok("delegate", "--scope", "read", "--ttl", "1h", "--json").stdout)
    expires = datetime.fromisoformat(doc["expires_at"])
    # instructions arrive with `initialize`, so only on a legacy connection
    async with mcp_client(world.home, doc["token"], "legacy") as client:
        text = client.instructions or ""
    assert "read" in text
    assert expires.strftime("%Y-%m-%d") in text


# ---------------------------------------------------------------------- read tools


@pytest.mark.anyio
async def test_search_entries_finds_an_entry_added_with_the_cli(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["read"], mode) as client:
        result = await client.call_tool("search_entries", {"query": "github"})
        by_user = await client.call_tool("search_entries", {"query": "octo"})
    hits = ok_of(result)["hits"]
    assert hits, "no hits for an entry added with apm add"
    top = hits[0]["entry"]
    assert top["name"] == "github"
    assert top["type"] == "login"
    assert top["url"] == "https://github.com/login"
    assert top["fields"]["username"]["value"] == "octo"
    assert GH_SECRET not in whole(result)
    assert [h["entry"]["name"] for h in ok_of(by_user)["hits"]][:1] == ["github"]


@pytest.mark.anyio
async def test_search_entries_never_matches_a_secret_value(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["admin"], mode) as client:
        result = await client.call_tool("search_entries", {"query": GH_SECRET})
    assert ok_of(result)["hits"] == []


@pytest.mark.anyio
async def test_get_entry_returns_metadata_and_no_secret_value(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        by_name = await client.call_tool("get_entry", {"entry": "github"})
        eid = ok_of(by_name)["entry"]["id"]
        by_id = await client.call_tool("get_entry", {"entry": eid})
    for result in (by_name, by_id):
        body = ok_of(result)
        entry = body["entry"]
        assert entry["id"] == eid
        assert entry["name"] == "github"
        assert entry["space"] == "default"
        assert entry["tags"] == ["dev"]
        assert entry["fields"]["username"] == {"secret": False, "value": "octo", "history": 0}
        assert entry["fields"]["password"]["secret"] is True
        assert entry["fields"]["password"].get("value") is None
        assert body.get("secret") is None
        assert GH_SECRET not in whole(result)


@pytest.mark.anyio
async def test_list_entries_pages_with_offset_limit_and_next_offset(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    pages: list[dict[str, Any]] = []
    async with mcp_client(world.home, tokens["read"], mode) as client:
        offset: int | None = 0
        while offset is not None and len(pages) < 10:
            page = ok_of(await client.call_tool("list_entries", {"offset": offset, "limit": 3}))
            pages.append(page)
            offset = page["next_offset"]
        everything = ok_of(await client.call_tool("list_entries", {}))
        work = ok_of(await client.call_tool("list_entries", {"space": "work"}))
        logins = ok_of(await client.call_tool("list_entries", {"type": "login"}))
        tagged = ok_of(await client.call_tool("list_entries", {"tag": "dev"}))
    assert [len(p["entries"]) for p in pages] == [3, 3, 1]
    assert [p["offset"] for p in pages] == [0, 3, 6]
    assert [p["next_offset"] for p in pages] == [3, 6, None]
    assert {p["total"] for p in pages} == {len(ALL_NAMES)}
    paged = [e["name"] for p in pages for e in p["entries"]]
    assert sorted(paged) == sorted(ALL_NAMES)  # every entry once, none twice
    assert everything["total"] == len(ALL_NAMES)
    assert everything["next_offset"] is None
    assert [e["name"] for e in work["entries"]] == ["ci-key"]
    assert [e["name"] for e in logins["entries"]] == ["github"]
    assert [e["name"] for e in tagged["entries"]] == ["github"]
    for p in pages:
        for e in p["entries"]:
            assert all(f.get("value") is None for f in e["fields"].values() if f["secret"])


@pytest.mark.anyio
async def test_assist_lists_what_needs_more_access(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["read"], mode) as client:
        read = ok_of(await client.call_tool("assist", {}))
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        secrets = ok_of(await client.call_tool("assist", {}))
    more = {t.name: t.scope for t in TOOLS if scope_rank(t.scope) > scope_rank("read")}
    assert read["needs_more_access"] == more
    assert set(more) >= SECRET_TOOLS
    assert set(read["tools_available"]) == expected_tools("read")
    assert read["scopes"] == ["read"]
    assert read["total_entries"] == len(ALL_NAMES)
    assert {s["name"]: s["entries"] for s in read["spaces"]} == {
        "default": len(ALL_NAMES) - 1,
        "work": 1,
    }
    assert read["types"] == {"login": 1, "totp": 1, "api_key": 1 + len(FILLERS)}
    assert read["how_to_get_more_access"]
    assert not set(secrets["needs_more_access"]) & expected_tools("secrets")
    assert set(secrets["tools_available"]) == expected_tools("secrets")


# ---------------------------------------------------------------------- secret tools


@pytest.mark.anyio
async def test_decrypt_entry_returns_the_exact_secret(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        by_name = ok_of(await client.call_tool("decrypt_entry", {"entry": "github"}))
        eid = by_name["id"]
        by_id = ok_of(await client.call_tool("decrypt_entry", {"entry": eid}))
        field = ok_of(
            await client.call_tool("decrypt_entry", {"entry": "github", "field": "password"})
        )
        spaced = ok_of(
            await client.call_tool("decrypt_entry", {"entry": "ci-key", "space": "work"})
        )
        inline = ok_of(
            await client.call_tool("get_entry", {"entry": "github", "include_secret": True})
        )
    assert by_name == {"id": eid, "name": "github", "field": "password", "value": GH_SECRET}
    assert by_id == by_name
    assert field == by_name
    assert spaced["value"] == WORK_SECRET
    assert inline["secret"] == {"field": "password", "value": GH_SECRET}


@pytest.mark.anyio
async def test_get_totp_returns_the_current_six_digit_code_and_seconds_remaining(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    totp = pyotp.TOTP(TOTP_SEED)
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        before = time.time()
        body = ok_of(await client.call_tool("get_totp", {"entry": "mfa"}))
        after = time.time()
    assert body["name"] == "mfa"
    assert len(body["code"]) == 6 and body["code"].isdigit()
    assert body["code"] in {totp.at(before), totp.at(after)}
    assert body["period"] == 30
    assert 1 <= body["remaining"] <= 30


# ---------------------------------------------------------------------- refusals


@pytest.mark.anyio
async def test_calls_outside_the_scope_get_permission_denied_with_a_hint(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["read"], mode) as client:
        results = [
            await client.call_tool("decrypt_entry", {"entry": "github"}),
            await client.call_tool("get_totp", {"entry": "mfa"}),
            await client.call_tool("get_entry", {"entry": "github", "include_secret": True}),
        ]
        still_fine = await client.call_tool("get_entry", {"entry": "github"})
    for result in results:
        body = error_of(result)
        assert body["code"] == "PERMISSION_DENIED"
        assert body["hint"]  # says how to get the access (the wording is free)
        assert GH_SECRET not in whole(result)
        assert result.content, "an error result carries readable text too"
    ok_of(still_fine)


INVALID = [
    ("get_entry", {"entry": 5}, "entry"),
    ("get_entry", {}, "entry"),
    ("get_entry", {"entry": "github", "colour": "red"}, "colour"),
    ("get_entry", {"entry": "github", "include_secret": "perhaps"}, "include_secret"),
    ("list_entries", {"limit": 0}, "limit"),
    ("list_entries", {"offset": -1}, "offset"),
    ("list_entries", {"type": "spaceship"}, "type"),
    ("search_entries", {}, "query"),
    ("search_entries", {"query": "x" * 1000}, "query"),
    ("decrypt_entry", {"entry": ""}, "entry"),
]


@pytest.mark.anyio
async def test_invalid_arguments_get_invalid_parameters_naming_the_field(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        results = [(await client.call_tool(tool, args), field) for tool, args, field in INVALID]
        unknown = await client.call_tool("no_such_tool", {})
        alive = await client.call_tool("list_entries", {"limit": 1})
    for (result, field), (tool, args, _) in zip(results, INVALID, strict=True):
        body = error_of(result)
        assert body["code"] == "INVALID_PARAMETERS", (tool, args)
        assert field in body["message"], (tool, args, body["message"])
        assert "x" * 300 not in whole(result)  # input is never echoed back
    assert error_of(unknown)["code"] == "INVALID_PARAMETERS"
    ok_of(alive)


@pytest.mark.anyio
async def test_a_session_filtered_to_a_space_sees_nothing_outside_it(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["admin"], mode) as client:
        github_id = await entry_id(client, "github")
    out = world.apm.ok("delegate", "--scope", "secrets", "--space", "work", "--json").stdout
    token = json.loads(out)["token"]
    async with mcp_client(world.home, token, mode) as client:
        listed = ok_of(await client.call_tool("list_entries", {}))
        searched = ok_of(await client.call_tool("search_entries", {"query": "github"}))
        hidden = [
            await client.call_tool("get_entry", {"entry": "github"}),
            await client.call_tool("get_entry", {"entry": github_id}),
            await client.call_tool("decrypt_entry", {"entry": "github"}),
            await client.call_tool("get_totp", {"entry": "mfa"}),
        ]
        visible = ok_of(await client.call_tool("decrypt_entry", {"entry": "ci-key"}))
        assist = ok_of(await client.call_tool("assist", {}))
    assert [e["name"] for e in listed["entries"]] == ["ci-key"]
    assert listed["total"] == 1
    assert searched["hits"] == []
    for result in hidden:
        assert error_of(result)["code"] == "ENTRY_NOT_FOUND"
        assert GH_SECRET not in whole(result)
    assert visible["value"] == WORK_SECRET
    assert assist["total_entries"] == 1
    assert assist["entry_filter"] == {"spaces": ["work"]}


# ---------------------------------------------------------------------- the session ends


@pytest.mark.anyio
async def test_revoking_the_session_fails_the_very_next_call_with_session_required(
    world: World, mode: str
) -> None:
    token, accessor = world.delegate("read")
    async with mcp_client(world.home, token, mode) as client:
        ok_of(await client.call_tool("list_entries", {}))
        world.apm.ok("session", "revoke", accessor, password=None)
        refused = await client.call_tool("list_entries", {})
        again = await client.call_tool("search_entries", {"query": "github"})
        names = await tool_names(client)
    assert error_of(refused)["code"] == "SESSION_REQUIRED"
    assert "apm delegate" in error_of(refused)["hint"]
    assert error_of(again)["code"] == "SESSION_REQUIRED"
    assert names == {"apm_status"}


@pytest.mark.anyio
async def test_locking_the_vault_fails_the_next_call_with_vault_locked_and_the_unlock_hint(
    world: World, tokens: dict[str, str], mode: str
) -> None:
    async with mcp_client(world.home, tokens["secrets"], mode) as client:
        ok_of(await client.call_tool("list_entries", {}))
        world.apm.ok("lock", password=None)
        try:
            locked = await client.call_tool("decrypt_entry", {"entry": "github"})
            status = await client.call_tool("apm_status", {})
            names = await tool_names(client)
        finally:
            unlock(world.home)
        unlocked = await client.call_tool("decrypt_entry", {"entry": "github"})
    body = error_of(locked)
    assert body["code"] == "VAULT_LOCKED"
    assert "apm unlock" in body["hint"]
    assert GH_SECRET not in whole(locked)
    assert not status.is_error
    assert ok_of(status)["code"] == "VAULT_LOCKED"
    assert "apm unlock" in ok_of(status)["hint"]
    assert names == {"apm_status"}
    assert ok_of(unlocked)["value"] == GH_SECRET


# ---------------------------------------------------------------------- the broker comes and goes


@pytest.mark.anyio
async def test_a_broker_killed_and_restarted_mid_session_serves_the_client_without_a_restart(
    spare: World, mode: str
) -> None:
    token, _ = spare.delegate("secrets")
    with restored(spare):
        async with mcp_client(spare.home, token, mode) as client:
            before = ok_of(await client.call_tool("decrypt_entry", {"entry": "k1"}))
            old_pid = spare.broker.pid
            spare.broker.kill9()
            start_broker(spare.broker)
            unlock(spare.home)
            # the very next call works: no retry loop, no client restart
            after = await client.call_tool("decrypt_entry", {"entry": "k1"})
            names = await tool_names(client)
            new_pid = spare.broker.pid
    assert new_pid != old_pid
    assert before["value"] == "value-one"
    assert ok_of(after)["value"] == "value-one"
    assert names == expected_tools("secrets")


@pytest.mark.anyio
async def test_without_a_broker_the_client_gets_apm_status_then_the_tools_once_it_is_back(
    spare: World, mode: str
) -> None:
    token, _ = spare.delegate("read")
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, mt.ToolListChangedNotification):
            changed.set()

    with restored(spare):
        spare.broker.stop()
        async with mcp_client(spare.home, token, mode, message_handler=on_message) as client:
            tools = (await client.list_tools()).tools
            refused = await client.call_tool("list_entries", {})
            status = await client.call_tool("apm_status", {})

            start_broker(spare.broker)
            unlock(spare.home)
            if mode == "legacy":
                # the shim re-attaches on its own and tells the client, which never restarts
                with anyio.fail_after(20):
                    await changed.wait()
                names = await tool_names(client)
            else:
                names = set()
                deadline = time.monotonic() + 20
                while names != expected_tools("read") and time.monotonic() < deadline:
                    names = await tool_names(client)
                    if names != expected_tools("read"):
                        await anyio.sleep(0.1)  # poll interval, not a wait for something
            listed = await client.call_tool("list_entries", {})

    assert [t.name for t in tools] == ["apm_status"]
    assert tools[0].input_schema.get("type") == "object"
    body = error_of(refused)
    assert body["code"] == "BROKER_UNAVAILABLE"
    assert "apm broker start" in body["hint"]
    assert not status.is_error
    assert ok_of(status)["code"] == "BROKER_UNAVAILABLE"
    assert names == expected_tools("read")
    assert [e["name"] for e in ok_of(listed)["entries"]] == ["k1"]
