"""Ephemeral sessions in-process: tokens, bindings through the ancestry seam, clocks, scopes.

Everything here drives `broker.core.sessions` directly or the dispatcher's in-memory twin
(`dispatch.handle(state, frame, peer)`) with an injected clock and a fake process table, so
expiry, idle time, pid reuse and process trees are exercised without sleeping or forking.
The same properties with real processes live in test_sessions_e2e.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, get_origin

import pytest

import broker.server.daemon  # noqa: F401 - registers every route the real broker serves
from broker.core.bindings import AGENT_PROFILES, AncestryCache, Proc
from broker.core.crypto import normalize_password
from broker.core.sessions import (
    CreateSpec,
    EntryFilter,
    SessionStore,
    hash_token,
)
from broker.core.vault import Change, Vault
from broker.server.context import Context
from broker.server.operations import OPERATIONS as ROUTES
from broker.server.peer import Peer
from broker.server.state import Throttle
from broker.wire.errors import ApmError
from broker.wire.protocol import McpAttachParams, McpAttachResult, Response

from .twin import Clock, SyncTwin, broker_state

PASSWORD = "correct horse battery staple"
HOST = "host-fingerprint-a"
TOKEN_RE = re.compile(r"^eps_[A-Za-z0-9_-]{43,}$")
TOTP_SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # 160 bits
SCOPES = ("read", "secrets", "write", "admin")


# ---------------------------------------------------------------------- fakes


class Procs:
    """A process table for the ancestry seam: pid -> (parent pid, create_time, exe)."""

    def __init__(self) -> None:
        self.table: dict[int, tuple[int, float, str]] = {1: (0, 1.0, "/sbin/init")}
        self.walks = 0

    def spawn(self, pid: int, parent: int = 1, ct: float | None = None, exe: str = "") -> int:
        self.table[pid] = (parent, float(pid) if ct is None else ct, exe or "/usr/bin/python3")
        return pid

    def exit(self, pid: int) -> None:
        del self.table[pid]

    def create_time(self, pid: int) -> float | None:
        row = self.table.get(pid)
        return row[1] if row else None

    def walk(self, pid: int) -> tuple[Proc, ...]:
        self.walks += 1
        chain: list[Proc] = []
        while pid in self.table:
            parent, ct, exe = self.table[pid]
            chain.append(Proc(pid=pid, create_time=ct, name=Path(exe).name, exe=exe))
            pid = parent
        return tuple(chain)


class NoDelayThrottle(Throttle):
    """Records what the dispatcher reports, and never makes a test wait."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = 0

    def failed(self, peer: Peer) -> float:
        self.reported += 1
        super().failed(peer)
        return 0.0


class FakeMcpHost:
    """Stands in for the MCP host (the SDK is not what these tests are about)."""

    conns: dict[str, object] = {}

    async def attach(self, ctx: Context, identity: bytes, p: McpAttachParams) -> McpAttachResult:
        assert ctx.session is not None
        return McpAttachResult(
            conn="c1",
            accessor=ctx.session.accessor,
            scope=ctx.session.scope,
            expires_at=ctx.session.expires_at,
        )


def peer(pid: int | None) -> Peer:
    return Peer(uid=os.getuid(), gid=os.getgid(), pid=pid)


@dataclass
class Twin(SyncTwin):
    """The broker's dispatcher in-process: real handlers, a real vault file, fake time and procs."""

    procs: Procs = field(default_factory=lambda: Procs())
    throttle: NoDelayThrottle = field(default_factory=lambda: NoDelayThrottle())
    pid: int = 0  # the default peer: a process with no particular ancestry
    responses: list[Response] = field(default_factory=list)

    @property
    def default_pid(self) -> int | None:
        return self.pid

    def call(self, method: str, params: dict[str, Any] | None = None, **kw: Any) -> Response:
        resp = super().call(method, params, **kw)
        self.responses.append(resp)
        return resp

    def delegate(self, **params: Any) -> tuple[str, str]:
        res = self.owner("session.create", params)
        return res["token"], res["session"]["accessor"]

    def space(self, name: str) -> str:
        if name not in self.vault.spaces:
            self.vault.space_add(name)
        return name

    def add(self, name: str, space: str = "default", tags: list[str] | None = None) -> str:
        self.space(space)
        change = Change(fields={}, secrets={"key": f"value-of-{name}"}, remove_fields=[])
        return self.vault.add("api_key", name, space, tags or [], None, None, change).id


def error_code(resp: Response) -> str:
    assert not resp.ok and resp.error is not None, resp
    return resp.error.code


@pytest.fixture
def twin(tmp_path: Path) -> Iterator[Twin]:
    clock = Clock()
    procs = Procs()
    throttle = NoDelayThrottle()
    ancestry = AncestryCache(walk=procs.walk, create_time_of=procs.create_time)
    with broker_state(
        tmp_path,
        PASSWORD,
        sign_audit=False,
        clock=clock,
        ancestry=ancestry,
        host=HOST,
        throttle=throttle,
    ) as state:
        loop = asyncio.new_event_loop()
        state._mcp_host = loop.create_future()
        state._mcp_host.set_result(FakeMcpHost())
        shell = procs.spawn(500, 1, exe="/usr/bin/bash")
        yield Twin(state, loop, clock, PASSWORD, procs, throttle, pid=procs.spawn(501, shell))
        loop.close()


def store(procs: Procs | None = None, clock: Clock | None = None, host: str = HOST) -> SessionStore:
    procs = procs or Procs()
    return SessionStore(
        [],
        clock=clock or Clock(),
        ancestry=AncestryCache(walk=procs.walk, create_time_of=procs.create_time),
        host=host,
    )


