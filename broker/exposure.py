"""What other processes can read of this one: the dumpable flag and the initial environment
block, for the two programs that hold a session token from their environment (`apm run` and
the `apm-mcp` shim).

Why both: `/proc/<pid>/environ` shows the *initial* environment block, the memory between
mm->env_start and mm->env_end that execve copied in; `os.environ.pop()`/`unsetenv` only drop
libc's pointer to a string in it. So the token stays readable by every process of the same
user (a child: `/proc/$PPID/environ`; a sibling such as the AI client's shell tool) until the
bytes are overwritten. PR_SET_DUMPABLE 0 makes /proc/<pid>/{environ,mem,maps} root-owned, so
other processes of the same uid can't read them at all; root ignores it, which is why the
scrub is needed as well.

Rules:
- Standard library only and cheap to import: the shim's cold start is part of its contract
  (ctypes loads only when a scrub or prctl actually runs, on Linux).
- Never raises: on other platforms, or if /proc is not mounted, it does what it can and says
  what it did in its return value.
"""

from __future__ import annotations

import os
import sys

PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): no core dumps, and /proc/<pid>/environ, mem and maps become
    unreadable to other processes of this uid (not to root). Reset by execve, so a child
    started afterwards is dumpable again. True if the flag is now set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _env_block_bounds() -> tuple[int, int] | None:
    """(env_start, env_end) from /proc/self/stat (fields 50 and 51, Linux >= 3.5)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # field 2 (comm) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        start, end = int(fields[50 - 3]), int(fields[51 - 3])
    except (IndexError, ValueError):
        return None
    return (start, end) if 0 < start < end else None


def scrub_environ(name: str) -> bool:
    """Remove `name` from os.environ (and libc's environ) and overwrite every `name=value`
    string in this process's initial environment block with NUL bytes, so /proc/<pid>/environ
    no longer shows it. True if a copy in the block was overwritten."""
    os.environ.pop(name, None)  # also unsetenv: libc drops its pointer before the bytes go
    if not sys.platform.startswith("linux"):
        return False
    bounds = _env_block_bounds()
    if bounds is None:
        return False
    import ctypes

    start, end = bounds
    block = ctypes.string_at(start, end - start)
    prefix = name.encode() + b"="
    found, offset = False, 0
    for entry in block.split(b"\0"):
        if entry.startswith(prefix):
            ctypes.memset(start + offset, 0, len(entry))
            found = True
        offset += len(entry) + 1
    return found
