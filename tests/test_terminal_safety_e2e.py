"""#13.1 end to end: hostile strings from an agent never reach the person's terminal, desktop
notification or webhook as control characters, and an approval shows what will really run.

A real broker (with a webhook to a local HTTP server and a recording `notify-send` on its PATH),
the real `apm-mcp` shim driven by the SDK's stdio client, and the real `apm` CLI whose stdout
is captured byte for byte (what a terminal would receive).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp import types as mt

from .conftest import PASSWORD, Apm, Broker, clean_env, make_home, register_secret
from .hook_server import Hook
from .mcp_client import INITIALIZE, SHIM, ok_of, request_access, unwrapped
from .mcp_world import add_api_key, mcp_broker, wire

pytestmark = pytest.mark.slow

CALL_TIMEOUT = 20.0
# the review's attack: erase the line, go up one, erase it, back to column 1, print a fake line
SPOOF_URL = "https://github.com\x1b[2K\x1b[1A\x1b[2K\x1b[1G      tags: +reviewed -"
SPOOF_WHY = (
    "need it for the weather job <!channel> <https://evil.example|approve here>"
    "\x1b[2K\x1b[1A\x1b[2K\r"
    "req_x  pending  weather-api for 5 min \u2014 cron\u202e\u2066"
)
HOSTILE_LABEL = "cron\x1b]0;owned\x07\x9b2J\u2028fake"
HOSTILE_CLIENT = "claude\x1b[8mhidden\x1b[0m\u200b"
NEW_PASSWORD = "Attacker-Known-Pass-8812"
register_secret(NEW_PASSWORD)


def control_chars(text: str) -> list[str]:
    """Every character a terminal or renderer would act on, except the newlines between lines."""
    bad = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
    return [
        f"U+{ord(ch):04X}"
        for ch in text
        if ch != "\n" and (unicodedata.category(ch) in bad or ch == "\x7f")
    ]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class World:
    home: Path
    apm: Apm
    broker: Broker
    hook: Hook
    notified: Path  # one JSON argv per line, written by the fake notify-send

    def wire(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return wire(self.home, method, params)

    def delegate(self, scope: str, label: str = "agent", approve: str = "agent") -> str:
        res = self.wire(
            "session.create",
            {"scope": scope, "ttl_seconds": 3600, "label": label, "approve": approve},
        )
        register_secret(res["token"])
        return str(res["token"])

    def run(self, *args: str) -> str:
        proc = self.apm(*args, password=PASSWORD)
        assert proc.returncode == 0, proc.stderr
        assert not control_chars(proc.stderr), proc.stderr
        return proc.stdout


@contextlib.asynccontextmanager
async def shim(w: World, token: str, client_name: str = "pytest") -> Any:
    params = StdioServerParameters(
        command=str(SHIM),
        args=[],
        env={
            "APM_HOME": str(w.home),
            "APM_EPHEMERAL_ID": token,
            "APM_EPHEMERAL_AGENT": client_name,
        },
    )
    info = mt.Implementation(name=client_name, version="1.0")
    with unwrapped():
        async with Client(
            params, mode="legacy", read_timeout_seconds=CALL_TIMEOUT, client_info=info
        ) as client:
            yield client


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = make_home()
    hook = Hook()
    fakebin = home / "fakebin"
    fakebin.mkdir()
    notified = home / "notified.jsonl"
    tool = fakebin / "notify-send"
    tool.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(notified)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    tool.chmod(0o755)
    config = f'[notify]\nwebhook_url = "{hook.url}"\ndesktop = true\n'
    path = {"PATH": f"{fakebin}:{os.environ.get('PATH', '')}"}
    try:
        with mcp_broker(config, home, extra_env=path) as (apm, broker):
            w = World(home, apm, broker, hook, notified)
            w.wire(
                "entry.add",
                {
                    "type": "login",
                    "name": "github",
                    "fields": {"username": "octo"},
                    "secrets": {"password": {"value": "Old-Github-Pass-5531"}},
                },
            )
            register_secret("Old-Github-Pass-5531")
            add_api_key(home, "proddb", "Prod-Db-Key-7731")
            yield w
    finally:
        hook.close()


async def _spoofed_edit(w: World) -> str:
    token = w.delegate("write", label="writer", approve="owner")
    async with shim(w, token) as client:
        body = ok_of(
            await client.call_tool(
                "edit_entry",
                {"entry": "github", "url": SPOOF_URL, "secrets": {"password": NEW_PASSWORD}},
            )
        )
    return str(body["tx_id"])


@pytest.mark.anyio
async def test_tx_ls_shows_the_escapes_and_the_password_change_the_spoofed_url_tried_to_hide(
    world: World,
) -> None:
    tx_id = await _spoofed_edit(world)
    out = world.run("tx", "ls", "--pending")
    assert tx_id in out
    assert not control_chars(out), out
    assert "\\x1b[2K\\x1b[1A" in out  # the escape sequence is visible as text
    mine = out[out.index(tx_id) :]
    # the exact stored arguments: the new password is there, as a length and a fingerprint
    assert f"<secret: {len(NEW_PASSWORD)} chars, fp " in mine
    assert NEW_PASSWORD not in out
    shown = json.loads(world.run("tx", "ls", "--pending", "--json"))
    tx = next(t for t in shown if t["tx_id"] == tx_id)
    # JSON carries the exact stored value (json.dumps escapes the control characters)
    assert tx["args"]["url"] == SPOOF_URL
    assert tx["args"]["secrets"]["password"].startswith(f"<secret: {len(NEW_PASSWORD)} chars")


async def _hostile_request(w: World) -> str:
    """A request from a session with a hostile label and client name, with a spoofing
    justification: its id."""
    token = w.delegate("read", label=HOSTILE_LABEL)
    async with shim(w, token, HOSTILE_CLIENT) as client:
        return await request_access(client, "proddb", SPOOF_WHY, 60)


@pytest.mark.anyio
async def test_a_justification_cannot_rewrite_what_request_ls_and_watch_show(world: World) -> None:
    rid = await _hostile_request(world)
    out = world.run("request", "ls", "--pending")
    assert rid in out and not control_chars(out), out
    line = next(ln for ln in out.splitlines() if ln.startswith(rid))
    assert "proddb" in line and "60 min" in line
    assert "\\x1b[1A" in out and "\\u202e" in out
    # `watch` prints through the same renderer: read its first request, then stop it
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "request", "watch", "--password-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=clean_env(world.home),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(PASSWORD.encode() + b"\n")
        proc.stdin.close()
        seen = b""
        while b"why:" not in seen:
            line_b = proc.stdout.readline()
            assert line_b, "watch ended before showing a request"
            seen += line_b
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not control_chars(seen.decode()), seen


@pytest.mark.anyio
async def test_notifications_and_webhooks_carry_no_control_characters(world: World) -> None:
    rid = await _hostile_request(world)
    deadline = time.monotonic() + 20
    while not world.hook.payloads(rid) or rid not in _notified(world):
        assert time.monotonic() < deadline, "no webhook or desktop notification arrived"
        time.sleep(0.05)
    for doc in world.hook.payloads(rid):
        for text in _strings(doc):
            assert not control_chars(text.replace("\n", " ")), text
        assert "\\x1b" in doc["apm"]["justification"]
        # Slack-style markup in an agent's words neither pings a channel nor hides a link
        assert "<!channel>" not in doc["text"] and "&lt;!channel&gt;" in doc["text"]
        assert "<https://evil" not in doc["text"]
    for argv in (json.loads(ln) for ln in _notified(world).splitlines() if rid in ln):
        for arg in argv:
            assert not control_chars(arg.replace("\n", " ")), arg


def _notified(w: World) -> str:
    return w.notified.read_text() if w.notified.exists() else ""


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.anyio
async def test_session_listings_and_the_audit_log_escape_labels_and_client_names(
    world: World,
) -> None:
    token = world.delegate("read", label=HOSTILE_LABEL)
    async with shim(world, token, HOSTILE_CLIENT) as client:
        await client.call_tool("list_entries", {})
    sessions = json.loads(world.run("session", "ls", "--json"))
    accessor = next(s["accessor"] for s in sessions if s["label"] == HOSTILE_LABEL)
    for args in (
        ("session", "ls"),
        ("session", "show", accessor),
        ("session", "why", accessor),
        ("audit",),
        ("audit", "--json"),
        ("session", "ls", "--json"),
    ):
        out = world.run(*args)
        assert not control_chars(out), (args, out)
    assert "\\x1b]0;owned\\x07\\x9b2J\\u2028fake" in world.run("session", "show", accessor)
    assert "\\x1b[8mhidden" in world.run("audit")


def test_session_why_escapes_a_hostile_process_name_in_the_ancestry_it_shows(
    world: World, tmp_path: Path
) -> None:
    # a process name is whatever its executable's file is called: here, an escape sequence
    hostile_dir = tmp_path / "bin"
    hostile_dir.mkdir()
    hostile = hostile_dir / "ev\x1b[2Jil"
    hostile.symlink_to(SHIM)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        res = world.wire(
            "session.create",
            {"scope": "read", "ttl_seconds": 3600, "label": "bound", "pid": bystander.pid},
        )
        register_secret(res["token"])
        accessor = res["session"]["accessor"]
        env = clean_env(world.home, APM_EPHEMERAL_ID=res["token"])
        shim_proc = subprocess.Popen(
            [str(hostile)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        try:
            assert shim_proc.stdin is not None and shim_proc.stdout is not None
            shim_proc.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
            shim_proc.stdin.flush()
            assert shim_proc.stdout.readline()  # answered: the broker has refused the binding
        finally:
            shim_proc.kill()
            shim_proc.wait()
            for s in (shim_proc.stdin, shim_proc.stdout):
                if s is not None:
                    s.close()
    finally:
        bystander.kill()
        bystander.wait()
    out = world.run("session", "why", accessor)
    assert "ancestry:" in out and not control_chars(out), out
    assert "ev\\x1b[2Jil" in out


@pytest.mark.anyio
async def test_entries_an_agent_wrote_are_escaped_in_apm_ls_and_show(world: World) -> None:
    name = "hostile-entry"  # names must be printable (the vault refuses others)
    token = world.delegate("write", label="writer")
    async with shim(world, token) as client:
        args = {
            "type": "login",
            "name": name,
            "url": SPOOF_URL,
            "notes": "fine\x1b[1A\x1b[2Kapproved by security",
            "fields": {"username": "root\x9b2J"},
            "secrets": {"password": NEW_PASSWORD},
        }
        tx = ok_of(await client.call_tool("add_entry", args))["tx_id"]
        done = ok_of(await client.call_tool("add_entry", {"tx_id": tx, "approve": True}))
        assert done["status"] == "committed"
    for argv in (("ls",), ("show", name), ("ls", "--json"), ("show", name, "--json")):
        out = world.run(*argv)
        assert not control_chars(out), (argv, out)
    shown = world.run("show", name)
    assert "root\\x9b2J" in shown and "github.com\\x1b[2K" in shown
    assert "\\x1b[1A\\x1b[2Kapproved" in shown


@pytest.mark.anyio
async def test_the_elicitation_prompt_is_escaped_and_shows_the_stored_arguments(
    world: World,
) -> None:
    token = world.delegate("write", label=HOSTILE_LABEL, approve="client")
    seen: list[str] = []

    async def respond(ctx: Any, params: Any) -> mt.ElicitResult:
        seen.append(params.message)
        return mt.ElicitResult(action="decline")

    params = StdioServerParameters(
        command=str(SHIM), args=[], env={"APM_HOME": str(world.home), "APM_EPHEMERAL_ID": token}
    )
    with unwrapped():
        async with Client(
            params, mode="legacy", read_timeout_seconds=CALL_TIMEOUT, elicitation_callback=respond
        ) as client:
            args = {"entry": "github", "url": SPOOF_URL, "secrets": {"password": NEW_PASSWORD}}
            tx = ok_of(await client.call_tool("edit_entry", args))["tx_id"]
            refused = await client.call_tool("edit_entry", {"tx_id": tx, "approve": True})
    assert refused.is_error
    assert len(seen) == 1
    message = seen[0]
    assert not control_chars(message), message
    assert NEW_PASSWORD not in message
    assert "runs entry.edit with:" in message and "\\x1b[2K" in message
    assert f"password: <secret: {len(NEW_PASSWORD)} chars, fp " in message
