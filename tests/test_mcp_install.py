"""`apm mcp install|uninstall|config`: each client's config written at its real path, in its
real format, into a temporary HOME, against a real broker; and the entry it writes really runs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from mcp import Client, StdioServerParameters

from broker.cli.mcp_cmd import CLIENTS
from broker.core.sessions import scope_rank
from broker.server.mcp_tools import TOOLS
from broker.wire.errors import InvalidParameters

from .conftest import PASSWORD, Apm, Broker, clean_env, make_home
from .test_mcp_e2e import start_broker, wire

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux config paths"),
]

# client -> (path under HOME, servers key, entries carry "type": "stdio")
EXPECTED: dict[str, tuple[str, str, bool]] = {
    "claude-desktop": (".config/Claude/claude_desktop_config.json", "mcpServers", False),
    "claude-code": (".claude.json", "mcpServers", True),
    "cursor": (".cursor/mcp.json", "mcpServers", False),
    "vscode": (".config/Code/User/mcp.json", "servers", True),
    "windsurf": (".codeium/windsurf/mcp_config.json", "mcpServers", False),
}
XDG_CLIENTS = ("claude-desktop", "vscode")
READ_TOOLS = {t.name for t in TOOLS if scope_rank(t.scope) <= scope_rank("read")}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Path, Apm]]:
    """One broker with an unlocked vault for the whole module; each test has its own HOME."""
    home = make_home()
    broker = Broker(home)
    start_broker(broker)
    apm = Apm(home)
    try:
        apm.ok("init", "--profile", "interactive")
        deploy = {"type": "api_key", "name": "deploy", "secrets": {"key": {"value": "v-1"}}}
        wire(home, "entry.add", deploy)
        yield home, apm
    finally:
        broker.stop()
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Desk:
    """A person's temporary HOME, and the apm CLI run with it."""

    apm_home: Path
    home: Path
    apm: Apm
    xdg: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        env = clean_env(self.apm_home, HOME=str(self.home))
        for var in ("XDG_CONFIG_HOME", "APPDATA"):
            env.pop(var, None)
        if self.xdg is not None:
            env["XDG_CONFIG_HOME"] = str(self.xdg)
        return env

    def run(self, *args: str, password: bool = True) -> subprocess.CompletedProcess[str]:
        return self.apm(*args, password=PASSWORD if password else None, env=self.env)

    def install(self, client: str, *extra: str) -> dict[str, Any]:
        proc = self.run("mcp", "install", "--client", client, "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))

    def sessions(self, cli: bool = False) -> dict[str, dict[str, Any]]:
        """Every session by accessor: from `apm session ls --json`, or over the wire (quicker)."""
        if cli:
            proc = self.run("session", "ls", "--json")
            assert proc.returncode == 0, proc.stderr
            listed = json.loads(proc.stdout)
        else:
            listed = wire(self.apm_home, "session.list")["sessions"]
        return {s["accessor"]: s for s in listed}

    def config_file(self, client: str) -> Path:
        rel, _, _ = EXPECTED[client]
        if self.xdg is not None and rel.startswith(".config/"):
            return self.xdg / rel.removeprefix(".config/")
        return self.home / rel


@pytest.fixture
def desk(served: tuple[Path, Apm], tmp_path: Path) -> Desk:
    apm_home, apm = served
    home = tmp_path / "home"
    home.mkdir()
    return Desk(apm_home, home, apm)


def entry_of(doc: dict[str, Any], client: str, name: str = "apm") -> dict[str, Any]:
    _, key, _ = EXPECTED[client]
    return dict(doc[key][name])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- the file written


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_install_writes_the_clients_config_at_its_real_path_in_its_format(
    desk: Desk, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = desk.install(client)
    path = desk.config_file(client)
    assert out["config"] == str(path)
    assert out["backup"] is None  # nothing was there before
    assert path.exists()
    assert mode_of(path) == 0o600
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert CLIENTS[client].config_path(desk.home) == path

    doc = json.loads(path.read_text())
    _, key, typed = EXPECTED[client]
    other_key = "servers" if key == "mcpServers" else "mcpServers"
    assert other_key not in doc
    entry = entry_of(doc, client)
    assert ("type" in entry) is typed
    if typed:
        assert entry["type"] == "stdio"
    command = Path(entry["command"])
    assert command.name == "apm-mcp"
    assert command.is_file() and os.access(command, os.X_OK)
    assert entry["args"] == []
    token = entry["env"]["APM_EPHEMERAL_ID"]
    assert token.startswith("eps_")
    assert token not in entry["command"]
    assert token not in json.dumps(entry["args"])
    assert entry["env"]["APM_EPHEMERAL_AGENT"] == client

    session = desk.sessions()[out["accessor"]]
    assert session["state"] == "active"
    assert session["scopes"] == ["read"]  # least privilege by default
    assert session["bindings"].get("agent") == client
    assert session["bindings"].get("host")


@pytest.mark.parametrize("client", XDG_CLIENTS)
def test_xdg_config_home_moves_the_config_of_clients_that_follow_it(
    desk: Desk, client: str, tmp_path: Path
) -> None:
    desk.xdg = tmp_path / "xdg-config"
    out = desk.install(client)
    path = desk.config_file(client)
    assert path.is_relative_to(desk.xdg)
    assert out["config"] == str(path)
    assert json.loads(path.read_text())[EXPECTED[client][1]]["apm"]["args"] == []
    assert not (desk.home / ".config").exists()


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_install_keeps_other_servers_and_keys_and_backs_up_the_old_file(
    desk: Desk, client: str
) -> None:
    _, key, _ = EXPECTED[client]
    other = {"command": "/usr/bin/other-server", "args": ["--flag"], "env": {"X": "1"}}
    before = {
        "theme": "dark",
        key: {"other": other},
        "projects": {"/src/app": {"allowedTools": ["Bash"]}},
    }
    path = desk.config_file(client)
    path.parent.mkdir(parents=True, exist_ok=True)
    original = json.dumps(before, indent=4).encode()
    path.write_bytes(original)

    out = desk.install(client)
    doc = json.loads(path.read_text())
    assert doc["theme"] == "dark"
    assert doc["projects"] == before["projects"]
    assert doc[key]["other"] == other
    assert set(doc[key]) == {"other", "apm"}
    backup = path.with_name(path.name + ".apm-backup")
    assert out["backup"] == str(backup)
    assert backup.read_bytes() == original
    assert mode_of(path) == 0o600
    assert mode_of(backup) == 0o600


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_reinstalling_replaces_the_entry_and_revokes_the_old_session(
    desk: Desk, client: str
) -> None:
    first = desk.install(client)
    path = desk.config_file(client)
    first_text = path.read_text()
    first_token = entry_of(json.loads(first_text), client)["env"]["APM_EPHEMERAL_ID"]

    second = desk.install(client)
    doc = json.loads(path.read_text())
    token = entry_of(doc, client)["env"]["APM_EPHEMERAL_ID"]
    assert token != first_token
    assert list(doc[EXPECTED[client][1]]) == ["apm"]  # replaced, not added
    assert second["revoked"] == [first["accessor"]]
    sessions = desk.sessions(cli=True)
    assert sessions[first["accessor"]]["state"] == "revoked"
    assert sessions[second["accessor"]]["state"] == "active"
    backup = path.with_name(path.name + ".apm-backup")
    assert backup.read_text() == first_text


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_uninstall_removes_the_entry_and_revokes_its_session(desk: Desk, client: str) -> None:
    _, key, _ = EXPECTED[client]
    path = desk.config_file(client)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({key: {"other": {"command": "x", "args": []}}, "keep": 1}))
    out = desk.install(client)

    proc = desk.run("mcp", "uninstall", "--client", client, "--json", password=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(path.read_text())
    assert doc == {key: {"other": {"command": "x", "args": []}}, "keep": 1}
    assert json.loads(proc.stdout)["revoked"] == [out["accessor"]]
    assert desk.sessions()[out["accessor"]]["state"] == "revoked"
    assert mode_of(path) == 0o600


@pytest.mark.parametrize("client", sorted(EXPECTED))
def test_a_config_that_is_not_json_is_refused_and_left_byte_identical(
    desk: Desk, client: str
) -> None:
    path = desk.config_file(client)
    path.parent.mkdir(parents=True, exist_ok=True)
    broken = b'{"mcpServers": {"other": {"command": "x",}\n  // a comment\n'
    path.write_bytes(broken)
    os.chmod(path, 0o644)
    sessions_before = set(desk.sessions())

    install = desk.run("mcp", "install", "--client", client)
    uninstall = desk.run("mcp", "uninstall", "--client", client, password=False)

    assert install.returncode == InvalidParameters.exit_code == 10
    assert uninstall.returncode == InvalidParameters.exit_code
    assert path.read_bytes() == broken
    assert mode_of(path) == 0o644
    assert not path.with_name(path.name + ".apm-backup").exists()
    assert set(desk.sessions()) == sessions_before  # refused before minting anything


@pytest.mark.parametrize(
    "content",
    [
        {"mcpServers": [1, 2], "servers": [1, 2]},
        {"mcpServers": {"apm": {"env": [1]}}, "servers": {"apm": {"env": [1]}}},
    ],
    ids=["servers-not-an-object", "env-not-an-object"],
)
def test_a_config_of_the_wrong_shape_is_refused_before_minting_a_session(
    desk: Desk, content: dict[str, Any]
) -> None:
    path = desk.config_file("cursor")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(content).encode()
    path.write_bytes(raw)
    sessions_before = set(desk.sessions())

    install = desk.run("mcp", "install", "--client", "cursor")
    uninstall = desk.run("mcp", "uninstall", "--client", "cursor", password=False)

    assert install.returncode == InvalidParameters.exit_code
    assert uninstall.returncode == InvalidParameters.exit_code
    assert "Traceback" not in install.stderr + uninstall.stderr
    assert path.read_bytes() == raw
    assert set(desk.sessions()) == sessions_before


# ---------------------------------------------------------------------- printing instead


def cursor_link_config(link: str) -> dict[str, Any]:
    """The config a Cursor deeplink carries, read back with a URL parser."""
    url = urlsplit(link)
    assert (url.scheme, url.netloc, url.path) == (
        "cursor",
        "anysphere.cursor-deeplink",
        "/mcp/install",
    )
    params = parse_qs(url.query, strict_parsing=True)
    assert params["name"] == ["apm"]
    (config,) = params["config"]
    return dict(json.loads(base64.b64decode(config, validate=True)))


def test_mcp_config_for_cursor_prints_a_deeplink_that_decodes_to_the_entry(desk: Desk) -> None:
    proc = desk.run("mcp", "config", "--client", "cursor", "--json", "--mint")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    entry = out["config"]["mcpServers"]["apm"]
    assert cursor_link_config(out["deeplink"]) == entry
    assert entry["args"] == []
    assert entry["env"]["APM_EPHEMERAL_ID"].startswith("eps_")
    assert out["path"] == str(desk.config_file("cursor"))
    assert not desk.config_file("cursor").exists()  # printed, not written
    assert desk.sessions()[out["accessor"]]["state"] == "active"

    text = desk.run("mcp", "config", "--client", "cursor", "--mint")
    assert text.returncode == 0, text.stderr
    links = [ln for ln in text.stdout.splitlines() if ln.startswith("cursor://")]
    assert len(links) == 1
    printed = cursor_link_config(links[0])
    assert printed["command"] == entry["command"]
    assert printed["env"]["APM_EPHEMERAL_ID"] != entry["env"]["APM_EPHEMERAL_ID"]  # a new session


@pytest.mark.parametrize("client", ["claude-code", "vscode"])
def test_mcp_config_prints_the_snippet_without_writing_the_file(desk: Desk, client: str) -> None:
    proc = desk.run("mcp", "config", "--client", client, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    entry = entry_of(out["config"], client)
    assert entry["type"] == "stdio"
    assert entry["args"] == []
    assert "deeplink" not in out
    assert not desk.config_file(client).exists()


# ---------------------------------------------------------------------- the entry runs


@contextlib.asynccontextmanager
async def configured_client(entry: dict[str, Any]) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=entry["env"])
    try:
        async with Client(params, mode="legacy", read_timeout_seconds=20) as client:
            yield client
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from group
        raise


@pytest.mark.anyio
@pytest.mark.parametrize("client", ["claude-desktop", "vscode"])
async def test_the_installed_entry_runs_and_its_agent_binding_refuses_other_processes(
    desk: Desk, client: str
) -> None:
    bound = desk.install(client)
    entry = entry_of(json.loads(desk.config_file(client).read_text()), client)
    async with configured_client(entry) as mcp:
        refused_names = {t.name for t in (await mcp.list_tools()).tools}
        status = await mcp.call_tool("apm_status", {})
        refused_call = await mcp.call_tool("list_entries", {})
    assert refused_names == {"apm_status"}
    assert status.structured_content is not None
    assert status.structured_content["code"] == "SESSION_REQUIRED"
    assert refused_call.is_error
    why = desk.run("session", "why", bound["accessor"], "--json")
    assert why.returncode == 0, why.stderr
    doc = json.loads(why.stdout)
    assert doc["session"]["bindings"]["agent"] == client
    assert doc["denials"], "the refusal was not recorded"
    text = desk.run("session", "why", bound["accessor"])
    assert f"agent {client}" in text.stdout

    unbound = desk.install(client, "--no-agent-binding")
    assert unbound["revoked"] == [bound["accessor"]]
    entry = entry_of(json.loads(desk.config_file(client).read_text()), client)
    async with configured_client(entry) as mcp:
        names = {t.name for t in (await mcp.list_tools()).tools}
        listed = await mcp.call_tool("list_entries", {})
    assert names == READ_TOOLS
    assert names >= {"list_entries", "search_entries", "get_entry", "assist"}
    assert not listed.is_error
    assert listed.structured_content is not None
    assert [e["name"] for e in listed.structured_content["entries"]] == ["deploy"]


# ---------------------------------------------------------------------- the client's executable

NPM_TAIL = "node_modules/@anthropic-ai/claude-code/bin/claude.exe"


def dash_copy(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shutil.which("dash") or "/bin/dash", path)
    path.chmod(0o755)
    return path


def install_with(desk: Desk, client: str, **env: str) -> subprocess.CompletedProcess[str]:
    return desk.apm(
        *("mcp", "install", "--client", client, "--json"),
        password=PASSWORD,
        env={**desk.env, **env},
    )


def test_install_finds_claude_code_in_the_npm_global_prefix_and_binds_to_that_file(
    desk: Desk,
) -> None:
    prefix = desk.home / ".npm-global"
    exe = dash_copy(prefix / "lib" / NPM_TAIL)
    proc = install_with(desk, "claude-code", NPM_CONFIG_PREFIX=str(prefix))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["executable"] == str(exe)
    assert out["found_via"].startswith("npm global prefix")
    assert desk.sessions()[out["accessor"]]["bindings"]["agent_exe"] == str(exe)
    human = desk.apm(
        "mcp", "install", "--client", "claude-code", password=PASSWORD,
        env={**desk.env, "NPM_CONFIG_PREFIX": str(prefix)},
    )  # fmt: skip
    assert f"found Claude Code at {exe}" in human.stderr


def test_install_follows_a_path_symlink_to_the_native_installer_and_binds_the_profile(
    desk: Desk,
) -> None:
    native = dash_copy(desk.home / ".local/share/claude/versions/2.1.332")
    bindir = desk.home / "bin"
    bindir.mkdir()
    (bindir / "claude").symlink_to(native)
    path = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    proc = install_with(desk, "claude-code", PATH=path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["executable"] == str(native)
    assert out["found_via"].startswith("PATH")
    bindings = desk.sessions()[out["accessor"]]["bindings"]
    assert bindings["agent"] == "claude-code" and "agent_exe" not in bindings
    assert "follows its updates" in out["binding"]


def test_install_skips_a_script_on_path_whose_process_would_be_its_interpreter(desk: Desk) -> None:
    bindir = desk.home / "bin"
    bindir.mkdir()
    script = bindir / "claude"
    script.write_text("#!/bin/sh\nexec node cli.js\n")
    script.chmod(0o755)
    path = f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    out = json.loads(install_with(desk, "claude-code", PATH=path).stdout)
    assert out["executable"] is None
    assert desk.sessions()[out["accessor"]]["bindings"]["agent"] == "claude-code"
    assert "no Claude Code executable found" in out["binding"]


def test_doctor_reports_a_client_whose_session_was_refused_with_the_reason_and_the_fix(
    desk: Desk,
) -> None:
    bound = desk.install("claude-code")
    entry = entry_of(json.loads(desk.config_file("claude-code").read_text()), "claude-code")
    token = entry["env"]["APM_EPHEMERAL_ID"]
    # the token used by a process that is not Claude Code: refused, and audited
    refused = desk.apm("ls", "--json", env={**desk.env, "APM_EPHEMERAL_ID": token})
    assert refused.returncode == 5, refused.stderr
    proc = desk.run("doctor", "--client", "claude-code", "--json", password=False)
    assert proc.returncode == 1
    check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "client claude-code")
    assert check["status"] == "fail"
    assert bound["accessor"] in check["detail"] and "refused" in check["detail"]
    assert "agent binding" in check["detail"]
    assert "apm mcp install --client claude-code" in check["fix"]
    human = desk.run("doctor", "--client", "claude-code", password=False)
    assert "was refused" in human.stdout and "fix: apm mcp install" in human.stdout


# ---------------------------------------------------------------------- config formats (14.4)

VSCODE_JSONC = """// my VS Code MCP servers
{
  /* a block comment */
  "servers": {
    "other": {"command": "/usr/bin/other", "args": ["--x"],},  // trailing commas, too
  },
  "inputs": [],  // keep me
}
"""


def test_vscode_jsonc_keeps_every_comment_and_changes_only_servers_apm(desk: Desk) -> None:
    path = desk.config_file("vscode")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VSCODE_JSONC)
    first = desk.install("vscode")
    text = path.read_text()
    for kept in (
        "// my VS Code MCP servers",
        "/* a block comment */",
        '"other": {"command": "/usr/bin/other", "args": ["--x"],},  // trailing commas, too',
        '"inputs": [],  // keep me',
    ):
        assert kept in text, text
    desk.install("vscode")  # replaced in place, comments still there
    again = path.read_text()
    assert again.count('"apm"') == 1 and "// keep me" in again
    proc = desk.run("mcp", "uninstall", "--client", "vscode", "--json", password=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["revoked"]
    assert path.read_text() == VSCODE_JSONC  # the round trip gives the user's file back
    assert first["backup"] is not None


def test_a_config_that_is_not_jsonc_is_refused_naming_line_and_column(desk: Desk) -> None:
    path = desk.config_file("vscode")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{\n  "servers": {\n    "a": 1\n    "b": 2\n  }\n}\n')
    before = path.read_bytes()
    proc = desk.run("mcp", "install", "--client", "vscode")
    assert proc.returncode == InvalidParameters.exit_code
    assert "line 4, column 5" in proc.stderr and "delimiter" in proc.stderr
    assert path.read_bytes() == before


def test_mcp_config_prints_a_placeholder_and_mints_nothing_without_mint(desk: Desk) -> None:
    before = set(desk.sessions())
    proc = desk.run("mcp", "config", "--client", "cursor", "--json", password=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["minted"] is False and out["accessor"] is None
    entry = out["config"]["mcpServers"]["apm"]
    assert not entry["env"]["APM_EPHEMERAL_ID"].startswith("eps_")
    assert cursor_link_config(out["deeplink"]) == entry  # URL-encoded: + / = survive
    assert set(desk.sessions()) == before


@pytest.mark.parametrize(
    ("client", "typed"), [("cursor", False), ("vscode", True), ("claude-code", True)]
)
def test_http_transport_writes_the_url_and_an_authorization_header(
    desk: Desk, client: str, typed: bool
) -> None:
    url = "http://127.0.0.1:8765/mcp"
    out = desk.install(client, "--transport", "http", "--url", url)
    assert out["transport"] == "http"
    entry = entry_of(json.loads(desk.config_file(client).read_text()), client)
    assert entry["url"] == url
    assert entry["headers"]["Authorization"].startswith("Bearer eps_")
    assert ("type" in entry) is typed and entry.get("type", "http") == "http"
    assert "command" not in entry and "env" not in entry
    # re-installing revokes the session the header held
    again = desk.install(client, "--transport", "http", "--url", url)
    assert again["revoked"] == [out["accessor"]]


def test_the_cursor_http_deeplink_carries_the_url_and_header(desk: Desk) -> None:
    url = "http://127.0.0.1:8765/mcp"
    proc = desk.run(
        *("mcp", "config", "--client", "cursor", "--transport", "http", "--url", url, "--json"),
        password=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    linked = cursor_link_config(out["deeplink"])
    assert linked == out["config"]["mcpServers"]["apm"]
    assert linked["url"] == url and linked["headers"]["Authorization"].startswith("Bearer ")


def test_http_transport_is_refused_for_a_client_that_takes_only_stdio(desk: Desk) -> None:
    proc = desk.run("mcp", "install", "--client", "claude-desktop", "--transport", "http")
    assert proc.returncode == InvalidParameters.exit_code
    assert "stdio" in proc.stderr


def test_install_debug_puts_debug_into_the_shim_args(desk: Desk) -> None:
    desk.install("claude-code", "--debug")
    entry = entry_of(json.loads(desk.config_file("claude-code").read_text()), "claude-code")
    assert entry["args"] == ["--debug"]
