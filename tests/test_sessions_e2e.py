"""Ephemeral sessions with real processes: a real broker, the real CLI, real process trees.

Bindings are checked against what the kernel says about the calling process, so these tests
build the trees for real: a long-lived parent that runs the CLI as its child on request
(`Tree`), and copies of /bin/dash standing in for an agent executable (a copy, not a symlink:
/proc/<pid>/exe resolves symlinks). A CLI started directly by the test is in another tree.
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from broker.cli.client import BrokerClient
from broker.core.crypto import normalize_password
from broker.core.vault import Vault
from broker.wire.errors import ApmError
from broker.wire.protocol import EntryListParams

from .agent_exe import (
    CLI,
    SESSION_REFUSED,
    broker_with_user_home,
    dash_copy,
    record,
    through,
)
from .conftest import (
    CAPTURED,
    PASSWORD,
    PY,
    Apm,
    Broker,
    clean_env,
    end_child,
)

pytestmark = pytest.mark.slow

TOKEN_RE = re.compile(r"^eps_[A-Za-z0-9_-]{43,}$")
EXPORT_RE = re.compile(r"^export APM_EPHEMERAL_ID=(eps_[A-Za-z0-9_-]{43,})\n$")

# A parent process that outlives its children: reads one JSON job per line, runs it as its
# child, answers with one JSON line. Tokens reach it through the pipe, never through argv.
SPAWNER = """
import json, subprocess, sys
for line in sys.stdin:
    job = json.loads(line)
    p = subprocess.run(job["argv"], env=job["env"], input=job["stdin"],
                       capture_output=True, text=True, timeout=60)
    print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr}), flush=True)
