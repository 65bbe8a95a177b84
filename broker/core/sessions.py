"""Ephemeral sessions: tokens shown once, stored as SHA-256 hashes, checked on every request.

Rules:
- The token itself is never stored, logged or returned again after `create`.
- Every request re-checks revocation, expiry, idle time, use count and every binding, so a
  revocation takes effect at the very next message, also on connections that already attached.
- The exact reason for a denial is for the owner (`denials`, the broker log); the peer only
  learns SESSION_REQUIRED or PERMISSION_DENIED.
- Time is injected (`clock`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.wire.errors import InvalidParameters, SessionRequired
from broker.wire.protocol import SessionFields

from .bindings import AGENT_PROFILES, AgentProfile, AncestryCache, Proc, file_identity
from .vault_file import atomic_write

Scope = Literal["read", "secrets", "write", "admin"]
Approver = Literal["agent", "client", "owner"]
ToolNames = Literal["apm", "apono"]  # MCP tool naming (mcp_tools.TOOL_NAMINGS)
SCOPES: tuple[str, ...] = ("read", "secrets", "write", "admin")
TOKEN_PREFIX = "eps_"  # noqa: S105 - a prefix, not a secret
ACCESSOR_PREFIX = "ses_"


def scope_rank(scope: str) -> int:
    return SCOPES.index(scope)


def scopes_up_to(scope: str) -> list[str]:
    return list(SCOPES[: scope_rank(scope) + 1])


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and 40 <= len(token) <= 256


class Bindings(BaseModel):
    host: str | None = None
    pid: int | None = None
    pid_create_time: float | None = None
    pid_name: str | None = None
    agent: str | None = None
    agent_exe: str | None = None
    agent_exe_pin: dict[str, Any] | None = None  # ExeIdentity of agent_exe at delegation
    pin: bool = False
    pinned_pid: int | None = None
    pinned_create_time: float | None = None
    pinned_name: str | None = None


class EntryFilter(BaseModel):
    spaces: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    globs: list[str] = Field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.spaces or self.tags or self.globs)

    def allows(self, space: str, tags: list[str], name: str) -> bool:
        if self.spaces and space not in self.spaces:
            return False
        if self.tags and not set(self.tags) & set(tags):
            return False
        return not self.globs or any(
            fnmatch.fnmatchcase(name.casefold(), g.casefold()) for g in self.globs
        )


class SessionRecord(SessionFields):
    """A session as the broker stores it: the fields it shares with its wire view
    (`protocol.SessionFields`, declared once) plus the token's hash and the structured filter
    and bindings, which the view shows in display form (`session_handlers.session_info`)."""

    token_hash: str
    filter: EntryFilter = Field(default_factory=EntryFilter)
    bindings: Bindings = Field(default_factory=Bindings)

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.max_uses is not None and self.use_count >= self.max_uses:
            return "exhausted"
        last = self.last_used_at or self.created_at  # idle from creation until first use
        if self.idle_seconds is not None and (now - last).total_seconds() > self.idle_seconds:
            return "idle-expired"
        return "active"


class Denial(BaseModel):
    at: datetime
    reason: str
    peer_pid: int | None = None
    seen: list[str] = Field(default_factory=list)  # "pid name exe" of the peer's ancestry


@dataclass
class CreateSpec:
    label: str
    scope: Scope
    ttl: timedelta
    idle_seconds: int | None = None
    max_uses: int | None = None
    bind_host: bool = True
    pid: int | None = None
    agent: str | None = None
    agent_exe: str | None = None
    agent_exe_pin: str | None = None  # "stat" or "sha256"
    pin: bool = False
    filter: EntryFilter = field(default_factory=EntryFilter)
    approve: Approver = "agent"
    tool_names: ToolNames | None = None


@dataclass
class AuthResult:
    record: SessionRecord
    must_persist: bool  # the record changed in a way that must be durable before answering


class SessionStore:
    """All sessions of one unlocked vault."""

    def __init__(
        self,
        records: list[dict[str, Any]],
        *,
        clock: Callable[[], datetime],
        ancestry: AncestryCache,
        host: str,
    ) -> None:
        self.clock = clock
        self.ancestry = ancestry
        self.host = host
        self.records: dict[str, SessionRecord] = {}
        self._by_hash: dict[str, str] = {}
        self.denials: dict[str, deque[Denial]] = {}
        self.dirty = False
        for raw in records:
            rec = SessionRecord.model_validate(raw)
            self._index(rec)

    def _index(self, rec: SessionRecord) -> None:
        self.records[rec.accessor] = rec
        self._by_hash[rec.token_hash] = rec.accessor

    def _unindex(self, rec: SessionRecord) -> None:
        self.records.pop(rec.accessor, None)
        self._by_hash.pop(rec.token_hash, None)

    def dump(self) -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in self.records.values()]

    # ------------------------------------------------------------------ create / revoke

    def create(self, spec: CreateSpec) -> tuple[str, SessionRecord]:
        now = self.clock()
        bindings = Bindings(host=self.host if spec.bind_host else None, pin=spec.pin)
        if spec.pid is not None:
            chain = self.ancestry.walk(spec.pid)
            if not chain:
                raise InvalidParameters(
                    f"no process with pid {spec.pid}", data={"field": "pid"}, hint="check the pid"
                )
            bindings.pid = spec.pid
            bindings.pid_create_time = chain[0].create_time
            bindings.pid_name = chain[0].name
        if spec.agent is not None:
            if spec.agent not in AGENT_PROFILES:
                raise InvalidParameters(
                    "unknown agent profile",
                    data={"field": "agent"},
                    hint="profiles: " + ", ".join(AGENT_PROFILES),
                )
            bindings.agent = spec.agent
        if spec.agent_exe is not None:
            if not spec.agent_exe.startswith("/") and ":\\" not in spec.agent_exe:
                raise InvalidParameters("--agent-exe must be an absolute path")
            bindings.agent_exe = spec.agent_exe
            if spec.agent_exe_pin is not None:
                try:
                    pinned = file_identity(spec.agent_exe, spec.agent_exe_pin)
                except (OSError, ValueError) as exc:
                    raise InvalidParameters(
                        f"cannot pin --agent-exe: {getattr(exc, 'strerror', None) or exc}",
                        data={"field": "agent_exe"},
                        hint="give the path of the client's executable file",
                    ) from exc
                bindings.agent_exe_pin = pinned.as_dict()
        elif spec.agent_exe_pin is not None:
            raise InvalidParameters("--agent-exe-pin needs --agent-exe PATH")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        rec = SessionRecord(
            accessor=ACCESSOR_PREFIX + secrets.token_hex(8),
            token_hash=hash_token(token),
            label=spec.label,
            scope=spec.scope,
            created_at=now,
            expires_at=now + spec.ttl,
            idle_seconds=spec.idle_seconds,
            max_uses=spec.max_uses,
            filter=spec.filter,
            bindings=bindings,
            approve=spec.approve,
            tool_names=spec.tool_names,
        )
        self._index(rec)
        return token, rec

    def discard(self, accessor: str) -> None:
        rec = self.records.get(accessor)
        if rec is not None:
            self._unindex(rec)

    def revoke(self, accessor: str) -> bool:
        rec = self.records.get(accessor)
        if rec is None or rec.revoked_at is not None:
            return False
        rec.revoked_at = self.clock()
        return True

    def revoke_all(self, before: datetime | None = None) -> list[str]:
        done = []
        for rec in self.records.values():
            if rec.revoked_at is None and (before is None or rec.created_at <= before):
                rec.revoked_at = self.clock()
                done.append(rec.accessor)
        return done

    def prune(self, keep: timedelta = timedelta(days=7)) -> int:
        """Forget sessions that ended more than `keep` ago."""
        now = self.clock()
        old = [
            r
            for r in self.records.values()
            if (r.revoked_at is not None and now - r.revoked_at > keep)
            or (now - r.expires_at > keep)
        ]
        for r in old:
            self._unindex(r)
        return len(old)

    # ------------------------------------------------------------------ authenticate

    def deny(
        self,
        rec: SessionRecord | None,
        reason: str,
        peer_pid: int | None,
        chain: tuple[Proc, ...] = (),
    ) -> SessionRequired:
        if rec is not None:
            d = Denial(
                at=self.clock(),
                reason=reason,
                peer_pid=peer_pid,
                seen=[f"{p.pid} {p.name} {p.exe}".strip() for p in chain[:8]],
            )
            self.denials.setdefault(rec.accessor, deque(maxlen=20)).append(d)
        return SessionRequired(
            "session is not valid for this process",
            hint='ask the owner to run "apm session why ACCESSOR" or "apm delegate"',
            data={"accessor": rec.accessor} if rec is not None else {},
        )

    def lookup(self, token: str) -> SessionRecord:
        accessor = self._by_hash.get(hash_token(token)) if looks_like_token(token) else None
        if accessor is None:
            raise SessionRequired(
                "unknown session token",
                hint='the session may have been pruned; ask the owner to run "apm delegate"',
            )
        return self.records[accessor]

    def authenticate(
        self, token: str, peer_pid: int | None, declared_agent: str | None = None
    ) -> AuthResult:
        return self.check(self.lookup(token), peer_pid, declared_agent)

    def check_accessor(
        self, accessor: str, peer_pid: int | None, declared_agent: str | None = None
    ) -> AuthResult:
        """Re-check an attached connection's session (it may since have been revoked)."""
        rec = self.records.get(accessor)
        if rec is None:
            raise SessionRequired("session no longer exists", hint='ask the owner: "apm delegate"')
        return self.check(rec, peer_pid, declared_agent)

    def verdict(
        self,
        rec: SessionRecord,
        peer_pid: int | None,
        declared_agent: str | None = None,
        now: datetime | None = None,
    ) -> tuple[str | None, tuple[Proc, ...]]:
        """Why this peer may not use the session now (None: it may), and the ancestry seen.

        No side effects: `check` applies them; `apm doctor` uses this alone for a dry run.
        """
        state = rec.state(self.clock() if now is None else now)
        if state != "active":
            return f"session {state}", ()
        b = rec.bindings
        if b.host is not None and b.host != self.host:
            return "host binding: another machine or user", ()
        chain: tuple[Proc, ...] = ()
        if b.pid is not None or b.agent or b.agent_exe or b.pin:
            if peer_pid is None:
                return "the kernel did not report the peer pid", ()
            chain = self.ancestry.get(peer_pid)
            if not chain:
                return "peer process vanished before it could be checked", ()
        if b.pid is not None and not _has(chain, b.pid, b.pid_create_time):
            if any(p.pid == b.pid for p in chain):
                return f"pid binding: pid {b.pid} was reused (create time differs)", chain
            return f"pid binding: peer is not pid {b.pid} or its descendant", chain
        if b.agent:
            profile = AGENT_PROFILES[b.agent]
            hits = [p for p in chain if profile.matches(p)]
            if not hits:
                return f"agent binding: no ancestor runs a {b.agent} executable", chain
            problems = [self.ancestry.exe_check(p.pid, p.exe) for p in hits]
            if all(problems):
                return f"agent binding: {b.agent} pid {hits[0].pid}: {problems[0]}", chain
            if declared_agent and contradicts(profile, declared_agent):
                return f"declared agent {declared_agent[:64]!r} contradicts {b.agent}", chain
        if b.agent_exe:
            reason = self._exe_verdict(rec, chain)
            if reason is not None:
                return reason, chain
        pinned = b.pin and b.pinned_pid is not None
        if pinned and not _has(chain, b.pinned_pid or 0, b.pinned_create_time):
            return "pin binding: another process tree", chain
        return None, chain

    def _exe_verdict(self, rec: SessionRecord, chain: tuple[Proc, ...]) -> str | None:
        b = rec.bindings
        hit = next((p for p in chain if p.exe == b.agent_exe), None)
        if hit is None:
            return "agent-exe binding: executable not in ancestry"
        problem = self.ancestry.exe_check(hit.pid, hit.exe)
        if problem is not None:
            return f"agent-exe binding: pid {hit.pid}: {problem}"
        if b.agent_exe_pin:
            change = self.ancestry.identity_change(b.agent_exe_pin, hit.pid, hit.exe)
            if change is not None:
                return (
                    f"agent-exe binding: {b.agent_exe} changed since the session pinned it "
                    f"({change}); if you updated it, re-pin: {repin_command(rec)}"
                )
        return None

    def check(
        self, rec: SessionRecord, peer_pid: int | None, declared_agent: str | None = None
    ) -> AuthResult:
        """Every rule, every request: state, host, pid, agent, pin; then count the use."""
        now = self.clock()  # (one clock read: the use is stamped with the time it was checked)
        reason, chain = self.verdict(rec, peer_pid, declared_agent, now)
        if reason is not None:
            raise self.deny(rec, reason, peer_pid, chain)
        b = rec.bindings
        must_persist = False
        if b.pin and b.pinned_pid is None:
            anchor = pin_anchor(chain)
            b.pinned_pid, b.pinned_create_time = anchor.pid, anchor.create_time
            b.pinned_name = anchor.name
            must_persist = True
        if declared_agent and rec.declared_agent is None:
            rec.declared_agent = declared_agent[:128]
        rec.use_count += 1
        rec.last_used_at = now
        if rec.max_uses is not None:
            must_persist = True
        self.dirty = True
        return AuthResult(record=rec, must_persist=must_persist)


