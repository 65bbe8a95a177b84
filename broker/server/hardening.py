"""Process hardening applied when the broker starts: no core dumps, no ptrace, private files."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import resource
import sys

from broker.wire.protocol import Hardening

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PT_DENY_ATTACH = 31  # macOS ptrace request


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """Resolved once: find_library runs `ldconfig -p` in a child process."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def apply() -> None:
    os.umask(0o077)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = _libc()
    if libc is None:
        return
    if sys.platform.startswith("linux"):
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    elif sys.platform == "darwin":
        libc.ptrace(PT_DENY_ATTACH, 0, None, 0)


def report(mlocked: bool) -> Hardening:
    dumpable: bool | None = None
    libc = _libc()
    if libc is not None and sys.platform.startswith("linux"):
        dumpable = bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    try:
        core_limit: int | None = resource.getrlimit(resource.RLIMIT_CORE)[1]
    except (ValueError, OSError):
        core_limit = None
    return Hardening(dumpable=dumpable, core_limit=core_limit, mlocked=mlocked)
