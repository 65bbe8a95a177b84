"""Agent profiles and executable bindings, attacked with real processes (issue 13.8).

A real broker whose HOME (the `~` of the profiles) is a temp dir of ours; copies of /bin/dash
at crafted paths stand in for client executables (a copy, not a symlink: /proc/<pid>/exe
resolves symlinks). The CLI runs as dash's child with the session token in its environment,
so the broker sees dash among its ancestors, exactly as it sees a real client above `apm-mcp`.

The attacks of the review, each shown to fail now:
- `*` crossed `/`: ~/.local/share/claude/x/y/not-claude passed for claude-code,
  ~/.vscode-server/evil for vscode;
- an executable deleted after exec passed (psutil strips " (deleted)");
- (new) an executable replaced under a running process, and an `--agent-exe` file changed
  after the session pinned it.
And the real npm Claude Code layout (…/node_modules/@anthropic-ai/claude-code/bin/claude.exe)
now matches its profile.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.core.bindings import AGENT_PROFILES, create_time, path_matches, walk_ancestry

from .agent_exe import CLI, SESSION_REFUSED, broker_with_user_home, dash_copy, through
from .conftest import CAPTURED, Apm, Broker, clean_env

NPM_TAIL = "node_modules/@anthropic-ai/claude-code/bin/claude.exe"


# ------------------------------------------------------------------ matching, no processes


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/usr/share/code/*", "/usr/share/code/code", True),
        ("/usr/share/code/*", "/usr/share/code/bin/evil", False),  # `*` stops at `/`
        ("/home/u/.vscode-server/bin/*/node", "/home/u/.vscode-server/bin/abc/node", True),
        ("/home/u/.vscode-server/bin/*/node", "/home/u/.vscode-server/evil", False),
        ("/h/.local/share/claude/versions/[0-9]*", "/h/.local/share/claude/versions/2.1.3", True),
        ("/h/.local/share/claude/versions/[0-9]*", "/h/.local/share/claude/x/y/not-claude", False),
        ("/h/.local/share/claude/versions/[0-9]*", "/h/.local/share/claude/versions/evil", False),
        (f"**/{NPM_TAIL}", f"/usr/local/lib/{NPM_TAIL}", True),
        (f"**/{NPM_TAIL}", f"/home/u/project/{NPM_TAIL}", True),
        (f"**/{NPM_TAIL}", "/home/u/project/node_modules/claude.exe", False),
        (f"**/{NPM_TAIL}", f"/tmp/{NPM_TAIL}/x", False),
        ("**\\AnthropicClaude\\claude.exe", "C:\\Users\\u\\AnthropicClaude\\claude.exe", True),
    ],
)
def test_a_profile_pattern_matches_whole_path_segments(
    pattern: str, path: str, expected: bool
) -> None:
    assert path_matches(pattern, path) is expected


def test_no_linux_profile_pattern_ends_in_a_bare_star_that_any_file_would_match() -> None:
    for name, profile in AGENT_PROFILES.items():
        for plat in ("linux", "darwin"):
            for pattern in profile.exe_globs.get(plat, ()):
                assert not pattern.endswith("/*"), (name, pattern)


def test_the_claude_code_profile_matches_npm_global_and_local_installs_and_the_native_one() -> None:
    profile = AGENT_PROFILES["claude-code"]
    home = str(Path.home())
    for exe in (
        f"/usr/local/lib/{NPM_TAIL}",
        f"/usr/lib/{NPM_TAIL}",
        f"{home}/.npm-global/lib/{NPM_TAIL}",
        f"{home}/work/app/{NPM_TAIL}",
        f"{home}/.local/share/claude/versions/2.1.332",
    ):
        assert profile.matches_path(exe), exe
    assert not profile.matches_path(f"{home}/.local/share/claude/x/y/not-claude")
    assert not profile.matches_path("/usr/bin/node")


# ------------------------------------------------------------------ real processes


@dataclass
class Lab:
    home: Path
    user_home: Path  # the broker's HOME: `~` in the profiles
    apm: Apm
    broker: Broker

    def delegate(self, *args: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(
            self.apm.ok("delegate", "--json", "--ttl", "1h", *args).stdout
        )
        return doc

    def env(self, token: str) -> dict[str, str]:
        return clean_env(self.home, APM_EPHEMERAL_ID=token)

    def why(self, accessor: str) -> list[str]:
        doc = json.loads(self.apm.ok("session", "why", accessor, "--json").stdout)
        return [d["reason"] for d in doc["denials"]]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with broker_with_user_home("sk-profile-value") as (home, user_home, apm, broker):
        yield Lab(home, user_home, apm, broker)


class Waiting:
    """`exe` started and blocked on stdin; `go()` makes it run the CLI as its child."""

    def __init__(self, exe: Path, env: dict[str, str], *args: str) -> None:
        cmd = " ".join(shlex.quote(a) for a in [*CLI, *args])
        self.proc = subprocess.Popen(
            [str(exe), "-c", f"read go; {cmd}; exit $?"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def go(self) -> int:
        _, err = self.proc.communicate("go\n", timeout=60)
        CAPTURED.append(err)
        return self.proc.returncode


@pytest.mark.slow
def test_star_no_longer_crosses_slash_for_claude_code(lab: Lab) -> None:
    made = lab.delegate("--agent", "claude-code")
    evil = dash_copy(lab.user_home / ".local/share/claude/x/y/not-claude")
    assert through(evil, lab.env(made["token"]), "ls", "--json").returncode == SESSION_REFUSED
    assert any("agent binding" in r for r in lab.why(made["accessor"]))


@pytest.mark.slow
def test_a_file_dropped_in_vscode_server_does_not_pass_for_vscode(lab: Lab) -> None:
    made = lab.delegate("--agent", "vscode")
    evil = dash_copy(lab.user_home / ".vscode-server/evil")
    assert through(evil, lab.env(made["token"]), "ls", "--json").returncode == SESSION_REFUSED


@pytest.mark.slow
def test_the_npm_and_native_claude_code_locations_pass_for_claude_code(lab: Lab) -> None:
    token = lab.delegate("--agent", "claude-code")["token"]
    npm_local = dash_copy(lab.user_home / "project" / NPM_TAIL)
    native = dash_copy(lab.user_home / ".local/share/claude/versions/2.1.332")
    for exe in (npm_local, native):
        r = through(exe, lab.env(token), "ls", "--json")
        assert r.returncode == 0, (exe, r.stderr)


@pytest.mark.slow
def test_an_executable_deleted_after_it_started_fails_the_agent_binding(lab: Lab) -> None:
    made = lab.delegate("--agent", "claude-code")
    claude = dash_copy(lab.user_home / ".local/share/claude/versions/9.9.1")
    waiting = Waiting(claude, lab.env(made["token"]), "ls", "--json")
    claude.unlink()
    assert waiting.go() == SESSION_REFUSED
    assert any("deleted" in r for r in lab.why(made["accessor"]))


@pytest.mark.slow
def test_an_executable_swapped_under_a_running_client_fails_the_agent_binding(lab: Lab) -> None:
    made = lab.delegate("--agent", "claude-code")
    claude = dash_copy(lab.user_home / ".local/share/claude/versions/9.9.2")
    waiting = Waiting(claude, lab.env(made["token"]), "ls", "--json")
    swapped = claude.with_name("swap")
    dash_copy(swapped)
    os.replace(swapped, claude)  # the path now names another file; the old one is unlinked
    assert waiting.go() == SESSION_REFUSED
    reasons = lab.why(made["accessor"])
    assert any("deleted" in r or "replaced" in r for r in reasons), reasons


@pytest.mark.slow
def test_an_agent_exe_deleted_after_it_started_fails_the_binding(lab: Lab) -> None:
    agent = dash_copy(lab.user_home / "opt" / "agent-deleted")
    made = lab.delegate("--agent-exe", str(agent))
    waiting = Waiting(agent, lab.env(made["token"]), "ls", "--json")
    agent.unlink()
    assert waiting.go() == SESSION_REFUSED
    assert any("deleted" in r for r in lab.why(made["accessor"]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stat", "sha256"])
def test_a_pinned_agent_exe_that_changed_is_refused_with_the_command_that_re_pins(
    lab: Lab, mode: str
) -> None:
    agent = dash_copy(lab.user_home / "opt" / f"agent-{mode}")
    made = lab.delegate("--agent-exe", str(agent), "--agent-exe-pin", mode)
    assert made["bindings"]["agent_exe_pin"]["mode"] == mode
    env = lab.env(made["token"])
    assert through(agent, env, "ls", "--json").returncode == 0
    with agent.open("ab") as f:  # an "update": same path, same inode, other content
        f.write(b"\0update")
    assert through(agent, env, "ls", "--json").returncode == SESSION_REFUSED
    reasons = lab.why(made["accessor"])
    assert any("changed since the session pinned it" in r for r in reasons), reasons
    assert any(f"--agent-exe {agent} --agent-exe-pin {mode}" in r for r in reasons), reasons


@pytest.mark.slow
def test_agent_exe_pin_without_agent_exe_is_invalid(lab: Lab) -> None:
    r = lab.apm("delegate", "--json", "--agent-exe-pin", "stat", password="x" * 12)
    assert r.returncode != 0


def test_create_time_reads_the_kernels_start_time_as_psutil_does(tmp_path: Path) -> None:
    """The per-use check reads /proc/<pid>/stat itself; its value must be psutil's to the bit
    (the ancestry walk and stored bindings compare them), also for a process whose name holds
    ") " and spaces, and None for a pid that is gone."""
    odd = tmp_path / "x) (y z"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", odd)
    odd.chmod(0o755)
    proc = subprocess.Popen([str(odd), "30"])
    try:
        for pid in (proc.pid, os.getpid(), 1):
            assert create_time(pid) == psutil.Process(pid).create_time()
        assert psutil.Process(proc.pid).name() == "x) (y z"
        chain = walk_ancestry(proc.pid)
        assert chain[0].create_time == create_time(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert create_time(proc.pid) is None
    assert create_time(0) is None and create_time(-1) is None
