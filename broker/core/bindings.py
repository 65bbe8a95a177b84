"""What the kernel says about a peer: its process ancestry, this host's identity, agent profiles.

Rules:
- Only kernel-reported facts count: the peer pid from SO_PEERCRED, and each ancestor's pid,
  create_time and executable path as read by psutil (/proc/<pid>/exe is a kernel link; a
  process name is self-chosen and only ever used for display).
- Ancestry is cached per (pid, create_time): a pid that is reused gets a new create_time and
  therefore a fresh walk.
- The walk is an injectable seam (`walk`), so tests can present a reused pid without waiting
  for the kernel to recycle one.
- Executable paths match profile patterns segment by segment: `*` never crosses `/`; only a
  leading `**` spans directories (npm installs live under any prefix). A process whose
  executable was deleted or replaced after it started matches nothing (`exe_problem`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
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
                ct = create_time(proc.pid)  # one base with the per-use check's values
                if ct is None:
                    break
                name = proc.name()
                exe = _exe_of(proc)
                parent = proc.parent()
        except psutil.Error:
            break
        chain.append(Proc(pid=proc.pid, create_time=ct, name=name, exe=exe))
        proc = parent
    return tuple(chain)


def _exe_of(proc: psutil.Process) -> str:
    """The file a process runs, from the kernel only ("" when it cannot be read).

    psutil's exe() falls back to argv[0] when /proc/<pid>/exe is unreadable, and argv[0] is
    whatever the process says: a non-dumpable process started with `exec -a /usr/bin/claude`
    would pass for that file. On Linux the link alone is trusted.
    """
    if sys.platform.startswith("linux"):
        try:
            target = os.readlink(f"/proc/{proc.pid}/exe")
        except OSError:
            return ""
        return target.removesuffix(" (deleted)")
    try:
        return str(proc.exe())
    except psutil.Error:
        return ""


_LINUX_PROC = sys.platform.startswith("linux") and os.path.isdir("/proc/self")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_boot_time: float | None = None


def _booted_at() -> float:
    """The boot time (epoch seconds) read once per process: a process's create_time is its
    start in clock ticks since boot plus this, so every value this process computes shares one
    base even if the wall clock is stepped later (psutil re-reads it on each call)."""
    global _boot_time
    if _boot_time is None:
        _boot_time = float(psutil.boot_time())
    return _boot_time


def create_time(pid: int) -> float | None:
    """When `pid` started (epoch seconds), or None if there is no such process. It runs on
    every session check, so on Linux it is one read of /proc/<pid>/stat (about 12 µs, where
    psutil.Process(pid).create_time() costs about 40: a Process object and /proc/stat's
    btime on every call); the kernel's starttime field, as psutil reads it."""
    if pid <= 0:
        return None
    if not _LINUX_PROC:
        try:
            return float(psutil.Process(pid).create_time())
        except psutil.Error:
            return None
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:  # the name (field 2) may hold spaces and ")": fields start after its last ")"
        fields = data[data.rindex(b")") + 2 :].split(b" ", 20)
        return int(fields[19]) / _CLOCK_TICKS + _booted_at()
    except (ValueError, IndexError):
        return None


class AncestryCache:
    """Ancestry per (pid, create_time), bounded LRU."""

    def __init__(
        self,
        walk: Callable[[int], Ancestry] = walk_ancestry,
        create_time_of: Callable[[int], float | None] = create_time,
        size: int = 4096,
        exe_check: Callable[[int, str], str | None] | None = None,
        identity_change: Callable[[dict[str, object], int, str], str | None] | None = None,
    ) -> None:
        self.walk = walk
        self.create_time_of = create_time_of
        # checked fresh on every use, never cached: a file can be swapped under a running pid;
        # a fake process table (tests) has no files behind it
        real = walk is walk_ancestry
        self.exe_check = exe_check or (exe_problem if real else _no_problem)
        self.identity_change = identity_change or (
            _identity_change if real else _no_identity_change
        )
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


def path_matches(pattern: str, path: str) -> bool:
    """`path` matches `pattern` segment by segment (`/`, or `\\` in a Windows pattern).

    `*`, `?` and `[...]` match within one segment and never across a separator; a leading `**`
    segment stands for any number of leading directories. So `~/.vscode-server/*` matches
    `~/.vscode-server/evil` but `/usr/share/code/code` matches only itself.
    """
    sep = "\\" if "\\" in pattern else "/"
    want, have = pattern.split(sep), path.split(sep)
    if want and want[0] == "**":
        want = want[1:]
        if len(have) < len(want) + 1:
            return False
        have = have[len(have) - len(want) :]
    elif len(want) != len(have):
        return False
    return all(fnmatch.fnmatchcase(h, w) for w, h in zip(want, have, strict=True))


