"""The broker's transport: the Unix ZMTP ROUTER (ipc:// on Linux) and the libzmq fallback.

Peers here are real libzmq DEALERs (pyzmq, as the CLI uses) and the shim's own ZMTP link, so
both ends of each pairing are the ones that run in production.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.server.peer import Peer
from broker.server.transport import HARD_FRAME_CAP, Receiver, Transport, UnixTransport
from broker.wire import zmtp

from .threaded_transport import dealer, threaded_transport


@contextlib.contextmanager
def echo_server(tmp_path: Path, seen: list[Peer | None] | None = None) -> Iterator[Transport]:
    """A Transport on its own event loop (a thread) that echoes every message's frames."""

    def receiver_for(transport: Transport) -> Receiver:
        def receiver(identity: bytes, frames: list[bytes], peer: Peer | None) -> None:
            if seen is not None:
                seen.append(peer)
            transport.send_frames(identity, *frames)

        return receiver

    with threaded_transport(tmp_path, receiver_for) as transport:
        yield transport


@pytest.mark.parametrize("impl", ["unix", "libzmq"])
def test_a_libzmq_dealer_is_served_with_its_kernel_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    if impl == "libzmq":
        monkeypatch.setenv("APM_BROKER_TRANSPORT", "libzmq")
    seen: list[Peer | None] = []
    with echo_server(tmp_path, seen) as transport:
        assert isinstance(transport, UnixTransport) is (impl == "unix")
        ctx, sock = dealer(transport.addr)
        try:
            big = os.urandom(300_000)  # long frames, more than one socket buffer
            for msg in ([b"one"], [b"mcp", b"conn", b"{}"], [b"", big]):
                sock.send_multipart(msg)
                assert sock.poll(5000)
                assert sock.recv_multipart() == msg
        finally:
            sock.close(linger=0)
            ctx.term()
    assert seen and all(p == Peer(os.getuid(), os.getgid(), os.getpid()) for p in seen)


def test_a_frame_over_the_hard_cap_ends_that_connection_only(tmp_path: Path) -> None:
    with echo_server(tmp_path) as transport:
        assert isinstance(transport, UnixTransport)
        path = str(transport.socket_path)
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rogue.connect(path)
        rogue.sendall(zmtp.GREETING + zmtp.ready(b"DEALER"))
        rogue.sendall(zmtp.frame_head(0, HARD_FRAME_CAP + 1))  # only the head: the claim is enough
        rogue.settimeout(5)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := rogue.recv(4096):
                data += chunk
        assert data.startswith(zmtp.GREETING)  # answered the handshake, then hung up
        rogue.close()
        ctx, sock = dealer(transport.addr)  # everyone else is still served
        try:
            sock.send(b"still here")
            assert sock.poll(5000)
            assert sock.recv() == b"still here"
        finally:
            sock.close(linger=0)
            ctx.term()


@pytest.mark.parametrize(
    "opening",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        zmtp.SIGNATURE + bytes([3, 0]) + b"CURVE".ljust(20, b"\x00") + bytes(32),
        zmtp.GREETING + zmtp.ready(b"PUB"),
        zmtp.GREETING + zmtp.encode([b"a message before READY"]),
    ],
    ids=["not-zmtp", "curve", "pub-socket", "no-handshake"],
)
def test_a_peer_that_breaks_the_protocol_is_dropped_and_never_reaches_the_receiver(
    tmp_path: Path, opening: bytes
) -> None:
    seen: list[Peer | None] = []
    with echo_server(tmp_path, seen) as transport:
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rogue.connect(str(transport.socket_path))
        rogue.sendall(opening)
        rogue.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while rogue.recv(4096):
                pass  # until the broker hangs up
        rogue.close()
        ctx, sock = dealer(transport.addr)
        try:
            sock.send(b"fine")
            assert sock.poll(5000)
            assert sock.recv() == b"fine"
        finally:
            sock.close(linger=0)
            ctx.term()
    assert len(seen) == 1  # only the well-behaved peer's message


def test_a_peer_that_stops_reading_does_not_stall_the_others(tmp_path: Path) -> None:
    """Replies a peer does not read wait in its own buffer (up to a cap, then are dropped as
    at a ROUTER's high-water mark); other peers are answered meanwhile."""
    with echo_server(tmp_path) as transport:
        assert isinstance(transport, UnixTransport)
        lazy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lazy.connect(str(transport.socket_path))
        lazy.sendall(zmtp.GREETING + zmtp.ready(b"DEALER"))
        payload = b"x" * 60_000
        lazy.sendall(zmtp.encode([payload]) * 200)  # 12 MB of echoes it never reads
        ctx, sock = dealer(transport.addr)
        try:
            for i in range(20):
                sock.send(b"%d" % i)
                assert sock.poll(5000)
                assert sock.recv() == b"%d" % i
        finally:
            sock.close(linger=0)
            ctx.term()
            lazy.close()


def test_the_shims_link_and_the_brokers_transport_talk(tmp_path: Path) -> None:
    """Both ends in Python: the shim's ZMTP link against the broker's Unix transport."""
    from shim.zmtp import Link

    seen: list[Peer | None] = []
    got: list[list[bytes]] = []
    up: list[Any] = []
    with echo_server(tmp_path, seen) as transport:
        link = Link(str(transport.socket_path), got.append, lambda: up.append(1), lambda: None)
        try:
            for _ in range(100):
                if up:
                    break
                link.wait(None, 0.05)
            assert up
            assert link.send((b"mcp", b"c", b"x" * 100_000))
            for _ in range(100):
                if got:
                    break
                link.wait(None, 0.05)
            assert got == [[b"mcp", b"c", b"x" * 100_000]]
        finally:
            link.close()
    assert seen == [Peer(os.getuid(), os.getgid(), os.getpid())]


def test_a_connection_that_never_completes_its_handshake_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(UnixTransport, "HANDSHAKE_SECONDS", 0.2)
    with echo_server(tmp_path) as transport:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(transport.socket_path))
        silent.settimeout(5)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := silent.recv(4096):  # the broker's greeting, then its hang-up
                data += chunk
        silent.close()
        assert data.startswith(zmtp.GREETING)
        assert isinstance(transport, UnixTransport)
        assert not transport._conns  # nothing left behind
