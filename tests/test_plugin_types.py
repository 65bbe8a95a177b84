"""Entry-type plugins (`entry_type.NAME` in the apm.plugins group): a real distribution, built
as a wheel and installed by pip into a directory on the path of the CLI and the broker.

Enabled, its type is honoured by `apm add`, `apm get|show|ls`, and the MCP add_entry tool, and
its own validation runs in the broker; disabled, adding one is PLUGIN_UNAVAILABLE naming the
plugin (entries already stored stay readable); one that raises at import, or describes no
type, is PLUGIN_UNAVAILABLE too and the broker keeps answering.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import plugin_registry as reg
from broker.plugin_state import write_enabled
from broker.wire.entries import ENTRY_TYPES
from broker.wire.errors import InvalidParameters, PluginUnavailable

from .conftest import PASSWORD, Apm, Broker, register_secret
from .mcp_client import error_of, ok_of, shim_client
from .plugin_world import plugin_world

DIST, VERSION = "apm-demo-types", "1.2.0"
TYPES = """
def check(fields, secrets):
    key = secrets.get("key")
    if key is not None and not key.startswith("xk_"):
        raise ValueError(f"the key {key} must start with xk_")
    if fields.get("region") not in (None, "eu", "us"):
        raise ValueError("region must be eu or us")


