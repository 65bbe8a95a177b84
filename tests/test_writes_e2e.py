"""Guarded writes end to end: the SDK's stdio client spawns the real `apm-mcp` shim, which relays
to a real broker process; the owner's side is the real `apm` CLI.

Most tests share one broker and vault (`world`) and use entry names of their own; the
concurrency test gets its own broker because it restarts it. Every secret value and token a
test uses is registered, so the hygiene test can look for all of them in the audit log.
Waits poll with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp import types as mt

from .conftest import PASSWORD, SWEEP_HITS, Apm, Broker, make_home, register_secret, sweep
from .mcp_client import error_of, ok_of, shim_client, whole

pytestmark = pytest.mark.slow

MODES = ("legacy", "auto")
CALL_TIMEOUT = 30.0  # seconds any single MCP request may take before the test fails
READ_TOOLS = {"list_entries", "search_entries", "get_entry", "assist"}
SECRET_TOOLS = {"decrypt_entry", "get_totp"}
WRITE_TOOLS = {
    "add_entry",
    "edit_entry",
    "delete_entry",
    "manage_spaces",
    "generate_password",
    "tx_status",
}
ADMIN_TOOLS = {"tx_list", "tx_abort", "get_audit_logs", "get_history", "manage_profiles"}

# every secret value and token handed to the broker in this module, for the hygiene test
USED_SECRETS: set[str] = set()
USED_TOKENS: set[str] = set()


def new_secret(tag: str) -> str:
    value = f"{tag}-Secret-{secrets.token_hex(6)}"
    USED_SECRETS.add(value)
    register_secret(value)  # conftest's sweep looks for it in every file under the home too
    return value


def close_world(w: World) -> None:
    """Stop the broker, then sweep every file under the home for registered secrets."""
    try:
        w.broker.stop()
        hits = sweep(w.home)
        SWEEP_HITS.extend(hits)
        assert not hits, f"secrets found in plaintext: {hits[:5]}"
    finally:
        shutil.rmtree(w.home, ignore_errors=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class World:
    """A broker with an unlocked vault."""

    home: Path
    apm: Apm
    broker: Broker

    def delegate(self, *args: str) -> tuple[str, str]:
        """A fresh session: (token, accessor)."""
        out = json.loads(self.apm.ok("delegate", "--ttl", "1h", "--json", *args).stdout)
        USED_TOKENS.add(out["token"])
        return out["token"], out["accessor"]

    def entries(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.apm.ok("ls", "--json").stdout)
        return {f"{r['space']}/{r['name']}": r for r in rows}

    def names(self) -> set[str]:
        return {r["name"] for r in self.entries().values()}

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.apm.ok("show", name, "--json").stdout))

    def get(self, name: str, field: str | None = None) -> str:
        extra = ("--field", field) if field else ()
        return self.apm.ok("get", name, "--no-newline", *extra).stdout

    def spaces(self) -> set[str]:
        return {s["name"] for s in json.loads(self.apm.ok("space", "ls", "--json").stdout)}

    def add(self, etype: str, name: str, secret: str, *extra: str) -> None:
        self.apm.ok("add", etype, name, "--from-stdin", *extra, stdin=secret + "\n")

    @property
    def audit(self) -> Path:
        return self.home / "state" / "audit.jsonl"


def start_world() -> World:
    home = make_home()
    broker = Broker(home).start()
    apm = Apm(home)
    apm.ok("init", "--profile", "interactive")
    return World(home, apm, broker)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = start_world()
    try:
        yield w
    finally:
        close_world(w)


def mcp_client(home: Path, token: str, mode: str = "legacy", **kw: Any) -> Any:
    """The SDK's stdio client running the real shim; a failure inside comes out unwrapped."""
    return shim_client(home, token, mode, CALL_TIMEOUT, **kw)


