"""MCP over streamable HTTP (`apm broker run --http 127.0.0.1:PORT`), end to end.

A real broker serves /mcp on a free loopback port; the SDK's HTTP client sends
`Authorization: Bearer eps_…` and lists and calls tools in both protocol eras. Raw HTTP
requests check the refusals: no or unknown token (401), a foreign Host (421) or Origin (403).
Session checks over HTTP: pid bindings resolved from the process owning the loopback
connection, a locked vault, a revoked session. Start-up refuses a non-loopback address unless
--allow-remote comes with a TLS certificate and key.

Tests that only read share one broker (`world`); tests that lock or revoke restore what they
change. Waits poll with a deadline; none sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx2
import pytest
from mcp import Client
from mcp import types as mt
from mcp.client.streamable_http import streamable_http_client

from broker.server import mcp_tools

from .conftest import PY, Apm, Broker, clean_env, make_home
from .mcp_client import error_body, unwrapped

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE = ROOT / "scripts" / "conformance.sh"
# the suite's server scenarios that apply to the broker, per protocol era (docs/conformance.md)
CONFORMANCE_APPLICABLE = {
    "2025-11-25": {
        "server-initialize",
        "ping",
        "tools-list",
        "tools-call-error",
        "dns-rebinding-protection",
        "server-sse-multiple-streams",
    },
    "2026-07-28": {
        "server-stateless",
        "tools-list",
        "tools-call-error",
        "dns-rebinding-protection",
        "server-sse-multiple-streams",
    },
}

pytestmark = pytest.mark.slow

MODES = ("legacy", "auto")
CALL_TIMEOUT = 20.0
SECRET = "http-Secret-4471-unique"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw-http-test", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int,
    what: str = "the HTTP listener",
    timeout: float = 15,
    proc: subprocess.Popen[str] | None = None,
) -> None:
    """Until 127.0.0.1:`port` accepts a connection (and `proc`, if given, is still running)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc is None or proc.poll() is None, f"{what} exited"
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.05)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class HttpBroker(Broker):
    """A real broker started as `apm broker run --http 127.0.0.1:PORT`."""

    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def argv(self) -> list[str]:
        return [
            *(PY, "-m", "broker.cli.main", "broker", "run", "--log-level", "debug"),
            *("--http", f"127.0.0.1:{self.port}"),
        ]

    def start(self, wait: bool = True) -> Self:
        super().start(wait)
        if wait:
            wait_listening(self.port)
        return self