def spec(**kw: Any) -> CreateSpec:
    kw.setdefault("label", "test")
    kw.setdefault("scope", "read")
    kw.setdefault("ttl", timedelta(minutes=15))
    return CreateSpec(**kw)


# ---------------------------------------------------------------------- the token


def test_a_token_is_eps_and_256_random_urlsafe_bits_and_only_its_hash_is_stored() -> None:
    s = store()
    tokens = [s.create(spec())[0] for _ in range(20)]
    assert all(TOKEN_RE.match(t) for t in tokens)
    assert len(set(tokens)) == len(tokens)
    dumped = repr(s.dump())
    for token in tokens:
        assert token not in dumped
        assert hashlib.sha256(token.encode()).hexdigest() in dumped
    accessors = [r["accessor"] for r in s.dump()]
    assert all(a.startswith("ses_") for a in accessors)
    assert not any(a in t for a in accessors for t in tokens)


def test_sessions_survive_a_reload_of_the_stored_table_and_work_again() -> None:
    procs, clock = Procs(), Clock()
    first = store(procs, clock)
    token, rec = first.create(spec())
    again = SessionStore(
        first.dump(),
        clock=clock,
        ancestry=AncestryCache(walk=procs.walk, create_time_of=procs.create_time),
        host=HOST,
    )
    assert again.authenticate(token, procs.spawn(42)).record.accessor == rec.accessor


def test_an_unknown_or_malformed_token_is_session_required() -> None:
    s = store()
    s.create(spec())
    for bad in ("eps_" + "A" * 43, "not-a-token", "", "eps_", "eps_" + "x" * 300):
        with pytest.raises(ApmError) as info:
            s.authenticate(bad, 1)
        assert info.value.code == "SESSION_REQUIRED"


def test_a_session_bound_to_this_host_is_refused_on_another_machine_or_uid() -> None:
    procs = Procs()
    here = store(procs)
    token, _ = here.create(spec())
    unbound, _ = here.create(spec(bind_host=False))
    elsewhere = SessionStore(
        here.dump(),
        clock=Clock(),
        ancestry=AncestryCache(walk=procs.walk, create_time_of=procs.create_time),
        host="host-fingerprint-b",
    )
    with pytest.raises(ApmError) as info:
        elsewhere.authenticate(token, 1)
    assert info.value.code == "SESSION_REQUIRED"
    elsewhere.authenticate(unbound, 1)


# ---------------------------------------------------------------------- the ancestry seam


def test_ancestry_is_walked_once_per_pid_and_create_time_and_again_after_pid_reuse() -> None:
    procs = Procs()
    procs.spawn(10, 1, ct=100.0)
    cache = AncestryCache(walk=procs.walk, create_time_of=procs.create_time)
    first = cache.get(10)
    assert cache.get(10) == first
    assert procs.walks == 1
    procs.exit(10)
    procs.spawn(10, 1, ct=200.0)
    reused = cache.get(10)
    assert procs.walks == 2
    assert reused[0].create_time == 200.0
    procs.exit(10)
    assert cache.get(10) == ()


def test_a_pid_bound_session_works_from_the_process_and_its_descendants_only() -> None:
    procs = Procs()
    agent = procs.spawn(300, 1)
    child = procs.spawn(301, agent)
    grandchild = procs.spawn(302, child)
    stranger = procs.spawn(400, 1)
    s = store(procs)
    token, _ = s.create(spec(pid=agent))
    for pid in (agent, child, grandchild):
        s.authenticate(token, pid)
    with pytest.raises(ApmError) as info:
        s.authenticate(token, stranger)
    assert info.value.code == "SESSION_REQUIRED"
    with pytest.raises(ApmError) as info:
        s.authenticate(token, None)  # the kernel did not say who is calling
    assert info.value.code == "SESSION_REQUIRED"


def test_a_reused_pid_with_another_create_time_is_refused(twin: Twin) -> None:
    procs = twin.procs
    agent = procs.spawn(300, 1, ct=1000.0)
    procs.spawn(301, agent, ct=1001.0)
    token, accessor = twin.delegate(pid=agent)
    assert twin.call("entry.list", token=token, pid=agent).ok  # now cached for pid 300
    assert twin.call("entry.list", token=token, pid=301).ok

    procs.exit(301)
    procs.exit(agent)
    procs.spawn(300, 1, ct=5000.0)  # the same number, another process
    procs.spawn(302, 300, ct=5001.0)
    for pid in (300, 302):
        assert error_code(twin.call("entry.list", token=token, pid=pid)) == "SESSION_REQUIRED"
    why = twin.owner("session.why", {"accessor": accessor})
    assert [d["peer_pid"] for d in why["denials"]] == [300, 302]
    assert all("reused" in d["reason"] for d in why["denials"])


def test_delegating_to_a_pid_that_does_not_exist_is_invalid(twin: Twin) -> None:
    resp = twin.call("session.create", {"pid": 77777}, password=PASSWORD)
    assert error_code(resp) == "INVALID_PARAMETERS"


