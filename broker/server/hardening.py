"""Process hardening applied when the broker starts: no core dumps, no ptrace, private files."""

from __future__ import annotations

import contextlib
import os
import resource
import sys

from broker.core.libc import libc
from broker.wire.protocol import Hardening

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PT_DENY_ATTACH = 31  # macOS ptrace request


def apply() -> None:
    os.umask(0o077)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    lib = libc()
    if lib is None:
        return
    if sys.platform.startswith("linux"):
        lib.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    elif sys.platform == "darwin":
        lib.ptrace(PT_DENY_ATTACH, 0, None, 0)


def report(mlocked: bool) -> Hardening:
    dumpable: bool | None = None
    lib = libc()
    if lib is not None and sys.platform.startswith("linux"):
        dumpable = bool(lib.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    try:
        core_limit: int | None = resource.getrlimit(resource.RLIMIT_CORE)[1]
    except (ValueError, OSError):
        core_limit = None
    return Hardening(dumpable=dumpable, core_limit=core_limit, mlocked=mlocked)
