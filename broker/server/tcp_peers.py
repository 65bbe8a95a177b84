"""The local owner of the client end of a TCP connection, read from the kernel's socket tables.

The kernel names the owning uid and the inode of every socket in this network namespace,
whoever owns it (an ordinary user sees other users' sockets, though not their processes): in
`/proc/net/tcp` and `tcp6` (uid column), and through the sock_diag netlink interface, which
`ss` uses and which looks one socket up by its exact 4-tuple. The netlink lookup is used
first: reading /proc/net/tcp costs ~25 ms with 2,000 sockets open (measured), which a
connection flood would turn into a stalled event loop. /proc/net/tcp is the fallback where
netlink is not allowed (a sandbox's address-family filter). The pid behind an inode needs
`/proc/<pid>/fd`, readable for our own uid's processes (every process when we are root).

Rules:
- A connection is identified once, by its exact 4-tuple, while it is open: never by an address
  alone, never from a cache keyed by address.
- Not found, found twice, or only a TIME_WAIT/closed entry (inode 0): unknown. Callers refuse.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("apm.broker.http")
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
    found: set[SocketOwner] = set()
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
                    found.add(SocketOwner(uid=uid, inode=inode))
    return found.pop() if len(found) == 1 else None


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")  # ports and addresses in network order
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie[2]
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode
_MSG = struct.Struct("=BBBB48sIIIII")


class NetlinkUnavailable(Exception):
    """sock_diag cannot be used here (not Linux, or netlink sockets are filtered)."""


def _diag_query(
    family: int, local: bytes, lport: int, remote: bytes, rport: int
) -> SocketOwner | None:
    sockid = _SOCKID.pack(lport, rport, local.ljust(16, b"\0"), remote.ljust(16, b"\0"))
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    body += _SOCKID_TAIL.pack(0, _NOCOOKIE, _NOCOOKIE)
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as exc:
        raise NetlinkUnavailable(str(exc)) from exc
    with nl:
        nl.settimeout(2.0)
        try:
            nl.sendto(msg + body, (0, 0))
            reply = nl.recv(8192)
        except OSError as exc:
            raise NetlinkUnavailable(str(exc)) from exc
    if len(reply) < _NLMSGHDR.size:
        return None
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
        if code in (0, -errno.ENOENT):
            return None
        raise NetlinkUnavailable(os.strerror(-code))
    if kind != SOCK_DIAG_BY_FAMILY or len(reply) < _NLMSGHDR.size + _MSG.size:
        return None
    _, state, _, _, _, _, _, _, uid, inode = _MSG.unpack_from(reply, _NLMSGHDR.size)
    if f"{state:02X}" in _DEAD_STATES or inode == 0:
        return None
    return SocketOwner(uid=uid, inode=inode)


def diag_owner(client: tuple[str, int], server: tuple[str, int]) -> SocketOwner | None:
    """The owner of the socket whose local end is `client` and remote end `server`, asked of
    the kernel by exact 4-tuple (sock_diag); raises NetlinkUnavailable when it cannot ask."""
    c = ipaddress.ip_address(client[0].split("%", 1)[0])
    s = ipaddress.ip_address(server[0].split("%", 1)[0])
    if isinstance(c, ipaddress.IPv6Address) and c.ipv4_mapped is not None:
        c = c.ipv4_mapped
    if isinstance(s, ipaddress.IPv6Address) and s.ipv4_mapped is not None:
        s = s.ipv4_mapped
    found: set[SocketOwner] = set()
    if isinstance(c, ipaddress.IPv4Address) and isinstance(s, ipaddress.IPv4Address):
        for family, cp, sp in (
            (socket.AF_INET, c.packed, s.packed),
            (socket.AF_INET6, _mapped(c), _mapped(s)),
        ):
            owner = _diag_query(family, cp, client[1], sp, server[1])
            if owner is not None:
                found.add(owner)
    elif isinstance(c, ipaddress.IPv6Address) and isinstance(s, ipaddress.IPv6Address):
        owner = _diag_query(socket.AF_INET6, c.packed, client[1], s.packed, server[1])
        if owner is not None:
            found.add(owner)
    return found.pop() if len(found) == 1 else None


def _mapped(ip: ipaddress.IPv4Address) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


_netlink_ok = True


def find_owner(
    client: tuple[str, int], server: tuple[str, int], attempts: int = 3
) -> SocketOwner | None:
    """Who owns the client end of this connection (None: not found, so refuse it)."""
    global _netlink_ok
    if _netlink_ok:
        try:
            return diag_owner(client, server)
        except ValueError:  # not an IP address
            return None
        except NetlinkUnavailable as exc:
            _netlink_ok = False
            log.warning("sock_diag unavailable (%s): reading /proc/net/tcp instead", exc)
    return table_owner(client, server, attempts)


def table_owner(
    client: tuple[str, int], server: tuple[str, int], attempts: int = 3
) -> SocketOwner | None:
    """Look the connection up in /proc/net/tcp and tcp6 (None: not found).

    The kernel writes these files a chunk at a time while sockets come and go, so under churn
    one read can miss a line (or show it twice: duplicates are the same inode and merge);
    a miss is read again, a few times, before the connection counts as unknown."""
    for _ in range(attempts):
        tables: list[str] = []
        for path in TABLES:
            try:
                tables.append(path.read_text())
            except OSError:
                tables.append("")
        try:
            owner = parse_owner(tables, client, server)
        except ValueError:  # not an IP address
            return None
        if owner is not None:
            return owner
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