def test_pin_binds_the_session_to_the_first_process_tree_that_uses_it(twin: Twin) -> None:
    procs = twin.procs
    tree_a = procs.spawn(600, 1, exe="/usr/bin/dash")
    tree_b = procs.spawn(700, 1, exe="/usr/bin/dash")
    token, accessor = twin.delegate(pin=True)
    assert twin.call("entry.list", token=token, pid=procs.spawn(601, tree_a)).ok
    assert twin.call("entry.list", token=token, pid=procs.spawn(602, tree_a)).ok
    assert error_code(twin.call("entry.list", token=token, pid=procs.spawn(701, tree_b))) == (
        "SESSION_REQUIRED"
    )
    pinned = twin.owner("session.show", {"accessor": accessor})["bindings"]["pin"]
    assert (pinned["pid"], pinned["create_time"]) == (tree_a, procs.create_time(tree_a))
    # durable: the pin is in the vault before the first answer went out
    on_disk = Vault.open(twin.state.paths.vault, normalize_password(PASSWORD))
    try:
        (rec,) = on_disk.extra["sessions"]
        assert rec["bindings"]["pinned_pid"] == tree_a
    finally:
        on_disk.close()


def test_pin_never_anchors_to_pid_1_which_every_process_descends_from(twin: Twin) -> None:
    procs = twin.procs
    orphan = procs.spawn(601, 1, exe="/usr/bin/dash")  # double-forked: its parent is pid 1
    stranger = procs.spawn(701, procs.spawn(700, 1, exe="/usr/bin/dash"))
    token, accessor = twin.delegate(pin=True)
    assert twin.call("entry.list", token=token, pid=orphan).ok
    pinned = twin.owner("session.show", {"accessor": accessor})["bindings"]["pin"]
    assert pinned["pid"] == orphan  # the caller itself, not init
    assert error_code(twin.call("entry.list", token=token, pid=stranger)) == "SESSION_REQUIRED"


def test_a_request_refused_for_scope_does_not_use_up_max_uses(twin: Twin) -> None:
    twin.add("site")
    token, _ = twin.delegate(scope="read", max_uses=2)
    for _ in range(3):  # space.add needs write: refused before the session is used
        assert error_code(twin.call("space.add", {"name": "extra"}, token=token)) == (
            "PERMISSION_DENIED"
        )
    assert twin.call("entry.list", token=token).ok
    assert twin.call("entry.list", token=token).ok
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"


def test_an_idle_timeout_runs_from_creation_when_the_session_was_never_used(twin: Twin) -> None:
    token, _ = twin.delegate(ttl_seconds=8 * 3600, idle_seconds=600)
    twin.clock.advance(seconds=601)
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"


def test_pin_refuses_the_same_parent_pid_once_it_is_reused(twin: Twin) -> None:
    procs = twin.procs
    tree_a = procs.spawn(600, 1, ct=10.0)
    token, _ = twin.delegate(pin=True)
    assert twin.call("entry.list", token=token, pid=procs.spawn(601, tree_a)).ok
    procs.exit(601)
    procs.exit(tree_a)
    procs.spawn(600, 1, ct=99.0)
    resp = twin.call("entry.list", token=token, pid=procs.spawn(603, 600))
    assert error_code(resp) == "SESSION_REQUIRED"


# ---------------------------------------------------------------------- agent bindings


def claude_exe() -> str:
    return str(Path.home() / ".local" / "bin" / "claude")


def test_an_agent_bound_session_needs_the_agent_executable_among_the_ancestors(
    twin: Twin,
) -> None:
    procs = twin.procs
    claude = procs.spawn(800, 1, exe=claude_exe())
    shim = procs.spawn(801, procs.spawn(802, claude, exe="/usr/bin/dash"))
    impostor = procs.spawn(900, procs.spawn(901, 1, exe="/tmp/claude"))
    token, accessor = twin.delegate(agent="claude-code")
    assert twin.call("entry.list", token=token, pid=shim, agent="claude-code").ok
    assert twin.call("entry.list", token=token, pid=shim).ok
    # the right name, declared by a process that does not descend from the agent
    for agent in ("claude-code", "Claude Code", None):
        resp = twin.call("entry.list", token=token, pid=impostor, agent=agent)
        assert error_code(resp) == "SESSION_REQUIRED"
    why = twin.owner("session.why", {"accessor": accessor})
    assert all("agent" in d["reason"] for d in why["denials"])
    assert any("/tmp/claude" in line for d in why["denials"] for line in d["seen"])


def test_a_declared_agent_that_contradicts_the_profile_is_refused(twin: Twin) -> None:
    procs = twin.procs
    shim = procs.spawn(801, procs.spawn(800, 1, exe=claude_exe()))
    token, _ = twin.delegate(agent="claude-code")
    resp = twin.call("entry.list", token=token, pid=shim, agent="cursor")
    assert error_code(resp) == "SESSION_REQUIRED"
    assert twin.call("entry.list", token=token, pid=shim, agent="claude-code/2.1").ok


def test_every_builtin_agent_profile_matches_some_executable_and_not_a_bare_name() -> None:
    for name, profile in AGENT_PROFILES.items():
        assert profile.globs(), name
        example = profile.globs()[0].replace("[0-9]", "1").replace("*", "x")
        assert profile.matches(Proc(pid=5, create_time=1.0, name="whatever", exe=example)), name
        assert not profile.matches(Proc(pid=5, create_time=1.0, name=name, exe=""))
        assert not profile.matches(Proc(pid=5, create_time=1.0, name=name, exe="/tmp/x/" + name))
        assert profile.accepts_declared(name)
    assert not AGENT_PROFILES["claude-code"].accepts_declared("cursor")


def test_an_agent_exe_session_needs_that_exact_executable_among_the_ancestors(
    twin: Twin,
) -> None:
    procs = twin.procs
    exe = "/opt/agents/bin/my-agent"
    inside = procs.spawn(811, procs.spawn(810, 1, exe=exe))
    outside = procs.spawn(821, procs.spawn(820, 1, exe=exe + "-other"))
    token, _ = twin.delegate(agent_exe=exe)
    assert twin.call("entry.list", token=token, pid=inside).ok
    assert error_code(twin.call("entry.list", token=token, pid=outside)) == "SESSION_REQUIRED"


