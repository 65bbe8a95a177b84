"""Plugins: the apm.plugins entry-point group, `apm plugin ls|enable|disable`, and the
`install_plugin` MCP tool, which always needs the owner whatever the session's policy.

A real distribution is installed for the test the way pip lays one out: a module and its
`*.dist-info` (METADATA, entry_points.txt) on the path of the CLI and the broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PASSWORD, Apm, Broker
from .mcp_client import error_of, ok_of, shim_client
from .plugin_world import plugin_world

PLUGIN = """
from broker.cli.importers import Loaded, Record


def load(path, ctx):
    out = Loaded()
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        out.records.append(Record(name=name, kind="api_key", password=value))
    return out
"""


def install_demo(site: Path) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "apm_demo_plugin.py").write_text(PLUGIN)
    (site / "apm_broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    info = site / "apm_demo_plugin-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: apm-demo-plugin\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text(
        "[apm.plugins]\n"
        "importer.demo = apm_demo_plugin:load\n"
        "importer.broken = apm_broken_plugin:load\n"
    )
    (info / "RECORD").write_text("")
    nothing = site / "apm_plain-1.0.dist-info"
    nothing.mkdir()
    (nothing / "METADATA").write_text("Metadata-Version: 2.1\nName: apm-plain\nVersion: 1.0\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    s = tmp_path / "site"
    install_demo(s)
    return s


def test_plugin_ls_enable_disable_and_a_disabled_plugin_never_runs(
    vault: Broker, apm: Apm, site: Path, tmp_path: Path
) -> None:
    apm.env["PYTHONPATH"] = str(site)
    rows = {r["name"]: r for r in json.loads(apm("plugin", "ls", "--json", check=True).stdout)}
    assert rows["importer.keepass"]["state"] == "built-in"
    assert rows["importer.demo"] == {
        "name": "importer.demo",
        "kind": "importer",
        "distribution": "apm-demo-plugin",
        "target": "apm_demo_plugin:load",
        "state": "disabled",
    }
    data = tmp_path / "demo.txt"
    data.write_text("alpha=plugin-s3cret-1\n")
    refused = apm("import", "demo", str(data), "--dry-run")
    assert refused.returncode == 10 and "not enabled" in refused.stderr
    wrong = apm("plugin", "enable", "apm-demo-plugin", password="not the password")
    assert wrong.returncode == 4
    assert json.loads(apm("plugin", "ls", "--json", check=True).stdout)[0]["state"] != "enabled"
    assert not (apm.home / "config" / "plugins.json").exists()
    apm.ok("plugin", "enable", "apm-demo-plugin")
    assert oct((apm.home / "config" / "plugins.json").stat().st_mode & 0o777) == "0o600"
    rows = {r["name"]: r for r in json.loads(apm("plugin", "ls", "--json", check=True).stdout)}
    assert rows["importer.demo"]["state"] == "enabled"
    done = apm.ok("import", "demo", str(data), "--json")
    assert json.loads(done.stdout)["added"] == ["alpha"]
    assert apm.ok("get", "alpha").stdout == "plugin-s3cret-1\n"
    broken = apm("import", "broken", str(data), "--dry-run")
    assert broken.returncode == 10
    assert "failed to load" in broken.stderr and "Traceback" not in broken.stderr
    off = apm("plugin", "disable", "importer.demo")  # no password needed to be safer
    assert off.returncode == 0
    assert apm("import", "demo", str(data), "--dry-run").returncode == 10
    unknown = apm("plugin", "enable", "no-such-dist", password=PASSWORD)
    assert unknown.returncode == 6


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Apm, Broker, Path]]:
    site = tmp_path / "site"
    install_demo(site)
    with plugin_world(site) as w:
        yield w


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["agent", "client", "owner"])
async def test_install_plugin_is_two_phase_and_needs_the_owner_in_every_policy(
    world: tuple[Apm, Broker, Path], policy: str
) -> None:
    apm, _, home = world
    token = json.loads(
        apm.ok("delegate", "--json", "--scope", "write", "--approve", policy).stdout
    )["token"]
    async with shim_client(home, token, "legacy", 30.0) as client:
        shown = ok_of(await client.call_tool("install_plugin", {"distribution": "apm-demo-plugin"}))
        assert shown["status"] == "pending" and shown["policy"] == "owner"
        assert "importer.demo -> apm_demo_plugin:load" in shown["preview"]
        assert "apm-demo-plugin 0.3.0" in shown["preview"]
        tx = shown["tx_id"]
        waiting = ok_of(await client.call_tool("install_plugin", {"tx_id": tx, "approve": True}))
        assert waiting["status"] == "pending_owner_approval"
        assert not (home / "config" / "plugins.json").exists()
        assert apm("tx", "approve", tx, password="not the password").returncode == 4
        apm.ok("tx", "approve", tx)
        done = ok_of(await client.call_tool("install_plugin", {"tx_id": tx, "approve": True}))
        assert done["status"] == "committed" and done["receipt"].startswith("rcpt_")
    enabled = json.loads((home / "config" / "plugins.json").read_text())["enabled"]
    assert enabled == ["importer.broken", "importer.demo"]
    rows = {
        r["name"]: r["state"] for r in json.loads(apm("plugin", "ls", "--json", check=True).stdout)
    }
    assert rows["importer.demo"] == "enabled"


@pytest.mark.slow
@pytest.mark.anyio
async def test_install_plugin_refuses_what_is_not_installed_or_not_a_plugin_or_built_in(
    world: tuple[Apm, Broker, Path],
) -> None:
    apm, _, home = world
    token = json.loads(apm.ok("delegate", "--json", "--scope", "write").stdout)["token"]
    read_token = json.loads(apm.ok("delegate", "--json", "--scope", "read").stdout)["token"]
    async with shim_client(home, token, "legacy", 30.0) as client:
        for dist, code in (
            ("left-pad-from-the-internet", "ENTRY_NOT_FOUND"),
            ("apm-plain", "INVALID_PARAMETERS"),
            ("apm-broker", "INVALID_PARAMETERS"),
        ):
            got = error_of(await client.call_tool("install_plugin", {"distribution": dist}))
            assert got["code"] == code, dist
    async with shim_client(home, read_token, "legacy", 30.0) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "install_plugin" not in names
    assert not (home / "config" / "plugins.json").exists()


NOTIFY = """
import json, os