def exe_problem(pid: int, exe: str) -> str | None:
    """Why `exe` is not (any more) the file process `pid` runs: None when it is.

    /proc/<pid>/exe links to the inode the process was started from, even once that file is
    deleted (its link then ends in " (deleted)", which psutil strips) or its path names a new
    file (an update, or an attacker's swap); stat() through the link reaches that inode.
    """
    if not sys.platform.startswith("linux"):
        return None
    link = f"/proc/{pid}/exe"
    try:
        target = os.readlink(link)
        running = os.stat(link)
    except OSError:
        return "its executable cannot be read"
    if target.endswith(" (deleted)"):
        return f"its executable {exe} was deleted after it started"
    try:
        now = os.stat(exe)
    except OSError:
        return f"its executable {exe} is gone"
    if (now.st_dev, now.st_ino) != (running.st_dev, running.st_ino):
        return f"its executable {exe} was replaced after it started"
    return None


@dataclass(frozen=True)
class ExeIdentity:
    """What `--agent-exe PATH --agent-exe-pin stat|sha256` pinned about that file."""

    mode: str  # "stat" or "sha256"
    dev: int = 0
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in (0, "")}


def file_identity(path: str, mode: str) -> ExeIdentity:
    """The identity of the regular file at `path` (raises OSError / ValueError)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    if mode == "sha256":
        # hashed once per file version (Claude Code's executable is ~400 MB), not per request
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        known = _SHA256_CACHE.get(key)
        if known is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            known = _SHA256_CACHE[key] = digest.hexdigest()
            if len(_SHA256_CACHE) > 64:
                _SHA256_CACHE.pop(next(iter(_SHA256_CACHE)))
        return ExeIdentity("sha256", size=st.st_size, sha256=known)
    return ExeIdentity("stat", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_SHA256_CACHE: dict[tuple[int, int, int, int], str] = {}


def _no_problem(pid: int, exe: str) -> str | None:
    return None


def _no_identity_change(pinned: dict[str, object], pid: int, exe: str) -> str | None:
    return None


def _identity_change(pinned: dict[str, object], pid: int, exe: str) -> str | None:
    """How the file process `pid` runs differs from the pinned identity (None: it does not)."""
    mode = str(pinned.get("mode", "stat"))
    link = f"/proc/{pid}/exe" if sys.platform.startswith("linux") else exe
    try:
        now = file_identity(link, mode)
    except (OSError, ValueError):
        return "its executable cannot be read"
    fields = {k: v for k, v in pinned.items() if k in ExeIdentity.__dataclass_fields__}
    was = ExeIdentity(**fields)  # type: ignore[arg-type]
    if mode == "sha256":
        return None if now.sha256 == was.sha256 else "its sha256 differs from the pinned one"
    diffs = [
        f"{k} {getattr(was, k)} -> {getattr(now, k)}"
        for k in ("dev", "ino", "size", "mtime_ns")
        if getattr(was, k) != getattr(now, k)
    ]
    return "; ".join(diffs) or None


@dataclass(frozen=True)
class AgentProfile:
    """An AI client, recognised by the executable path of some ancestor of the peer."""

    name: str
    display: str
    names: tuple[str, ...]  # process names, for display and diagnostics only
    exe_globs: dict[str, tuple[str, ...]]  # platform -> executable path patterns (~ = home)
    aliases: tuple[str, ...]  # self-reported names (MCP clientInfo, APM_EPHEMERAL_AGENT)
    commands: tuple[str, ...] = ()  # names of the client's command on PATH, if it has one

    def globs(self, platform: str | None = None) -> tuple[str, ...]:
        plat = "darwin" if (platform or sys.platform) == "darwin" else "linux"
        if (platform or sys.platform) == "win32":
            plat = "win32"
        home = str(Path.home())
        return tuple(g.replace("~", home, 1) for g in self.exe_globs.get(plat, ()))

    def matches_path(self, exe: str) -> bool:
        return bool(exe) and any(path_matches(g, exe) for g in self.globs())

    def matches(self, proc: Proc) -> bool:
        """The process's executable path is one of the profile's (the caller also checks that
        the file is still the one the process runs: `AncestryCache.exe_check`)."""
        return self.matches_path(proc.exe)

    def accepts_declared(self, declared: str) -> bool:
        d = declared.strip().casefold()
        return any(d == a.casefold() or d.startswith(a.casefold() + "/") for a in self.aliases)


# Exact executable names at each client's known install locations (segment patterns, see
# `path_matches`). `~` is the home directory of the broker's user.
NPM_CLAUDE_CODE = "**/node_modules/@anthropic-ai/claude-code/bin/claude.exe"  # global or local
AGENT_PROFILES: dict[str, AgentProfile] = {
    p.name: p
    for p in (
        AgentProfile(
            name="claude-desktop",
            display="Claude Desktop",
            names=("claude", "Claude", "claude-desktop"),
            exe_globs={
                "linux": (  # community packages (claude-desktop-debian and the like)
                    "/usr/lib/claude-desktop/node_modules/electron/dist/electron",
                    "/usr/lib/claude-desktop/claude-desktop",
                    "/opt/Claude/claude",
                    "/opt/Claude/claude-desktop",
                    "/usr/bin/claude-desktop",
                ),
                "darwin": (
                    "/Applications/Claude.app/Contents/MacOS/Claude",
                    "/Applications/Claude.app/Contents/Frameworks/Claude Helper*.app/Contents/"
                    "MacOS/Claude Helper*",
                ),
                "win32": (
                    "**\\AnthropicClaude\\app-*\\claude.exe",
                    "**\\AnthropicClaude\\claude.exe",
                ),
            },
            aliases=("claude-desktop", "claude-ai", "Claude Desktop"),
        ),
        AgentProfile(
            name="claude-code",
            display="Claude Code",
            names=("claude",),
            exe_globs={
                "linux": (
                    "~/.local/share/claude/versions/[0-9]*",  # native installer
                    "~/.local/bin/claude",
                    "~/.claude/local/claude",
                    NPM_CLAUDE_CODE,
                    "/usr/local/bin/claude",
                    "/usr/bin/claude",
                ),
                "darwin": (
                    "~/.local/share/claude/versions/[0-9]*",
                    "~/.local/bin/claude",
                    "~/.claude/local/claude",
                    NPM_CLAUDE_CODE,
                    "/opt/homebrew/Caskroom/claude-code/*/claude",
                    "/usr/local/Caskroom/claude-code/*/claude",
                    "/opt/homebrew/bin/claude",
                    "/usr/local/bin/claude",
                ),
                "win32": (
                    "**\\.local\\bin\\claude.exe",
                    "**\\node_modules\\@anthropic-ai\\claude-code\\bin\\claude.exe",
                ),
            },
            aliases=("claude-code", "claude code"),
            commands=("claude",),
        ),
        AgentProfile(
            name="cursor",
            display="Cursor",
            names=("cursor", "Cursor", "Cursor Helper"),
            exe_globs={
                "linux": (
                    "/usr/share/cursor/cursor",
                    "/opt/Cursor/cursor",
                    "/opt/cursor/cursor",
                    "~/.local/share/cursor/cursor",
                    "~/.cursor-server/bin/*/node",  # remote
                    "~/.cursor-server/cli/servers/*/server/node",
                ),
                "darwin": (
                    "/Applications/Cursor.app/Contents/MacOS/Cursor",
                    "/Applications/Cursor.app/Contents/Frameworks/Cursor Helper*.app/Contents/"
                    "MacOS/Cursor Helper*",
                ),
                "win32": ("**\\Programs\\cursor\\Cursor.exe",),
            },
            aliases=("cursor", "cursor-vscode"),
            commands=("cursor",),
        ),
        AgentProfile(
            name="vscode",
            display="Visual Studio Code",
            names=("code", "Code", "Code Helper", "code-insiders"),
            exe_globs={
                "linux": (
                    "/usr/share/code/code",
                    "/usr/share/code-insiders/code-insiders",
                    "/opt/visual-studio-code/code",
                    "/snap/code/*/usr/share/code/code",
                    "~/.vscode-server/bin/*/node",  # remote (older layout)
                    "~/.vscode-server/cli/servers/*/server/node",
                ),
                "darwin": (
                    "/Applications/Visual Studio Code.app/Contents/MacOS/Electron",
                    "/Applications/Visual Studio Code.app/Contents/Frameworks/Code Helper*.app/"
                    "Contents/MacOS/Code Helper*",
                    "/Applications/Visual Studio Code - Insiders.app/Contents/MacOS/Electron",
                ),
                "win32": ("**\\Microsoft VS Code\\Code.exe",),
            },
            aliases=("vscode", "visual studio code", "Visual Studio Code"),
            commands=("code", "code-insiders"),
        ),
        AgentProfile(
            name="windsurf",
            display="Windsurf",
            names=("windsurf", "Windsurf"),
            exe_globs={
                "linux": (
                    "/usr/share/windsurf/windsurf",
                    "/opt/Windsurf/windsurf",
                    "/opt/windsurf/windsurf",
                ),
                "darwin": (
                    "/Applications/Windsurf.app/Contents/MacOS/Electron",
                    "/Applications/Windsurf.app/Contents/Frameworks/Windsurf Helper*.app/"
                    "Contents/MacOS/Windsurf Helper*",
                ),
                "win32": ("**\\Programs\\Windsurf\\Windsurf.exe",),
            },
            aliases=("windsurf", "codeium", "windsurf-client"),
            commands=("windsurf",),
        ),
    )
}