def test_agent_and_agent_exe_together_or_an_unknown_profile_are_invalid(twin: Twin) -> None:
    for params in (
        {"agent": "claude-code", "agent_exe": "/usr/bin/claude"},
        {"agent": "emacs"},
        {"agent_exe": "relative/claude"},
    ):
        resp = twin.call("session.create", params, password=PASSWORD)
        assert error_code(resp) == "INVALID_PARAMETERS", params


# ---------------------------------------------------------------------- time and uses


def test_a_session_ends_at_its_expiry_on_the_injected_clock(twin: Twin) -> None:
    token, accessor = twin.delegate(ttl_seconds=900)
    assert twin.call("entry.list", token=token).ok
    twin.clock.advance(seconds=899)
    assert twin.call("entry.list", token=token).ok
    twin.clock.advance(seconds=1)
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    assert twin.owner("session.show", {"accessor": accessor})["state"] == "expired"


def test_an_idle_session_ends_and_each_use_restarts_the_idle_timer(twin: Twin) -> None:
    token, accessor = twin.delegate(ttl_seconds=3600, idle_seconds=600)
    assert twin.call("entry.list", token=token).ok
    for _ in range(3):  # 1800 s in all, never 600 s unused
        twin.clock.advance(seconds=599)
        assert twin.call("entry.list", token=token).ok
    twin.clock.advance(seconds=601)
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    assert twin.owner("session.show", {"accessor": accessor})["state"] == "idle-expired"


def test_a_session_with_max_uses_refuses_the_request_after_the_last_use(twin: Twin) -> None:
    token, accessor = twin.delegate(max_uses=3)
    for _ in range(3):
        assert twin.call("entry.list", token=token).ok
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    info = twin.owner("session.show", {"accessor": accessor})
    assert (info["state"], info["use_count"]) == ("exhausted", 3)


def test_a_ttl_above_the_configured_maximum_is_refused(twin: Twin) -> None:
    twin.state.max_ttl = timedelta(hours=8)
    resp = twin.call("session.create", {"ttl_seconds": 8 * 3600 + 1}, password=PASSWORD)
    assert error_code(resp) == "INVALID_PARAMETERS"
    twin.delegate(ttl_seconds=8 * 3600)


# ---------------------------------------------------------------------- revocation


def test_a_revoked_session_is_refused_at_the_very_next_message(twin: Twin) -> None:
    token, accessor = twin.delegate()
    other, _ = twin.delegate()
    assert twin.call("entry.list", token=token).ok
    twin.ok("session.revoke", {"accessor": accessor})  # no password
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    assert twin.call("entry.list", token=other).ok


def test_revoking_while_locked_is_recorded_and_applied_at_the_next_unlock(twin: Twin) -> None:
    token, accessor = twin.delegate()
    kept, _ = twin.delegate()
    twin.ok("vault.lock")
    res = twin.ok("session.revoke", {"accessor": accessor})
    assert res["pending"] is True
    twin.owner("vault.unlock")
    assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    assert twin.call("entry.list", token=kept).ok
    assert twin.owner("session.show", {"accessor": accessor})["state"] == "revoked"
    assert not (twin.state.paths.state_dir / "pending-revocations.json").exists()


def test_revoke_all_while_locked_ends_every_session_at_the_next_unlock(twin: Twin) -> None:
    tokens = [twin.delegate()[0] for _ in range(3)]
    twin.ok("vault.lock")
    assert twin.ok("session.revoke", {"all": True})["pending"] is True
    twin.owner("vault.unlock")
    for token in tokens:
        assert error_code(twin.call("entry.list", token=token)) == "SESSION_REQUIRED"
    fresh, _ = twin.delegate()
    assert twin.call("entry.list", token=fresh).ok


def test_sessions_ended_more_than_a_week_ago_are_forgotten_at_the_next_unlock(
    twin: Twin,
) -> None:
    _, expired = twin.delegate(ttl_seconds=3600)
    _, revoked = twin.delegate(ttl_seconds=30 * 86400)
    live, kept = twin.delegate(ttl_seconds=30 * 86400)
    twin.owner("session.revoke", {"accessor": revoked})
    twin.clock.advance(seconds=6 * 86400)
    twin.ok("vault.lock")
    twin.owner("vault.unlock")  # six days: ended, but still listed
    listed = {s["accessor"] for s in twin.owner("session.list")["sessions"]}
    assert {expired, revoked, kept} <= listed
    twin.clock.advance(seconds=2 * 86400)
    twin.ok("vault.lock")
    twin.owner("vault.unlock")
    listed = {s["accessor"] for s in twin.owner("session.list")["sessions"]}
    assert kept in listed and expired not in listed and revoked not in listed
    assert twin.call("entry.list", token=live).ok
    assert twin.state.audit is not None
    pruned = [r for r in twin.state.audit.records() if r["event"] == "session.pruned"]
    assert [r["count"] for r in pruned] == [2]
    # durable: what a fresh unlock of the file sees
    twin.ok("vault.lock")
    twin.owner("vault.unlock")
    listed = {s["accessor"] for s in twin.owner("session.list")["sessions"]}
    assert expired not in listed and revoked not in listed