async def preview(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    body = ok_of(await client.call_tool(tool, args))
    assert body["status"] == "pending" and body["tx_id"].startswith("tx_")
    return body


async def commit(client: Client, tool: str, tx: str) -> mt.CallToolResult:
    return await client.call_tool(tool, {"tx_id": tx, "approve": True})


async def two_phase(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    tx = (await preview(client, tool, args))["tx_id"]
    done = ok_of(await commit(client, tool, tx))
    assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    return done


# ---------------------------------------------------------------------- the catalog


@pytest.mark.anyio
@pytest.mark.parametrize("scope", ["read", "secrets", "write", "admin"])
async def test_each_scope_sees_write_tools_only_from_write_and_admin_tools_only_from_admin(
    world: World, scope: str
) -> None:
    token, _ = world.delegate("--scope", scope)
    async with mcp_client(world.home, token) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    names = set(tools)
    # other issues add tools of their own; these are the ones this issue is about
    assert names >= READ_TOOLS
    assert (names >= SECRET_TOOLS) is (scope != "read")
    if scope in ("write", "admin"):
        assert names >= WRITE_TOOLS
    else:
        assert not names & WRITE_TOOLS
    if scope == "admin":
        assert names >= ADMIN_TOOLS
    else:
        assert not names & ADMIN_TOOLS
    for name in names & (WRITE_TOOLS - {"tx_status"}):
        ann = tools[name].annotations
        assert ann is not None and ann.read_only_hint is False, name


# ---------------------------------------------------------------------- preview, then commit


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_commit_adds_exactly_the_previewed_entry_even_when_the_commit_call_differs(
    world: World, mode: str
) -> None:
    name = f"aws-{mode}"
    secret, smuggled = new_secret("aws"), new_secret("smuggled")
    token, _ = world.delegate("--scope", "write")
    args = {
        "type": "login",
        "name": name,
        "fields": {"username": "root"},
        "secrets": {"password": secret},
        "tags": ["prod"],
        "url": "https://aws.example.com",
    }
    async with mcp_client(world.home, token, mode) as client:
        result = await client.call_tool("add_entry", args)
        shown = ok_of(result)
        assert secret not in whole(result)
        assert name in shown["preview"] and "root" in shown["preview"]
        tx = shown["tx_id"]
        assert name not in world.names()
        for differing in (
            {"name": name + "-evil"},
            {"secrets": {"password": smuggled}},
            {"fields": {"username": "attacker"}},
            {"url": "https://evil.example.com"},
        ):
            refused = await client.call_tool(
                "add_entry", {"tx_id": tx, "approve": True, **differing}
            )
            assert error_of(refused)["code"] == "INVALID_PARAMETERS"
            assert smuggled not in whole(refused)
        assert not {name, name + "-evil"} & world.names()
        done = ok_of(await commit(client, "add_entry", tx))
        assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
        assert secret not in json.dumps(done)
        replay = await commit(client, "add_entry", tx)
        assert error_of(replay)["code"] == "TRANSACTION_CLOSED"
    assert name + "-evil" not in world.names()
    assert world.get(name) == secret
    meta = world.show(name)
    assert meta["id"] == done["entry"]["id"]
    assert meta["fields"]["username"]["value"] == "root"
    assert meta["tags"] == ["prod"] and meta["url"] == "https://aws.example.com"
    assert sum(1 for n in world.names() if n.startswith(name)) == 1


@pytest.mark.anyio
async def test_commit_edits_exactly_the_previewed_values_and_keeps_the_old_secret_in_history(
    world: World,
) -> None:
    old, new, smuggled = new_secret("db-old"), new_secret("db-new"), new_secret("db-evil")
    world.add("login", "db-edit", old, "--field", "username=app")
    token, _ = world.delegate("--scope", "write")
    async with mcp_client(world.home, token) as client:
        result = await client.call_tool(
            "edit_entry",
            {"entry": "db-edit", "fields": {"username": "app2"}, "secrets": {"password": new}},
        )
        shown = ok_of(result)
        assert "app -> app2" in shown["preview"]
        assert new not in whole(result) and old not in whole(result)
        refused = await client.call_tool(
            "edit_entry",
            {"tx_id": shown["tx_id"], "approve": True, "secrets": {"password": smuggled}},
        )
        assert error_of(refused)["code"] == "INVALID_PARAMETERS"
        assert world.get("db-edit") == old
        ok_of(await commit(client, "edit_entry", shown["tx_id"]))
    assert world.get("db-edit") == new
    meta = world.show("db-edit")
    assert meta["fields"]["username"]["value"] == "app2"
    assert meta["fields"]["password"]["history"] == 1


@pytest.mark.anyio
async def test_another_sessions_tx_id_is_not_found_and_changes_nothing(world: World) -> None:
    alice, _ = world.delegate("--scope", "write", "--label", "alice")
    mallory, _ = world.delegate("--scope", "admin", "--label", "mallory")
    secret = new_secret("cross")
    async with (
        mcp_client(world.home, alice) as a,
        mcp_client(world.home, mallory) as m,
    ):
        tx = (
            await preview(
                a, "add_entry", {"type": "api_key", "name": "cross", "secrets": {"key": secret}}
            )
        )["tx_id"]
        assert error_of(await commit(m, "add_entry", tx))["code"] == "TRANSACTION_NOT_FOUND"
        status = await m.call_tool("tx_status", {"tx_id": tx})
        assert error_of(status)["code"] == "TRANSACTION_NOT_FOUND"
        aborted = await m.call_tool("tx_abort", {"tx_id": tx})
        assert error_of(aborted)["code"] == "TRANSACTION_NOT_FOUND"
        assert ok_of(await m.call_tool("tx_list", {}))["transactions"] == []
        assert "cross" not in world.names()
        ok_of(await commit(a, "add_entry", tx))  # still the owner session's to commit
    assert world.get("cross") == secret


@pytest.mark.anyio
async def test_an_entry_edited_by_the_owner_between_preview_and_commit_is_a_conflict(
    world: World,
) -> None:
    secret = new_secret("conflict")
    world.add("login", "conflicted", secret, "--field", "username=first")
    token, _ = world.delegate("--scope", "write")
    async with mcp_client(world.home, token) as client:
        tx = (
            await preview(
                client, "edit_entry", {"entry": "conflicted", "fields": {"username": "agent"}}
            )
        )["tx_id"]
        world.apm.ok("edit", "conflicted", "--field", "username=owner")
        result = await commit(client, "edit_entry", tx)
        assert error_of(result)["code"] == "TRANSACTION_CONFLICT"
        assert error_of(await commit(client, "edit_entry", tx))["code"] == "TRANSACTION_CLOSED"
    assert world.show("conflicted")["fields"]["username"]["value"] == "owner"
    assert world.get("conflicted") == secret


# ---------------------------------------------------------------------- approval policies


def elicitation(answer: str, content: dict[str, Any] | None, seen: list[str]) -> Any:
    async def respond(ctx: Any, params: Any) -> mt.ElicitResult:
        seen.append(params.message)
        return mt.ElicitResult(action=answer, content=content)  # type: ignore[arg-type]

    return respond


@pytest.mark.anyio
async def test_the_client_policy_asks_the_person_without_showing_secrets_and_commits_on_yes(
    world: World,
) -> None:
    secret = new_secret("client-yes")
    token, _ = world.delegate("--scope", "write", "--approve", "client", "--label", "asker")
    seen: list[str] = []
    respond = elicitation("accept", {"approve": True}, seen)
    async with mcp_client(world.home, token, elicitation_callback=respond) as client:
        tx = (
            await preview(
                client,
                "add_entry",
                {"type": "api_key", "name": "client-yes", "secrets": {"key": secret}},
            )
        )["tx_id"]
        assert seen == []  # the preview itself asks nobody
        done = ok_of(await commit(client, "add_entry", tx))
    assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    assert len(seen) == 1 and "client-yes" in seen[0] and secret not in seen[0]
    assert world.get("client-yes") == secret


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "content"),
    [("decline", None), ("cancel", None), ("accept", {"approve": False})],
    ids=["decline", "cancel", "accept-but-no"],
)
async def test_the_client_policy_refuses_the_commit_when_the_person_says_no(
    world: World, answer: str, content: dict[str, Any] | None
) -> None:
    name = f"client-{answer}-{content is not None}"
    token, _ = world.delegate("--scope", "write", "--approve", "client")
    seen: list[str] = []
    respond = elicitation(answer, content, seen)
    async with mcp_client(world.home, token, elicitation_callback=respond) as client:
        tx = (
            await preview(
                client, "manage_spaces", {"action": "create", "name": name.replace("-", "")}
            )
        )["tx_id"]
        assert error_of(await commit(client, "manage_spaces", tx))["code"] == "APPROVAL_DENIED"
        assert error_of(await commit(client, "manage_spaces", tx))["code"] == "APPROVAL_DENIED"
        status = ok_of(await client.call_tool("tx_status", {"tx_id": tx}))
        assert status["status"] == "denied"
    assert len(seen) == 1
    assert name.replace("-", "") not in world.spaces()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_the_client_policy_without_elicitation_support_cannot_commit(
    world: World, mode: str
) -> None:
    secret = new_secret("nocap")
    name = f"nocap-{mode}"
    token, _ = world.delegate("--scope", "write", "--approve", "client")
    async with mcp_client(world.home, token, mode) as client:
        tx = (
            await preview(
                client, "add_entry", {"type": "api_key", "name": name, "secrets": {"key": secret}}
            )
        )["tx_id"]
        assert error_of(await commit(client, "add_entry", tx))["code"] == "PERMISSION_DENIED"
    assert name not in world.names()