def record(title, body, payload):
    with open(os.environ["APM_TEST_NOTIFY_FILE"], "a") as f:
        f.write(json.dumps(payload) + "\\n")


def explode(title, body, payload):
    raise SystemExit(3)
"""


@pytest.fixture
def notify_world(tmp_path: Path) -> Iterator[tuple[Apm, Broker, Path, Path]]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "apm_demo_notify.py").write_text(NOTIFY)
    (site / "apm_broken_notify.py").write_text("import sys\nsys.exit('no')\n")
    info = site / "apm_demo_notify-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: apm-demo-notify\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[apm.plugins]\n"
        "notifier.record = apm_demo_notify:record\n"
        "notifier.exploding = apm_demo_notify:explode\n"
        "notifier.loadfail = apm_broken_notify:notify\n"
    )
    out = tmp_path / "notified.jsonl"
    env = {"APM_TEST_NOTIFY_FILE": str(out)}
    with plugin_world(site, env, "[notify]\ndesktop = false\n") as (apm, broker, home):
        yield apm, broker, home, out


async def _ask(home: Path, token: str) -> str:
    args = {"entry": "db", "duration_minutes": 5, "justification": "run the nightly job"}
    async with shim_client(home, token, "legacy", 30.0) as client:
        body = ok_of(await client.call_tool("request_access", args))
    return str(body["request_id"])


@pytest.mark.slow
@pytest.mark.anyio
async def test_an_enabled_notifier_plugin_runs_in_the_broker_and_a_failing_one_cannot_stop_it(
    notify_world: tuple[Apm, Broker, Path, Path],
) -> None:
    import time

    apm, broker, home, out = notify_world
    apm.ok("add", "api_key", "db", "--from-stdin", stdin="notify-s3cret-9\n")
    token = json.loads(apm.ok("delegate", "--json", "--scope", "read").stdout)["token"]
    before = await _ask(home, token)  # no plugin enabled yet: nothing runs
    apm.ok("plugin", "enable", "apm-demo-notify")
    after = await _ask(home, token)
    deadline = time.monotonic() + 30
    while not (out.exists() and after in out.read_text()):
        assert time.monotonic() < deadline, broker.output()[-2000:]
        time.sleep(0.1)
    payloads = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["request_id"] for p in payloads] == [after]
    assert payloads[0]["entry"] == "db" and "notify-s3cret-9" not in out.read_text()
    assert before != after
    # the exploding and unloadable plugins were caught and named; the broker still serves
    deadline = time.monotonic() + 30
    while "notifier.exploding failed: SystemExit" not in broker.output():
        assert time.monotonic() < deadline, broker.output()[-2000:]
        time.sleep(0.1)
    assert "notifier.loadfail failed to load (SystemExit)" in broker.output()
    assert broker.proc is not None and broker.proc.poll() is None
    assert apm("status", "--json").returncode == 0
    apm("plugin", "disable", "apm-demo-notify", check=True)
    third = await _ask(home, token)
    apm.ok("plugin", "enable", "notifier.record")
    fourth = await _ask(home, token)
    deadline = time.monotonic() + 30
    while fourth not in out.read_text():  # delivered in order: the third's turn came first
        assert time.monotonic() < deadline, broker.output()[-2000:]
        time.sleep(0.1)
    assert third not in out.read_text()