def test_sessions_survive_lock_and_unlock_and_keep_their_use_count(twin: Twin) -> None:
    token, accessor = twin.delegate()
    for _ in range(2):
        twin.ok("entry.list", token=token)
    twin.ok("vault.lock")
    assert error_code(twin.call("entry.list", token=token)) == "VAULT_LOCKED"
    twin.owner("vault.unlock")
    assert twin.call("entry.list", token=token).ok
    assert twin.owner("session.show", {"accessor": accessor})["use_count"] == 3


# ---------------------------------------------------------------------- denials


def test_the_peer_learns_only_the_code_and_the_owner_sees_which_binding_failed(
    twin: Twin,
) -> None:
    procs = twin.procs
    secret_exe = "/home/someone/very-distinctive-agent-path"
    stranger = procs.spawn(951, procs.spawn(950, 1, exe=secret_exe))
    token, accessor = twin.delegate(pid=procs.spawn(940, 1))
    resp = twin.call("entry.list", token=token, pid=stranger)
    assert error_code(resp) == "SESSION_REQUIRED"
    assert resp.error is not None
    assert secret_exe not in resp.model_dump_json()
    assert resp.error.hint
    why = twin.owner("session.why", {"accessor": accessor})
    (denial,) = why["denials"]
    assert denial["peer_pid"] == stranger
    assert "pid" in denial["reason"]
    assert any(secret_exe in line for line in denial["seen"])


def test_a_dry_run_diagnosis_neither_pins_nor_counts_a_use_nor_records_a_denial(
    twin: Twin,
) -> None:
    procs = twin.procs
    tree_a = procs.spawn(600, 1)
    tree_b = procs.spawn(700, 1)
    token, accessor = twin.delegate(pin=True, pid=procs.spawn(650, 1))
    for pid in (procs.spawn(701, tree_b), procs.spawn(601, tree_a)):
        seen = twin.ok("session.diagnose", token=token, pid=pid)
        assert (seen["known"], seen["accessor"]) == (True, accessor)
        assert seen["problem"]  # neither tree descends from pid 650
    info = twin.owner("session.show", {"accessor": accessor})
    assert (info["use_count"], info["bindings"]["pin"]) == (0, "first use")
    assert twin.owner("session.why", {"accessor": accessor})["denials"] == []


def test_repeated_failed_token_attempts_are_reported_to_the_throttle(twin: Twin) -> None:
    token, _ = twin.delegate()
    for _ in range(4):
        twin.call("entry.list", token="eps_" + "B" * 43)
    assert twin.throttle.reported == 4
    assert twin.call("entry.list", token=token).ok
    assert twin.throttle.reported == 4


def test_the_throttle_delay_grows_with_repeated_failures_and_is_capped() -> None:
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    attacker = Peer(uid=4242, gid=4242, pid=99_999_999)
    delays = []
    for _ in range(15):
        delays.append(throttle.failed(attacker))
        now[0] += 3.0  # slower than the global budget
    assert delays == sorted(delays)
    assert delays[0] == 0.0
    assert delays[4] > delays[3] > 0.0
    assert delays[-1] == delays[-2] > 0.0  # capped
    # another user is not slowed by the attacker
    assert throttle.failed(Peer(uid=4343, gid=4343, pid=99_999_998)) == 0.0


def test_a_new_process_or_unix_session_of_the_same_user_does_not_start_a_fresh_count() -> None:
    """#13.10: `setsid` per attempt used to get a new key (the Unix session)."""
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    delays = [throttle.failed(Peer(uid=4242, gid=4242, pid=50_000 + n)) for n in range(6)]
    assert delays[-1] > delays[-2] > 0.0


def test_a_valid_call_between_attempts_does_not_reset_the_throttle_only_a_quiet_period_does() -> (
    None
):
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    p = Peer(uid=4242, gid=4242, pid=99_999_999)
    for _ in range(6):
        throttle.failed(p)
    assert not hasattr(throttle, "succeeded")  # nothing a valid call could reset
    assert throttle.failed(p) > 0.0
    now[0] += 601.0
    assert throttle.failed(p) == 0.0


def test_failures_from_many_users_together_exhaust_the_global_budget() -> None:
    now = [0.0]
    throttle = Throttle(clock=lambda: now[0])
    delays = [throttle.failed(Peer(uid=10_000 + n, gid=0, pid=None)) for n in range(40)]
    assert delays[: Throttle.GLOBAL_FREE] == [0.0] * Throttle.GLOBAL_FREE
    assert delays[-1] == Throttle.MAX_DELAY
    now[0] += 61.0
    assert throttle.failed(Peer(uid=20_000, gid=0, pid=None)) == 0.0


def test_diagnosing_an_unknown_token_counts_as_a_failed_attempt_and_reveals_nothing(
    twin: Twin,
) -> None:
    token, _ = twin.delegate()
    before = twin.throttle.reported
    out = twin.call("session.diagnose", token="eps_" + "C" * 43)
    assert out.ok and out.result == {
        "known": False,
        "accessor": None,
        "state": None,
        "scope": None,
        "expires_at": None,
        "problem": out.result["problem"],
    }
    assert twin.throttle.reported == before + 1
    nothing = twin.call("session.diagnose")
    assert nothing.ok and nothing.result is not None and nothing.result["known"] is False
    assert nothing.result["accessor"] is None
    assert twin.call("session.diagnose", token=token).result["known"] is True


# ---------------------------------------------------------------------- the scope ladder

