"""Resource limits: the broker's file-descriptor budget and the HTTP front end's caps.

libzmq aborts the whole process when its ipc listener's accept() hits EMFILE, so every other
holder of file descriptors is capped well below RLIMIT_NOFILE.

Rules:
- At start the soft RLIMIT_NOFILE is raised to the hard limit.
- Admitted HTTP connections take at most a quarter of the soft limit. Beyond the caps a few
  more get a 503, and the rest are reset as soon as they are accepted; accept() takes at most
  ACCEPT_BATCH connections per event-loop turn, so those in flight stay bounded too. The rest
  is for the ipc socket's peers, files and the runtime.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, replace

log = logging.getLogger("apm.broker.limits")

# connections over the cap that still get a 503 answer; beyond these they are reset at accept
OVERFLOW = 16
RETRY_AFTER_SECONDS = 5
# a connection that has sent nothing this long after accept is closed
FIRST_REQUEST_SECONDS = 10.0
# the listen() backlog, which is also how many connections asyncio accepts per loop turn
ACCEPT_BATCH = 64
# on macOS the hard limit may be "unlimited", which setrlimit refuses for the soft one
_FALLBACK_CEILING = 10240


@dataclass(frozen=True)
class HttpLimits:
    """[http] in config.toml: caps on concurrent connections and MCP sessions."""

    max_connections: int = 64
    max_connections_per_uid: int = 32
    max_sessions: int = 64
    max_sessions_per_uid: int = 32
    session_idle_minutes: float = 10.0

    def check(self) -> None:
        for name in ("max_connections", "max_connections_per_uid", "max_sessions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= 100_000):
                raise ValueError(f"http.{name} must be a whole number from 1 to 100000")
        if not (isinstance(self.max_sessions_per_uid, int) and self.max_sessions_per_uid >= 1):
            raise ValueError("http.max_sessions_per_uid must be a whole number from 1")
        if not 0 < self.session_idle_minutes <= 24 * 60:
            raise ValueError("http.session_idle_minutes must be more than 0 and at most 1440")

    def within(self, nofile: int) -> HttpLimits:
        """These caps, lowered where needed so that HTTP holds at most a quarter of `nofile`."""
        budget = max(2, nofile // 4)
        total = min(self.max_connections, budget)
        fitted = replace(
            self,
            max_connections=total,
            max_connections_per_uid=min(self.max_connections_per_uid, total),
            max_sessions_per_uid=min(self.max_sessions_per_uid, self.max_sessions),
        )
        if fitted.max_connections != self.max_connections:
            log.warning(
                "http.max_connections lowered from %d to %d to stay within the open-file "
                "limit (%d)",
                self.max_connections,
                total,
                nofile,
            )
        return fitted


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, _FALLBACK_CEILING)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else _FALLBACK_CEILING
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        log.warning("could not raise the open-file limit above %d", soft)
        return soft
    return target


def current_nofile() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else _FALLBACK_CEILING
