"""Who is on the other end of a connection, as the kernel reports it (never as it says).

A plain dataclass, apart from the transports that fill it in: dispatch, the MCP host and the
HTTP endpoint use it without loading zmq.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int | None  # None where the platform does not report it (macOS ipc, other uids)