@pytest.mark.anyio
async def test_the_client_policy_in_the_2026_era_never_commits_without_the_persons_yes(
    world: World,
) -> None:
    """The 2026-07-28 era has no server-to-client requests: asking may be impossible, and then
    the commit must be refused, never treated as approved."""
    token, _ = world.delegate("--scope", "write", "--approve", "client")
    seen: list[str] = []
    respond = elicitation("accept", {"approve": True}, seen)
    async with mcp_client(world.home, token, "auto", elicitation_callback=respond) as client:
        tx = (await preview(client, "manage_spaces", {"action": "create", "name": "era26"}))[
            "tx_id"
        ]
        result = await commit(client, "manage_spaces", tx)
    if result.is_error:
        assert error_of(result)["code"] == "PERMISSION_DENIED"
        assert "era26" not in world.spaces()
    else:
        assert len(seen) == 1 and "era26" in world.spaces()


def pending(world: World) -> dict[str, dict[str, Any]]:
    rows = json.loads(world.apm.ok("tx", "ls", "--pending", "--json").stdout)
    return {r["tx_id"]: r for r in rows}


@pytest.mark.anyio
async def test_the_owner_policy_waits_for_apm_tx_approve_then_the_commit_lands(
    world: World,
) -> None:
    secret = new_secret("owner-yes")
    token, accessor = world.delegate("--scope", "write", "--approve", "owner", "--label", "ow")
    async with mcp_client(world.home, token) as client:
        shown = await preview(
            client,
            "add_entry",
            {"type": "api_key", "name": "owner-yes", "secrets": {"key": secret}},
        )
        tx = shown["tx_id"]
        waiting = ok_of(await commit(client, "add_entry", tx))
        assert waiting["status"] == "pending_owner_approval" and waiting["receipt"] is None
        assert "owner-yes" not in world.names()
        listed = pending(world)
        assert listed[tx]["session"] == accessor and listed[tx]["status"] == "awaiting_owner"
        assert secret not in json.dumps(listed)
        human = world.apm.ok("tx", "ls", "--pending").stdout
        assert tx in human and "owner-yes" in human and secret not in human
        wrong = world.apm("tx", "approve", tx, password="not the password")
        assert wrong.returncode != 0
        status = ok_of(await client.call_tool("tx_status", {"tx_id": tx}))
        assert status["status"] == "awaiting_owner"
        world.apm.ok("tx", "approve", tx)
        assert ok_of(await client.call_tool("tx_status", {"tx_id": tx}))["status"] == "approved"
        assert "owner-yes" not in world.names()  # approval alone changes nothing
        done = ok_of(await commit(client, "add_entry", tx))
        assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
        status = ok_of(await client.call_tool("tx_status", {"tx_id": tx}))
        assert status["status"] == "committed" and status["receipt"] == done["receipt"]
    assert world.get("owner-yes") == secret
    assert tx not in pending(world)


