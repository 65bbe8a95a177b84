"""The real Claude Code from npm against apm, as a new user sets it up (issue 14.2).

`@anthropic-ai/claude-code` (pinned in tests/clients/claude-code/package-lock.json) is
installed into .cache/clients/claude-code/ with `npm ci` on first use and kept there. With
HOME pointed at a temporary directory and the package's `node_modules/.bin` on PATH (what
`npm install` puts there), `apm mcp install --client claude-code` must find the executable
Claude Code really runs (…/node_modules/@anthropic-ai/claude-code/bin/claude.exe, the ancestor
the broker sees) and bind the session to it; then `claude mcp list` spawns `apm-mcp` from
~/.claude.json and must show it connected, and the broker's audit must show the session
accepted for it (`session.attached`), never `session.denied`. `claude mcp list` needs no
network.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from . import real_clients
from .conftest import PASSWORD, Apm, Broker, clean_env

pytestmark = pytest.mark.slow

PACKAGE = "@anthropic-ai/claude-code"
EXE_TAIL = Path("node_modules/@anthropic-ai/claude-code/bin/claude.exe")


def audit_of(home: Path, accessor: str) -> list[dict[str, object]]:
    records = []
    for line in (home / "state" / "audit.jsonl").read_text().splitlines():
        doc = json.loads(line)
        if doc.get("session") == accessor:
            records.append(doc)
    return records


def test_claude_code_from_npm_shows_apm_connected_and_the_audit_shows_it_accepted(
    home: Path, apm: Apm, broker: Broker, tmp_path: Path
) -> None:
    prefix = real_clients.require("Claude Code from npm", real_clients.installed, "claude-code")
    assert isinstance(prefix, Path)
    version = real_clients.package_version(prefix, PACKAGE)
    apm.ok("init", "--profile", "interactive")
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = clean_env(
        home,
        HOME=str(user_home),
        PATH=f"{prefix / 'node_modules' / '.bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    env.pop("XDG_CONFIG_HOME", None)

    installed = apm(
        "mcp", "install", "--client", "claude-code", "--json", password=PASSWORD, env=env
    )
    assert installed.returncode == 0, installed.stderr
    out = json.loads(installed.stdout)
    exe = (prefix / EXE_TAIL).resolve()
    assert out["executable"] == str(exe), out
    assert out["found_via"].startswith("PATH"), out

    listed = subprocess.run(
        ["claude", "mcp", "list"],
        env=env,
        cwd=user_home,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert re.search(r"^apm: .*Connected", listed.stdout, re.M), (
        f"claude {version} mcp list ({listed.returncode}):\n{listed.stdout}\n{listed.stderr}"
    )

    records = audit_of(home, out["accessor"])
    events = [r["event"] for r in records]
    assert "session.attached" in events, events
    assert "session.denied" not in events, records

    doctor = apm("doctor", "--client", "claude-code", "--json", env=env)
    check = next(
        c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "client claude-code"
    )
    assert check["status"] == "ok", check