# The contract, pinned: which scope each method needs. None: no credentials at all (safe
# operations: lock, revoke, status). "owner": the master password, never a session.
NEEDS: dict[str, str | None] = {
    "broker.ping": None,
    "broker.status": None,
    "broker.shutdown": None,
    "vault.lock": None,
    "session.revoke": None,
    "mcp.detach": None,
    "audit.verify": None,
    "request.deny": None,
    "request.revoke": None,
    "session.diagnose": None,
    "approval.link": None,  # a pending item's page: it decides nothing without the proof
    "passkey.list": None,
    "vault.init": "owner",
    "vault.unlock": "owner",
    "vault.passwd": "owner",
    "profile.set": "owner",
    "session.create": "owner",
    "tx.list": "owner",
    "tx.approve": "owner",
    "tx.deny": "owner",
    "request.approve": "owner",
    "entry.restore": "owner",
    "passkey.begin": "owner",
    "passkey.remove": "owner",
    "entry.list": "read",
    "entry.search": "read",
    "entry.show": "read",
    "space.list": "read",
    "session.whoami": "read",
    "mcp.attach": "read",
    "entry.get": "secrets",
    "entry.totp": "secrets",
    "secret.resolve": "secrets",
    "entry.add": "write",
    "entry.add_batch": "write",
    "vault.backup": "owner",
    "vault.migrate": "owner",
    "entry.edit": "write",
    "entry.remove": "write",
    "space.add": "write",
    "space.rename": "write",
    "space.remove": "write",
    "profile.show": "admin",
    "entry.history": "admin",
    "session.list": "admin",
    "session.show": "admin",
    "session.why": "admin",
    "audit.list": "admin",
    "request.list": "admin",
    "sync.init": "owner",
    "sync.invite": "owner",
    "sync.join": "owner",
    "sync.approve": "owner",
    "sync.remove": "owner",
    "sync.revoke_sessions": "owner",
    "sync.status": None,
    "sync.now": "write",
}
OWNER_ONLY = {m for m, need in NEEDS.items() if need == "owner"}
GATE_CODES = ("PERMISSION_DENIED", "SESSION_REQUIRED")


def auto_params(method: str) -> dict[str, Any]:
    """Some valid parameters for a method this file has no sample for (values are guesses)."""
    model = ROUTES[method].params
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.is_required():
            is_list = get_origin(info.annotation) is list
            out[name] = ["x"] if is_list else 1 if info.annotation is int else "x"
    model.model_validate(out)
    return out


def sample_params(twin: Twin, method: str, n: int) -> dict[str, Any] | None:
    """Valid parameters for `method`, with whatever it acts on freshly created.

    None: no sample here; the caller guesses parameters, which still shows whether the
    session passes the dispatcher's gate, though the handler may then refuse the guess.
    """
    fresh = f"x{n}"
    samples: dict[str, Callable[[], dict[str, Any]]] = {
        "entry.add": lambda: {"type": "api_key", "name": fresh, "secrets": {"key": {"value": "v"}}},
        "entry.add_batch": lambda: {
            "entries": [{"type": "api_key", "name": fresh, "secrets": {"key": {"value": "v"}}}]
        },
        "vault.backup": lambda: {"name": f"{fresh}.apm"},
        "entry.show": lambda: {"ref": "seed"},
        "entry.get": lambda: {"ref": "seed"},
        "entry.totp": lambda: {"ref": "otp"},
        "entry.search": lambda: {"query": "seed"},
        "entry.edit": lambda: {"ref": "seed", "notes": fresh},
        "entry.remove": lambda: {"ref": twin.add(fresh)},
        "space.add": lambda: {"name": fresh},
        "space.rename": lambda: {"name": twin.space(fresh), "new_name": fresh + "r"},
        "space.remove": lambda: {"name": twin.space(fresh)},
        "session.show": lambda: {"accessor": twin.delegate()[1]},
        "session.why": lambda: {"accessor": twin.delegate()[1]},
        "session.revoke": lambda: {"accessor": twin.delegate()[1]},
        "session.create": lambda: {"scope": "admin", "ttl_seconds": 86400},
        "secret.resolve": lambda: {"refs": ["apm://default/seed/key"]},
        "tx.approve": lambda: {"tx_id": "tx_none"},
        "tx.deny": lambda: {"tx_id": "tx_none"},
        "approval.link": lambda: {"kind": "tx", "id": "tx_none"},
        "passkey.remove": lambda: {"id": "none-such"},
        "mcp.attach": lambda: {"client_name": "ladder"},
        "mcp.detach": lambda: {"conn": "none"},
        "vault.passwd": lambda: {"new_password": "a new password"},
        "profile.set": lambda: {"profile": "interactive"},
        "vault.init": lambda: {"profile": "interactive"},
        "sync.approve": lambda: {"device": "dev-00"},
        "sync.remove": lambda: {"device": "dev-00", "space": "work"},
        "sync.revoke_sessions": lambda: {"device": "dev-00"},
    }
    no_params = {
        "broker.ping",
        "broker.status",
        "broker.shutdown",
        "vault.lock",
        "vault.unlock",
        "profile.show",
        "entry.list",
        "space.list",
        "session.list",
        "session.whoami",
        "audit.list",
        "audit.verify",
        "tx.list",
        "request.list",
        "session.diagnose",
        "sync.status",
        "sync.now",
    }
    if method in no_params:
        return {}
    make = samples.get(method)
    return make() if make is not None else None


def expected(method: str, scope: str) -> str:
    """What the dispatcher's Access for `method` promises a session of `scope`."""
    access = ROUTES[method].rule
    if access.owner_only or method in OWNER_ONLY:
        return "refused"
    if access.scope is None:
        return "runs"
    return "runs" if SCOPES.index(scope) >= SCOPES.index(access.scope) else "PERMISSION_DENIED"