@pytest.mark.anyio
async def test_the_owner_policy_commit_is_refused_after_apm_tx_deny(world: World) -> None:
    world.add("api_key", "owner-keep", new_secret("owner-keep"))
    token, _ = world.delegate("--scope", "write", "--approve", "owner")
    async with mcp_client(world.home, token) as client:
        tx = (await preview(client, "delete_entry", {"entry": "owner-keep"}))["tx_id"]
        waiting = ok_of(await commit(client, "delete_entry", tx))
        assert waiting["status"] == "pending_owner_approval"
        assert tx in pending(world)
        world.apm.ok("tx", "deny", tx, "--reason", "keep it")
        assert error_of(await commit(client, "delete_entry", tx))["code"] == "APPROVAL_DENIED"
        assert ok_of(await client.call_tool("tx_status", {"tx_id": tx}))["status"] == "denied"
    assert "owner-keep" in world.names()
    assert tx not in pending(world)


# ---------------------------------------------------------------------- concurrency


SESSIONS = 8
COMMITS_PER_SESSION = 4


@pytest.mark.anyio
async def test_concurrent_commits_from_eight_sessions_lose_nothing_even_across_a_restart() -> None:
    w = start_world()
    try:
        tokens = [w.delegate("--scope", "write", "--label", f"agent-{i}")[0] for i in range(8)]
        receipts: dict[str, tuple[str, str]] = {}  # receipt -> (name, secret)
        failures: list[str] = []

        async def agent(i: int) -> None:
            async with mcp_client(w.home, tokens[i]) as client:
                for k in range(COMMITS_PER_SESSION):
                    name, secret = f"c{i}-{k}", new_secret(f"c{i}k{k}")
                    args = {"type": "api_key", "name": name, "secrets": {"key": secret}}
                    result = await client.call_tool("add_entry", args)
                    if result.is_error:
                        failures.append(f"preview {name}: {result.structured_content}")
                        continue
                    assert result.structured_content is not None
                    done = await commit(client, "add_entry", result.structured_content["tx_id"])
                    body = done.structured_content or {}
                    if done.is_error or not body.get("receipt"):
                        failures.append(f"commit {name}: {body}")
                        continue
                    receipts[body["receipt"]] = (name, secret)

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for i in range(SESSIONS):
                    tg.start_soon(agent, i)
        assert failures == []
        assert len(receipts) == SESSIONS * COMMITS_PER_SESSION
        expected = {name for name, _ in receipts.values()}
        assert expected <= w.names()
        logged = {
            json.loads(line).get("receipt")
            for line in w.audit.read_text().splitlines()
            if '"receipt"' in line
        }
        assert set(receipts) <= logged
        assert w.apm("audit", "verify").returncode == 0

        w.broker.stop()
        w.broker.start()
        unlocked = w.apm("unlock", password=PASSWORD)
        assert unlocked.returncode == 0, w.broker.output()[-3000:]
        assert expected <= w.names()
        for name, secret in list(receipts.values())[:: COMMITS_PER_SESSION + 1]:
            assert w.get(name) == secret
    finally:
        close_world(w)