def pin_anchor(chain: tuple[Proc, ...]) -> Proc:
    """The process a --pin session binds to: the caller's parent, unless that parent is pid 1
    or an ancestor of the broker itself (a session manager such as `systemd --user`), which
    every process descends from and would bind to nothing; then the caller itself."""
    shared = {p.pid for p in _own_ancestry()}
    if len(chain) > 1 and chain[1].pid != 1 and chain[1].pid not in shared:
        return chain[1]
    return chain[0]


def _own_ancestry() -> tuple[Proc, ...]:
    from .bindings import walk_ancestry

    return walk_ancestry(os.getpid())


def repin_command(rec: SessionRecord) -> str:
    """The command that makes a session pinned to the executable's current file."""
    b = rec.bindings
    mode = str((b.agent_exe_pin or {}).get("mode", "stat"))
    pin = f"--agent-exe {b.agent_exe} --agent-exe-pin {mode}"
    client = rec.label.removesuffix(" (apm mcp install)")
    if client != rec.label and " " not in client:
        return f'"apm mcp install --client {client} {pin}"'
    return f'"apm delegate --scope {rec.scope} {pin}", then "apm session revoke {rec.accessor}"'


def contradicts(profile: AgentProfile, declared: str) -> bool:
    """A declared client name contradicts a profile when it names another known client."""
    if profile.accepts_declared(declared):
        return False
    return any(p.accepts_declared(declared) for p in AGENT_PROFILES.values() if p is not profile)