def test_the_pinned_scope_table_names_every_route_and_agrees_with_its_access() -> None:
    unpinned = set(ROUTES) - set(NEEDS)
    assert not unpinned, f"pin the scope these methods need in NEEDS: {sorted(unpinned)}"
    for method in ROUTES:
        need, access = NEEDS[method], ROUTES[method].rule
        if need is None:
            assert (access.scope, access.owner_only) == (None, False), method
        elif need == "owner":
            assert access.scope is None, method
        else:
            assert (access.scope, access.owner_only) == (need, False), method


@pytest.mark.parametrize("scope", SCOPES)
def test_every_method_runs_or_is_denied_exactly_as_its_access_says(twin: Twin, scope: str) -> None:
    twin.add("seed", tags=["t"])
    twin.vault.add("totp", "otp", "default", [], None, None, Change({}, {"secret": TOTP_SEED}, []))
    token, accessor = twin.delegate(scope=scope, ttl_seconds=86400)
    outcomes: dict[str, str] = {}
    refused_by_handler: dict[str, str] = {}
    for n, method in enumerate(sorted(ROUTES)):
        params = sample_params(twin, method, n)
        guessed = params is None
        sessions_before = len(twin.state.sessions().records)
        header_before = twin.state.paths.vault.read_bytes()[:64]
        resp = twin.call(method, auto_params(method) if params is None else params, token=token)
        code = resp.error.code if resp.error is not None else "OK"
        outcomes[method] = code if code in GATE_CODES else "runs"
        if code not in GATE_CODES and code != "OK" and not guessed:
            refused_by_handler[method] = code
        if expected(method, scope) == "refused":
            # a session never creates, widens or unlocks anything, nor changes the key
            assert len(twin.state.sessions().records) == sessions_before, method
            assert twin.state.paths.vault.read_bytes()[:64] == header_before, method
            assert outcomes[method] in GATE_CODES, method
            outcomes[method] = "refused"
        # put back what the safe, credential-free methods switched off
        twin.state.shutdown.clear()
        if twin.state.cache.peek() is None:
            twin.owner("vault.unlock")
    assert outcomes == {m: expected(m, scope) for m in ROUTES}
    # with proper parameters, "runs" means it succeeded (request and tx ids here name nothing)
    named_nothing = {"request.deny", "request.revoke", "approval.link"}
    assert set(refused_by_handler) <= named_nothing, refused_by_handler
    # the session itself is still what it was: same scope, not extended
    info = twin.owner("session.show", {"accessor": accessor})
    assert info["scope"] == scope
    assert datetime.fromisoformat(info["expires_at"]) == twin.clock() + timedelta(days=1)


def test_a_session_cannot_create_a_session_even_with_a_wrong_password_beside_it(
    twin: Twin,
) -> None:
    token, _ = twin.delegate(scope="admin")
    resp = twin.call("session.create", {"scope": "admin"}, token=token, password="guess")
    assert error_code(resp) == "BAD_PASSWORD"
    assert len(twin.state.sessions().records) == 1


# ---------------------------------------------------------------------- entry filters


@pytest.fixture
def filtered(twin: Twin) -> Twin:
    twin.add("gh", space="work", tags=["dev"])
    twin.add("aws-prod", space="work", tags=["ops"])
    twin.add("bank", space="personal", tags=["money"])
    twin.add("gh", space="personal", tags=["dev"])  # same name, another space
    return twin


@pytest.mark.parametrize(
    ("spec_", "visible"),
    [
        ({"spaces": ["work"]}, {("work", "gh"), ("work", "aws-prod")}),
        ({"tags": ["dev"]}, {("work", "gh"), ("personal", "gh")}),
        ({"entries": ["aws-*", "BANK"]}, {("work", "aws-prod"), ("personal", "bank")}),
        ({"spaces": ["work"], "tags": ["ops"]}, {("work", "aws-prod")}),
    ],
)
def test_entries_outside_the_filter_are_not_found_and_absent_from_list_and_search(
    filtered: Twin, spec_: dict[str, list[str]], visible: set[tuple[str, str]]
) -> None:
    twin = filtered
    token, _ = twin.delegate(scope="write", **spec_)
    listed = twin.ok("entry.list", token=token)["entries"]
    assert {(e["space"], e["name"]) for e in listed} == visible
    for query in ("gh", "aws-prod", "bank"):
        hits = twin.ok("entry.search", {"query": query}, token=token)["hits"]
        found = {(h["entry"]["space"], h["entry"]["name"]) for h in hits}
        assert found <= visible
        assert {(s, n) for s, n in visible if n == query} <= found
    everything = {(e.space, e.name): e.id for e in twin.vault.entries.values()}
    for (space, name), eid in everything.items():
        for method in ("entry.show", "entry.get", "entry.totp", "entry.remove"):
            for params in ({"ref": eid}, {"ref": name, "space": space}):
                if (space, name) in visible:
                    continue
                resp = twin.call(method, params, token=token)
                assert error_code(resp) == "ENTRY_NOT_FOUND", (method, params)
        edit = twin.call("entry.edit", {"ref": eid, "notes": "x"}, token=token)
        if (space, name) in visible:
            assert edit.ok
        else:
            assert error_code(edit) == "ENTRY_NOT_FOUND"
    assert len(twin.vault.entries) == len(everything)


