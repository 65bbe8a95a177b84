"""The approval page without a browser: where it is served (its own loopback port, or the
loopback HTTP listener), what a locked vault shows, and that another local user's connection is
reset before the page is read (a real other uid, created with useradd; we run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from broker.wire.errors import ApmError

from .conftest import Apm, Broker, make_home
from .test_approve_page_browser import VALUE, World, csrf_of, origin_of, post
from .test_http_identity import ATTACKER_USER, ensure_user

pytestmark = pytest.mark.slow


def held(world: World, name: str) -> tuple[str, str]:
    token = world.session()
    return world.held_add(token, name, VALUE)


@pytest.fixture
def http_world() -> Iterator[tuple[World, int]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    home = make_home()
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_text(f'[http]\nlisten = "127.0.0.1:{port}"\n')
    broker = Broker(home)
    apm = Apm(home)
    try:
        broker.start()
        apm.ok("init", "--profile", "interactive")
        yield World(home, apm, broker), port
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def page_world() -> Iterator[World]:
    home = make_home()
    broker = Broker(home)
    apm = Apm(home)
    try:
        broker.start()
        apm.ok("init", "--profile", "interactive")
        yield World(home, apm, broker)
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_with_a_loopback_http_listener_the_page_shares_its_port(
    http_world: tuple[World, int],
) -> None:
    world, port = http_world
    _, url = held(world, "on-the-listener")
    assert url.startswith(f"http://localhost:{port}/approve/")
    status, body = post(
        url,
        {"decision": "approve", "password": "correct horse battery staple", "csrf": csrf_of(url)},
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
    fields = {"decision": "approve", "password": "correct horse battery staple", "csrf": csrf}
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
        user=attacker.pw_name,
        group=attacker.pw_gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
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