"""


class Tree:
    """A long-lived parent process; `run` starts the CLI as its child."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc = subprocess.Popen(
            [PY, "-c", SPAWNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(home),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(
        self, *args: str, token: str | None = None, stdin: str = "", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        extra = {"APM_EPHEMERAL_ID": token} if token else {}
        job = {"argv": [*CLI, *args], "env": clean_env(self.home, **extra), "stdin": stdin}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the tree's child did not finish within {timeout} s"
        out = json.loads(self.proc.stdout.readline())
        record(out["stdout"], out["stderr"])
        return subprocess.CompletedProcess(args, out["rc"], out["stdout"], out["stderr"])

    def close(self) -> None:
        end_child(self.proc)


@pytest.fixture
def trees() -> Iterator[list[Tree]]:
    made: list[Tree] = []
    yield made
    for t in made:
        t.close()


@dataclass
class Shared:
    """One broker and vault for the tests that only add sessions of their own.

    Its HOME (`~` in the agent profiles' executable paths) is a temp dir of ours.
    """

    home: Path
    apm: Apm
    broker: Broker
    user_home: Path


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    with broker_with_user_home("sk-e2e-value") as (home, user_home, apm, b):
        yield Shared(home, apm, b, user_home)


def tree(trees: list[Tree], home: Path) -> Tree:
    t = Tree(home)
    trees.append(t)
    return t


def session_env(home: Path, token: str, agent: str | None = None) -> dict[str, str]:
    extra = {"APM_EPHEMERAL_ID": token}
    if agent is not None:
        extra["APM_EPHEMERAL_AGENT"] = agent
    return clean_env(home, **extra)


def delegate(apm: Apm, *args: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(apm.ok("delegate", "--json", *args).stdout)
    return doc


def names(stdout: str) -> list[str]:
    return [e["name"] for e in json.loads(stdout)]


def seed(apm: Apm) -> None:
    apm.ok("add", "api_key", "openai", "--from-stdin", stdin="sk-e2e-value\n")


# ---------------------------------------------------------------------- pid


def test_a_pid_bound_session_works_from_a_child_of_the_pid_and_not_from_another_tree(
    shared: Shared, trees: list[Tree]
) -> None:
    apm, home = shared.apm, shared.home
    agent = tree(trees, home)
    made = delegate(apm, "--pid", str(agent.pid))
    assert {"token", "accessor", "scopes", "bindings", "expires_at"} <= made.keys()
    assert TOKEN_RE.match(made["token"])
    assert made["scopes"] == ["read"]
    assert made["bindings"]["pid"]["pid"] == agent.pid
    token, accessor = made["token"], made["accessor"]

    inside = agent.run("ls", "--json", token=token)
    assert inside.returncode == 0, inside.stderr
    assert names(inside.stdout) == ["openai"]

    outside = apm("ls", "--json", env=session_env(home, token))
    assert outside.returncode == SESSION_REFUSED
    assert outside.stdout == ""

    why = json.loads(apm.ok("session", "why", accessor, "--json").stdout)
    (denial,) = why["denials"]
    assert denial["peer_pid"] != agent.pid
    assert "pid" in denial["reason"]
    assert denial["seen"]
    text = apm.ok("session", "why", accessor).stdout
    assert denial["reason"] in text


def test_session_shell_prints_an_export_line_bound_to_the_invoking_process(
    shared: Shared, trees: list[Tree]
) -> None:
    apm, home = shared.apm, shared.home
    shell = tree(trees, home)
    printed = shell.run("session", "shell", "--password-stdin", stdin=PASSWORD + "\n")
    assert printed.returncode == 0, printed.stderr
    match = EXPORT_RE.match(printed.stdout)
    assert match, printed.stdout
    token = match.group(1)

    (mine,) = [
        s
        for s in json.loads(apm.ok("session", "ls", "--json").stdout)
        if s["label"] == f"shell {shell.pid}"
    ]
    assert mine["bindings"]["pid"]["pid"] == shell.pid
    assert mine["scopes"] == ["read", "secrets"]

    got = shell.run("get", "openai", token=token)
    assert (got.returncode, got.stdout) == (0, "sk-e2e-value\n")
    assert apm("get", "openai", env=session_env(home, token)).returncode == SESSION_REFUSED


# ---------------------------------------------------------------------- agent


def test_an_agent_exe_session_works_only_below_that_exact_executable(shared: Shared) -> None:
    apm, home = shared.apm, shared.home
    agent = dash_copy(shared.user_home / "opt" / "my-agent")
    lookalike = dash_copy(shared.user_home / "other" / "my-agent")
    token = delegate(apm, "--agent-exe", str(agent))["token"]
    env = session_env(home, token)

    below = through(agent, env, "ls", "--json")
    assert below.returncode == 0, below.stderr
    assert names(below.stdout) == ["openai"]
    assert through(lookalike, env, "ls", "--json").returncode == SESSION_REFUSED
    assert apm("ls", "--json", env=env).returncode == SESSION_REFUSED


def test_a_copied_token_is_refused_outside_the_agent_even_when_it_declares_the_agent(
    shared: Shared,
) -> None:
    apm, home = shared.apm, shared.home
    claude = dash_copy(shared.user_home / ".local" / "bin" / "claude")  # a claude-code path
    elsewhere = dash_copy(shared.user_home / "bin" / "claude")  # same name, not a profile path
    made = delegate(apm, "--agent", "claude-code")
    assert made["bindings"]["agent"] == "claude-code"
    token = made["token"]

    declared = session_env(home, token, agent="claude-code")
    assert apm("ls", "--json", env=declared).returncode == SESSION_REFUSED
    assert through(elsewhere, declared, "ls", "--json").returncode == SESSION_REFUSED

    below = through(claude, declared, "ls", "--json")
    assert below.returncode == 0, below.stderr
    assert names(below.stdout) == ["openai"]
    assert through(claude, session_env(home, token), "ls", "--json").returncode == 0

    contradicting = session_env(home, token, agent="cursor")
    assert through(claude, contradicting, "ls", "--json").returncode == SESSION_REFUSED

    why = json.loads(apm.ok("session", "why", made["accessor"], "--json").stdout)
    assert len(why["denials"]) == 3
    assert why["session"]["declared_agent"] == "claude-code"


# ---------------------------------------------------------------------- pin


def test_pin_binds_the_session_to_the_first_process_tree_only(
    shared: Shared, trees: list[Tree]
) -> None:
    apm, home = shared.apm, shared.home
    tree_a, tree_b = tree(trees, home), tree(trees, home)
    made = delegate(apm, "--pin")
    token = made["token"]
    assert made["bindings"]["pin"] == "first use"

    first = tree_a.run("ls", "--json", token=token)
    assert first.returncode == 0, first.stderr
    assert tree_a.run("ls", "--json", token=token).returncode == 0
    assert tree_b.run("ls", "--json", token=token).returncode == SESSION_REFUSED
    assert apm("ls", "--json", env=session_env(home, token)).returncode == SESSION_REFUSED

    shown = json.loads(apm.ok("session", "show", made["accessor"], "--json").stdout)
    assert shown["bindings"]["pin"]["pid"] == tree_a.pid
    assert shown["use_count"] == 2


# ---------------------------------------------------------------------- revocation


def test_revoking_takes_effect_on_a_connection_that_already_authenticated(
    shared: Shared,
) -> None:
    apm = shared.apm
    made = delegate(apm)
    token = SecretStr(made["token"])
    with BrokerClient(f"ipc://{shared.broker.socket}") as client:
        first = client.call("entry.list", EntryListParams(), token=token)
        assert [e.name for e in first.entries] == ["openai"]

        revoked = apm("session", "revoke", made["accessor"], "--json")  # no password
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout)["revoked"] == [made["accessor"]]

        with pytest.raises(ApmError) as refused:
            client.call("entry.list", EntryListParams(), token=token)
        assert refused.value.code == "SESSION_REQUIRED"


def test_revoking_while_locked_needs_no_password_and_applies_at_the_next_unlock(
    vault: Broker, apm: Apm, home: Path
) -> None:
    seed(apm)
    revoked, kept = delegate(apm), delegate(apm)
    apm("lock", check=True)
    pending = apm("session", "revoke", revoked["accessor"], "--json")
    assert pending.returncode == 0, pending.stderr
    assert json.loads(pending.stdout)["pending"] is True
    assert apm("ls", env=session_env(home, revoked["token"])).returncode == 3  # still locked

    apm.ok("unlock")
    assert apm("ls", env=session_env(home, revoked["token"])).returncode == SESSION_REFUSED
    assert apm("ls", env=session_env(home, kept["token"])).returncode == 0
    shown = json.loads(apm.ok("session", "show", revoked["accessor"], "--json").stdout)
    assert shown["state"] == "revoked"


# ---------------------------------------------------------------------- hygiene


def test_after_a_full_run_the_token_is_nowhere_on_disk_or_in_logs_but_hashed_in_the_vault(
    vault: Broker, apm: Apm, home: Path, trees: list[Tree]
) -> None:
    start = len(CAPTURED)
    seed(apm)
    shown_once: list[str] = []

    made = apm.ok("delegate", "--json", "--scope", "secrets", "--label", "e2e")
    shown_once.append(made.stdout)
    first = json.loads(made.stdout)
    shell = tree(trees, home)
    exported = shell.run("session", "shell", "--password-stdin", stdin=PASSWORD + "\n")
    shown_once.append(exported.stdout)
    match = EXPORT_RE.match(exported.stdout)
    assert match
    tokens = [first["token"], match.group(1)]

    for token in tokens:
        assert shell.run("get", "openai", token=token).stdout == "sk-e2e-value\n"
        assert shell.run("ls", "--json", token=token).returncode == 0
    bad = apm("get", "openai", env=session_env(home, tokens[1]))  # another tree: denied, logged
    assert bad.returncode == SESSION_REFUSED
    apm.ok("session", "ls")
    apm.ok("session", "show", first["accessor"])
    apm.ok("session", "why", first["accessor"])
    apm("session", "revoke", first["accessor"], check=True)
    assert apm("ls", env=session_env(home, tokens[0])).returncode == SESSION_REFUSED
    apm("lock", check=True)
    apm.ok("unlock")
    assert vault.stop() == 0

    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in tokens]
    needles = [t.encode() for t in tokens] + [h.encode() for h in hashes]
    files = [p for p in home.rglob("*") if p.is_file()]
    logs = [home / "broker-stdout.log", home / "state" / "broker.log"]
    for log in logs:
        assert log in files and first["accessor"] in log.read_text(), log  # the logs did talk
    for path in files:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{needle[:8]!r}... found in {path}"

    said = [out for out in CAPTURED[start:] if out not in shown_once]
    assert len(said) > 20
    for out in said:
        for token in tokens:
            assert token not in out
    for out in shown_once:
        assert sum(out.count(t) for t in tokens) == 1

    opened = Vault.open(home / "vault.apm", normalize_password(PASSWORD))
    try:
        stored = {s["token_hash"] for s in opened.extra["sessions"]}
    finally:
        opened.close()
    assert stored == set(hashes)