# ---------------------------------------------------------------------- every tool


@pytest.mark.anyio
async def test_every_write_tool_and_tx_status_work_through_the_shim(world: World) -> None:
    world.add("login", "gen-me", new_secret("gen-old"), "--field", "username=u")
    world.add("api_key", "del-me", new_secret("del"))
    token, _ = world.delegate("--scope", "write")
    async with mcp_client(world.home, token) as client:
        await two_phase(client, "manage_spaces", {"action": "create", "name": "tools"})
        assert "tools" in world.spaces()
        await two_phase(
            client, "manage_spaces", {"action": "rename", "name": "tools", "new_name": "tools2"}
        )
        listing = world.spaces()
        assert "tools2" in listing and "tools" not in listing
        secret = new_secret("in-space")
        await two_phase(
            client,
            "add_entry",
            {"type": "api_key", "name": "in-space", "space": "tools2", "secrets": {"key": secret}},
        )
        await two_phase(client, "edit_entry", {"entry": "in-space", "move_to": "default"})
        assert world.entries()["default/in-space"]
        await two_phase(client, "manage_spaces", {"action": "remove", "name": "tools2"})
        assert "tools2" not in world.spaces()

        shown = await preview(client, "generate_password", {"entry": "gen-me", "length": 40})
        status = ok_of(await client.call_tool("tx_status", {"tx_id": shown["tx_id"]}))
        assert status["status"] == "pending" and status["tool"] == "generate_password"
        done = ok_of(await commit(client, "generate_password", shown["tx_id"]))
        generated = done["generated"]
        USED_SECRETS.add(generated)
        register_secret(generated)
        assert len(generated) == 40 and generated not in shown["preview"]
        assert world.get("gen-me") == generated

        new = await two_phase(
            client, "generate_password", {"entry": "gen-new", "type": "login", "length": 16}
        )
        USED_SECRETS.add(new["generated"])
        register_secret(new["generated"])
        assert world.get("gen-new") == new["generated"]

        await two_phase(client, "delete_entry", {"entry": "del-me"})
        assert "del-me" not in world.names()
        assert (
            ok_of(await client.call_tool("tx_status", {"tx_id": new["tx_id"]}))["receipt"]
            == (new["receipt"])
        )


