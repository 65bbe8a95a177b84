"""The C library, for the few calls Python does not wrap (mlock, prctl, ptrace): resolved once."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """Resolved once (find_library runs `ldconfig -p` in a child process); None if missing."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
