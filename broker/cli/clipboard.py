"""`--clip`: copy a secret to the clipboard and clear it after N seconds, if it still holds it.

Rules:
- The value reaches the clipboard tool on its stdin, never in argv.
- The clearer is a detached process that gets the value's SHA-256 on stdin, never the value:
  neither its argv nor its memory holds the secret. It clears only when the clipboard's
  content still hashes to that digest, so something the person copied since is left alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from broker.wire.errors import ExternalToolMissing, InvalidParameters

TOOL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Tool:
    name: str
    copy: tuple[str, ...]
    paste: tuple[str, ...]
    clear: tuple[str, ...] | None  # None: clear by copying an empty string


TOOLS = (
    # (tool, environment variable that says its display server is there)
    (
        Tool("wl-copy", ("wl-copy",), ("wl-paste", "--no-newline"), ("wl-copy", "--clear")),
        "WAYLAND_DISPLAY",
    ),
    (
        Tool(
            "xclip",
            ("xclip", "-selection", "clipboard", "-in"),
            ("xclip", "-selection", "clipboard", "-out"),
            None,
        ),
        "DISPLAY",
    ),
    (
        Tool(
            "xsel",
            ("xsel", "--clipboard", "--input"),
            ("xsel", "--clipboard", "--output"),
            ("xsel", "--clipboard", "--clear"),
        ),
        "DISPLAY",
    ),
    (Tool("pbcopy", ("pbcopy",), ("pbpaste",), None), ""),
)


def find_tool() -> Tool:
    for tool, needs in TOOLS:
        if needs and not os.environ.get(needs):
            continue
        if not needs and sys.platform != "darwin":
            continue
        if shutil.which(tool.copy[0]) and shutil.which(tool.paste[0]):
            return tool
    raise ExternalToolMissing(
        "no clipboard tool found",
        hint="install wl-clipboard (Wayland), xclip or xsel (X11); macOS has pbcopy; "
        'or print the value with "apm get NAME"',
    )


def _run(argv: tuple[str, ...], data: bytes | None) -> bytes:
    try:
        # stdout to a pipe only when reading: xclip and wl-copy fork a server that would
        # otherwise hold the pipe open and hang us
        proc = subprocess.run(
            argv,
            input=data if data is not None else b"",
            stdout=subprocess.PIPE if data is None else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TOOL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExternalToolMissing(f"the clipboard tool {argv[0]} failed to run") from exc
    if proc.returncode != 0:
        raise ExternalToolMissing(f"the clipboard tool {argv[0]} failed (exit {proc.returncode})")
    return proc.stdout or b""


def copy(tool: Tool, value: bytes) -> None:
    _run(tool.copy, value)


def paste(tool: Tool) -> bytes:
    return _run(tool.paste, None)


def clear(tool: Tool) -> None:
    if tool.clear is not None:
        _run(tool.clear, b"")
    else:
        _run(tool.copy, b"")


def clear_if_unchanged(tool: Tool, digest: str) -> bool:
    """Clear the clipboard if it still holds the value whose SHA-256 is `digest`."""
    try:
        current = paste(tool)
    except ExternalToolMissing:
        return False
    if hashlib.sha256(current).hexdigest() != digest:
        return False
    clear(tool)
    return True


def copy_and_schedule_clear(value: str, seconds: int) -> None:
    if seconds < 0:
        raise InvalidParameters("--clear-after must be 0 or more seconds")
    tool = find_tool()
    data = value.encode()
    copy(tool, data)
    digest = hashlib.sha256(data).hexdigest()
    if seconds:
        subprocess.Popen(
            [sys.executable, "-m", "broker.cli.clipboard", tool.name, str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives this command and the terminal's Ctrl-C
            close_fds=True,
        ).communicate(digest.encode() + b"\n", timeout=TOOL_TIMEOUT)
        sys.stderr.write(f"apm: copied to the clipboard; it will be cleared in {seconds} s\n")
    else:
        sys.stderr.write("apm: copied to the clipboard (not cleared automatically)\n")


def _clearer(argv: list[str]) -> int:
    """The detached clearer: argv = [tool name, seconds]; the digest arrives on stdin."""
    name, seconds = argv[0], int(argv[1])
    digest = sys.stdin.readline().strip()
    sys.stdin.close()
    if os.fork():  # let the parent's communicate() return at once
        return 0
    tool = next(t for t, _ in TOOLS if t.name == name)
    time.sleep(seconds)
    clear_if_unchanged(tool, digest)
    return 0


if __name__ == "__main__":
    sys.exit(_clearer(sys.argv[1:]))