@pytest.mark.anyio
async def test_the_admin_tools_work_through_the_shim(world: World) -> None:
    secret = new_secret("hist-1")
    world.add("login", "hist", secret, "--field", "username=h")
    token, accessor = world.delegate("--scope", "admin", "--label", "admin-agent")
    async with mcp_client(world.home, token) as client:
        second = new_secret("hist-2")
        await two_phase(client, "edit_entry", {"entry": "hist", "secrets": {"password": second}})

        tx_a = (await preview(client, "delete_entry", {"entry": "hist"}))["tx_id"]
        tx_b = (await preview(client, "manage_spaces", {"action": "create", "name": "adm"}))[
            "tx_id"
        ]
        listed = ok_of(await client.call_tool("tx_list", {"status": "pending"}))
        assert {t["tx_id"] for t in listed["transactions"]} == {tx_a, tx_b}
        aborted = ok_of(await client.call_tool("tx_abort", {"tx_id": tx_a}))
        assert aborted["status"] == "aborted"
        assert error_of(await commit(client, "delete_entry", tx_a))["code"] == "TRANSACTION_CLOSED"
        assert "hist" in world.names()
        every = ok_of(await client.call_tool("tx_list", {}))["transactions"]
        assert {t["status"] for t in every} == {"committed", "aborted", "pending"}

        history = await client.call_tool("get_history", {"entry": "hist"})
        body = ok_of(history)
        assert body["name"] == "hist"
        assert len(body["secret_versions"]) == 2
        assert {v["value"] for v in body["secret_versions"]} == {"********"}
        assert any(e.get("tool") == "edit_entry" for e in body["events"])
        assert secret not in whole(history) and second not in whole(history)

        page1 = ok_of(
            await client.call_tool(
                "get_audit_logs", {"session": accessor, "event": "tool", "limit": 2}
            )
        )
        assert len(page1["records"]) == 2 and page1["next_after_seq"] is not None
        assert all(r["session"] == accessor and r["event"] == "tool" for r in page1["records"])
        page2 = ok_of(
            await client.call_tool(
                "get_audit_logs",
                {"session": accessor, "event": "tool", "after_seq": page1["next_after_seq"]},
            )
        )
        seqs = [r["seq"] for r in page1["records"] + page2["records"]]
        assert seqs == sorted(set(seqs)) and min(r["seq"] for r in page2["records"]) > max(
            r["seq"] for r in page1["records"]
        )
        commit_rec = next(r for r in page1["records"] + page2["records"] if r.get("receipt"))
        assert commit_rec["label"] == "admin-agent" and isinstance(commit_rec["pid"], int)
        assert commit_rec["tool"] == "edit_entry" and commit_rec["code"] == "OK"
        assert commit_rec["tx"].startswith("tx_") and commit_rec.get("exe")
        assert commit_rec.get("client")

        shown = ok_of(await client.call_tool("manage_profiles", {}))
        assert shown["profile"] == "interactive" and "hardened" in shown["available"]
        refused = await client.call_tool(
            "manage_profiles", {"action": "set", "profile": "hardened"}
        )
        assert error_of(refused)["code"] == "PERMISSION_DENIED"
    profile = world.apm.ok("profile", "show", "--json").stdout
    assert "interactive" in profile