def _has(chain: tuple[Proc, ...], pid: int, ct: float | None) -> bool:
    return any(p.pid == pid and (ct is None or abs(p.create_time - ct) < 1e-3) for p in chain)


class PendingRevocations:
    """Revocations asked for while the vault is locked, applied at the next unlock.

    Revoking never needs the password, but a locked vault cannot be rewritten; the accessor ids
    (not secret) are kept durably beside it until then, and in the broker's memory, because any
    same-user process can delete the file: at unlock both are applied, and what the file lost
    is reported. Locked, no session can be used anyway.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.memory: list[dict[str, str]] = []

    def load(self) -> list[dict[str, str]]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [d for d in doc if isinstance(d, dict)] if isinstance(doc, list) else []

    def add(self, item: dict[str, str]) -> None:
        items = [*self.load(), item]
        atomic_write(self.path, json.dumps(items).encode(), keep_backup=False)
        self.memory.append(item)

    def missing_from_file(self) -> list[dict[str, str]]:
        """What this broker was asked to revoke while locked that the file no longer holds."""
        on_file = self.load()
        return [item for item in self.memory if item not in on_file]

    def apply(self, store: SessionStore) -> list[str]:
        done: list[str] = []
        items = self.load()
        items += [item for item in self.memory if item not in items]
        for item in items:
            if "accessor" in item and store.revoke(item["accessor"]):
                done.append(item["accessor"])
            elif "all_before" in item:
                done += store.revoke_all(datetime.fromisoformat(item["all_before"]))
        return done

    @property
    def waiting(self) -> bool:
        return bool(self.memory) or self.path.exists()

    def clear(self) -> None:
        self.memory = []
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
