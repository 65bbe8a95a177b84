"""Where an AI client's real executable is on this machine: what `apm mcp install` binds to.

The broker sees a client as the executable file of an ancestor of `apm-mcp` (/proc/<pid>/exe,
symlinks resolved). So the installer looks where each client is installed, resolves symlinks,
and keeps only native executables (a `#!` script runs as its interpreter, which would be the
ancestor instead). Places, in order: the client's command on PATH, npm's global prefix and
local `node_modules` (walking up from the current directory), and the native installer's
location. Stdlib only; nothing here trusts what a process says about itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CLAUDE_CODE_NPM = Path("node_modules/@anthropic-ai/claude-code/bin/claude.exe")


@dataclass(frozen=True)
class Found:
    path: str  # the real file (symlinks resolved)
    how: str  # where it was found, for the person
    follows_updates: bool = False  # a versioned location: bind the profile, not the file


def _native(path: Path) -> str | None:
    """The real path of `path` if it is an executable binary (not a script), else None."""
    try:
        real = path.resolve(strict=True)
        if not (real.is_file() and os.access(real, os.X_OK)):
            return None
        with open(real, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head.startswith(b"#!"):
        return None
    return str(real)


def _npm_global_roots() -> list[Path]:
    roots: list[Path] = []
    env = os.environ
    prefix = env.get("NPM_CONFIG_PREFIX") or env.get("npm_config_prefix")
    if prefix:
        roots.append(Path(prefix))
    npm = shutil.which("npm")
    if npm is not None:
        try:
            r = subprocess.run(
                [npm, "prefix", "-g"], capture_output=True, text=True, timeout=15, check=False
            )
            if r.returncode == 0 and r.stdout.strip():
                roots.append(Path(r.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    home = Path.home()
    roots += [Path("/usr/local"), Path("/usr"), home / ".npm-global", home / ".local"]
    out: list[Path] = []
    for root in roots:
        for lib in (root / "lib", root):  # Unix prefixes keep packages in lib/node_modules
            if lib not in out:
                out.append(lib)
    return out


def _claude_code(cwd: Path) -> list[Found]:
    home = Path.home()
    found: list[Found] = []
    versions = home / ".local" / "share" / "claude" / "versions"

    def add(path: Path, how: str) -> None:
        real = _native(path)
        if real is not None and all(f.path != real for f in found):
            native = Path(real).parent == versions.resolve() if versions.exists() else False
            found.append(Found(real, how, follows_updates=native))

    on_path = shutil.which("claude")
    if on_path:
        add(Path(on_path), f"PATH ({on_path})")
    for root in _npm_global_roots():
        add(root / CLAUDE_CODE_NPM, f"npm global prefix ({root})")
    for d in (cwd, *cwd.parents):
        add(d / CLAUDE_CODE_NPM, f"npm local install ({d / 'node_modules'})")
    add(home / ".local" / "bin" / "claude", "native installer (~/.local/bin/claude)")
    if versions.is_dir():
        newest = sorted(versions.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in newest[:1]:
            add(p, "native installer (~/.local/share/claude/versions)")
    add(home / ".claude" / "local" / "claude", "local installer (~/.claude/local)")
    return found


# Electron apps: the process that spawns MCP servers runs the app binary itself
APP_BINARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "vscode": {
        "linux": (
            "/usr/share/code/code",
            "/opt/visual-studio-code/code",
            "/snap/code/current/usr/share/code/code",
        ),
        "darwin": ("/Applications/Visual Studio Code.app/Contents/MacOS/Electron",),
    },
    "cursor": {
        "linux": ("/usr/share/cursor/cursor", "/opt/Cursor/cursor", "/opt/cursor/cursor"),
        "darwin": ("/Applications/Cursor.app/Contents/MacOS/Cursor",),
    },
    "windsurf": {
        "linux": ("/usr/share/windsurf/windsurf", "/opt/Windsurf/windsurf"),
        "darwin": ("/Applications/Windsurf.app/Contents/MacOS/Electron",),
    },
    "claude-desktop": {
        "linux": ("/usr/lib/claude-desktop/node_modules/electron/dist/electron",),
        "darwin": ("/Applications/Claude.app/Contents/MacOS/Claude",),
    },
}


def resolve(client: str, cwd: Path | None = None) -> list[Found]:
    """Every executable of `client` found here, best first (empty: not installed here)."""
    if client == "claude-code":
        return _claude_code(cwd or Path.cwd())
    plat = "darwin" if sys.platform == "darwin" else "linux"
    out: list[Found] = []
    for candidate in APP_BINARIES.get(client, {}).get(plat, ()):
        real = _native(Path(candidate))
        if real is not None and all(f.path != real for f in out):
            out.append(Found(real, f"install location ({candidate})"))
    return out