# ---------------------------------------------------------------------- hygiene


@pytest.mark.anyio
async def test_no_secret_value_or_token_reaches_the_audit_log_after_a_full_run(
    world: World,
) -> None:
    """A run of every kind of write and read; then every value and token ever used here is
    looked for in the log and its checkpoint (earlier tests' ones too)."""
    writer, _ = world.delegate("--scope", "admin", "--label", "hygiene")
    owner_only, _ = world.delegate("--scope", "write", "--approve", "owner")
    seen: list[str] = []
    asker, _ = world.delegate("--scope", "write", "--approve", "client")
    one, two, three = new_secret("hy1"), new_secret("hy2"), new_secret("hy3")
    async with mcp_client(world.home, writer) as client:
        await two_phase(
            client,
            "add_entry",
            {"type": "login", "name": "hygiene", "secrets": {"password": one}},
        )
        await two_phase(client, "edit_entry", {"entry": "hygiene", "secrets": {"password": two}})
        gen = await two_phase(client, "generate_password", {"entry": "hygiene"})
        USED_SECRETS.add(gen["generated"])
        register_secret(gen["generated"])
        revealed = ok_of(await client.call_tool("decrypt_entry", {"entry": "hygiene"}))
        assert revealed["value"] == gen["generated"]
        tx = (await preview(client, "add_entry", {"type": "login", "name": "h2"}))["tx_id"]
        bad = await client.call_tool(
            "add_entry", {"tx_id": tx, "approve": True, "secrets": {"password": three}}
        )
        assert error_of(bad)["code"] == "INVALID_PARAMETERS"
        ok_of(await client.call_tool("get_audit_logs", {}))
    async with mcp_client(world.home, owner_only) as client:
        tx = (
            await preview(
                client, "add_entry", {"type": "api_key", "name": "h3", "secrets": {"key": three}}
            )
        )["tx_id"]
        ok_of(await commit(client, "add_entry", tx))
        world.apm.ok("tx", "approve", tx)
        ok_of(await commit(client, "add_entry", tx))
    respond = elicitation("accept", {"approve": True}, seen)
    async with mcp_client(world.home, asker, elicitation_callback=respond) as client:
        await two_phase(client, "edit_entry", {"entry": "h3", "secrets": {"key": one}})
    world.apm("unlock", password="a wrong " + PASSWORD)
    assert world.apm("audit", "verify").returncode == 0

    log = world.audit.read_text()
    head = world.audit.with_name("audit.jsonl.head").read_text()
    assert len(log.splitlines()) > 20
    assert len(USED_SECRETS) > 10 and len(USED_TOKENS) > 5
    for text in (log, head):
        for value in USED_SECRETS | USED_TOKENS | {PASSWORD}:
            assert value not in text
        assert "eps_" not in text
