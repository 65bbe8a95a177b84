"""The kernel's word on who owns the client end of a loopback TCP connection (tcp_peers).

Real sockets on loopback: the netlink (sock_diag) lookup and the /proc/net/tcp table must name
the same uid and inode, the inode must be the socket's own, and anything that is not one live
client end (a closed connection, a TIME_WAIT entry, an ambiguous table) has no owner.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from broker.server import http, tcp_peers
from broker.server.limits import OVERFLOW, HttpLimits
from broker.server.tcp_peers import (
    NetlinkUnavailable,
    SocketOwner,
    diag_owner,
    find_owner,
    parse_owner,
    pids_holding,
    table_owner,
)


def pair(family: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen(4)
    cli = socket.create_connection(srv.getsockname()[:2])
    acc, _ = srv.accept()
    return srv, cli, acc


@pytest.fixture(
    params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"), (socket.AF_INET6, "::")]
)
def conn(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    family, host = request.param
    try:
        srv, cli, acc = pair(family, host)
    except OSError:
        pytest.skip(f"no {host} here")
    yield cli, acc
    for s in (srv, cli, acc):
        s.close()


def ends(acc: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    """(client, server) as the accepting side sees them (the broker's view)."""
    peer, local = acc.getpeername(), acc.getsockname()
    return (peer[0], peer[1]), (local[0], local[1])


def test_netlink_and_the_proc_table_name_the_client_sockets_own_uid_and_inode(
    conn: tuple[socket.socket, socket.socket],
) -> None:
    cli, acc = conn
    client, server = ends(acc)
    expected = SocketOwner(uid=os.getuid(), inode=os.fstat(cli.fileno()).st_ino)
    assert diag_owner(client, server) == expected
    assert table_owner(client, server) == expected
    assert find_owner(client, server) == expected
    # never the accepting side's own socket
    assert expected.inode != os.fstat(acc.fileno()).st_ino


def test_the_process_holding_the_client_socket_is_found_by_its_inode(
    conn: tuple[socket.socket, socket.socket],
) -> None:
    cli, _ = conn
    assert pids_holding(os.fstat(cli.fileno()).st_ino) == [os.getpid()]


def test_a_closed_connection_and_an_unknown_port_have_no_owner() -> None:
    srv, cli, acc = pair(socket.AF_INET, "127.0.0.1")
    try:
        client, server = ends(acc)
        cli.close()  # the client end goes to FIN_WAIT/TIME_WAIT: inode 0 or gone
        acc.close()
        assert find_owner(client, server) is None
        assert table_owner(client, server) is None
        assert find_owner(("127.0.0.1", 1), server) is None
    finally:
        srv.close()


def test_the_proc_table_is_used_when_netlink_is_not_allowed(
    monkeypatch: pytest.MonkeyPatch, conn: tuple[socket.socket, socket.socket]
) -> None:
    cli, acc = conn

    def refuse(*_: object) -> None:
        raise NetlinkUnavailable("filtered")

    monkeypatch.setattr(tcp_peers, "_diag_query", refuse)
    monkeypatch.setattr(tcp_peers, "_netlink_ok", True)
    assert find_owner(*ends(acc)) == SocketOwner(os.getuid(), os.fstat(cli.fileno()).st_ino)


def _line(local: str, remote: str, state: str, uid: int, inode: int) -> str:
    return (
        f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1"
    )


V4 = f"{struct.unpack('=I', socket.inet_aton('127.0.0.1'))[0]:08X}"


def test_time_wait_entries_and_ambiguous_tables_have_no_owner() -> None:
    client, server = ("127.0.0.1", 40000), ("127.0.0.1", 8765)
    local, remote = f"{V4}:9C40", f"{V4}:223D"
    head = "  sl  local_address rem_address   st ...\n"
    live = _line(local, remote, "01", 1000, 4242)
    assert parse_owner([head + live, ""], client, server) == SocketOwner(1000, 4242)
    # a time-wait entry (uid 0, inode 0) must never pass for root's socket
    assert parse_owner([head + _line(local, remote, "06", 0, 0), ""], client, server) is None
    # the same socket listed twice while the table changed: still one owner
    assert parse_owner([head + live + "\n" + live, ""], client, server) == SocketOwner(1000, 4242)
    # two different sockets for one 4-tuple: refuse rather than guess
    other = _line(local, remote, "01", 1001, 4343)
    assert parse_owner([head + live + "\n" + other, ""], client, server) is None
    # the reversed tuple (the server's own accepted socket) is not the client end
    assert parse_owner([head + _line(remote, local, "01", 0, 7), ""], client, server) is None


# ------------------------------------------------------------------ admission at accept


def gate(
    monkeypatch: pytest.MonkeyPatch, owner: SocketOwner | None, allow_remote: bool = False
) -> http.ConnectionGate:
    """The accept-time gate, with the kernel's answer replaced by `owner`."""
    monkeypatch.setattr(http, "find_owner", lambda client, server: owner)
    limits = HttpLimits(max_connections=2, max_connections_per_uid=2)
    return http.ConnectionGate(limits, allow_remote=allow_remote)


LOCAL = ("127.0.0.1", 40000), ("127.0.0.1", 8765)


def test_a_connection_whose_owner_is_not_found_is_refused_even_with_allow_remote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert gate(monkeypatch, None).admit(*LOCAL) is None
    remote_ok = gate(monkeypatch, None, allow_remote=True)
    assert remote_ok.admit(*LOCAL) is None  # loopback: a local peer
    far = remote_ok.admit(("192.0.2.7", 40000), ("192.0.2.1", 8765))
    assert far is not None and far.owner is None  # a remote peer, only with --allow-remote


def test_a_connection_owned_by_another_uid_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    other = SocketOwner(uid=os.getuid() + 4343, inode=99)
    assert gate(monkeypatch, other).admit(*LOCAL) is None


def test_connections_over_the_cap_are_marked_for_503_then_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g = gate(monkeypatch, SocketOwner(uid=os.getuid(), inode=7))
    admitted = [g.admit(*LOCAL) for _ in range(2)]
    assert all(c is not None and not c.over_cap for c in admitted)
    busy = [g.admit(*LOCAL) for _ in range(OVERFLOW)]
    assert all(c is not None and c.over_cap for c in busy)
    assert g.admit(*LOCAL) is None
    g.release(admitted[0])
    again = g.admit(*LOCAL)
    assert again is not None and not again.over_cap