@dataclass
class World:
    home: Path
    apm: Apm
    broker: HttpBroker

    def delegate(self, *args: str) -> tuple[str, str]:
        """A fresh session: (token, accessor)."""
        out = json.loads(self.apm.ok("delegate", "--ttl", "1h", "--json", *args).stdout)
        return out["token"], out["accessor"]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = make_home()
    broker = HttpBroker(home).start()
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        apm.ok(
            *("add", "login", "github", "--field", "username=octo", "--from-stdin"),
            stdin=SECRET + "\n",
        )
        yield World(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def read_token(world: World) -> str:
    return world.delegate("--scope", "read")[0]


@contextlib.asynccontextmanager
async def http_client(url: str, token: str, mode: str = "legacy") -> AsyncIterator[Client]:
    """The SDK's streamable-HTTP client with a Bearer header; a failure comes out unwrapped."""
    headers = {"Authorization": f"Bearer {token}"}
    with unwrapped():
        async with (
            httpx2.AsyncClient(headers=headers, timeout=CALL_TIMEOUT) as hc,
            Client(streamable_http_client(url, http_client=hc), mode=mode) as client,
        ):
            yield client


def code_of(result: mt.CallToolResult) -> str:
    """ "OK", or the code of a tool error."""
    if not result.is_error:
        return "OK"
    return str(error_body(result)["code"])


def hit_names(result: mt.CallToolResult) -> set[str]:
    body = result.structured_content
    assert isinstance(body, dict), result
    return {h["entry"]["name"] for h in body["hits"]}


async def tool_names(client: Client) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


def raw_post(url: str, headers: dict[str, str]) -> httpx2.Response:
    """One initialize POST, without the SDK, so the status and headers can be read."""
    return httpx2.post(url, headers={**MCP_HEADERS, **headers}, json=INIT, timeout=CALL_TIMEOUT)


# ------------------------------------------------------------------------------------------ tools


@pytest.mark.anyio
async def test_a_bearer_session_lists_its_tools_and_searches_over_http_in_both_eras(
    world: World, read_token: str, mode: str
) -> None:
    expected = {t.name for t in mcp_tools.tools_for("read", False)}
    async with http_client(world.broker.url, read_token, mode) as client:
        assert await tool_names(client) == expected
        result = await client.call_tool("search_entries", {"query": "git"})
    assert code_of(result) == "OK"
    assert hit_names(result) == {"github"}
    assert SECRET not in result.model_dump_json(by_alias=True)


@pytest.mark.anyio
async def test_a_read_session_over_http_gets_a_permission_error_for_secrets(
    world: World, read_token: str
) -> None:
    async with http_client(world.broker.url, read_token) as client:
        result = await client.call_tool("decrypt_entry", {"entry": "github"})
    assert code_of(result) == "PERMISSION_DENIED"
    assert SECRET not in result.model_dump_json(by_alias=True)


# ----------------------------------------------------------------------------- HTTP refusals


def test_a_request_with_a_valid_token_host_and_origin_is_served(
    world: World, read_token: str
) -> None:
    """The positive control for the refusals below: same request, everything right."""
    r = raw_post(
        world.broker.url,
        {
            "Authorization": f"Bearer {read_token}",
            "Origin": f"http://127.0.0.1:{world.broker.port}",
        },
    )
    assert r.status_code == 200, r.text


def test_a_request_without_a_token_gets_401_with_a_bearer_challenge(world: World) -> None:
    r = raw_post(world.broker.url, {})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")


def test_a_request_with_an_unknown_token_gets_401(world: World) -> None:
    r = raw_post(world.broker.url, {"Authorization": f"Bearer eps_{secrets.token_urlsafe(32)}"})
    assert r.status_code == 401
    assert "invalid_token" in r.headers["WWW-Authenticate"]


def test_the_401_points_to_metadata_that_says_bearer_tokens_only_and_no_oauth(
    world: World,
) -> None:
    """#13.14: the challenge used to name this listener as an OAuth authorization server, which
    has no /.well-known/oauth-authorization-server, so OAuth clients started a dead-end flow."""
    base = f"http://127.0.0.1:{world.broker.port}"
    challenge = raw_post(world.broker.url, {}).headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge  # RFC 6750: no error code when no token was sent
    assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"' in challenge
    for path in (
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ):
        r = httpx2.get(base + path, timeout=CALL_TIMEOUT)
        assert r.status_code == 200, path
        doc = r.json()
        assert doc["resource"] == world.broker.url
        assert doc["bearer_methods_supported"] == ["header"]
        assert "authorization_servers" not in doc
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        assert httpx2.get(base + path, timeout=CALL_TIMEOUT).status_code == 404, path


def test_a_request_naming_a_foreign_host_gets_421(world: World, read_token: str) -> None:
    r = raw_post(
        world.broker.url,
        {"Authorization": f"Bearer {read_token}", "Host": f"evil.example:{world.broker.port}"},
    )
    assert r.status_code == 421


def test_a_request_from_a_foreign_origin_gets_403(world: World, read_token: str) -> None:
    r = raw_post(
        world.broker.url,
        {"Authorization": f"Bearer {read_token}", "Origin": "http://evil.example"},
    )
    assert r.status_code == 403


# ---------------------------------------------------------------------------- session checks


@pytest.mark.anyio
async def test_a_session_bound_to_the_test_process_works_from_it_over_http(
    world: World,
) -> None:
    token, _ = world.delegate("--scope", "read", "--pid", str(os.getpid()))
    async with http_client(world.broker.url, token) as client:
        assert "search_entries" in await tool_names(client)
        result = await client.call_tool("search_entries", {"query": "git"})
    assert code_of(result) == "OK"
    assert hit_names(result) == {"github"}


@pytest.mark.anyio
async def test_a_session_bound_to_another_process_tree_is_refused_over_http(
    world: World,
) -> None:
    sibling = subprocess.Popen(["sleep", "600"])
    try:
        token, accessor = world.delegate("--scope", "read", "--pid", str(sibling.pid))
        async with http_client(world.broker.url, token) as client:
            assert await tool_names(client) == {"apm_status"}
            result = await client.call_tool("search_entries", {"query": "git"})
    finally:
        sibling.kill()
        sibling.wait()
    assert code_of(result) == "SESSION_REQUIRED"
    assert "github" not in result.model_dump_json(by_alias=True)
    # the peer was resolved from the loopback connection: this test process
    denial = json.loads(world.apm.ok("session", "why", accessor, "--json").stdout)["denials"][-1]
    assert denial["peer_pid"] == os.getpid()
    assert denial["reason"].startswith("pid binding")


def test_with_the_vault_locked_any_bearer_gets_503_with_the_unlock_hint_and_no_session(
    world: World, read_token: str
) -> None:
    """The attack (#13.4): while locked, any bearer string opened an MCP session, and 1,000 of
    them stayed in memory. Now nothing is allocated before the token is verified."""
    world.apm.ok("lock", password=None)
    try:
        answers = [
            raw_post(world.broker.url, {"Authorization": f"Bearer {token}"})
            for token in [read_token] + [f"eps_{secrets.token_urlsafe(32)}" for _ in range(20)]
        ]
    finally:
        world.apm.ok("unlock")
    for r in answers:
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert "mcp-session-id" not in r.headers
        body = r.json()
        assert body["code"] == "VAULT_LOCKED"
        assert "apm unlock" in body["hint"]
    # unlocked again: the same token is served
    ok = raw_post(world.broker.url, {"Authorization": f"Bearer {read_token}"})
    assert ok.status_code == 200


@pytest.mark.anyio
async def test_revoking_a_session_makes_its_next_http_call_fail(world: World) -> None:
    token, accessor = world.delegate("--scope", "read")
    refused: BaseException | None = None
    async with http_client(world.broker.url, token) as client:
        first = await client.call_tool("search_entries", {"query": "git"})
        world.apm.ok("session", "revoke", accessor, password=None)
        try:  # revoked: refused at HTTP authentication (401), before any tool runs
            after = await client.call_tool("search_entries", {"query": "git"})
        except Exception as exc:  # the SDK surfaces the 401 as an error
            refused = exc
    assert code_of(first) == "OK"
    assert refused is not None, f"a revoked session was served: {after}"
    # and at the HTTP layer it is exactly an authentication refusal
    assert raw_post(world.broker.url, {"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_revoked_token_is_refused_at_http_authentication_like_an_unknown_one(
    world: World,
) -> None:
    token, accessor = world.delegate("--scope", "read")
    world.apm.ok("session", "revoke", accessor, password=None)
    assert raw_post(world.broker.url, {"Authorization": f"Bearer {token}"}).status_code == 401


# ----------------------------------------------------------------------------------- start-up


def test_the_http_listener_can_be_set_in_config_toml(home: Path) -> None:
    port = free_port()
    (home / "config").mkdir(mode=0o700)
    (home / "config" / "config.toml").write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
    broker = Broker(home).start()
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError, httpx2.TransportError):
                r = httpx2.post(f"http://127.0.0.1:{port}/mcp", timeout=5)
                break
            assert time.monotonic() < deadline, "no HTTP listener from config.toml"
            time.sleep(0.05)
        # no vault yet, so locked: the listener answers, naming the fix
        assert r.status_code == 503
        assert r.json()["code"] == "VAULT_LOCKED"
    finally:
        assert broker.stop() == 0


ENTRY_POINTS = {
    "apm broker run": [PY, "-m", "broker.cli.main", "broker", "run"],
    "apm-broker": [PY, "-m", "broker.server.daemon"],
}


@pytest.fixture(params=sorted(ENTRY_POINTS))
def entry_point(request: pytest.FixtureRequest) -> list[str]:
    return ENTRY_POINTS[str(request.param)]


def _refused_start(
    home: Path, *args: str, entry: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(entry or ENTRY_POINTS["apm broker run"]), *args],
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_non_loopback_http_address_without_allow_remote_is_refused_at_start(
    home: Path, entry_point: list[str]
) -> None:
    port = free_port()
    r = _refused_start(home, "--http", f"0.0.0.0:{port}", entry=entry_point)
    assert r.returncode == 10, r.stderr
    assert "0.0.0.0 is not a loopback address" in r.stderr
    assert "--allow-remote" in r.stderr
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        pass


def test_allow_remote_without_a_tls_certificate_and_key_is_refused_at_start(
    home: Path, entry_point: list[str]
) -> None:
    port = free_port()
    r = _refused_start(home, "--http", f"0.0.0.0:{port}", "--allow-remote", entry=entry_point)
    assert r.returncode == 10, r.stderr
    assert "--allow-remote needs --tls-cert and --tls-key" in r.stderr


def test_a_refused_http_address_leaves_no_socket_file_behind(home: Path) -> None:
    r = _refused_start(home, "--http", f"0.0.0.0:{free_port()}")
    assert r.returncode == 10
    assert not (home / "run" / "broker.sock").exists()


# -------------------------------------------------------------------------------- conformance


def run_conformance(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CONFORMANCE), "--json-out", str(out)],
        env={**os.environ, "PYTHON": PY, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_the_applicable_mcp_conformance_scenarios_pass_over_http_in_both_eras(
    tmp_path: Path,
) -> None:
    out = tmp_path / "conformance.json"
    r = run_conformance(out)
    if r.returncode == 77:
        pytest.skip(f"MCP conformance suite not run: {json.loads(out.read_text())['skipped']}")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    eras = json.loads(out.read_text())["eras"]
    assert set(eras) == set(CONFORMANCE_APPLICABLE)
    for era, expected in CONFORMANCE_APPLICABLE.items():
        summary = eras[era]
        assert set(summary["applicable_passed"]) == expected, (era, summary)
        assert summary["applicable_failed"] == summary["applicable_missing"] == [], era


def test_the_conformance_script_skips_with_a_reason_when_the_npm_registry_is_unreachable(
    tmp_path: Path,
) -> None:
    out = tmp_path / "conformance.json"
    r = run_conformance(
        out,
        APM_CONFORMANCE_CACHE=str(tmp_path / "empty-cache"),
        npm_config_registry=f"http://127.0.0.1:{free_port()}/",
        npm_config_fetch_retries="0",
    )
    assert r.returncode == 77, r.stderr
    reason = json.loads(out.read_text())["skipped"]
    assert "npm registry" in reason
    assert "SKIP" in r.stderr
