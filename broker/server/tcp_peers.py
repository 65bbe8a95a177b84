"""The local owner of the client end of a TCP connection, read from the kernel's socket tables.

`/proc/net/tcp` and `tcp6` list every socket in this network namespace with its owning uid and
inode, whoever owns it (an ordinary user sees other users' sockets there, though not their
processes). The pid behind an inode needs `/proc/<pid>/fd`, readable for our own uid's
processes (every process when we are root).

Rules:
- A connection is identified once, by its exact 4-tuple, while it is open: never by an address
  alone, never from a cache keyed by address.
- Not found, found twice, or only a TIME_WAIT/closed entry (inode 0): unknown. Callers refuse.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
from dataclasses import dataclass
from pathlib import Path

TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
# TIME_WAIT, CLOSE, LISTEN: not a live client end (a time-wait entry has uid 0 and inode 0)
_DEAD_STATES = {"06", "07", "0A"}


@dataclass(frozen=True)
class SocketOwner:
    """The kernel's word on who created a socket: its uid, and its inode (to find the pid)."""

    uid: int
    inode: int


def _hex_v4(ip: ipaddress.IPv4Address) -> str:
    # the kernel prints each 32-bit word of the address as a host-order integer
    return f"{struct.unpack('=I', ip.packed)[0]:08X}"


def _hex_v6(ip: ipaddress.IPv6Address) -> str:
    return "".join(f"{w:08X}" for w in struct.unpack("=4I", ip.packed))


def _forms(host: str) -> list[tuple[int, str]]:
    """(table index, hex address) for every way the kernel may list this address: an IPv4
    peer of a dual-stack socket is listed in tcp6 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        return [(0, _hex_v4(ip)), (1, _hex_v6(mapped))]
    return [(1, _hex_v6(ip))]


def parse_owner(
    tables: list[str], client: tuple[str, int], server: tuple[str, int]
) -> SocketOwner | None:
    """The owner of the socket whose local end is `client` and remote end is `server`, from
    the text of /proc/net/tcp and tcp6 (in that order); None unless exactly one is live."""
    found: list[SocketOwner] = []
    client_forms = _forms(client[0])
    server_forms = dict(_forms(server[0]))
    for index, local in client_forms:
        remote = server_forms.get(index)
        if remote is None or index >= len(tables):
            continue
        text = tables[index]
        key = f"{local}:{client[1]:04X} {remote}:{server[1]:04X} "
        at = text.find(key)
        while at >= 0:
            start = text.rfind("\n", 0, at) + 1
            end = text.find("\n", at)
            fields = text[start : end if end >= 0 else len(text)].split()
            at = text.find(key, at + len(key))
            if len(fields) < 10 or fields[3] in _DEAD_STATES:
                continue
            if fields[1] != key.split()[0] or fields[2] != key.split()[1]:
                continue
            with contextlib.suppress(ValueError):
                uid, inode = int(fields[7]), int(fields[9])
                if inode != 0:
                    found.append(SocketOwner(uid=uid, inode=inode))
    return found[0] if len(found) == 1 else None


def find_owner(client: tuple[str, int], server: tuple[str, int]) -> SocketOwner | None:
    """Look the connection up in this namespace's live socket tables (None: not found)."""
    tables: list[str] = []
    for path in TABLES:
        try:
            tables.append(path.read_text())
        except OSError:
            tables.append("")
    try:
        return parse_owner(tables, client, server)
    except ValueError:  # not an IP address
        return None


def pids_holding(inode: int, proc: Path = Path("/proc")) -> list[int]:
    """Every process with a file descriptor on socket `inode` that we may look at."""
    target = f"socket:[{inode}]"
    pids: list[int] = []
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return pids
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            with os.scandir(f"{entry.path}/fd") as fds:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) == target:
                            pids.append(int(entry.name))
                            break
        except OSError:  # gone, or not ours to look at
            continue
    return sorted(pids)