def test_a_filtered_search_sees_each_commit_and_still_hides_what_the_filter_hides(
    filtered: Twin,
) -> None:
    # the first search builds the search index; the owner's commits after it are what the
    # index holds stale copies of, and the next search must show them through the filter
    twin = filtered
    token, _ = twin.delegate(scope="read", spaces=["work"])

    def found(query: str, limit: int = 50) -> list[tuple[str, str]]:
        params = {"query": query, "limit": limit}
        hits = twin.ok("entry.search", params, token=token)["hits"]
        return [(h["entry"]["space"], h["entry"]["name"]) for h in hits]

    assert found("g") == [("work", "gh")]
    assert twin.vault._search is not None
    twin.add("gamma", space="personal")  # hidden, new
    twin.add("gold", space="work")  # visible, new
    twin.owner("entry.edit", {"ref": "aws-prod", "new_name": "gcp-prod"})  # renamed into view
    moved = {"ref": "gh", "space": "personal", "new_name": "ghost", "move_to": "work"}
    twin.owner("entry.edit", moved)  # renamed and moved into view
    twin.owner("entry.edit", {"ref": "bank", "new_name": "gbank"})  # hidden, renamed
    assert twin.vault._search is not None  # a few commits keep the index
    assert found("g") == [("work", "gcp-prod"), ("work", "gh"), ("work", "ghost"), ("work", "gold")]
    # a small limit: the search stops at the best hits, commits and filter still apply
    assert found("g", limit=2) == [("work", "gcp-prod"), ("work", "gh")]
    assert found("gh", limit=1) == [("work", "gh")]
    twin.owner("entry.edit", {"ref": "gold", "move_to": "personal"})  # moved out of view
    twin.owner("entry.edit", {"ref": "gh", "move_to": "personal"})  # indexed, moved out of view
    twin.owner("entry.remove", {"ref": "gcp-prod"})
    assert found("g") == [("work", "ghost")]
    assert found("g", limit=1) == found("gho", limit=1) == [("work", "ghost")]
    assert found("gbank") == found("gamma") == found("gold") == found("gcp") == found("aws") == []
    assert len(twin.ok("entry.search", {"query": "g"}, password=twin.password)["hits"]) == 5


def test_a_filtered_name_lookup_ignores_the_hidden_namesake(filtered: Twin) -> None:
    token, _ = filtered.delegate(scope="secrets", spaces=["work"])
    got = filtered.ok("entry.get", {"ref": "gh"}, token=token)
    assert got["value"] == "value-of-gh"
    assert filtered.ok("entry.show", {"ref": "gh"}, token=token)["entry"]["space"] == "work"


def test_a_filtered_session_cannot_add_outside_its_filter_or_change_spaces(
    filtered: Twin,
) -> None:
    token, _ = filtered.delegate(scope="write", spaces=["work"])
    outside = {
        "type": "api_key",
        "name": "new",
        "space": "personal",
        "secrets": {"key": {"value": "v"}},
    }
    assert error_code(filtered.call("entry.add", outside, token=token)) == "PERMISSION_DENIED"
    inside = {**outside, "space": "work"}
    assert filtered.call("entry.add", inside, token=token).ok
    moved = filtered.call("entry.edit", {"ref": "gh", "move_to": "personal"}, token=token)
    assert error_code(moved) == "PERMISSION_DENIED"
    for method, params in (
        ("space.add", {"name": "new"}),
        ("space.rename", {"name": "personal", "new_name": "p2"}),
        ("space.remove", {"name": "personal", "force": True}),
    ):
        assert error_code(filtered.call(method, params, token=token)) == "PERMISSION_DENIED"
    spaces = filtered.ok("space.list", token=token)["spaces"]
    assert [s["name"] for s in spaces] == ["work"]


# ---------------------------------------------------------------------- the hash, not the token


def test_the_vault_keeps_the_token_hash_and_never_the_token(twin: Twin) -> None:
    token, accessor = twin.delegate(label="ci")
    twin.ok("entry.list", token=token)
    twin.ok("vault.lock")  # flushes usage counters
    files = [p for p in twin.state.paths.vault.parent.rglob("*") if p.is_file()]
    assert twin.state.paths.state_dir / "audit.jsonl" in files
    for path in files:  # the vault, its backup, the audit log ...
        raw = path.read_bytes()
        assert token.encode() not in raw, path
        assert hash_token(token).encode() not in raw, path  # encrypted, not in the clear
    on_disk = Vault.open(twin.state.paths.vault, normalize_password(PASSWORD))
    try:
        (rec,) = on_disk.extra["sessions"]
    finally:
        on_disk.close()
    assert rec["accessor"] == accessor
    assert rec["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(rec)
    everything_said = "".join(r.model_dump_json() for r in twin.responses[1:])
    assert token not in everything_said  # shown once, by session.create only


def test_session_create_shows_the_token_once_with_accessor_scopes_bindings_and_expiry(
    twin: Twin,
) -> None:
    res = twin.owner("session.create", {"scope": "write", "pid": twin.pid, "pin": True})
    assert TOKEN_RE.match(res["token"])
    s = res["session"]
    assert s["scopes"] == ["read", "secrets", "write"]
    assert s["bindings"]["host"] is True
    assert s["bindings"]["pid"]["pid"] == twin.pid
    assert s["bindings"]["pin"] == "first use"
    assert datetime.fromisoformat(s["expires_at"]) == twin.clock() + timedelta(minutes=15)
    listed = twin.owner("session.list")
    assert res["token"] not in str(listed)


def test_filter_matching_is_by_space_tag_and_case_insensitive_glob() -> None:
    f = EntryFilter(spaces=["work"], tags=["dev", "ops"], globs=["GITH*"])
    assert f.allows("work", ["dev"], "github")
    assert not f.allows("personal", ["dev"], "github")
    assert not f.allows("work", ["money"], "github")
    assert not f.allows("work", ["dev"], "gitlab")
    assert EntryFilter().empty
