"""The approval page without a browser: where it is served (its own loopback port, or the
loopback HTTP listener), what a locked vault shows, and that another local user's connection is
reset before the page is read (a real other uid, created with useradd; we run as root).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker.server.page_server import PageServer
from broker.wire.errors import ApmError

from .other_uid import PLAIN_ENV, as_user, ensure_user
from .test_approve_page_browser import VALUE, World, csrf_of, origin_of, post, started_world
from .test_http import free_port
from .test_http_identity import ATTACKER_USER
from .test_requests import PASSWORD, FakeNotifier, Twin, twin_state
from .twin import Clock

pytestmark = pytest.mark.slow


def held(world: World, name: str) -> tuple[str, str]:
    token = world.session()
    return world.held_add(token, name, VALUE)


@pytest.fixture
def http_world() -> Iterator[tuple[World, int]]:
    port = free_port()
    with started_world(f'[http]\nlisten = "127.0.0.1:{port}"\n') as world:
        yield world, port


@pytest.fixture
def page_world() -> Iterator[World]:
    with started_world() as world:
        yield world


def test_with_a_loopback_http_listener_the_page_shares_its_port(
    http_world: tuple[World, int],
) -> None:
    world, port = http_world
    _, url = held(world, "on-the-listener")
    assert url.startswith(f"http://localhost:{port}/approve/")
    status, body = post(
        url,
        {"decision": "approve", "password": PASSWORD, "csrf": csrf_of(url)},
        origin_of(url),
    )
    assert status == 200, body
    assert "on-the-listener" in world.names()
    # MCP on the same listener still wants its bearer token
    req = urllib.request.Request(f"http://127.0.0.1:{port}/mcp", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310
    with refused.value:
        assert refused.value.code == 401


def test_a_locked_vault_shows_the_page_as_locked_and_decides_nothing(page_world: World) -> None:
    world = page_world
    _, url = held(world, "while-locked")
    csrf = csrf_of(url)
    world.apm.ok("lock", password=None)
    with pytest.raises(urllib.error.HTTPError) as closed:
        urllib.request.urlopen(url, timeout=10)  # noqa: S310
    with closed.value:
        assert closed.value.code == 410
        assert "locked" in closed.value.read().decode()
    fields = {"decision": "approve", "password": PASSWORD, "csrf": csrf}
    assert post(url, fields, origin_of(url))[0] == 410
    world.apm.ok("unlock")
    assert "while-locked" not in world.names()


def test_another_local_user_cannot_read_the_page(page_world: World) -> None:
    if os.getuid() != 0:
        pytest.fail("this test needs root (useradd, another uid); CI runs it as root")
    attacker = ensure_user(ATTACKER_USER)
    _, url = held(page_world, "other-uid-target")
    script = (
        "import json, sys, urllib.request\n"
        "try:\n"
        f"    body = urllib.request.urlopen({url!r}, timeout=10).read().decode()\n"
        "    print(json.dumps({'body': body}))\n"
        "except Exception as exc:\n"
        "    print(json.dumps({'error': type(exc).__name__}))\n"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-c", script],
        env=PLAIN_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        **as_user(attacker),
    )
    got = json.loads(out.stdout)
    assert "error" in got, got  # reset at accept: no page, no CSRF token
    assert "csrf" not in out.stdout
    # control: our own uid reads it
    assert csrf_of(url)


def test_a_session_token_cannot_fetch_links_to_approve_or_register(page_world: World) -> None:
    world = page_world
    token = SecretStr(world.session(approve="agent", scope="admin"))
    with pytest.raises(ApmError) as refused:
        world.wire("passkey.begin", {}, token=token)
    assert refused.value.code == "PERMISSION_DENIED"
    tx_id, _ = held(world, "session-approves")
    with pytest.raises(ApmError) as refused:
        world.wire("tx.approve", {"tx_id": tx_id}, token=token)
    assert refused.value.code == "PERMISSION_DENIED"
    assert "session-approves" not in world.names()


def test_a_rebound_host_name_gets_no_page(page_world: World) -> None:
    """DNS rebinding: a web page on a name the attacker points at 127.0.0.1 sends its Host."""
    _, url = held(page_world, "rebound-target")
    req = urllib.request.Request(url, headers={"Host": "evil.example"})  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310
    with refused.value:
        assert refused.value.code == 421
        assert "csrf" not in refused.value.read().decode()


# ---------------------------------------------------------------------- expiry, in-process


def test_a_link_is_refused_once_its_item_expires_by_the_injected_clock(tmp_path: Path) -> None:
    """The page checks the item on every use: past the request's pending time (24 h) and the
    transaction's (15 min) the same link answers 410 and decides nothing. No sleeping: the
    broker's clock is a fake the test moves."""
    clock = Clock()
    with twin_state(tmp_path, clock) as state:
        loop = asyncio.new_event_loop()
        twin = Twin(state, loop, clock, PASSWORD, FakeNotifier())
        twin.add("expiring", {"key": VALUE})
        _, rec = twin.delegate("read")
        rid = twin.ask(rec, entry="expiring", access="use")

        async def get(url: str) -> int:
            rest = url.split("://", 1)[1]
            hostport, path = rest.split("/", 1)
            _host, port = hostport.split(":")
            reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
            writer.write(
                f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            writer.close()
            await writer.wait_closed()
            return status

        async def scenario() -> list[int]:
            server = PageServer(state)
            await server.start()
            try:
                url = state.links.url("request", rid)
                assert url is not None
                seen = [await get(url)]
                clock.advance(hours=24)
                seen.append(await get(url))
                return seen
            finally:
                await server.stop()

        try:
            assert loop.run_until_complete(scenario()) == [200, 410]
            assert state.requests().get(rid, None).status(clock()) == "expired"
        finally:
            loop.close()