XKEY = {
    "fields": [
        {"name": "key", "secret": True, "required": True},
        {"name": "region"},
        {"name": "pin", "secret": True},
    ],
    "primary": "key",
    "validate": check,
}
NOT_A_TYPE = 42
NO_FIELDS = {"fields": []}
BAD_PRIMARY = {"fields": [{"name": "a", "secret": True}], "primary": "b"}
"""
ENTRY_POINTS = (
    "[apm.plugins]\n"
    "entry_type.xkey = apm_demo_types:XKEY\n"
    "entry_type.shapeless = apm_demo_types:NOT_A_TYPE\n"
    "entry_type.nofields = apm_demo_types:NO_FIELDS\n"
    "entry_type.badprimary = apm_demo_types:BAD_PRIMARY\n"
    "entry_type.boom = apm_boom_types:TYPE\n"
    "entry_type.quits = apm_quit_types:TYPE\n"
    "entry_type.hangs = apm_hang_types:TYPE\n"
    "entry_type.login = apm_demo_types:XKEY\n"  # cannot replace a built-in
)
KEY = "xk_live_Plugin-7781"
BAD_KEY = "sk_not_xk-4471"
register_secret(KEY)
register_secret(BAD_KEY)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(out: Path) -> Path:
    """A pure-Python wheel of the demo distribution, laid out as the wheel spec says."""
    info = f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    files = {
        "apm_demo_types.py": TYPES,
        "apm_boom_types.py": "raise RuntimeError('boom at import')\n",
        "apm_quit_types.py": "import sys\nsys.exit('no')\n",
        "apm_hang_types.py": "import threading\nthreading.Event().wait()\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: apm-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": ENTRY_POINTS,
    }
    record = "".join(
        f"{name},{_record_hash(text.encode())},{len(text.encode())}\n"
        for name, text in files.items()
    )
    files[f"{info}/RECORD"] = record + f"{info}/RECORD,,\n"
    wheel = out / f"{DIST.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def pip_install(tmp: Path) -> Path:
    site = tmp / "site"
    wheel = build_wheel(tmp)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
    cmd += ["--disable-pip-version-check", "--target", str(site), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    assert (site / f"apm_demo_types-{VERSION}.dist-info" / "INSTALLER").read_text() == "pip\n"
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install(tmp_path_factory.mktemp("plugin"))


# ---------------------------------------------------------------------- in process


@pytest.fixture
def local(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The distribution on this process's path, an empty APM_HOME, a fresh registry."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("APM_HOME", str(tmp_path))
    monkeypatch.setattr(reg, "_REGISTRY", reg._Registry())
    for mod in ("apm_demo_types", "apm_boom_types", "apm_quit_types", "apm_hang_types"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return tmp_path / "config" / "plugins.json"


def test_the_built_in_types_are_entry_points_of_the_group_resolving_to_their_specs() -> None:
    plugins = {p.name: p for p in reg.discover()}
    for name, spec in ENTRY_TYPES.items():
        plugin = plugins[f"entry_type.{name}"]
        assert plugin.builtin and plugin.dist == reg.BUILTIN_DIST
        assert reg.load_target(plugin) is spec
        assert reg.entry_type(name) is spec


def test_a_plugin_type_is_unknown_until_enabled_and_then_its_spec(local: Path) -> None:
    with pytest.raises(PluginUnavailable) as off:
        reg.entry_type("xkey")
    assert off.value.code == "PLUGIN_UNAVAILABLE"
    assert off.value.data == {
        "plugin": "entry_type.xkey",
        "distribution": DIST,
        "reason": "disabled",
    }
    assert "entry_type.xkey" in off.value.message and DIST in off.value.message
    assert "apm plugin enable entry_type.xkey" in (off.value.hint or "")
    with pytest.raises(InvalidParameters) as unknown:
        reg.entry_type("nosuchtype")
    assert unknown.value.code == "INVALID_PARAMETERS"
    write_enabled({"entry_type.xkey", "entry_type.login"}, local)
    spec = reg.entry_type("xkey")
    assert [(f.name, f.secret, f.required) for f in spec.fields] == [
        ("key", True, True),
        ("region", False, False),
        ("pin", True, False),
    ]
    assert spec.primary == "key"
    assert reg.entry_type("login") is ENTRY_TYPES["login"]  # a third party cannot replace it


@pytest.mark.parametrize(
    ("name", "reason", "words"),
    [
        ("boom", "failed", "failed to load: RuntimeError"),
        ("quits", "failed", "failed to load: SystemExit"),
        ("shapeless", "invalid", "does not describe an entry type: it is a int"),
        ("nofields", "invalid", '"fields" must be a non-empty list'),
        ("badprimary", "invalid", '"primary" names no field'),
    ],
)
def test_a_broken_plugin_is_plugin_unavailable_naming_it(
    local: Path, name: str, reason: str, words: str
) -> None:
    write_enabled({f"entry_type.{name}"}, local)
    for _ in range(2):  # remembered, and raised afresh each time
        with pytest.raises(PluginUnavailable) as err:
            reg.entry_type(name)
        assert (
            err.value.data["reason"] == reason and err.value.data["plugin"] == f"entry_type.{name}"
        )
        assert words in err.value.message
    assert reg.entry_type_or_none(name) is None


def test_a_plugin_that_never_finishes_loading_is_given_up_on(
    local: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reg, "PLUGIN_TIMEOUT", 0.2)  # its import waits forever, in a daemon
    write_enabled({"entry_type.hangs"}, local)
    with pytest.raises(PluginUnavailable) as err:
        reg.entry_type("hangs")
    assert "entry_type.hangs (apm-demo-types) did not finish loading" in err.value.message
    assert err.value.data["reason"] == "failed"


def test_the_plugins_validation_runs_and_its_message_never_shows_a_secret(local: Path) -> None:
    write_enabled({"entry_type.xkey"}, local)
    reg.check_values("xkey", {"region": "eu"}, {"key": KEY})
    with pytest.raises(InvalidParameters) as err:
        reg.check_values("xkey", {}, {"key": "wrong-Value-5512"})
    assert "refused the values" in err.value.message
    assert "wrong-Value-5512" not in err.value.message and "***" in err.value.message
    assert err.value.data == {"plugin": "entry_type.xkey", "type": "xkey"}
    with pytest.raises(InvalidParameters, match="region must be eu or us"):
        reg.check_values("xkey", {"region": "mars"}, {})


# ---------------------------------------------------------------------- a real broker


@pytest.fixture
def world(site: Path) -> Iterator[tuple[Apm, Broker, Path]]:
    with plugin_world(site) as w:
        yield w


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _add_args(name: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"type": "xkey", "name": name, "secrets": {"key": key}, **extra}


@pytest.mark.slow
@pytest.mark.anyio
async def test_an_enabled_entry_type_plugin_is_honoured_by_cli_and_mcp_and_disabling_it_is_clear(
    world: tuple[Apm, Broker, Path],
) -> None:
    apm, broker, home = world
    token = json.loads(apm.ok("delegate", "--json", "--scope", "write").stdout)["token"]

    # not enabled: the CLI and the broker both refuse, naming the plugin
    refused = apm("add", "xkey", "k0", "--from-stdin", stdin=KEY + "\n", password=PASSWORD)
    assert refused.returncode == 10
    assert "entry_type.xkey (apm-demo-types), which is not enabled" in refused.stderr
    assert "Traceback" not in refused.stderr
    async with shim_client(home, token, "legacy", 30.0) as client:
        got = error_of(await client.call_tool("add_entry", _add_args("k0", KEY)))
    assert got["code"] == "PLUGIN_UNAVAILABLE" and "entry_type.xkey" in got["message"]

    apm.ok("plugin", "enable", "apm-demo-types")
    rows = {r["name"]: r for r in json.loads(apm("plugin", "ls", "--json", check=True).stdout)}
    assert rows["entry_type.xkey"]["state"] == "enabled"
    assert rows["entry_type.login"]["state"] == "built-in"

    # enabled: apm add prompts for the type's secrets, the broker stores and validates them
    apm.ok("add", "xkey", "k1", "--field", "region=eu", "--from-stdin", stdin=KEY + "\n")
    assert apm.ok("get", "k1").stdout == KEY + "\n"  # the type's primary field
    shown = json.loads(apm.ok("show", "k1", "--json").stdout)
    assert shown["type"] == "xkey"
    assert shown["fields"]["key"] == {"secret": True, "value": None, "history": 0}
    assert shown["fields"]["region"] == {"secret": False, "value": "eu", "history": 0}
    listed = json.loads(apm.ok("ls", "--type", "xkey", "--json").stdout)
    assert [e["name"] for e in listed] == ["k1"]
    wrong = apm("add", "xkey", "k2", "--from-stdin", stdin="not-a-key-3310\n", password=PASSWORD)
    assert wrong.returncode == 10 and "refused the values" in wrong.stderr
    assert "not-a-key-3310" not in wrong.stderr
    plain = apm("add", "xkey", "k2", "--field", "key=x", "--from-stdin", stdin=KEY + "\n")
    assert plain.returncode == 10  # a secret field of the plugin's type is never in argv
    bad_field = apm("edit", "k1", "--field", "colour=red", password=PASSWORD)
    assert bad_field.returncode == 10 and "no field named 'colour'" in bad_field.stderr

    async with shim_client(home, token, "legacy", 30.0) as client:
        preview = ok_of(
            await client.call_tool("add_entry", _add_args("k3", KEY, fields={"region": "us"}))
        )
        assert "+ add xkey 'k3'" in preview["preview"]
        done = ok_of(
            await client.call_tool("add_entry", {"tx_id": preview["tx_id"], "approve": True})
        )
        assert done["status"] == "committed"
        # values are checked where they are stored: the commit runs the plugin's validation
        pv = ok_of(await client.call_tool("add_entry", _add_args("k4", BAD_KEY)))
        refused_value = error_of(
            await client.call_tool("add_entry", {"tx_id": pv["tx_id"], "approve": True})
        )
        assert refused_value["code"] == "INVALID_PARAMETERS", refused_value
        assert "refused the values" in refused_value["message"]
        assert BAD_KEY not in json.dumps(refused_value)
        listed_mcp = ok_of(await client.call_tool("list_entries", {"type": "xkey"}))
        assert sorted(e["name"] for e in listed_mcp["entries"]) == ["k1", "k3"]
        for name, reason, words in (
            ("boom", "failed", "failed to load: RuntimeError"),
            ("quits", "failed", "failed to load: SystemExit"),
            ("shapeless", "invalid", "does not describe an entry type"),
        ):
            got = error_of(
                await client.call_tool("add_entry", {"type": name, "name": "z", "secrets": {}})
            )
            assert got["code"] == "PLUGIN_UNAVAILABLE", got
            assert f"entry_type.{name}" in got["message"] and words in got["message"]
            assert got["data"]["reason"] == reason
        # the broker still answers, on MCP and on the CLI
        still = ok_of(await client.call_tool("list_entries", {}))
        assert {e["name"] for e in still["entries"]} == {"k1", "k3"}
    assert broker.proc is not None and broker.proc.poll() is None
    assert apm("status", "--json").returncode == 0
    assert apm.ok("get", "k3").stdout == KEY + "\n"

    # disabled: adding or changing one names the plugin; stored entries stay readable
    apm("plugin", "disable", "entry_type.xkey", check=True)
    again = apm("add", "xkey", "k5", "--from-stdin", stdin=KEY + "\n", password=PASSWORD)
    assert again.returncode == 10 and "entry_type.xkey" in again.stderr
    assert "not enabled" in again.stderr
    edit = apm("edit", "k1", "--field", "region=us", password=PASSWORD)
    assert edit.returncode == 10 and "entry_type.xkey" in edit.stderr
    async with shim_client(home, token, "legacy", 30.0) as client:
        got = error_of(await client.call_tool("add_entry", _add_args("k5", KEY)))
        assert got["code"] == "PLUGIN_UNAVAILABLE" and got["data"]["reason"] == "disabled"
        assert got["data"]["plugin"] == "entry_type.xkey"
    assert apm.ok("get", "k1").stdout == KEY + "\n"
    assert [e["name"] for e in json.loads(apm.ok("ls", "--type", "xkey", "--json").stdout)] == [
        "k1",
        "k3",
    ]

    # and a broker started afresh still opens a vault holding the disabled type's entries
    broker.stop()
    broker.start()
    apm.ok("unlock")
    assert apm.ok("get", "k3").stdout == KEY + "\n"
