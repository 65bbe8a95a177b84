"""What the kernel says about a peer: its process ancestry, this host's identity, agent profiles.

Rules:
- Only kernel-reported facts count: the peer pid from SO_PEERCRED, and each ancestor's pid,
  create_time and executable path as read by psutil (/proc/<pid>/exe is a kernel link; a
  process name is self-chosen and only ever used for display).
- Ancestry is cached per (pid, create_time): a pid that is reused gets a new create_time and
  therefore a fresh walk.
- The walk is an injectable seam (`walk`), so tests can present a reused pid without waiting
  for the kernel to recycle one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Proc:
    pid: int
    create_time: float
    name: str
    exe: str


Ancestry = tuple[Proc, ...]  # the peer first, then its parent, ... up to pid 1


def walk_ancestry(pid: int) -> Ancestry:
    chain: list[Proc] = []
    try:
        proc: psutil.Process | None = psutil.Process(pid)
    except psutil.Error:
        return ()
    seen: set[int] = set()
    while proc is not None and proc.pid not in seen and len(chain) < 64:
        seen.add(proc.pid)
        try:
            with proc.oneshot():
                ct = proc.create_time()
                name = proc.name()
                try:
                    exe = proc.exe()
                except psutil.Error:
                    exe = ""
                parent = proc.parent()
        except psutil.Error:
            break
        chain.append(Proc(pid=proc.pid, create_time=ct, name=name, exe=exe))
        proc = parent
    return tuple(chain)


def create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


class AncestryCache:
    """Ancestry per (pid, create_time), bounded LRU."""

    def __init__(
        self,
        walk: Callable[[int], Ancestry] = walk_ancestry,
        create_time_of: Callable[[int], float | None] = create_time,
        size: int = 4096,
    ) -> None:
        self.walk = walk
        self.create_time_of = create_time_of
        self._size = size
        self._cache: OrderedDict[tuple[int, float], Ancestry] = OrderedDict()

    def get(self, pid: int) -> Ancestry:
        ct = self.create_time_of(pid)
        if ct is None:
            return ()
        key = (pid, ct)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        chain = self.walk(pid)
        if chain and chain[0].create_time == ct:
            self._cache[key] = chain
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return chain


def machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    if sys.platform == "darwin":
        import subprocess

        out = subprocess.run(
            ["/usr/sbin/ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in out.splitlines():
            if "IOPlatformUUID" in line:
                return line.split('"')[-2]
    return os.uname().nodename


def host_fingerprint(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    return hashlib.sha256(f"apm-host-v1\x00{machine_id()}\x00{uid}".encode()).hexdigest()


@dataclass(frozen=True)
class AgentProfile:
    """An AI client, recognised by the executable path of some ancestor of the peer."""

    name: str
    display: str
    names: tuple[str, ...]  # process names, for display and diagnostics only
    exe_globs: dict[str, tuple[str, ...]]  # platform -> executable path globs (~ = home)
    aliases: tuple[str, ...]  # self-reported names (MCP clientInfo, APM_EPHEMERAL_AGENT)

    def globs(self, platform: str | None = None) -> tuple[str, ...]:
        plat = "darwin" if (platform or sys.platform) == "darwin" else "linux"
        if (platform or sys.platform) == "win32":
            plat = "win32"
        home = str(Path.home())
        return tuple(g.replace("~", home, 1) for g in self.exe_globs.get(plat, ()))

    def matches(self, proc: Proc) -> bool:
        return bool(proc.exe) and any(fnmatch.fnmatchcase(proc.exe, g) for g in self.globs())

    def accepts_declared(self, declared: str) -> bool:
        d = declared.strip().casefold()
        return any(d == a.casefold() or d.startswith(a.casefold() + "/") for a in self.aliases)


AGENT_PROFILES: dict[str, AgentProfile] = {
    p.name: p
    for p in (
        AgentProfile(
            name="claude-desktop",
            display="Claude Desktop",
            names=("claude", "Claude", "claude-desktop"),
            exe_globs={
                "linux": (
                    "/usr/lib/claude-desktop/*",
                    "/opt/Claude/*",
                    "/usr/bin/claude-desktop",
                    "~/.local/share/claude-desktop/*",
                ),
                "darwin": ("/Applications/Claude.app/Contents/*",),
                "win32": ("*\\AnthropicClaude\\*\\claude.exe", "*\\AnthropicClaude\\claude.exe"),
            },
            aliases=("claude-desktop", "claude-ai", "Claude Desktop"),
        ),
        AgentProfile(
            name="claude-code",
            display="Claude Code",
            names=("claude",),
            exe_globs={
                "linux": (
                    "~/.local/bin/claude",
                    "~/.claude/local/*",
                    "~/.local/share/claude/*",
                    "/usr/local/bin/claude",
                    "/usr/bin/claude",
                ),
                "darwin": (
                    "~/.local/bin/claude",
                    "~/.claude/local/*",
                    "~/.local/share/claude/*",
                    "/opt/homebrew/bin/claude",
                    "/usr/local/bin/claude",
                ),
                "win32": ("*\\.local\\bin\\claude.exe", "*\\claude\\claude.exe"),
            },
            aliases=("claude-code", "claude code"),
        ),
        AgentProfile(
            name="cursor",
            display="Cursor",
            names=("cursor", "Cursor", "Cursor Helper"),
            exe_globs={
                "linux": (
                    "/usr/share/cursor/*",
                    "/opt/Cursor/*",
                    "/opt/cursor/*",
                    "~/.local/share/cursor/*",
                ),
                "darwin": ("/Applications/Cursor.app/Contents/*",),
                "win32": ("*\\Programs\\cursor\\*",),
            },
            aliases=("cursor", "cursor-vscode"),
        ),
        AgentProfile(
            name="vscode",
            display="Visual Studio Code",
            names=("code", "Code", "Code Helper", "code-insiders"),
            exe_globs={
                "linux": (
                    "/usr/share/code/*",
                    "/usr/share/code-insiders/*",
                    "/opt/visual-studio-code/*",
                    "/snap/code/*",
                    "~/.vscode-server/*",
                ),
                "darwin": (
                    "/Applications/Visual Studio Code.app/Contents/*",
                    "/Applications/Visual Studio Code - Insiders.app/Contents/*",
                ),
                "win32": ("*\\Microsoft VS Code\\*",),
            },
            aliases=("vscode", "visual studio code", "Visual Studio Code"),
        ),
        AgentProfile(
            name="windsurf",
            display="Windsurf",
            names=("windsurf", "Windsurf"),
            exe_globs={
                "linux": ("/usr/share/windsurf/*", "/opt/Windsurf/*", "/opt/windsurf/*"),
                "darwin": ("/Applications/Windsurf.app/Contents/*",),
                "win32": ("*\\Programs\\Windsurf\\*",),
            },
            aliases=("windsurf", "codeium", "windsurf-client"),
        ),
    )
}
